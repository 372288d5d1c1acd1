//! The packet path. Three kinds of loop, each on its own thread with its own
//! buffers; receive and transmit loops run one per core
//! ([`MAX_RX_WORKERS`]), each with its own socket of the listen port's
//! `SO_REUSEPORT` group and its own queue of the TUN device:
//!
//! - [`rx::run`]: UDP datagrams (a `recvmmsg` batch) → identify the peer by
//!   receiver index → `Tunn::decapsulate`, in place into the TUN batch's
//!   buffer → [`crate::policy::decide`] → [`batch::TunBatch`] → one
//!   GRO-coalesced TUN write pass per batch. Handshake initiations that pass
//!   the cheap checks (source backoff, mac1, cookie) go to a bounded queue.
//! - [`rx::run_handshakes`]: the queued initiations (anonymous parse to find
//!   the key, unless the source is remembered → `Tunn::decapsulate` → the
//!   response): the Diffie-Hellman work, off the data path and on the other core.
//! - [`tx::run`]: TUN read (a GSO super-packet, split) → [`crate::routing`]
//!   lookup by destination → `Tunn::encapsulate` → UDP GSO send per endpoint.
//!
//! Every datagram comes and goes through a [`udp::DatagramIo`], and TUN reads
//! and writes through a [`batch::TunRead`] and a [`batch::TunWrite`] handed to
//! the loop, so the loops run in
//! tests over stand-ins, as they run in the daemon over the socket and device.
//!
//! Both read the peer set from an immutable [`peers::PeerTable`] snapshot that the
//! control plane swaps whole ([`arc_swap`]), so the only lock on the path is the
//! sending peer's own `Tunn` mutex, held for the crypto and released before any
//! I/O. [`timers::Timers::tick`] drives boringtun's timers and the event summaries.
//! Packet counts for `/metrics` are tallied per batch ([`tally`]) and reach the
//! peer's atomic counters once per batch; failed UDP sends and TUN writes the
//! same way ([`IoTally`] into [`IoErrors`]), so a lost packet is never silent.
//! Each loop loads the peer table once per batch (a `recvmmsg` batch, a TUN
//! read) and hands it down, so a reload applies from the next batch on.
//!
//! The protocol rules against abuse live here too: one handshake limiter for
//! every `Tunn` ([`Engine::rate_limiter`]), roaming only on authenticated
//! packets ([`rx`]), random session indices ([`peers`]) and per-source backoff
//! of failing handshakes ([`sources`]).

pub mod batch;
pub mod packet;
pub mod peers;
pub mod rx;
pub mod sources;
pub mod tally;
pub mod timers;
pub mod tx;
pub mod udp;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use boringtun::noise::rate_limiter::RateLimiter;

use crate::events::{HandshakeFailure, Throttle};
use crate::keys::PublicKey;

/// Largest datagram or IP packet a loop handles (64 KiB plus WireGuard overhead).
pub const MAX_PACKET: usize = 65_536 + 64;

/// Handshake checks per second, gateway-wide, before boringtun answers with
/// cookie replies (demanding mac2, which proves the sender receives at its
/// address) instead of doing Diffie-Hellman work. The one limiter is shared by
/// the receive loop's first check and every peer's `Tunn`, and a handshake that
/// reaches a `Tunn` passes both, so this is about 100 handshakes per second.
pub const HANDSHAKE_RATE_LIMIT: u64 = 200;

/// A monotonic millisecond clock starting at 1 (0 means "never" in throttles).
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Self {
        Self(Instant::now())
    }
    #[inline]
    pub fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64 + 1
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// The key (when the handshake revealed one) and address behind a failure.
pub type Offender = (Option<PublicKey>, SocketAddr);

/// Distinct public keys named in summaries of refused keys.
pub const SUMMARY_KEYS: usize = 4;

/// What a summary says about who failed: the latest offender, and the first
/// few distinct keys tried since the last line plus a count of further tries.
#[derive(Debug, Default, Clone, Copy)]
pub struct Seen {
    pub last: Option<Offender>,
    pub keys: [Option<PublicKey>; SUMMARY_KEYS],
    /// Attempts with a key not among `keys`.
    pub other_keys: u64,
}

impl Seen {
    /// Notes one attempt by `key` from `src`.
    pub fn note(&mut self, key: Option<PublicKey>, src: SocketAddr) {
        self.last = Some((key, src));
        let Some(key) = key else { return };
        if self.keys.iter().flatten().any(|k| *k == key) {
            return;
        }
        match self.keys.iter_mut().find(|k| k.is_none()) {
            Some(slot) => *slot = Some(key),
            None => self.other_keys += 1,
        }
    }

    /// The keys as one comma-separated field value (empty when none).
    pub fn key_list(&self) -> String {
        let mut out = String::new();
        for k in self.keys.iter().flatten() {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&k.to_base64());
        }
        out
    }
}

/// Failures not attributable to an issued peer (unknown keys, bad MACs, junk):
/// throttled per reason, with who failed kept for the summary line.
#[derive(Debug, Default)]
pub struct AnonFailures {
    pub throttles: [Throttle; HandshakeFailure::ALL.len()],
    pub seen: Mutex<[Seen; HandshakeFailure::ALL.len()]>,
    /// Datagrams dropped before any peer could be charged with them.
    pub dropped: [Throttle; DropReason::ALL.len()],
    pub dropped_last: Mutex<[Option<SocketAddr>; DropReason::ALL.len()]>,
}

/// `reason` values of `datagram_dropped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a WireGuard message at all (wrong type or size).
    Malformed,
    /// A well-formed message for a session index the gateway does not have: a
    /// site still using a session from before a restart or revocation, or junk.
    UnknownSession,
}

impl DropReason {
    pub const ALL: [DropReason; 2] = [DropReason::Malformed, DropReason::UnknownSession];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownSession => "unknown_session",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Where decrypted packets go: the receive loop's [`batch::TunBatch`] (written
/// to the TUN device once per received batch, coalesced by GRO), or a capture
/// in tests. The sink lends the buffer: boringtun decrypts straight into it, so
/// a packet is never copied between decryption and the TUN write.
pub trait TunSink {
    /// Room for the next packet ([`MAX_PACKET`] bytes at least). What is left
    /// there without [`TunSink::commit`] is overwritten by the next packet.
    fn next_buf(&mut self) -> &mut [u8];
    /// The first `len` bytes of [`TunSink::next_buf`] are a packet to write.
    fn commit(&mut self, len: usize);
}

/// The gateway's real I/O endpoints.
pub struct Device {
    /// The receive workers' sockets, one each, all bound to the listen port
    /// ([`udp::Udp::bind_group`]); the first also carries the handshake
    /// worker's, the transmit loop's and the timers' sends.
    pub udp: Vec<udp::Udp>,
    /// The TUN device's queues, one per worker pair (receive worker `i`
    /// writes to queue `i`, transmit worker `i` reads it).
    pub tun: Vec<tun_rs::SyncDevice>,
    /// The TUN device carries virtio-net headers (GSO/GRO offload).
    pub offload: bool,
}

impl Device {
    /// The socket every loop sends from.
    pub fn sender(&self) -> &udp::Udp {
        &self.udp[0]
    }
}

/// Receive and transmit workers: one each per core, at most this many. A
/// peer's datagrams all reach one receive worker (the socket group hashes by
/// sender) and a flow's packets one transmit worker (the TUN device's queues
/// hash by flow), so they stay in order; different sites and flows are
/// decrypted and encrypted on different cores.
pub const MAX_RX_WORKERS: usize = 4;

/// Data-path output failures since start, gateway-wide: what the loops could
/// not hand to the kernel. Lost packets are otherwise silent (the peer's
/// TCP retransmits, the counters look fine), so these make a dead route or a
/// downed TUN device visible in `status` and `/metrics`. The loops add to
/// them once per batch from an [`IoTally`], never per packet.
#[derive(Debug, Default)]
pub struct IoErrors {
    /// Datagrams a UDP send failed to send (each failed `sendto`, and each
    /// datagram of a GSO send that failed and then failed again alone).
    udp_send: AtomicU64,
    /// TUN write passes that failed, wholly or in part. A pass writes one
    /// receive batch (GRO-coalesced); tun-rs reports only that some write of
    /// it failed, not how many packets were lost.
    tun_write: AtomicU64,
    /// The `errno` of the latest failure of each kind, for the log line.
    udp_errno: AtomicI32,
    tun_errno: AtomicI32,
}

impl IoErrors {
    pub fn udp_send_errors(&self) -> u64 {
        self.udp_send.load(Ordering::Relaxed)
    }

    pub fn tun_write_errors(&self) -> u64 {
        self.tun_write.load(Ordering::Relaxed)
    }

    /// The `errno` of the latest UDP send and TUN write failures (0: none
    /// known), for the summary event.
    pub fn last_errno(&self) -> (i32, i32) {
        (
            self.udp_errno.load(Ordering::Relaxed),
            self.tun_errno.load(Ordering::Relaxed),
        )
    }
}

/// One loop's output failures over its current batch, in memory it owns:
/// the failure path costs a few plain adds, and [`IoTally::flush`] touches
/// the shared [`IoErrors`] only when the batch had a failure.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoTally {
    udp_send: u64,
    tun_write: u64,
    udp_errno: i32,
    tun_errno: i32,
}

impl IoTally {
    /// One datagram that a UDP send failed to send.
    #[cold]
    pub fn udp_failed(&mut self, error: &std::io::Error) {
        self.udp_send += 1;
        self.udp_errno = error.raw_os_error().unwrap_or(0);
    }

    /// One TUN write pass that failed.
    #[cold]
    pub fn tun_failed(&mut self, error: &std::io::Error) {
        self.tun_write += 1;
        self.tun_errno = error.raw_os_error().unwrap_or(0);
    }

    /// Adds the batch's failures to `to` and starts over.
    #[inline]
    pub fn flush(&mut self, to: &IoErrors) {
        if self.udp_send == 0 && self.tun_write == 0 {
            return;
        }
        self.flush_slow(to);
    }

    #[cold]
    fn flush_slow(&mut self, to: &IoErrors) {
        let t = std::mem::take(self);
        if t.udp_send > 0 {
            to.udp_errno.store(t.udp_errno, Ordering::Relaxed);
            to.udp_send.fetch_add(t.udp_send, Ordering::Relaxed);
        }
        if t.tun_write > 0 {
            to.tun_errno.store(t.tun_errno, Ordering::Relaxed);
            to.tun_write.fetch_add(t.tun_write, Ordering::Relaxed);
        }
    }
}

/// The protocol side of the data plane, with no I/O of its own: the peer
/// table, the gateway's keys and handshake limiter, the policy, the endpoint
/// and backoff rules and every failure counter. The loops hand it datagrams
/// and packets ([`Engine::handle_datagram`], [`Engine::handle_tun_packet`],
/// [`Engine::poll_timers`]) with the I/O to answer through; the control plane
/// swaps its table and reads its counters.
pub struct Engine {
    pub table: ArcSwap<peers::PeerTable>,
    pub static_secret: x25519_dalek::StaticSecret,
    pub static_public: x25519_dalek::PublicKey,
    /// The gateway's one handshake limiter, shared by every peer's `Tunn`.
    pub rate_limiter: Arc<RateLimiter>,
    tunn_seed: Arc<peers::TunnSeed>,
    pub clock: Clock,
    pub anon: AnonFailures,
    /// Handshake failures charged to an issued peer, by reason, gateway-wide.
    /// Each peer's own throttles count them too, but leave with its slot
    /// (revocation, rotation); these stay, so that the gateway-wide counter
    /// of `/metrics` never goes down. Failures are not the data path: one
    /// more relaxed `fetch_add` per failure.
    pub peer_failures: [AtomicU64; HandshakeFailure::ALL.len()],
    /// Failed handshakes per source address; sources over the threshold are
    /// ignored for a while. Locked by the receive loop for handshake messages
    /// only, and by the timer for its summary.
    pub sources: Mutex<sources::SourceTable>,
    /// Sources put into backoff, throttled like other failures.
    pub source_blocks: Throttle,
    /// Endpoint addresses of peers with a session, refreshed by the timer:
    /// never put into backoff.
    pub live_endpoints: ArcSwap<HashSet<IpAddr>>,
    /// Packets from the TUN device with no peer owning the destination.
    pub no_route: AtomicU64,
    /// UDP send and TUN write failures of the packet loops and the timer.
    pub io_errors: IoErrors,
    /// The rules for decrypted packets, from the config.
    pub policy: crate::policy::Policy,
    /// [`Clock::now_ms`] as of the last timer tick: a clock the packet path
    /// reads for one relaxed load (it stamps "internet seen").
    pub coarse_ms: AtomicU64,
}

impl Engine {
    /// Fresh state with no peers, answering as `key`, deciding by `policy`.
    pub fn new(key: &crate::keys::PrivateKey, policy: crate::policy::Policy) -> Engine {
        let static_secret = key.to_x25519();
        let static_public = x25519_dalek::PublicKey::from(&static_secret);
        let rate_limiter = Arc::new(RateLimiter::new(&static_public, HANDSHAKE_RATE_LIMIT));
        Engine {
            table: ArcSwap::from_pointee(peers::PeerTable::default()),
            tunn_seed: Arc::new(peers::TunnSeed::new(
                static_secret.clone(),
                Some(Arc::clone(&rate_limiter)),
            )),
            rate_limiter,
            static_secret,
            static_public,
            clock: Clock::new(),
            anon: AnonFailures::default(),
            peer_failures: Default::default(),
            sources: Mutex::new(sources::SourceTable::default()),
            source_blocks: Throttle::default(),
            live_endpoints: ArcSwap::from_pointee(HashSet::new()),
            no_route: AtomicU64::new(0),
            io_errors: IoErrors::default(),
            policy,
            coarse_ms: AtomicU64::new(1),
        }
    }

    /// What the peers' `Tunn`s are made from: the gateway's key, answering
    /// with the gateway's one handshake limiter.
    pub fn tunn_seed(&self) -> Arc<peers::TunnSeed> {
        Arc::clone(&self.tunn_seed)
    }

    /// Handles one datagram of a receive batch: [`rx::handle_in_batch`].
    #[inline]
    pub fn handle_datagram(
        &self,
        rx: &mut rx::Receiver,
        io: &impl udp::DatagramIo,
        table: &Arc<peers::PeerTable>,
        datagram: &[u8],
        src: SocketAddr,
        sink: &mut impl TunSink,
    ) {
        rx::handle_in_batch(self, rx, io, table, datagram, src, sink);
    }

    /// Handles one packet of a TUN read: [`tx::handle_packet`].
    #[inline]
    pub fn handle_tun_packet(
        &self,
        tx: &mut tx::Transmitter,
        io: &impl udp::DatagramIo,
        table: &Arc<peers::PeerTable>,
        packet: &[u8],
    ) {
        tx::handle_packet(self, tx, io, table, packet);
    }

    /// Runs every peer's timers and the event summaries: [`timers::Timers::tick`].
    pub fn poll_timers(
        &self,
        timers: &mut timers::Timers,
        runtime: &Runtime,
        io: &impl udp::DatagramIo,
    ) {
        timers.tick(self, runtime, io);
    }
}

/// What the loops share besides the [`Engine`]: when to stop, their own
/// failures, and the test hooks.
#[derive(Default)]
pub struct Runtime {
    pub stopping: AtomicBool,
    /// Errors of the packet loops (`tun_error`, `udp_error`), throttled.
    pub loop_errors: [Throttle; LoopError::ALL.len()],
    pub hooks: Hooks,
}

impl Runtime {
    pub fn new(hooks: Hooks) -> Runtime {
        Runtime {
            hooks,
            ..Runtime::default()
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Logs a packet loop's error, throttled like every other failure.
    pub fn loop_error(&self, now_ms: u64, which: LoopError, error: &std::io::Error) {
        if self.loop_errors[which.index()].hit(now_ms) {
            tracing::error!(event = which.as_str(), error = %error, count = 1u64);
        }
    }
}

/// Errors of the packet loops, each its own event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopError {
    Tun,
    Udp,
}

impl LoopError {
    pub const ALL: [LoopError; 2] = [LoopError::Tun, LoopError::Udp];

    pub fn as_str(self) -> &'static str {
        match self {
            LoopError::Tun => "tun_error",
            LoopError::Udp => "udp_error",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A loop that has seen nothing but errors for this long gives up: the daemon
/// ends (exit 1) so that its supervisor restarts it, instead of running on
/// with one direction of traffic dead.
pub const FATAL_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// Fault injection for the integration tests, from the environment variable
/// `SITEGATE_TEST_HOOKS` (comma-separated): `panic_rx` and `panic_tx` make the
/// receive or transmit loop panic on its first packet; `reload_pause_ms=N`
/// pauses every registry read inside its transaction. Unset in production; all
/// they can do is stop or slow the daemon, which whoever sets its environment
/// can do anyway.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hooks {
    pub panic_rx: bool,
    pub panic_tx: bool,
    pub reload_pause_ms: u64,
}

impl Hooks {
    pub const ENV: &'static str = "SITEGATE_TEST_HOOKS";

    /// Parses the variable's value; unknown words are an error, so a typo in a
    /// test does not silently test nothing.
    ///
    /// # Errors
    /// A word that is not a hook, or a pause that is not a number.
    pub fn parse(value: &str) -> Result<Hooks, String> {
        let mut hooks = Hooks::default();
        for word in value.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word.split_once('=') {
                None if word == "panic_rx" => hooks.panic_rx = true,
                None if word == "panic_tx" => hooks.panic_tx = true,
                Some(("reload_pause_ms", ms)) => {
                    hooks.reload_pause_ms = ms
                        .parse()
                        .map_err(|_| format!("{}: {word:?} is not a number of ms", Self::ENV))?;
                }
                _ => return Err(format!("{}: unknown hook {word:?}", Self::ENV)),
            }
        }
        Ok(hooks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hooks parse from the variable; a typo is an error, not a silent no-op.
    #[test]
    fn hooks_parse() {
        let h = Hooks::parse("panic_rx, reload_pause_ms=1500").unwrap();
        assert!(h.panic_rx && !h.panic_tx);
        assert_eq!(h.reload_pause_ms, 1500);
        assert!(Hooks::parse("").is_ok());
        assert!(Hooks::parse("panic_rxx")
            .unwrap_err()
            .contains("unknown hook"));
        assert!(Hooks::parse("reload_pause_ms=soon")
            .unwrap_err()
            .contains("not a number"));
    }

    /// The first few distinct keys are kept in order; the rest only counted.
    #[test]
    fn seen_keys_bounded() {
        let src: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let keys: Vec<PublicKey> = (0..6)
            .map(|_| crate::keys::PrivateKey::generate().public_key())
            .collect();
        let mut seen = Seen::default();
        for k in keys.iter().chain(keys.iter()) {
            seen.note(Some(*k), src);
        }
        seen.note(None, src);
        assert_eq!(seen.keys.map(Option::unwrap).to_vec(), keys[..SUMMARY_KEYS]);
        assert_eq!(seen.other_keys, 4, "two tries each of two unlisted keys");
        assert_eq!(seen.key_list().matches(',').count(), SUMMARY_KEYS - 1);
        assert_eq!(seen.last, Some((None, src)));
    }
}
