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

fn bind_dual_stack(port: u16) -> io::Result<UdpSocket> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn6,
    };
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
    Ok(UdpSocket::from(fd))
}

impl Udp {
    /// Binds `port` on all addresses, IPv6 dual-stack when available.
    ///
    /// # Errors
    /// The port is in use or no socket can be made.
    pub fn bind(port: u16) -> io::Result<Udp> {
        let (sock, v6) = match bind_dual_stack(port) {
            Ok(s) => (s, true),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            Err(_) => (UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?, false),
        };
        sock.set_read_timeout(Some(RECV_TIMEOUT))?;
        grow_buffers(&sock);
        Ok(Udp { sock, v6 })
    }

    pub fn local_port(&self) -> io::Result<u16> {
        self.sock.local_addr().map(|a| a.port())
    }

    /// Receives one datagram; the source is canonical (IPv4-mapped → IPv4).
    #[inline]
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, src) = self.sock.recv_from(buf)?;
        Ok((n, canonical(src)))
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
        let mut buf = [0u8; 16];
        let (n, src) = udp.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert!(src.is_ipv4());
        udp.send_to(b"pong", src).unwrap();
        let (n, _) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"pong");
    }
}
