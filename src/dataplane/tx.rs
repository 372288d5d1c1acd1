//! TUN → UDP: route by destination to the owning peer, encrypt, send.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::TunnResult;

use super::batch::TunRead;
use super::peers::PeerTable;
use super::tally::{Direction, Tally};
use super::udp::DatagramIo;
use super::{packet, Engine, IoTally, LoopError, Runtime, FATAL_AFTER, MAX_PACKET};

/// WireGuard message type of a transport (data) message: what `encapsulate`
/// returns for a packet sent on a session, as opposed to the handshake
/// initiation it returns when it queued the packet instead.
const MSG_TRANSPORT: u8 = 4;

/// Reads the TUN device until shutdown. With offload on, one read may return a
/// 64 KiB TCP/UDP super-packet that tun-rs splits into MTU-sized segments (the
/// kernel skips segmentation and checksums); each is then routed and encrypted.
/// Datagrams for the same endpoint leave together by UDP GSO. Owns its buffers,
/// and counts the packets of a read per peer, adding to the peers' counters
/// once per read.
///
/// # Errors
/// The TUN device has failed for [`FATAL_AFTER`] without a single successful
/// read: the daemon is to end rather than run with this direction dead.
pub fn run(
    engine: &Engine,
    rt: &Runtime,
    udp: &impl DatagramIo,
    tun: &impl TunRead,
    mtu: usize,
) -> std::io::Result<()> {
    let mut raw = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65_535];
    let mut segments = vec![vec![0u8; mtu.max(1280) + 64]; tun_rs::IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
    let mut tx = Transmitter::default();
    let mut failing_since: Option<Instant> = None;
    while !rt.is_stopping() {
        match tun.read_batch(&mut raw, &mut segments, &mut sizes) {
            Ok(n) => {
                failing_since = None;
                if n > 0 && rt.hooks.panic_tx {
                    panic!("test hook panic_tx");
                }
                // One table for the whole read: a reload that lands meanwhile
                // applies from the next read on.
                let table = engine.table.load();
                for (seg, &len) in segments.iter().zip(&sizes).take(n) {
                    engine.handle_tun_packet(&mut tx, udp, &table, &seg[..len]);
                }
                drop(table);
                tx.end_batch(engine, udp);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                if rt.is_stopping() {
                    return Ok(());
                }
                rt.loop_error(engine.clock.now_ms(), LoopError::Tun, &e);
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= FATAL_AFTER {
                    return Err(e);
                }
                std::thread::sleep(super::udp::RECV_TIMEOUT);
            }
        }
    }
    Ok(())
}

/// What the transmit loop owns between reads: the GSO batch packets are
/// encrypted into, and the packet counts of the read in hand.
pub struct Transmitter {
    gso: GsoBatch,
    sent: Tally,
}

impl Default for Transmitter {
    fn default() -> Self {
        Transmitter {
            gso: GsoBatch::new(),
            sent: Tally::new(Direction::Tx),
        }
    }
}

impl Transmitter {
    /// Ends a read begun with [`handle_packet`]: sends what the GSO batch
    /// holds, and adds the read's packet counts and failed sends to the
    /// peers' and the gateway's counters (one atomic add each).
    pub fn end_batch(&mut self, engine: &Engine, io: &impl DatagramIo) {
        self.gso.flush(io);
        self.gso.failures.flush(&engine.io_errors);
        self.sent.flush();
    }
}

/// Encrypts one IP packet of a TUN read for the peer owning its destination,
/// in place at the end of the read's GSO batch, where the datagram joins the
/// batch (sent by [`Transmitter::end_batch`], or earlier when the batch fills
/// or the endpoint changes). `table` is the read's snapshot of the peers.
#[inline]
pub fn handle_packet(
    engine: &Engine,
    tx: &mut Transmitter,
    io: &impl DatagramIo,
    table: &Arc<PeerTable>,
    ip: &[u8],
) {
    let sent = &mut tx.sent;
    let count = |table: &Arc<PeerTable>, pos| sent.count(table, pos);
    if let Some((at, len, ep)) = encrypt(engine, table, ip, tx.gso.spare(), count) {
        tx.gso.commit(at, len, ep, io);
    }
}

/// Encrypts one IP packet for the peer owning its destination into `out`:
/// where the datagram starts in `out`, its length and where it goes, or
/// `None` when no peer owns the destination or the peer has no session or
/// endpoint yet (boringtun then queues the packet and starts a handshake). A
/// packet that leaves as a transport message is passed to `count` with the
/// table and the peer's position in it. `table` is the batch's snapshot,
/// loaded once by the caller.
#[inline]
fn encrypt(
    engine: &Engine,
    table: &Arc<PeerTable>,
    ip: &[u8],
    out: &mut [u8],
    count: impl FnOnce(&Arc<PeerTable>, usize),
) -> Option<(usize, usize, SocketAddr)> {
    let dst = packet::destination(ip)?;
    let Some(&pos) = table.routes.lookup(dst) else {
        engine.no_route.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let peer = &table.peers[pos];
    let base = out.as_ptr() as usize;
    let mut state = peer.lock();
    let result = peer.tunn(&mut state).encapsulate(ip, out);
    let endpoint = state.endpoint;
    drop(state);
    match (result, endpoint) {
        (TunnResult::WriteToNetwork(datagram), Some(ep)) => {
            if datagram.first() == Some(&MSG_TRANSPORT) {
                count(table, pos);
            }
            // boringtun writes at the start of `out`; the offset keeps that
            // an observation rather than an assumption.
            Some((datagram.as_ptr() as usize - base, datagram.len(), ep))
        }
        _ => None,
    }
}

/// Most segments and bytes one UDP GSO send may carry (kernel limits: 64
/// segments on older kernels, 64 KiB of payload).
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;

/// Consecutive datagrams to one endpoint, all of one size but the last, sent
/// with one UDP GSO `sendmsg(2)`. Datagrams are encrypted straight into the
/// batch's buffer, after the ones already there ([`GsoBatch::spare`], then
/// [`GsoBatch::commit`]); only one that cannot join (another endpoint or
/// size, or a full batch) moves, to the front, once the batch before it is
/// sent. Falls back to one send per datagram if the GSO send fails;
/// datagrams that fail alone too are counted in `failures`.
struct GsoBatch {
    /// Send failures since the loop last flushed them to the shared counters.
    failures: IoTally,
    /// Initialised once; the batch is `buf[..len]`. Room for a full batch
    /// plus one more datagram of any size after it.
    buf: Box<[u8]>,
    len: usize,
    segment: usize,
    count: usize,
    /// The last datagram was shorter than `segment`: nothing may follow it.
    closed: bool,
    dst: Option<SocketAddr>,
    enabled: bool,
}

impl GsoBatch {
    fn new() -> GsoBatch {
        GsoBatch {
            failures: IoTally::default(),
            buf: vec![0u8; GSO_MAX_BYTES + 2 * MAX_PACKET].into_boxed_slice(),
            len: 0,
            segment: 0,
            count: 0,
            closed: false,
            dst: None,
            enabled: true,
        }
    }

    /// Room for the next datagram, right after the batch: at least
    /// [`MAX_PACKET`] bytes, since the batch never holds more than
    /// `GSO_MAX_BYTES` plus one datagram.
    #[inline]
    fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    /// The `len` bytes at `at` in [`GsoBatch::spare`] are a datagram for
    /// `dst`: it joins the batch, or the batch is sent first and the
    /// datagram starts the next one.
    #[inline]
    fn commit(&mut self, at: usize, len: usize, dst: SocketAddr, udp: &impl DatagramIo) {
        let start = self.len + at;
        if self.count > 0
            && (self.dst != Some(dst)
                || self.closed
                || len > self.segment
                || self.len + len > GSO_MAX_BYTES
                || self.count == GSO_MAX_SEGMENTS)
        {
            self.flush(udp);
        }
        if start != self.len {
            self.buf.copy_within(start..start + len, self.len);
        }
        if self.count == 0 {
            self.segment = len;
            self.dst = Some(dst);
        }
        self.closed = len < self.segment;
        self.len += len;
        self.count += 1;
    }

    /// Adds a datagram that was not encrypted in place (a copy).
    #[cfg(test)]
    fn push(&mut self, datagram: &[u8], dst: SocketAddr, udp: &impl DatagramIo) {
        self.spare()[..datagram.len()].copy_from_slice(datagram);
        self.commit(0, datagram.len(), dst, udp);
    }

    fn flush(&mut self, udp: &impl DatagramIo) {
        if let Some(dst) = self.dst {
            let batch = &self.buf[..self.len];
            let mut gso_error = None;
            if self.count > 1 && self.enabled {
                if let Ok(seg) = u16::try_from(self.segment) {
                    if let Err(e) = udp.send_segments(batch, seg, dst) {
                        gso_error = e.raw_os_error();
                    } else {
                        self.reset();
                        return;
                    }
                }
            }
            let mut delivered = false;
            for chunk in batch.chunks(self.segment.max(1)) {
                match udp.send_to(chunk, dst) {
                    Ok(_) => delivered = true,
                    Err(e) => self.failures.udp_failed(&e),
                }
            }
            // No GSO here (old kernel, odd device): stop trying. Only when the
            // same datagrams then went out one by one, since a route that
            // refuses everything (a blackhole gives `EINVAL` too) says nothing
            // about GSO and must not cost it for every other endpoint.
            if delivered
                && matches!(
                    gso_error,
                    Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                )
            {
                self.enabled = false;
            }
        }
        self.reset();
    }

    /// Empties the batch; the bytes stay (a datagram committed after it may
    /// still be moved from there).
    fn reset(&mut self) {
        self.len = 0;
        self.count = 0;
        self.closed = false;
        self.dst = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::IoErrors;
    use std::cell::{Cell, RefCell};

    /// A socket whose sends fail with `errno` (GSO sends with `gso_errno`),
    /// recording what it was asked to send.
    struct FakeUdp {
        gso_errno: Option<i32>,
        errno: Option<i32>,
        gso_sends: Cell<usize>,
        sent: RefCell<Vec<usize>>,
    }

    impl FakeUdp {
        fn new(gso_errno: Option<i32>, errno: Option<i32>) -> FakeUdp {
            FakeUdp {
                gso_errno,
                errno,
                gso_sends: Cell::new(0),
                sent: RefCell::new(Vec::new()),
            }
        }
    }

    impl DatagramIo for FakeUdp {
        fn recv_batch(&self, _: &mut crate::dataplane::udp::RecvBatch) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
        fn send_segments(&self, buf: &[u8], _: u16, _: SocketAddr) -> std::io::Result<()> {
            self.gso_sends.set(self.gso_sends.get() + 1);
            match self.gso_errno {
                Some(e) => Err(std::io::Error::from_raw_os_error(e)),
                None => {
                    self.sent.borrow_mut().push(buf.len());
                    Ok(())
                }
            }
        }
        fn send_to(&self, buf: &[u8], _: SocketAddr) -> std::io::Result<usize> {
            match self.errno {
                Some(e) => Err(std::io::Error::from_raw_os_error(e)),
                None => {
                    self.sent.borrow_mut().push(buf.len());
                    Ok(buf.len())
                }
            }
        }
    }

    fn dst() -> SocketAddr {
        "192.0.2.7:51820".parse().unwrap()
    }

    /// Every datagram lost to a dead route is counted once, at the loop's
    /// flush; GSO stays on, because the route and not GSO was at fault.
    #[test]
    fn dead_route_counts_each_datagram() {
        let udp = FakeUdp::new(Some(libc::EINVAL), Some(libc::EINVAL));
        let mut gso = GsoBatch::new();
        for _ in 0..5 {
            gso.push(&[4; 100], dst(), &udp);
        }
        gso.push(&[4; 40], dst(), &udp);
        gso.flush(&udp);
        gso.push(&[4; 100], dst(), &udp);
        gso.flush(&udp);
        let shared = IoErrors::default();
        assert_eq!(shared.udp_send_errors(), 0, "not before the batch ends");
        gso.failures.flush(&shared);
        assert_eq!(shared.udp_send_errors(), 7);
        assert_eq!(shared.last_errno(), (libc::EINVAL, 0));
        assert!(gso.enabled, "a dead route does not turn GSO off");
        assert_eq!(udp.gso_sends.get(), 1, "a single datagram goes alone");
        assert!(udp.sent.borrow().is_empty());
    }

    /// A GSO refusal whose datagrams then go out alone is the kernel's lack
    /// of GSO: nothing is lost, nothing counted, and GSO is not tried again.
    #[test]
    fn gso_refused_falls_back_without_counting() {
        let udp = FakeUdp::new(Some(libc::EIO), None);
        let mut gso = GsoBatch::new();
        for _ in 0..3 {
            gso.push(&[4; 100], dst(), &udp);
        }
        gso.flush(&udp);
        assert_eq!(*udp.sent.borrow(), [100, 100, 100]);
        assert_eq!(gso.failures, IoTally::default());
        assert!(!gso.enabled);
        for _ in 0..3 {
            gso.push(&[4; 100], dst(), &udp);
        }
        gso.flush(&udp);
        assert_eq!(udp.gso_sends.get(), 1, "GSO tried once");
    }

    /// Datagrams encrypted in place join the batch where they were written;
    /// one for another endpoint moves to the front once the batch before it
    /// is sent, bytes intact, and an offset from the encryptor is honoured.
    #[test]
    fn in_place_datagrams_join_or_start_the_next_batch() {
        #[derive(Default)]
        struct Record(RefCell<Vec<(Vec<u8>, SocketAddr)>>);
        impl DatagramIo for Record {
            fn recv_batch(
                &self,
                _: &mut crate::dataplane::udp::RecvBatch,
            ) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::WouldBlock.into())
            }
            fn send_segments(&self, buf: &[u8], seg: u16, dst: SocketAddr) -> std::io::Result<()> {
                for d in buf.chunks(usize::from(seg)) {
                    self.0.borrow_mut().push((d.to_vec(), dst));
                }
                Ok(())
            }
            fn send_to(&self, buf: &[u8], dst: SocketAddr) -> std::io::Result<usize> {
                self.0.borrow_mut().push((buf.to_vec(), dst));
                Ok(buf.len())
            }
        }
        let other: SocketAddr = "198.51.100.9:4000".parse().unwrap();
        let udp = Record::default();
        let mut gso = GsoBatch::new();
        for i in 0..3u8 {
            gso.spare()[..100].fill(i);
            gso.commit(0, 100, dst(), &udp);
        }
        assert!(
            udp.0.borrow().is_empty(),
            "nothing sent while the batch grows"
        );
        // Written 7 bytes into the spare room, for another endpoint.
        gso.spare()[7..107].fill(9);
        gso.commit(7, 100, other, &udp);
        gso.flush(&udp);
        let sent = udp.0.borrow();
        let expect: Vec<(Vec<u8>, SocketAddr)> = (0..3u8)
            .map(|i| (vec![i; 100], dst()))
            .chain([(vec![9u8; 100], other)])
            .collect();
        assert_eq!(*sent, expect);
    }

    /// Partial failure: the GSO send fails with a transient error (a full
    /// buffer), the one-by-one retry loses some: exactly those are counted.
    #[test]
    fn partial_failure_counts_the_lost() {
        struct Flaky(Cell<usize>);
        impl DatagramIo for Flaky {
            fn recv_batch(
                &self,
                _: &mut crate::dataplane::udp::RecvBatch,
            ) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::WouldBlock.into())
            }
            fn send_segments(&self, _: &[u8], _: u16, _: SocketAddr) -> std::io::Result<()> {
                Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
            }
            fn send_to(&self, buf: &[u8], _: SocketAddr) -> std::io::Result<usize> {
                self.0.set(self.0.get() + 1);
                if self.0.get().is_multiple_of(2) {
                    Err(std::io::Error::from_raw_os_error(libc::ENOBUFS))
                } else {
                    Ok(buf.len())
                }
            }
        }
        let udp = Flaky(Cell::new(0));
        let mut gso = GsoBatch::new();
        for _ in 0..4 {
            gso.push(&[4; 100], dst(), &udp);
        }
        gso.flush(&udp);
        let shared = IoErrors::default();
        gso.failures.flush(&shared);
        assert_eq!(shared.udp_send_errors(), 2);
        assert_eq!(shared.last_errno().0, libc::ENOBUFS);
        assert!(gso.enabled, "EAGAIN says nothing about GSO");
    }
}
