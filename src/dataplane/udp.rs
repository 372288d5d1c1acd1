//! The WireGuard UDP socket: dual-stack when the host has IPv6, with endpoints
//! kept in canonical form (IPv4 as IPv4) so logs and `wg show` read naturally.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::time::Duration;

/// How long a blocked receive waits before the loop re-checks for shutdown.
pub const RECV_TIMEOUT: Duration = Duration::from_millis(200);

pub struct Udp {
    sock: UdpSocket,
    v6: bool,
}

/// One UDP socket on `port`: IPv6 dual-stack (`v6`) or IPv4, with
/// `SO_REUSEPORT` when it is to share the port with the loop's other sockets.
fn bind_socket(port: u16, v6: bool, reuse: bool) -> io::Result<UdpSocket> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
        SockaddrIn6,
    };
    use std::os::fd::AsRawFd;
    let family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    if reuse {
        setsockopt(&fd, sockopt::ReusePort, &true)?;
    }
    if v6 {
        setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
        let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
        bind(fd.as_raw_fd(), &addr)?;
    } else {
        let addr = SockaddrIn::from(std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
        bind(fd.as_raw_fd(), &addr)?;
    }
    let sock = UdpSocket::from(fd);
    sock.set_read_timeout(Some(RECV_TIMEOUT))?;
    grow_buffers(&sock);
    Ok(sock)
}

impl Udp {
    /// Binds `port` on all addresses, IPv6 dual-stack when available.
    ///
    /// # Errors
    /// The port is in use or no socket can be made.
    pub fn bind(port: u16) -> io::Result<Udp> {
        Ok(Udp::bind_group(port, 1)?.remove(0))
    }

    /// Binds `n` (at least one) sockets to `port` (the first picks it when
    /// `port` is 0) with `SO_REUSEPORT`, one per receive worker. The kernel
    /// spreads senders over them by a hash of their address and port, so one
    /// peer's datagrams always reach the same socket, in order. The group is
    /// made by root before privileges are dropped, and Linux lets a socket
    /// join it only with the same owner, so no other local user can bind the
    /// port and take a share of the traffic.
    ///
    /// # Errors
    /// The port is in use or no socket can be made.
    pub fn bind_group(port: u16, n: usize) -> io::Result<Vec<Udp>> {
        let reuse = n > 1;
        let (first, v6) = match bind_socket(port, true, reuse) {
            Ok(s) => (s, true),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            Err(_) => (bind_socket(port, false, reuse)?, false),
        };
        let port = first.local_addr()?.port();
        let mut group = vec![Udp { sock: first, v6 }];
        for _ in 1..n {
            group.push(Udp {
                sock: bind_socket(port, v6, true)?,
                v6,
            });
        }
        Ok(group)
    }

    pub fn local_port(&self) -> io::Result<u16> {
        self.sock.local_addr().map(|a| a.port())
    }

    /// Receives up to [`RECV_BATCH`] datagrams with one `recvmmsg(2)`: it waits
    /// (up to [`RECV_TIMEOUT`]) for the first, then takes what is already queued.
    ///
    /// # Errors
    /// As `recvmmsg(2)`; a timeout is `WouldBlock`.
    pub fn recv_batch(&self, b: &mut RecvBatch) -> io::Result<usize> {
        for i in 0..RECV_BATCH {
            b.iovs[i] = libc::iovec {
                iov_base: b.bufs[i].as_mut_ptr().cast(),
                iov_len: b.bufs[i].len(),
            };
            let h = &mut b.hdrs[i];
            h.msg_hdr.msg_name = (&mut b.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut b.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points at buffers owned by `b` that outlive the
        // call, with their true lengths; the kernel writes at most that much.
        let n = unsafe {
            libc::recvmmsg(
                std::os::fd::AsRawFd::as_raw_fd(&self.sock),
                b.hdrs.as_mut_ptr(),
                RECV_BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            let h = &b.hdrs[i];
            b.lens[i] = h.msg_len as usize;
            b.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            b.srcs[i] = socket_addr(&b.addrs[i]);
        }
        Ok(n)
    }

    /// Sends `buf` as datagrams of `segment` bytes each (the last may be shorter)
    /// to `dst` with one `sendmsg(2)` (UDP GSO, `UDP_SEGMENT`): the kernel cuts
    /// them, so a 64 KiB burst costs one system call instead of forty-five.
    ///
    /// # Errors
    /// As `sendmsg(2)`; `EIO`/`EINVAL` where the kernel or device cannot do GSO.
    pub fn send_segments(&self, buf: &[u8], segment: u16, dst: SocketAddr) -> io::Result<()> {
        let dst = match dst {
            SocketAddr::V4(v4) if self.v6 => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            other => other,
        };
        let (mut storage, len) = sockaddr(dst);
        let mut iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // Room for one cmsghdr carrying a u16, aligned as the kernel expects.
        let mut control = [0u64; 4];
        // SAFETY: msghdr is a plain C struct; all-zero is a valid empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut storage as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = len;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure size computation.
        msg.msg_controllen =
            unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
        // SAFETY: msg_control points at `control`, which is large enough for one
        // cmsghdr with a u16 payload (checked by msg_controllen above).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
        }
        // SAFETY: every pointer in `msg` refers to a local that outlives the call;
        // the kernel only reads them.
        let n = unsafe { libc::sendmsg(std::os::fd::AsRawFd::as_raw_fd(&self.sock), &msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    #[inline]
    pub fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize> {
        match dst {
            SocketAddr::V4(v4) if self.v6 => self.sock.send_to(
                buf,
                SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
            ),
            _ => self.sock.send_to(buf, dst),
        }
    }
}

/// Where every datagram the gateway sends goes: [`Udp`] in the daemon, a
/// capture or a failing socket in tests. The packet loops, the handshake
/// worker and the timers all send through it, so the same code runs in tests
/// as in the daemon. Sends are best effort, like the network itself: a full
/// buffer drops the datagram, and the caller counts the error in its
/// [`super::IoTally`] rather than retrying.
pub trait DatagramIo {
    /// As [`Udp::recv_batch`]: waits a little for the first datagram, then
    /// takes what is queued, into `batch`.
    ///
    /// # Errors
    /// As `recvmmsg(2)`; nothing arrived in time is `WouldBlock`.
    fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize>;
    /// As [`Udp::send_segments`].
    ///
    /// # Errors
    /// As `sendmsg(2)`.
    fn send_segments(&self, buf: &[u8], segment: u16, dst: SocketAddr) -> io::Result<()>;
    /// As [`Udp::send_to`].
    ///
    /// # Errors
    /// As `sendto(2)`.
    fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize>;
}

impl DatagramIo for Udp {
    #[inline]
    fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        Udp::recv_batch(self, batch)
    }
    #[inline]
    fn send_segments(&self, buf: &[u8], segment: u16, dst: SocketAddr) -> io::Result<()> {
        Udp::send_segments(self, buf, segment, dst)
    }
    #[inline]
    fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize> {
        Udp::send_to(self, buf, dst)
    }
}

/// Datagrams taken from the socket per `recvmmsg(2)`.
pub const RECV_BATCH: usize = 64;
/// Receive buffer per datagram: a WireGuard message for a 1420-byte MTU is 1452
/// bytes; larger tunnel MTUs up to jumbo frames still fit, anything longer is
/// truncated and dropped as malformed.
pub const DATAGRAM_BUF: usize = 9216;

/// Buffers and headers for one `recvmmsg(2)` call, allocated once per loop.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    lens: Vec<usize>,
    srcs: Vec<Option<SocketAddr>>,
    truncated: Vec<bool>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for
        // which all-zero bytes are a valid (empty) value.
        let zeroed_addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let zeroed_hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        RecvBatch {
            bufs: vec![vec![0u8; DATAGRAM_BUF]; RECV_BATCH],
            addrs: vec![zeroed_addr; RECV_BATCH],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                RECV_BATCH
            ],
            hdrs: vec![zeroed_hdr; RECV_BATCH],
            lens: vec![0; RECV_BATCH],
            srcs: vec![None; RECV_BATCH],
            truncated: vec![false; RECV_BATCH],
        }
    }
}

impl RecvBatch {
    /// The `i`th datagram of the last receive and its canonical source; `None`
    /// for a truncated datagram or an unknown address family.
    pub fn datagram(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        let src = self.srcs.get(i).copied().flatten()?;
        (!self.truncated[i]).then(|| (&self.bufs[i][..self.lens[i]], src))
    }

    /// The source of the `i`th datagram, also when it was truncated.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        self.srcs.get(i).copied().flatten()
    }

    /// Puts `datagram` from `src` in slot `i` as a receive would (marked
    /// truncated past [`DATAGRAM_BUF`]): for [`DatagramIo`] stand-ins.
    ///
    /// # Panics
    /// `i` is not below [`RECV_BATCH`].
    pub fn put(&mut self, i: usize, datagram: &[u8], src: SocketAddr) {
        let n = datagram.len().min(DATAGRAM_BUF);
        self.bufs[i][..n].copy_from_slice(&datagram[..n]);
        self.lens[i] = n;
        self.truncated[i] = n < datagram.len();
        self.srcs[i] = Some(src);
    }
}

/// The C form of `addr` for `sendmsg(2)`.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn socket_addr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which fits.
            let a: &libc::sockaddr_in = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6, which fits.
            let a: &libc::sockaddr_in6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(canonical(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            ))))
        }
        _ => None,
    }
}

/// Socket buffer size asked for, as wireguard-go does: the default ~200 KiB drops
/// datagrams in bursts at gigabit rates.
pub const SOCKET_BUFFER_BYTES: usize = 7 << 20;

/// Enlarges the socket buffers, past `rmem_max` when privileged; best effort.
fn grow_buffers(sock: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(sock, sockopt::RcvBufForce, &SOCKET_BUFFER_BYTES).is_err() {
        let _ = setsockopt(sock, sockopt::RcvBuf, &SOCKET_BUFFER_BYTES);
    }
    if setsockopt(sock, sockopt::SndBufForce, &SOCKET_BUFFER_BYTES).is_err() {
        let _ = setsockopt(sock, sockopt::SndBuf, &SOCKET_BUFFER_BYTES);
    }
}

/// IPv4-mapped IPv6 addresses become plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mapped addresses are shown and stored as IPv4; real IPv6 stays.
    #[test]
    fn canonical_endpoints() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:51820".parse().unwrap();
        assert_eq!(canonical(mapped), "192.0.2.1:51820".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    /// One GSO send arrives as separate datagrams of the segment size.
    #[test]
    fn send_segments_splits() {
        let udp = Udp::bind(0).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let payload: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
        udp.send_segments(&payload, 100, client.local_addr().unwrap())
            .unwrap();
        let mut buf = [0u8; 512];
        let sizes: Vec<usize> = (0..3)
            .map(|_| client.recv_from(&mut buf).unwrap().0)
            .collect();
        assert_eq!(sizes, [100, 100, 50]);
        assert_eq!(&buf[..50], &payload[200..]);
    }

    /// A group shares one port; the kernel spreads senders over its sockets
    /// and keeps each sender on one socket, its datagrams in order.
    #[test]
    fn group_spreads_senders_and_keeps_each_in_order() {
        let group = Udp::bind_group(0, 2).unwrap();
        let port = group[0].local_port().unwrap();
        assert_eq!(group[1].local_port().unwrap(), port);
        let senders: Vec<UdpSocket> = (0..32)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for round in 0..3u8 {
            for s in &senders {
                s.send_to(&[round], ("127.0.0.1", port)).unwrap();
            }
        }
        let mut batch = RecvBatch::default();
        let mut seen: std::collections::HashMap<SocketAddr, (usize, Vec<u8>)> = Default::default();
        let mut per_socket = [0usize; 2];
        for (i, udp) in group.iter().enumerate() {
            // Each socket: read until a receive times out with nothing queued.
            while let Ok(n) = udp.recv_batch(&mut batch) {
                for j in 0..n {
                    let (d, src) = batch.datagram(j).unwrap();
                    let entry = seen.entry(src).or_insert((i, Vec::new()));
                    assert_eq!(entry.0, i, "{src} reached two sockets");
                    entry.1.push(d[0]);
                    per_socket[i] += 1;
                }
            }
        }
        assert_eq!(seen.len(), 32);
        assert!(
            seen.values().all(|(_, r)| r == &[0, 1, 2]),
            "in order, none lost"
        );
        assert!(
            per_socket.iter().all(|&n| n > 0),
            "32 senders all on one socket: {per_socket:?}"
        );
    }

    /// A burst arrives in one batch, in order, with canonical sources.
    #[test]
    fn recv_batch_takes_a_burst() {
        let udp = Udp::bind(0).unwrap();
        let port = udp.local_port().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..10u8 {
            client.send_to(&[i; 3], ("127.0.0.1", port)).unwrap();
        }
        let mut batch = RecvBatch::default();
        let mut got = Vec::new();
        while got.len() < 10 {
            let n = udp.recv_batch(&mut batch).unwrap();
            for i in 0..n {
                let (d, src) = batch.datagram(i).unwrap();
                assert_eq!(src, client.local_addr().unwrap());
                got.push(d.to_vec());
            }
        }
        assert_eq!(got, (0..10u8).map(|i| vec![i; 3]).collect::<Vec<_>>());
    }

    /// A datagram sent to the dual-stack socket over IPv4 loopback arrives with a
    /// canonical IPv4 source, and a reply to that source arrives back.
    #[test]
    fn loopback_roundtrip() {
        let udp = Udp::bind(0).unwrap();
        let port = udp.local_port().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.send_to(b"ping", ("127.0.0.1", port)).unwrap();
        let mut batch = RecvBatch::default();
        assert_eq!(udp.recv_batch(&mut batch).unwrap(), 1);
        let (d, src) = batch.datagram(0).unwrap();
        assert_eq!(d, b"ping");
        assert!(src.is_ipv4());
        udp.send_to(b"pong", src).unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"pong");
    }

    /// A datagram longer than the receive buffer is not handed on as data, but
    /// its source is still known (for the `datagram_dropped` event).
    #[test]
    fn truncated_datagram_flagged() {
        let udp = Udp::bind(0).unwrap();
        let port = udp.local_port().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .send_to(&vec![7u8; DATAGRAM_BUF + 1], ("127.0.0.1", port))
            .unwrap();
        let mut batch = RecvBatch::default();
        assert_eq!(udp.recv_batch(&mut batch).unwrap(), 1);
        assert!(batch.datagram(0).is_none());
        assert_eq!(batch.source(0), Some(client.local_addr().unwrap()));
    }
}
