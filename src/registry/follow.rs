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
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::StoreConfig;
use crate::registry::postgres::PgStore;
use crate::registry::store::{Snapshot, StoreError};
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

/// The follower thread; it ends when the control loop drops its command
/// sender (or the update receiver).
pub struct Follower<W> {
    pub commands: Sender<Command<W>>,
    thread: JoinHandle<()>,
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
        let version = first.version;
        let thread = std::thread::Builder::new()
            .name("sg-registry".into())
            .spawn(move || {
                let mut f = Following {
                    cfg,
                    seal,
                    commands: rx,
                    updates,
                    version,
                };
                f.run(Some(store));
            })
            .map_err(|e| StoreError::Connect {
                url: String::new(),
                reason: format!("cannot start thread sg-registry: {e}"),
            })?;
        Ok((Follower { commands, thread }, first))
    }

    /// Ends the thread (within one wait) and joins it.
    pub fn stop(self) {
        drop(self.commands);
        let _ = self.thread.join();
    }
}

struct Following<W> {
    cfg: StoreConfig,
    seal: Option<Arc<SealKey>>,
    commands: Receiver<Command<W>>,
    updates: tokio::sync::mpsc::UnboundedSender<Update<W>>,
    /// The version of the last snapshot sent.
    version: i64,
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
                self.version = -1;
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
        let mut need = self.version < 0;
        let mut last_check = Instant::now();
        let mut last_full = Instant::now();
        loop {
            if need || !waiting.is_empty() {
                let started = Instant::now();
                match store.snapshot(|| {}) {
                    Ok(s) => {
                        // Debug level: what a change costs each gateway (benches/registry.sh).
                        tracing::debug!(
                            event = "registry_synced",
                            version = s.version,
                            peers = s.peers.len() as u64,
                            read_ms = started.elapsed().as_millis() as u64,
                        );
                        self.version = s.version;
                        if self
                            .updates
                            .send(Update::Snapshot(s, std::mem::take(waiting)))
                            .is_err()
                        {
                            return Stop::Quit;
                        }
                        need = false;
                        last_full = Instant::now();
                        last_check = last_full;
                    }
                    Err(e) => return Stop::Lost(e.to_string()),
                }
            }
            match store.wait_changed(WAIT) {
                Ok(changed) => need |= changed,
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
                    Ok(v) => need |= v != self.version,
                    Err(e) => return Stop::Lost(e.to_string()),
                }
            }
            need |= last_full.elapsed() >= FULL_RESYNC;
        }
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
