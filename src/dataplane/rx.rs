//! UDP → TUN: identify the sender, decrypt, apply policy, deliver.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver as QueueRx, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};

use super::batch::{TunBatch, TunWrite};
use super::packet::Header;
use super::peers::{PeerSlot, PeerTable};
use super::tally::{Direction, Tally};
use super::udp::{DatagramIo, RecvBatch};
use super::{
    DropReason, Engine, IoTally, LoopError, Runtime, Seen, TunSink, FATAL_AFTER, MAX_PACKET,
};
use crate::events::HandshakeFailure;
use crate::keys::PublicKey;
use crate::policy::{self, Quiet, Verdict};

/// WireGuard message type of a handshake response (what a responder sends back).
const MSG_HANDSHAKE_RESPONSE: u8 = 2;
/// WireGuard message type of a transport packet (the keepalive an initiator
/// sends once it accepted a response).
const MSG_TRANSPORT: u8 = 4;

/// Receives until shutdown, a batch of datagrams per system call, and writes
/// what they carry to the TUN device once per batch. Owns its buffers: nothing
/// is allocated per datagram.
///
/// # Errors
/// The socket has failed for [`FATAL_AFTER`] without a single successful
/// receive: the daemon is to end rather than run half-deaf.
pub fn run(
    engine: &Engine,
    rt: &Runtime,
    udp: &impl DatagramIo,
    tun: &impl TunWrite,
    offload: bool,
    handshakes: SyncSender<Initiation>,
) -> std::io::Result<()> {
    let mut batch = RecvBatch::default();
    let mut packets = TunBatch::new(offload);
    let mut rx = Receiver::with_handshakes(handshakes);
    let mut failing_since: Option<Instant> = None;
    while !rt.is_stopping() {
        match udp.recv_batch(&mut batch) {
            Ok(n) => {
                failing_since = None;
                if n > 0 && rt.hooks.panic_rx {
                    panic!("test hook panic_rx");
                }
                // One table for the whole batch: a reload that lands meanwhile
                // applies from the next batch on.
                let table = engine.table.load();
                for i in 0..n {
                    match batch.datagram(i) {
                        Some((datagram, src)) => engine.handle_datagram(
                            &mut rx,
                            udp,
                            &table,
                            datagram,
                            src,
                            &mut packets,
                        ),
                        // Longer than any tunnel MTU: not a message we sent for.
                        None => match batch.source(i) {
                            Some(src) => dropped(engine, DropReason::Malformed, src),
                            None => {
                                engine.anon.dropped[DropReason::Malformed.index()]
                                    .hit(engine.clock.now_ms());
                            }
                        },
                    }
                }
                drop(table);
                packets.flush(tun, &mut rx.failures);
                rx.end_batch(engine);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            // ICMP errors from earlier sends surface here on Linux; they say
            // nothing about this socket's health.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => {
                rt.loop_error(engine.clock.now_ms(), LoopError::Udp, &e);
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

/// WireGuard handshake messages: initiation, response, cookie reply.
#[inline]
fn is_handshake(datagram: &[u8]) -> bool {
    matches!(datagram.first(), Some(1..=3))
}

/// Source addresses remembered by [`Initiators`]; past this the memory is
/// cleared and refilled (one extra Diffie-Hellman per site, once).
const INITIATOR_CACHE: usize = 8192;

/// Which key last completed a handshake from each source address, so that the
/// next initiation from there goes straight to that peer's `Tunn` instead of
/// being decrypted twice (once anonymously to find the key, once by the
/// `Tunn`): one Diffie-Hellman less per renewal. Filled only by handshakes
/// boringtun accepted, and changed only by the next one, so no unauthenticated
/// datagram moves it: a guess that turns out wrong (another key at that
/// address) costs one `Tunn` attempt that changes no state, then the anonymous
/// path runs as before. Owned by the receive loop: no lock.
#[derive(Debug)]
struct Initiators {
    keys: HashMap<SocketAddr, [u8; 32]>,
}

impl Default for Initiators {
    fn default() -> Self {
        Initiators {
            keys: HashMap::with_capacity(INITIATOR_CACHE),
        }
    }
}

impl Initiators {
    fn remember(&mut self, src: SocketAddr, key: [u8; 32]) {
        if self.keys.len() >= INITIATOR_CACHE && !self.keys.contains_key(&src) {
            self.keys.clear();
        }
        self.keys.insert(src, key);
    }
}

/// A handshake initiation is always this long (boringtun parses no other).
pub const INITIATION_LEN: usize = 148;

/// Initiations waiting for the handshake worker. A full queue means the
/// worker is behind by this many Diffie-Hellman rounds (about 0.2 s of work);
/// further initiations are refused as `rate_limited` until it catches up, and
/// the data path never waits.
pub const HANDSHAKE_QUEUE: usize = 1024;

/// An initiation the receive loop checked (mac1, cookie, source backoff) and
/// hands to the handshake worker; copied, so no buffer is shared.
pub struct Initiation {
    bytes: [u8; INITIATION_LEN],
    src: SocketAddr,
}

/// What a receive loop owns between datagrams: its output buffer, its
/// memory of initiators, the packet counts and send failures of the batch in
/// hand, and where initiations go.
pub struct Receiver {
    out: Vec<u8>,
    initiators: Initiators,
    forwarded: Tally,
    failures: IoTally,
    /// The handshake worker's queue; `None`: initiations are answered inline
    /// (the worker itself, and the engine tests).
    handshakes: Option<SyncSender<Initiation>>,
}

impl Default for Receiver {
    fn default() -> Self {
        Receiver {
            out: vec![0u8; MAX_PACKET],
            initiators: Initiators::default(),
            forwarded: Tally::new(Direction::Rx),
            failures: IoTally::default(),
            handshakes: None,
        }
    }
}

impl Receiver {
    /// A receiver that hands initiations to [`run_handshakes`] through `queue`
    /// instead of answering them itself.
    /// It never answers an initiation itself, so it reserves no memory of
    /// initiators (the worker's [`Receiver`] has that).
    pub fn with_handshakes(queue: SyncSender<Initiation>) -> Receiver {
        Receiver {
            out: vec![0u8; MAX_PACKET],
            initiators: Initiators {
                keys: HashMap::new(),
            },
            forwarded: Tally::new(Direction::Rx),
            failures: IoTally::default(),
            handshakes: Some(queue),
        }
    }
}

/// Initiations answered per table snapshot before the worker loads a new one.
const HANDSHAKE_BATCH: usize = 64;

/// Answers the initiations the receive loop queues, until shutdown or until
/// the receive loop is gone. This is the Diffie-Hellman work (three X25519
/// per initiation, about 0.2 ms), on its own thread so that a burst of
/// handshakes (a thousand sites renewing, or a flood) does not stall the
/// packets of sessions that exist.
///
/// # Errors
/// None so far; the signature matches the other loops.
pub fn run_handshakes(
    engine: &Engine,
    rt: &Runtime,
    queue: QueueRx<Initiation>,
    io: &impl DatagramIo,
) -> std::io::Result<()> {
    let mut rx = Receiver::default();
    let mut discard = NoTun(vec![0u8; MAX_PACKET]);
    while !rt.is_stopping() {
        let first = match queue.recv_timeout(super::udp::RECV_TIMEOUT) {
            Ok(i) => i,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let table = engine.table.load();
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(i) = next.take() {
            handle_initiation(engine, &mut rx, io, &table, &i.bytes, i.src, &mut discard);
            handled += 1;
            if handled < HANDSHAKE_BATCH {
                next = queue.try_recv().ok();
            }
        }
        drop(table);
        rx.end_batch(engine);
    }
    Ok(())
}

/// The handshake worker's scratch space: boringtun writes its response there.
/// An initiation yields a response on the wire, nothing for the TUN device.
struct NoTun(Vec<u8>);

impl TunSink for NoTun {
    fn next_buf(&mut self) -> &mut [u8] {
        &mut self.0
    }
    fn commit(&mut self, _: usize) {}
}

impl Receiver {
    /// Ends a batch begun with [`handle_in_batch`]: the packets it forwarded
    /// reach their peers' counters (one atomic add per peer), and its failed
    /// sends and TUN writes the gateway's (only when there were any).
    pub fn end_batch(&mut self, engine: &Engine) {
        self.forwarded.flush();
        self.failures.flush(&engine.io_errors);
    }
}

/// Handles one datagram from `src` as a batch of its own; a decrypted packet
/// that passes policy goes to `sink`.
pub fn handle(
    engine: &Engine,
    rx: &mut Receiver,
    io: &impl DatagramIo,
    datagram: &[u8],
    src: SocketAddr,
    sink: &mut impl TunSink,
) {
    let table = engine.table.load();
    handle_in_batch(engine, rx, io, &table, datagram, src, sink);
    drop(table);
    rx.end_batch(engine);
}

/// Handles one datagram of a batch, as [`handle`] does, except that the
/// packet counts wait for [`Receiver::end_batch`]: the receive loop counts a
/// batch in memory it owns and touches the peers' atomics once. `table` is
/// the batch's snapshot of the peers, loaded once by the caller.
pub fn handle_in_batch(
    engine: &Engine,
    rx: &mut Receiver,
    io: &impl DatagramIo,
    table: &Arc<PeerTable>,
    datagram: &[u8],
    src: SocketAddr,
    sink: &mut impl TunSink,
) {
    // A source in backoff costs a table lookup: no MAC, no cookie reply.
    // Transport packets never wait here: a spoofed flood must not cut a session.
    if is_handshake(datagram) && source_blocked(engine, src) {
        return;
    }
    let mut cookie = [0u8; 64];
    let packet = match engine
        .rate_limiter
        .verify_packet(Some(src.ip()), datagram, &mut cookie)
    {
        Ok(p) => p,
        Err(TunnResult::WriteToNetwork(reply)) => {
            send(io, &mut rx.failures, reply, src);
            anon_failure(engine, HandshakeFailure::RateLimited, None, src);
            return;
        }
        Err(TunnResult::Err(WireGuardError::InvalidMac)) => {
            source_failed(engine, src);
            anon_failure(engine, HandshakeFailure::BadMac, None, src);
            return;
        }
        Err(_) => {
            dropped(engine, DropReason::Malformed, src);
            return;
        }
    };
    if let Packet::HandshakeInit(_) = packet {
        if let Some(queue) = &rx.handshakes {
            if let Ok(bytes) = <[u8; INITIATION_LEN]>::try_from(datagram) {
                match queue.try_send(Initiation { bytes, src }) {
                    Ok(()) => return,
                    Err(TrySendError::Full(_)) => {
                        anon_failure(engine, HandshakeFailure::RateLimited, None, src);
                        return;
                    }
                    // The worker is gone (the daemon is stopping): answer here.
                    Err(TrySendError::Disconnected(_)) => {}
                }
            }
        }
        handle_initiation(engine, rx, io, table, datagram, src, sink);
        return;
    }
    if let Some((pos, kind)) = identify(engine, table, &packet, src) {
        process(engine, rx, io, table, pos, kind, false, datagram, src, sink);
    }
}

/// Answers an initiation whose mac1 (and, under load, mac2) checked out.
fn handle_initiation(
    engine: &Engine,
    rx: &mut Receiver,
    io: &impl DatagramIo,
    table: &Arc<PeerTable>,
    datagram: &[u8],
    src: SocketAddr,
    sink: &mut impl TunSink,
) {
    // An initiation from an address whose key we remember goes straight to
    // that peer; `None` back means another key initiated there.
    let remembered = rx.initiators.keys.get(&src).and_then(|k| table.by_key(k));
    if let Some(pos) = remembered {
        if process(
            engine,
            rx,
            io,
            table,
            pos,
            Kind::Initiation,
            true,
            datagram,
            src,
            sink,
        )
        .is_some()
        {
            return;
        }
    }
    let Ok(Packet::HandshakeInit(init)) = Tunn::parse_incoming_packet(datagram) else {
        return;
    };
    if let Some((pos, kind)) = identify(engine, table, &Packet::HandshakeInit(init), src) {
        process(engine, rx, io, table, pos, kind, false, datagram, src, sink);
    }
}

/// Which peer a verified message is for, and what kind it is. Reports and
/// returns `None` when no active peer owns it.
fn identify(
    engine: &Engine,
    table: &PeerTable,
    packet: &Packet<'_>,
    src: SocketAddr,
) -> Option<(usize, Kind)> {
    let (pos, kind) = match packet {
        Packet::HandshakeInit(init) => {
            match parse_handshake_anon(&engine.static_secret, &engine.static_public, init) {
                Ok(half) => match table.by_key(&half.peer_static_public) {
                    Some(pos) => (Some(pos), Kind::Initiation),
                    None => {
                        let key = PublicKey::from_bytes(half.peer_static_public);
                        source_failed(engine, src);
                        refused_key(engine, table, key, src);
                        return None;
                    }
                },
                Err(_) => {
                    source_failed(engine, src);
                    anon_failure(engine, HandshakeFailure::Decrypt, None, src);
                    return None;
                }
            }
        }
        Packet::HandshakeResponse(r) => (table.by_receiver(r.receiver_idx), Kind::Response),
        Packet::PacketCookieReply(c) => (table.by_receiver(c.receiver_idx), Kind::CookieReply),
        Packet::PacketData(d) => (table.by_receiver(d.receiver_idx), Kind::Data),
    };
    if pos.is_none() {
        dropped(engine, DropReason::UnknownSession, src);
    }
    pos.map(|p| (p, kind))
}

/// Hands the datagram to peer `pos`'s `Tunn` and acts on the result. With
/// `remembered` (an initiation sent to the key last seen at `src`), a
/// `WrongKey` answer changes nothing and returns `None`: the caller then
/// identifies the sender the anonymous way.
#[allow(clippy::too_many_arguments)]
fn process(
    engine: &Engine,
    rx: &mut Receiver,
    io: &impl DatagramIo,
    table: &Arc<PeerTable>,
    pos: usize,
    kind: Kind,
    remembered: bool,
    datagram: &[u8],
    src: SocketAddr,
    sink: &mut impl TunSink,
) -> Option<()> {
    let peer = &table.peers[pos];
    let mut state = peer.lock();
    // Decrypted in place, into the buffer the TUN write will take.
    let result = peer
        .tunn(&mut state)
        .decapsulate(Some(src.ip()), datagram, sink.next_buf());
    if remembered && matches!(result, TunnResult::Err(WireGuardError::WrongKey)) {
        return None;
    }
    let authenticated = authenticated(kind, &result);
    if authenticated && state.endpoint != Some(src) {
        state.endpoint = Some(src);
    }
    drop(state);
    match result {
        TunnResult::Done => {}
        TunnResult::Err(e) => peer_failure(engine, peer, e, kind, src),
        TunnResult::WriteToNetwork(reply) => {
            if !authenticated {
                // boringtun answered with a cookie: the gateway is under load
                // and this handshake message carried no valid mac2 for `src`.
                failure_event(engine, peer, HandshakeFailure::RateLimited, src);
            }
            send(io, &mut rx.failures, reply, src);
            if authenticated {
                if kind == Kind::Initiation && !remembered {
                    rx.initiators.remember(src, *peer.public_key.as_bytes());
                }
                peer.lock().session_up = true;
                peer.handshakes.fetch_add(1, Ordering::Relaxed);
                peer.last_handshake_ms
                    .store(engine.clock.now_ms(), Ordering::Relaxed);
                tracing::info!(
                    event = "handshake",
                    peer = %peer.name,
                    public_key = %peer.public_key,
                    endpoint = %src,
                    role = if kind == Kind::Initiation { "responder" } else { "initiator" },
                );
            }
            flush_queue(io, peer, &mut rx.out, &mut rx.failures);
        }
        TunnResult::WriteToTunnelV4(ip, _) | TunnResult::WriteToTunnelV6(ip, _) => {
            if deliver(engine, table, pos, peer, ip, &mut rx.forwarded) {
                let len = ip.len();
                sink.commit(len);
            }
        }
    }
    Some(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Initiation,
    Response,
    CookieReply,
    Data,
}

/// Whether boringtun authenticated the message, so that its source may become
/// the peer's endpoint (WireGuard's roaming rule). `WriteToNetwork` alone proves
/// nothing: under load boringtun answers any message with a valid mac1 (which
/// needs only the gateway's public key) with a cookie reply, before any
/// cryptographic check. Only the reply's type tells an accepted handshake apart:
/// an initiation is answered with a response, a response with a keepalive.
/// Cookie replies never move the endpoint; a data packet does once it decrypted
/// (a keepalive decrypts to `Done`, which no failing data packet returns).
fn authenticated(kind: Kind, result: &TunnResult<'_>) -> bool {
    match (kind, result) {
        (Kind::Initiation, TunnResult::WriteToNetwork(reply)) => {
            reply.first() == Some(&MSG_HANDSHAKE_RESPONSE)
        }
        (Kind::Response, TunnResult::WriteToNetwork(reply)) => {
            reply.first() == Some(&MSG_TRANSPORT)
        }
        (
            Kind::Data,
            TunnResult::Done | TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..),
        ) => true,
        _ => false,
    }
}

/// Applies policy to a decrypted packet: `true` when it goes to the TUN
/// device (counted in `forwarded`), `false` when it is dropped (counted or
/// reported as the verdict says).
#[inline]
fn deliver(
    engine: &Engine,
    table: &Arc<PeerTable>,
    pos: usize,
    peer: &PeerSlot,
    ip: &[u8],
    forwarded: &mut Tally,
) -> bool {
    let Some(header) = Header::parse(ip) else {
        return false;
    };
    match policy::decide(&engine.policy, &pos, peer.grants(), &header, &table.routes) {
        Verdict::Forward => {
            forwarded.count(table, pos);
            true
        }
        Verdict::Internet => {
            let now = engine.coarse_ms.load(Ordering::Relaxed);
            if peer.internet_seen_ms.load(Ordering::Relaxed) != now {
                peer.internet_seen_ms.store(now, Ordering::Relaxed);
            }
            forwarded.count(table, pos);
            true
        }
        Verdict::Quiet(Quiet::Ipv6Noise) => {
            peer.noise.fetch_add(1, Ordering::Relaxed);
            false
        }
        Verdict::Quiet(Quiet::Ipv6Off) => {
            peer.ipv6_dropped.fetch_add(1, Ordering::Relaxed);
            false
        }
        Verdict::Deny(reason) => {
            if peer.denied[reason.index()].hit(engine.clock.now_ms()) {
                tracing::warn!(
                    event = "packet_denied",
                    reason = reason.as_str(),
                    peer = %peer.name,
                    public_key = %peer.public_key,
                    src = %header.src,
                    dst = %header.dst,
                    protocol = header.protocol,
                    dst_port = header.dst_port,
                    count = 1u64,
                );
            }
            false
        }
    }
}

/// Sends a reply, counting a failure in the batch's `failures`.
#[inline]
fn send(io: &impl DatagramIo, failures: &mut IoTally, datagram: &[u8], dst: SocketAddr) {
    if let Err(e) = io.send_to(datagram, dst) {
        failures.udp_failed(&e);
    }
}

/// Sends packets boringtun queued while the session was being established,
/// counting them as transmitted (once per handshake, so one atomic add each).
fn flush_queue(io: &impl DatagramIo, peer: &PeerSlot, out: &mut [u8], failures: &mut IoTally) {
    loop {
        let mut state = peer.lock();
        let endpoint = state.endpoint;
        let Some(tunn) = state.tunn() else { return };
        match tunn.decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(packet) => {
                drop(state);
                if let Some(ep) = endpoint {
                    if packet.first() == Some(&MSG_TRANSPORT) {
                        peer.packets.add(Direction::Tx, 1);
                    }
                    send(io, failures, packet, ep);
                }
            }
            _ => return,
        }
    }
}

/// A decapsulation error for an identified peer.
fn peer_failure(
    engine: &Engine,
    peer: &PeerSlot,
    err: WireGuardError,
    kind: Kind,
    src: SocketAddr,
) {
    let reason = match (kind, err) {
        // Data-path noise (stale counters, no session) and cookie replies that
        // do not fit a handshake in flight.
        (Kind::Data | Kind::CookieReply, _) => return,
        (_, WireGuardError::WrongTai64nTimestamp) => HandshakeFailure::Replay,
        (_, WireGuardError::InvalidMac) => HandshakeFailure::BadMac,
        (_, WireGuardError::UnderLoad) => HandshakeFailure::RateLimited,
        _ => HandshakeFailure::Decrypt,
    };
    if reason != HandshakeFailure::RateLimited {
        source_failed(engine, src);
    }
    failure_event(engine, peer, reason, src);
}

fn failure_event(engine: &Engine, peer: &PeerSlot, reason: HandshakeFailure, src: SocketAddr) {
    engine.peer_failures[reason.index()].fetch_add(1, Ordering::Relaxed);
    if peer.handshake_failures[reason.index()].hit(engine.clock.now_ms()) {
        tracing::warn!(
            event = "handshake_failed",
            reason = reason.as_str(),
            peer = %peer.name,
            public_key = %peer.public_key,
            endpoint = %src,
            count = 1u64,
        );
    }
}

/// An initiation that authenticated a key which is not (or no longer) admitted.
fn refused_key(engine: &Engine, table: &PeerTable, key: PublicKey, src: SocketAddr) {
    match table.inactive(key.as_bytes()) {
        Some((name, why)) => {
            let reason = why.failure();
            if record_anon(engine, reason, Some(key), src) {
                tracing::warn!(
                    event = "handshake_failed",
                    reason = reason.as_str(),
                    peer = %name,
                    public_key = %key,
                    endpoint = %src,
                    count = 1u64,
                );
            }
        }
        None => anon_failure(engine, HandshakeFailure::UnknownKey, Some(key), src),
    }
}

fn record_anon(
    engine: &Engine,
    reason: HandshakeFailure,
    key: Option<PublicKey>,
    src: SocketAddr,
) -> bool {
    let log_now = engine.anon.throttles[reason.index()].hit(engine.clock.now_ms());
    if let Ok(mut seen) = engine.anon.seen.lock() {
        let seen = &mut seen[reason.index()];
        if log_now {
            // This line names the key; the next summary lists what follows it.
            *seen = Seen::default();
            seen.last = Some((key, src));
        } else {
            seen.note(key, src);
        }
    }
    log_now
}

/// Whether `src` is in backoff for failing too many handshakes.
#[inline]
fn source_blocked(engine: &Engine, src: SocketAddr) -> bool {
    let now_ms = engine.clock.now_ms();
    engine
        .sources
        .lock()
        .is_ok_and(|mut t| t.is_blocked(src.ip(), now_ms))
}

/// Charges `src` with a failed handshake; logs once when that puts it into
/// backoff (the timer summarises what it then sends). The address of a live
/// session is never put into backoff: a sender forging it could otherwise keep
/// that site from renewing its session.
fn source_failed(engine: &Engine, src: SocketAddr) {
    let now_ms = engine.clock.now_ms();
    let blocked = match engine.sources.lock() {
        Ok(mut t) => t.record_failure(src.ip(), now_ms),
        Err(_) => None,
    };
    let Some(b) = blocked else { return };
    if engine.live_endpoints.load().contains(&b.source) {
        if let Ok(mut t) = engine.sources.lock() {
            t.unblock(b.source);
        }
        return;
    }
    if engine.source_blocks.hit(now_ms) {
        tracing::warn!(
            event = "handshake_failed",
            reason = HandshakeFailure::RateLimited.as_str(),
            source = %b.source,
            failures = b.failures,
            backoff_secs = super::sources::BACKOFF_MS / 1000,
            count = 1u64,
        );
    }
}

fn anon_failure(
    engine: &Engine,
    reason: HandshakeFailure,
    key: Option<PublicKey>,
    src: SocketAddr,
) {
    if record_anon(engine, reason, key, src) {
        match key {
            Some(k) => tracing::warn!(
                event = "handshake_failed",
                reason = reason.as_str(),
                public_key = %k,
                endpoint = %src,
                count = 1u64,
            ),
            None => tracing::warn!(
                event = "handshake_failed",
                reason = reason.as_str(),
                endpoint = %src,
                count = 1u64,
            ),
        }
    }
}

fn dropped(engine: &Engine, reason: DropReason, src: SocketAddr) {
    if let Ok(mut last) = engine.anon.dropped_last.lock() {
        last[reason.index()] = Some(src);
    }
    if engine.anon.dropped[reason.index()].hit(engine.clock.now_ms()) {
        tracing::warn!(
            event = "datagram_dropped",
            reason = reason.as_str(),
            endpoint = %src,
            count = 1u64,
        );
    }
}
