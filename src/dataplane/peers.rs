//! The data plane's view of the registry: one slot per active peer, published as
//! an immutable [`PeerTable`] snapshot. A slot gets its boringtun `Tunn` (11 KiB,
//! most of it room for eight sessions) on first contact, not when it is issued, so
//! 10,000 issued peers that never connect cost about 0.5 KiB each.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use ipnet::IpNet;

use super::tally::PacketCounters;
use crate::events::{CloseReason, HandshakeFailure, Throttle};
use crate::keys::{PresharedKey, PublicKey};
use crate::policy::{DenyReason, Grants, Policy};
use crate::registry::store::RevokedKey;
use crate::registry::{Lifecycle, Peer, PeerName};
use crate::routing::AllowedIps;

/// Mutable per-peer state, guarded by the slot's mutex. Held only around
/// `Tunn` calls, never across I/O.
pub struct PeerState {
    /// `None` until the peer's first handshake message or the first packet
    /// routed to it. Never dropped while the slot lives: it holds the latest
    /// initiation timestamp, the replay protection for initiations.
    tunn: Option<Box<Tunn>>,
    /// Latest authenticated source address (roaming follows it).
    pub endpoint: Option<SocketAddr>,
    /// A session exists: set by a completed handshake, cleared when the timer
    /// sees a confirmed session disappear. Its end is logged exactly once.
    pub session_up: bool,
    /// boringtun has reported the session usable (a responder's session becomes
    /// usable with the initiator's first data packet). Only a confirmed session
    /// can time out; an unconfirmed one is not mistaken for a closed one.
    pub confirmed: bool,
}

impl PeerState {
    /// The peer's `Tunn`, if it has had any contact.
    #[inline]
    pub fn tunn(&mut self) -> Option<&mut Tunn> {
        self.tunn.as_deref_mut()
    }
}

/// What every `Tunn` of a table shares: the gateway's static key and its
/// handshake limiter.
pub struct TunnSeed {
    secret: x25519_dalek::StaticSecret,
    limiter: Option<Arc<RateLimiter>>,
}

impl TunnSeed {
    pub fn new(secret: x25519_dalek::StaticSecret, limiter: Option<Arc<RateLimiter>>) -> Self {
        TunnSeed { secret, limiter }
    }
}

/// One issued, active peer.
pub struct PeerSlot {
    /// boringtun's 24-bit local index; the upper bits of every receiver index.
    pub index: u32,
    seed: Arc<TunnSeed>,
    pub name: PeerName,
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    pub addresses: Vec<IpAddr>,
    /// Unix seconds, `i64::MAX` when it never expires; updated in place on reload.
    pub expires_at: AtomicI64,
    state: Mutex<PeerState>,
    pub denied: [Throttle; DenyReason::ALL.len()],
    pub handshake_failures: [Throttle; HandshakeFailure::ALL.len()],
    /// IPv6 link-local/multicast chatter dropped without an event.
    pub noise: AtomicU64,
    /// IPv6 dropped because the gateway has no IPv6 tunnel address.
    pub ipv6_dropped: AtomicU64,
    /// [`Grants`] bits for the services this peer may reach; updated in place
    /// on reload, like `expires_at`.
    pub grants: AtomicU64,
    /// `peer add --admin`: only admin peers reach the admin API when any exists.
    pub admin: std::sync::atomic::AtomicBool,
    /// [`super::Engine::coarse_ms`] when internet-bound traffic last came
    /// through this peer's session; 0: never.
    pub internet_seen_ms: AtomicU64,
    /// Handshakes completed with this peer (sessions established or renewed,
    /// either role), for `/metrics`: every accepted handshake, whether or not
    /// its event was logged.
    pub handshakes: AtomicU64,
    /// [`super::Clock::now_ms`] of the latest of them; 0: none yet. Kept here
    /// because boringtun forgets the time once the session ends.
    pub last_handshake_ms: AtomicU64,
    /// IP packets forwarded from (rx) and encrypted to (tx) this peer, added
    /// once per loop batch by a [`super::tally::Tally`].
    pub packets: PacketCounters,
}

impl PeerSlot {
    /// Locks the peer's state. A poisoned lock (a panic elsewhere while holding
    /// it) still yields the state: `Tunn` has no invariant a panic can half-break
    /// that its own timers do not repair.
    #[inline]
    pub fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The peer's `Tunn` inside `state` (this slot's locked state), made on
    /// first use. Making one costs a Diffie-Hellman (boringtun precomputes the
    /// static-static secret) and one allocation, once per slot.
    #[inline]
    pub fn tunn<'s>(&self, state: &'s mut PeerState) -> &'s mut Tunn {
        state.tunn.get_or_insert_with(|| {
            Box::new(Tunn::new(
                self.seed.secret.clone(),
                self.public_key.to_x25519(),
                self.preshared_key.as_ref().map(|k| *k.as_bytes()),
                None,
                self.index,
                self.seed.limiter.clone(),
            ))
        })
    }

    /// A consistent snapshot of the peer's live state, with boringtun's
    /// relative handshake age turned into a wall-clock time.
    pub fn live(&self) -> Live {
        let wall_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut state = self.lock();
        let (since, tx, rx) = match state.tunn() {
            Some(t) => {
                let (since, tx, rx, _, _) = t.stats();
                (since, tx, rx)
            }
            None => (None, 0, 0),
        };
        Live {
            endpoint: state.endpoint,
            last_handshake: since.map(|s| wall_now.saturating_sub(s)),
            rx_bytes: rx as u64,
            tx_bytes: tx as u64,
            session: state.session_up,
        }
    }

    #[inline]
    pub fn grants(&self) -> Grants {
        Grants::from_bits(self.grants.load(Ordering::Relaxed))
    }

    fn same_identity(&self, p: &Peer) -> bool {
        self.name == p.name
            && self.public_key == p.public_key
            && self.preshared_key == p.preshared_key
            && self.addresses == p.addresses
    }
}

/// What `wg show` and `sitegate status` report about a peer.
#[derive(Debug, Clone, Copy)]
pub struct Live {
    pub endpoint: Option<SocketAddr>,
    /// Since the Unix epoch.
    pub last_handshake: Option<std::time::Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub session: bool,
}

/// Why a known key is not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inactive {
    Revoked,
    Expired,
}

impl Inactive {
    pub fn failure(self) -> HandshakeFailure {
        match self {
            Inactive::Revoked => HandshakeFailure::Revoked,
            Inactive::Expired => HandshakeFailure::Expired,
        }
    }
    pub fn close_reason(self) -> CloseReason {
        match self {
            Inactive::Revoked => CloseReason::Revoked,
            Inactive::Expired => CloseReason::Expired,
        }
    }
}

/// An immutable snapshot: built by the control plane, read by the packet loops.
#[derive(Default)]
pub struct PeerTable {
    pub peers: Vec<Arc<PeerSlot>>,
    by_key: HashMap<[u8; 32], usize>,
    by_index: HashMap<u32, usize>,
    /// Tunnel address → position in `peers`.
    pub routes: AllowedIps<usize>,
    /// Issued keys that may not connect, with the name and reason for the log.
    inactive: HashMap<[u8; 32], (PeerName, Inactive)>,
}

/// A peer that left the table in a rebuild, for the `session_closed` event.
pub struct Removed {
    pub slot: Arc<PeerSlot>,
    pub reason: CloseReason,
}

impl PeerTable {
    #[inline]
    pub fn by_key(&self, key: &[u8; 32]) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    /// The slot owning a receiver index from a WireGuard message.
    #[inline]
    pub fn by_receiver(&self, receiver_idx: u32) -> Option<usize> {
        self.by_index.get(&(receiver_idx >> 8)).copied()
    }

    pub fn inactive(&self, key: &[u8; 32]) -> Option<&(PeerName, Inactive)> {
        self.inactive.get(key)
    }

    /// Builds the next table from the registry at `now` (Unix seconds). Slots whose
    /// name, key, PSK and addresses are unchanged are carried over with their
    /// sessions; others get a new slot (its `Tunn` made from `seed` on first
    /// contact), with a random 24-bit index that no slot of this table or the next one holds (so
    /// that a message for an old session never reaches a new one, and an
    /// off-path attacker cannot guess a live index).
    pub fn rebuild(
        &self,
        records: &[Peer],
        revoked: &[RevokedKey],
        now: i64,
        policy: &Policy,
        seed: &Arc<TunnSeed>,
    ) -> (PeerTable, Vec<Removed>) {
        let mut next = PeerTable::default();
        // Keys that left the registry by rotation or revocation stay refused.
        for r in revoked {
            if let Ok(name) = PeerName::new(&r.peer) {
                next.inactive
                    .insert(*r.public_key.as_bytes(), (name, Inactive::Revoked));
            }
        }
        for p in records {
            if let Some(reason) = inactive_reason(p, now) {
                next.inactive
                    .insert(*p.public_key.as_bytes(), (p.name.clone(), reason));
                continue;
            }
            let carried = self
                .by_key(p.public_key.as_bytes())
                .map(|i| &self.peers[i])
                .filter(|s| s.same_identity(p));
            let slot = match carried {
                Some(s) => {
                    s.expires_at
                        .store(p.expires_at.unwrap_or(i64::MAX), Ordering::Relaxed);
                    s.grants
                        .store(policy.grants(&p.services).bits(), Ordering::Relaxed);
                    s.admin.store(p.admin, Ordering::Relaxed);
                    Arc::clone(s)
                }
                None => {
                    let index = fresh_index(|i| {
                        self.by_index.contains_key(&i) || next.by_index.contains_key(&i)
                    });
                    let grants = policy.grants(&p.services);
                    Arc::new(PeerSlot::new(index, p, grants, Arc::clone(seed)))
                }
            };
            next.insert(slot);
        }
        // Sets, so a reload stays O(n) with 10,000+ peers.
        let kept: HashSet<*const PeerSlot> = next.peers.iter().map(Arc::as_ptr).collect();
        let names: HashSet<&PeerName> = next.peers.iter().map(|n| &n.name).collect();
        let removed = self
            .peers
            .iter()
            .filter(|s| !kept.contains(&Arc::as_ptr(s)))
            .map(|s| Removed {
                slot: Arc::clone(s),
                // A new key under the same name is a rotation; a vanished key counts
                // as revoked.
                reason: if names.contains(&s.name) {
                    CloseReason::Rotated
                } else {
                    next.inactive(s.public_key.as_bytes())
                        .map_or(CloseReason::Revoked, |(_, r)| r.close_reason())
                },
            })
            .collect();
        (next, removed)
    }

    /// The same table without the peers expired at `now` (Unix seconds), or
    /// `None` when none is. Needs no store: expiry holds even when the store
    /// cannot be read.
    pub fn without_expired(&self, now: i64) -> Option<(PeerTable, Vec<Removed>)> {
        let expired = |s: &PeerSlot| s.expires_at.load(Ordering::Relaxed) <= now;
        if !self.peers.iter().any(|s| expired(s)) {
            return None;
        }
        let mut next = PeerTable {
            inactive: self.inactive.clone(),
            ..PeerTable::default()
        };
        let mut removed = Vec::new();
        for slot in &self.peers {
            if expired(slot) {
                next.inactive.insert(
                    *slot.public_key.as_bytes(),
                    (slot.name.clone(), Inactive::Expired),
                );
                removed.push(Removed {
                    slot: Arc::clone(slot),
                    reason: CloseReason::Expired,
                });
                continue;
            }
            next.insert(Arc::clone(slot));
        }
        Some((next, removed))
    }

    fn insert(&mut self, slot: Arc<PeerSlot>) {
        let pos = self.peers.len();
        self.by_key.insert(*slot.public_key.as_bytes(), pos);
        self.by_index.insert(slot.index, pos);
        for a in &slot.addresses {
            self.routes.insert(IpNet::from(*a), pos);
        }
        self.peers.push(slot);
    }
}

/// A random nonzero 24-bit index for which `taken` is false.
fn fresh_index(taken: impl Fn(u32) -> bool) -> u32 {
    use rand_core::{OsRng, RngCore};
    loop {
        let i = OsRng.next_u32() & 0x00ff_ffff;
        if i != 0 && !taken(i) {
            return i;
        }
    }
}

fn inactive_reason(p: &Peer, now: i64) -> Option<Inactive> {
    match p.lifecycle(now) {
        Lifecycle::Active => None,
        Lifecycle::Expired => Some(Inactive::Expired),
        Lifecycle::Revoked => Some(Inactive::Revoked),
    }
}

impl PeerSlot {
    fn new(index: u32, p: &Peer, grants: Grants, seed: Arc<TunnSeed>) -> Self {
        PeerSlot {
            index,
            seed,
            name: p.name.clone(),
            public_key: p.public_key,
            preshared_key: p.preshared_key.clone(),
            addresses: p.addresses.clone(),
            expires_at: AtomicI64::new(p.expires_at.unwrap_or(i64::MAX)),
            state: Mutex::new(PeerState {
                tunn: None,
                endpoint: None,
                session_up: false,
                confirmed: false,
            }),
            denied: Default::default(),
            handshake_failures: Default::default(),
            noise: AtomicU64::new(0),
            ipv6_dropped: AtomicU64::new(0),
            grants: AtomicU64::new(grants.bits()),
            admin: std::sync::atomic::AtomicBool::new(p.admin),
            internet_seen_ms: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
            last_handshake_ms: AtomicU64::new(0),
            packets: PacketCounters::default(),
        }
    }
}
