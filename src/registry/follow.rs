//! Following a shared registry from a running gateway: a thread that holds a
//! `LISTEN` connection, reads a fresh snapshot whenever another host commits a
//! change, checks the version as a safety net (a notification lost while the
//! connection was down), and reconnects with backoff when the database goes
//! away. The control loop applies what it sends; while the database is away
//! the table in force stays (every peer it knew keeps working, every
//! revocation and expiry it heard stays enforced), and the first snapshot after
//! reconnecting catches up.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::StoreConfig;
use std::collections::BTreeMap;

use crate::registry::postgres::{Delta, PgStore};
use crate::registry::store::{RevokedKey, Snapshot, StoreError};
use crate::registry::Peer;
use crate::seal::SealKey;

/// How long one wait for a notification lasts before the thread looks at its
/// commands (a resync request, or stop).
const WAIT: Duration = Duration::from_millis(100);
/// How often the version is read even without a notification.
pub const VERSION_CHECK: Duration = Duration::from_secs(5);
/// How often the whole registry is read even when the version has not moved.
pub const FULL_RESYNC: Duration = Duration::from_secs(300);
/// Reconnect backoff: first wait, and the longest.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the control loop asks of the follower.
pub enum Command<W> {
    /// Read a snapshot now and hand `W` back with it (a reload request that
    /// waits for its answer).
    Resync(W),
}

/// What the follower tells the control loop.
pub enum Update<W> {
    /// A snapshot to apply, with the requests that wait for it.
    Snapshot(Snapshot, Vec<W>),
    /// The database is unreachable; `waiting` requests get this error.
    Down { error: String, waiting: Vec<W> },
    /// The database is back after `down_for`; a snapshot follows.
    Up { down_for: Duration },
}

/// The follower thread's command side. The thread is not joined: it ends at
/// its next wait once the control loop drops this sender (or the update
/// receiver), and a connect in progress may take its full timeout.
pub struct Follower<W> {
    pub commands: Sender<Command<W>>,
}

impl<W: Send + 'static> Follower<W> {
    /// Connects, subscribes and reads the first snapshot here, so that an
    /// unreachable or refused database stops the daemon's start with a clear
    /// error; then follows on thread `sg-registry`.
    ///
    /// # Errors
    /// The store errors of [`PgStore::open_sealed`] and the first snapshot.
    pub fn start(
        cfg: &StoreConfig,
        seal: Option<Arc<SealKey>>,
        updates: tokio::sync::mpsc::UnboundedSender<Update<W>>,
    ) -> Result<(Follower<W>, Snapshot), StoreError> {
        let store = PgStore::open_sealed(cfg, seal.clone())?;
        store.listen()?;
        let first = store.snapshot(|| {})?;
        let (commands, rx) = std::sync::mpsc::channel();
        let cfg = cfg.clone();
        let mirror = Mirror::from_snapshot(&first);
        std::thread::Builder::new()
            .name("sg-registry".into())
            .spawn(move || {
                let mut f = Following {
                    cfg,
                    seal,
                    commands: rx,
                    updates,
                    mirror,
                    need: false,
                };
                f.run(Some(store));
            })
            .map_err(|e| StoreError::Connect {
                url: String::new(),
                reason: format!("cannot start thread sg-registry: {e}"),
            })?;
        Ok((Follower { commands }, first))
    }
}

struct Following<W> {
    cfg: StoreConfig,
    seal: Option<Arc<SealKey>>,
    commands: Receiver<Command<W>>,
    updates: tokio::sync::mpsc::UnboundedSender<Update<W>>,
    /// The registry as last read and sent.
    mirror: Mirror,
    /// Read what changed at the next turn (a notification, a reconnect).
    need: bool,
}

/// Why following stopped on a connection.
enum Stop {
    /// The control loop is gone: end the thread.
    Quit,
    /// The connection failed: reconnect.
    Lost(String),
}

impl<W> Following<W> {
    fn run(&mut self, mut connected: Option<PgStore>) {
        let mut backoff = BACKOFF_MIN;
        let mut down_since: Option<Instant> = None;
        let mut waiting: Vec<W> = Vec::new();
        loop {
            let store = match connected.take() {
                Some(s) => s,
                None => match PgStore::open_sealed(&self.cfg, self.seal.clone())
                    .and_then(|s| s.listen().map(|()| s))
                {
                    Ok(s) => s,
                    Err(e) => {
                        down_since.get_or_insert_with(Instant::now);
                        if self.down(e.to_string(), &mut waiting).is_err()
                            || self.pause(backoff, &e.to_string()).is_err()
                        {
                            return;
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                },
            };
            backoff = BACKOFF_MIN;
            if let Some(since) = down_since.take() {
                if self
                    .updates
                    .send(Update::Up {
                        down_for: since.elapsed(),
                    })
                    .is_err()
                {
                    return;
                }
                // Catch up: whatever changed while away.
                self.need = true;
            }
            match self.follow(&store, &mut waiting) {
                Stop::Quit => return,
                Stop::Lost(error) => {
                    down_since = Some(Instant::now());
                    if self.down(error, &mut waiting).is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Follows on one connection until it fails or the loop quits.
    fn follow(&mut self, store: &PgStore, waiting: &mut Vec<W>) -> Stop {
        let mut last_check = Instant::now();
        let mut last_full = Instant::now();
        loop {
            let full = last_full.elapsed() >= FULL_RESYNC;
            if self.need || full || !waiting.is_empty() {
                match self.read(store, full) {
                    Ok(moved) => {
                        if (moved || full || !waiting.is_empty())
                            && self
                                .updates
                                .send(Update::Snapshot(
                                    self.mirror.snapshot(),
                                    std::mem::take(waiting),
                                ))
                                .is_err()
                        {
                            return Stop::Quit;
                        }
                        self.need = false;
                        if full {
                            last_full = Instant::now();
                        }
                        last_check = Instant::now();
                    }
                    Err(e) => return Stop::Lost(e.to_string()),
                }
            }
            match store.wait_changed(WAIT) {
                Ok(changed) => self.need |= changed,
                Err(e) => return Stop::Lost(e.to_string()),
            }
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Resync(w)) => waiting.push(w),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return Stop::Quit,
                }
            }
            if last_check.elapsed() >= VERSION_CHECK {
                last_check = Instant::now();
                match store.registry_version() {
                    Ok(v) => self.need |= v != self.mirror.version,
                    Err(e) => return Stop::Lost(e.to_string()),
                }
            }
        }
    }

    /// Brings the mirror up to date: what changed since its version, or the
    /// whole registry when `full` or when the change log does not reach back.
    /// True when the version moved.
    fn read(&mut self, store: &PgStore, full: bool) -> Result<bool, StoreError> {
        let started = Instant::now();
        let before = self.mirror.version;
        let delta = if full {
            None
        } else {
            store.changes_since(before)?
        };
        let kind = match delta {
            Some(d) => {
                self.mirror.apply(d);
                "delta"
            }
            None => {
                self.mirror = Mirror::from_snapshot(&store.snapshot(|| {})?);
                "full"
            }
        };
        // Debug level: what a change costs each gateway (benches/registry.sh).
        tracing::debug!(
            event = "registry_synced",
            read = kind,
            version = self.mirror.version,
            peers = self.mirror.peers.len() as u64,
            read_ms = started.elapsed().as_millis() as u64,
        );
        Ok(self.mirror.version != before)
    }

    /// Reports the outage; requests waiting get the error.
    fn down(&self, error: String, waiting: &mut Vec<W>) -> Result<(), ()> {
        self.updates
            .send(Update::Down {
                error,
                waiting: std::mem::take(waiting),
            })
            .map_err(drop)
    }

    /// Waits out a backoff, answering resync requests with the outage.
    fn pause(&self, wait: Duration, error: &str) -> Result<(), ()> {
        let end = Instant::now() + wait;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match self.commands.recv_timeout(left) {
                Ok(Command::Resync(w)) => {
                    self.updates
                        .send(Update::Down {
                            error: error.to_string(),
                            waiting: vec![w],
                        })
                        .map_err(drop)?;
                }
                Err(RecvTimeoutError::Timeout) => return Ok(()),
                Err(RecvTimeoutError::Disconnected) => return Err(()),
            }
        }
    }
}

/// The registry as the follower holds it, keyed so that a [`Delta`] merges in.
#[derive(Debug, Default)]
struct Mirror {
    version: i64,
    peers: BTreeMap<i64, Peer>,
    /// By base64 key.
    revoked: BTreeMap<String, RevokedKey>,
}

impl Mirror {
    fn from_snapshot(s: &Snapshot) -> Mirror {
        Mirror {
            version: s.version,
            peers: s.peers.iter().map(|p| (p.id, p.clone())).collect(),
            revoked: s
                .revoked
                .iter()
                .map(|r| (r.public_key.to_base64(), r.clone()))
                .collect(),
        }
    }

    /// Merges what changed: changed peers and entries replace theirs, gone
    /// ones leave.
    fn apply(&mut self, d: Delta) {
        for p in d.peers {
            self.peers.insert(p.id, p);
        }
        for id in d.gone {
            self.peers.remove(&id);
        }
        for r in d.revoked {
            self.revoked.insert(r.public_key.to_base64(), r);
        }
        for k in d.unrevoked {
            self.revoked.remove(&k);
        }
        self.version = d.version;
    }

    /// The snapshot the control loop applies: peers by id, as a full read
    /// orders them; the revocation list oldest first.
    fn snapshot(&self) -> Snapshot {
        let mut revoked: Vec<RevokedKey> = self.revoked.values().cloned().collect();
        revoked.sort_by(|a, b| {
            (a.revoked_at, a.public_key.to_base64()).cmp(&(b.revoked_at, b.public_key.to_base64()))
        });
        Snapshot {
            peers: self.peers.values().cloned().collect(),
            revoked,
            version: self.version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use crate::registry::PeerName;

    fn peer(id: i64, name: &str) -> Peer {
        Peer {
            id,
            name: PeerName::new(name).unwrap(),
            public_key: PrivateKey::generate().public_key(),
            preshared_key: None,
            addresses: vec![format!("10.8.0.{}", id + 1).parse().unwrap()],
            created_at: 1,
            expires_at: None,
            revoked_at: None,
            revoked_reason: None,
            admin: false,
            services: vec![],
        }
    }

    fn revoked(p: &Peer, at: i64) -> RevokedKey {
        RevokedKey {
            public_key: p.public_key,
            peer: p.name.to_string(),
            reason: None,
            revoked_at: at,
        }
    }

    /// A delta merged into the mirror gives what a full read of the new state
    /// gives: changed peers replaced, new ones added, gone ones and
    /// un-revoked keys removed, the list in revocation order.
    #[test]
    fn delta_merges_like_a_full_read() {
        let (a, b, c) = (peer(1, "a"), peer(2, "b"), peer(3, "c"));
        let mut m = Mirror::from_snapshot(&Snapshot {
            peers: vec![a.clone(), b.clone(), c.clone()],
            revoked: vec![revoked(&c, 5)],
            version: 10,
        });
        let mut b2 = b.clone();
        b2.revoked_at = Some(20);
        b2.addresses.clear();
        let d = peer(4, "d");
        m.apply(Delta {
            version: 14,
            peers: vec![b2.clone(), d.clone()],
            gone: vec![1],
            revoked: vec![revoked(&b, 20)],
            unrevoked: vec![c.public_key.to_base64()],
        });
        let s = m.snapshot();
        assert_eq!(s.version, 14);
        let ids: Vec<i64> = s.peers.iter().map(|p| p.id).collect();
        assert_eq!(ids, [2, 3, 4]);
        assert_eq!(s.peers[0].revoked_at, Some(20));
        assert!(s.peers[0].addresses.is_empty());
        assert_eq!(s.revoked, [revoked(&b, 20)]);
        // An empty delta moves nothing but the version.
        m.apply(Delta {
            version: 14,
            ..Delta::default()
        });
        assert_eq!(m.snapshot().peers.len(), 3);
    }
}
