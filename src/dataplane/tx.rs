//! TUN → UDP: route by destination to the owning peer, encrypt, send.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::TunnResult;

use super::peers::PeerTable;
use super::tally::{Direction, Tally};
use super::udp::Udp;
use super::{packet, LoopError, Shared, FATAL_AFTER, MAX_PACKET};

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
    shared: &Shared,
    udp: &Udp,
    tun: &tun_rs::SyncDevice,
    interrupt: &tun_rs::InterruptEvent,
    mtu: usize,
) -> std::io::Result<()> {
    let mut raw = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65_535];
    let mut segments = vec![vec![0u8; mtu.max(1280) + 64]; tun_rs::IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
    let mut out = vec![0u8; MAX_PACKET];
    let mut gso = GsoBatch::new();
    let mut sent = Tally::new(Direction::Tx);
    let mut failing_since: Option<Instant> = None;
    while !shared.is_stopping() {
        match tun.recv_multiple_intr(&mut raw, &mut segments, &mut sizes, 0, interrupt) {
            Ok(n) => {
                failing_since = None;
                if n > 0 && shared.hooks.panic_tx {
                    panic!("test hook panic_tx");
                }
                for (seg, &len) in segments.iter().zip(&sizes).take(n) {
                    let count = |table: &Arc<PeerTable>, pos| sent.count(table, pos);
                    if let Some((datagram, ep)) = encrypt(shared, &seg[..len], &mut out, count) {
                        gso.push(datagram, ep, udp);
                    }
                }
                gso.flush(udp);
                sent.flush();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                if shared.is_stopping() {
                    return Ok(());
                }
                shared.loop_error(LoopError::Tun, &e);
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

/// Encrypts one IP packet from the TUN device for the peer owning its
/// destination and sends it, counting it at once (a batch of one).
#[inline]
pub fn handle(shared: &Shared, ip: &[u8], out: &mut [u8]) {
    let count = |table: &Arc<PeerTable>, pos: usize| {
        table.peers[pos].packets.add(Direction::Tx, 1);
    };
    if let Some((datagram, ep)) = encrypt(shared, ip, out, count) {
        shared.wire.send_datagram(datagram, ep);
    }
}

/// Encrypts one IP packet for the peer owning its destination: the datagram
/// (in `out`) and where it goes, or `None` when no peer owns the destination or
/// the peer has no session or endpoint yet (boringtun then queues the packet
/// and starts a handshake). A packet that leaves as a transport message is
/// passed to `count` with the table and the peer's position in it.
#[inline]
fn encrypt<'a>(
    shared: &Shared,
    ip: &[u8],
    out: &'a mut [u8],
    count: impl FnOnce(&Arc<PeerTable>, usize),
) -> Option<(&'a [u8], SocketAddr)> {
    let dst = packet::destination(ip)?;
    let table = shared.table.load();
    let Some(&pos) = table.routes.lookup(dst) else {
        shared.no_route.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let peer = &table.peers[pos];
    let mut state = peer.lock();
    let result = state.tunn.encapsulate(ip, out);
    let endpoint = state.endpoint;
    drop(state);
    match (result, endpoint) {
        (TunnResult::WriteToNetwork(datagram), Some(ep)) => {
            if datagram.first() == Some(&MSG_TRANSPORT) {
                count(&table, pos);
            }
            Some((datagram, ep))
        }
        _ => None,
    }
}

/// Most segments and bytes one UDP GSO send may carry (kernel limits: 64
/// segments on older kernels, 64 KiB of payload).
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;

/// Consecutive datagrams to one endpoint, all of one size but the last, sent
/// with one UDP GSO `sendmsg(2)`. Falls back to one send per datagram if the
/// kernel refuses GSO.
struct GsoBatch {
    buf: Vec<u8>,
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
            buf: Vec::with_capacity(GSO_MAX_BYTES + MAX_PACKET),
            segment: 0,
            count: 0,
            closed: false,
            dst: None,
            enabled: true,
        }
    }

    #[inline]
    fn push(&mut self, datagram: &[u8], dst: SocketAddr, udp: &Udp) {
        if self.count > 0
            && (self.dst != Some(dst)
                || self.closed
                || datagram.len() > self.segment
                || self.buf.len() + datagram.len() > GSO_MAX_BYTES
                || self.count == GSO_MAX_SEGMENTS)
        {
            self.flush(udp);
        }
        if self.count == 0 {
            self.segment = datagram.len();
            self.dst = Some(dst);
        }
        self.closed = datagram.len() < self.segment;
        self.buf.extend_from_slice(datagram);
        self.count += 1;
    }

    fn flush(&mut self, udp: &Udp) {
        if let Some(dst) = self.dst {
            let sent_whole = self.count > 1
                && self.enabled
                && match u16::try_from(self.segment) {
                    Ok(seg) => match udp.send_segments(&self.buf, seg, dst) {
                        Ok(()) => true,
                        Err(e) => {
                            // No GSO here (old kernel, odd device): stop trying.
                            if matches!(
                                e.raw_os_error(),
                                Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                            ) {
                                self.enabled = false;
                            }
                            false
                        }
                    },
                    Err(_) => false,
                };
            if !sent_whole {
                for chunk in self.buf.chunks(self.segment.max(1)) {
                    let _ = udp.send_to(chunk, dst);
                }
            }
        }
        self.buf.clear();
        self.count = 0;
        self.closed = false;
        self.dst = None;
    }
}
