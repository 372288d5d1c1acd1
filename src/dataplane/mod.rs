//! The packet path. Two loops, each on its own thread with its own buffers:
//!
//! - [`rx::run`]: UDP datagrams (a `recvmmsg` batch) → identify the peer
//!   (anonymous handshake parse for initiations, receiver index otherwise) →
//!   `Tunn::decapsulate` → [`crate::policy::decide`] → [`batch::TunBatch`] →
//!   one GRO-coalesced TUN write pass per batch.
//! - [`tx::run`]: TUN read (a GSO super-packet, split) → [`crate::routing`]
//!   lookup by destination → `Tunn::encapsulate` → UDP GSO send per endpoint.
//!
//! Both read the peer set from an immutable [`peers::PeerTable`] snapshot that the
//! control plane swaps whole ([`arc_swap`]), so the only lock on the path is the
//! sending peer's own `Tunn` mutex, held for the crypto and released before any
//! I/O. [`timers::Timers::tick`] drives boringtun's timers and the event summaries.

pub mod batch;
pub mod packet;
pub mod peers;
pub mod rx;
pub mod timers;
pub mod tx;
pub mod udp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use arc_swap::ArcSwap;
use boringtun::noise::rate_limiter::RateLimiter;

use crate::events::{HandshakeFailure, Throttle};
use crate::keys::PublicKey;

/// Largest datagram or IP packet a loop handles (64 KiB plus WireGuard overhead).
pub const MAX_PACKET: usize = 65_536 + 64;

/// Handshake initiations per second, gateway-wide, before boringtun answers with
/// cookies (mac2) instead of doing Diffie-Hellman work: a flood costs a MAC check.
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;

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

/// Failures not attributable to an issued peer (unknown keys, bad MACs, junk):
/// throttled per reason, with the latest offender kept for the summary line.
#[derive(Debug, Default)]
pub struct AnonFailures {
    pub throttles: [Throttle; HandshakeFailure::ALL.len()],
    pub last: Mutex<[Option<Offender>; HandshakeFailure::ALL.len()]>,
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

/// Where encrypted datagrams go. The daemon's [`Device`] writes to the real UDP
/// socket; engine tests capture instead. Sends are best effort, like the
/// network itself: a full buffer drops the datagram.
pub trait Wire: Send + Sync {
    fn send_datagram(&self, datagram: &[u8], dst: SocketAddr);
}

/// Where decrypted packets go: the receive loop's [`batch::TunBatch`] (written
/// to the TUN device once per received batch, coalesced by GRO), or a capture
/// in tests.
pub trait TunSink {
    fn packet(&mut self, ip: &[u8]);
}

/// The gateway's real I/O endpoints.
pub struct Device {
    pub udp: udp::Udp,
    pub tun: tun_rs::SyncDevice,
    /// The TUN device carries virtio-net headers (GSO/GRO offload).
    pub offload: bool,
}

impl Wire for std::sync::Arc<Device> {
    #[inline]
    fn send_datagram(&self, datagram: &[u8], dst: SocketAddr) {
        let _ = self.udp.send_to(datagram, dst);
    }
}

/// State shared by the packet loops and the control plane.
pub struct Shared {
    pub table: ArcSwap<peers::PeerTable>,
    pub wire: Box<dyn Wire>,
    pub static_secret: x25519_dalek::StaticSecret,
    pub static_public: x25519_dalek::PublicKey,
    pub rate_limiter: RateLimiter,
    pub clock: Clock,
    pub anon: AnonFailures,
    /// Packets from the TUN device with no peer owning the destination.
    pub no_route: AtomicU64,
    pub stopping: AtomicBool,
}

impl Shared {
    /// Fresh state with no peers, answering as `key`.
    pub fn new(wire: Box<dyn Wire>, key: &crate::keys::PrivateKey) -> Shared {
        let static_secret = key.to_x25519();
        let static_public = x25519_dalek::PublicKey::from(&static_secret);
        Shared {
            table: ArcSwap::from_pointee(peers::PeerTable::default()),
            wire,
            rate_limiter: RateLimiter::new(&static_public, HANDSHAKE_RATE_LIMIT),
            static_secret,
            static_public,
            clock: Clock::new(),
            anon: AnonFailures::default(),
            no_route: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}
