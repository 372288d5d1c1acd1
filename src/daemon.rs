//! `sitegate run`: brings up TUN and UDP, starts the packet loops, serves UAPI,
//! drives timers, follows the peer store, and shuts down cleanly.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::audit;
use crate::config::Config;
use crate::config::StoreConfig;
use crate::control::protocol::{self, AdminEvent, PeerLive, Request, Response, StatusView};
use crate::control::{self, server};
use crate::dataplane::batch::DeviceTun;
use crate::dataplane::peers::Removed;
use crate::dataplane::timers::{self, Timers};
use crate::dataplane::{rx, tx, udp::Udp, Device, Engine, Hooks, Runtime, MAX_RX_WORKERS};
use crate::events::{CloseReason, Throttle};
use crate::keys::PrivateKey;
use crate::privilege::{self, Plan, Target};
use crate::registry::{follow, Snapshot, Store};

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Runs the gateway until SIGTERM or SIGINT. SIGHUP reloads the peer store.
///
/// # Errors
/// Startup failures (key, store, TUN, UDP port, UAPI socket), with context.
pub fn run_until_signal(cfg: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        run(cfg, shutdown).await
    })
}

/// The daemon's view of the peer store: a SQLite file it polls, or a shared
/// PostgreSQL registry that a follower thread watches for it.
enum Registry {
    Local(LocalRegistry),
    Shared(SharedRegistry),
}

/// Who waits for a resync of the shared registry.
enum Waiter {
    /// SIGHUP: logs `config_reloaded` when done.
    Signal,
    /// A control client or the API: answered when done.
    Client(tokio::sync::oneshot::Sender<Response>),
}

type Updates = tokio::sync::mpsc::UnboundedReceiver<follow::Update<Waiter>>;

/// A shared registry, followed by [`follow::Follower`] on its own thread, so
/// that a slow or vanished database never stalls the control loop's timers.
struct SharedRegistry {
    follower: follow::Follower<Waiter>,
    /// `store_unavailable`, throttled.
    outage: Throttle,
}

/// The SQLite registry. It opens the store afresh for every
/// read, so that a database file that was moved, replaced or made unreadable
/// shows as a failed read instead of a stale connection that still works.
struct LocalRegistry {
    store: StoreConfig,
    seal: Option<Arc<crate::seal::SealKey>>,
    /// `Store::registry_version` of the snapshot in force.
    registry_version: i64,
    /// How long each read pauses inside its transaction (test hook).
    pause: std::time::Duration,
    /// `reload_failed`, throttled: an unreadable store must not flood the log.
    failures: Throttle,
}

/// Swaps in a new peer table built from `snapshot`; peers that left get their
/// `session_closed` event. Returns the number of active peers.
fn apply(engine: &Engine, snapshot: &Snapshot) -> usize {
    let old = engine.table.load_full();
    let (table, removed) = old.rebuild(
        &snapshot.peers,
        &snapshot.revoked,
        unix_now(),
        &engine.policy,
        &engine.tunn_seed(),
    );
    let active = table.peers.len();
    engine.table.store(Arc::new(table));
    close_removed(removed);
    active
}

impl Registry {
    /// Reloads on SIGHUP: now for SQLite, when the follower's snapshot
    /// arrives for a shared registry.
    fn reload_signal(&mut self, engine: &Engine) {
        match self {
            Registry::Local(r) => match r.reload(engine) {
                Ok(peers) => tracing::info!(
                    event = "config_reloaded",
                    trigger = "sighup",
                    peers,
                    actor = "signal"
                ),
                Err(e) => r.failed(engine, &e),
            },
            Registry::Shared(r) => r.resync(Waiter::Signal),
        }
    }

    /// A reload request from a control client or the API, answered on `reply`.
    fn reload_request(&mut self, engine: &Engine, reply: tokio::sync::oneshot::Sender<Response>) {
        match self {
            Registry::Local(r) => {
                let _ = reply.send(match r.reload(engine) {
                    Ok(active_peers) => Response::Reloaded { active_peers },
                    Err(e) => {
                        r.failed(engine, &e);
                        Response::Error {
                            message: format!("{e:#}"),
                        }
                    }
                });
            }
            Registry::Shared(r) => r.resync(Waiter::Client(reply)),
        }
    }

    /// Once a second: SQLite's version poll; for both, the throttled summaries.
    fn tick(&mut self, engine: &Engine) {
        match self {
            Registry::Local(r) => {
                r.poll(engine);
                r.summarise(engine);
            }
            Registry::Shared(r) => {
                if let Some(count) = r.outage.take_summary(engine.clock.now_ms()) {
                    tracing::error!(event = "store_unavailable", count, summary = true);
                }
            }
        }
    }
}

impl SharedRegistry {
    fn resync(&self, waiter: Waiter) {
        // The follower ended only if the daemon is ending.
        if let Err(std::sync::mpsc::SendError(follow::Command::Resync(w))) =
            self.follower.commands.send(follow::Command::Resync(waiter))
        {
            answer(w, Err("the registry follower has stopped".into()));
        }
    }

    /// Applies what the follower reports.
    fn update(&self, engine: &Engine, update: follow::Update<Waiter>) {
        match update {
            follow::Update::Snapshot(snapshot, waiting) => {
                let started = std::time::Instant::now();
                let active = apply(engine, &snapshot);
                tracing::debug!(
                    event = "registry_applied",
                    version = snapshot.version,
                    active,
                    apply_ms = started.elapsed().as_millis() as u64,
                );
                for w in waiting {
                    answer(w, Ok(active));
                }
            }
            follow::Update::Down { error, waiting } => {
                if self.outage.hit(engine.clock.now_ms()) {
                    // Every peer known stays served; nothing is forgotten.
                    tracing::error!(
                        event = "store_unavailable",
                        error = %error,
                        count = 1u64,
                        peers = engine.table.load().peers.len(),
                    );
                }
                for w in waiting {
                    answer(w, Err(error.clone()));
                }
            }
            follow::Update::Up { down_for } => {
                tracing::info!(
                    event = "store_reconnected",
                    down_ms = down_for.as_millis() as u64,
                );
            }
        }
    }
}

/// Tells a waiter how its resync went.
fn answer(w: Waiter, result: Result<usize, String>) {
    match (w, result) {
        (Waiter::Signal, Ok(peers)) => {
            tracing::info!(
                event = "config_reloaded",
                trigger = "sighup",
                peers,
                actor = "signal"
            );
        }
        (Waiter::Signal, Err(_)) => {} // logged as store_unavailable
        (Waiter::Client(reply), Ok(active_peers)) => {
            let _ = reply.send(Response::Reloaded { active_peers });
        }
        (Waiter::Client(reply), Err(message)) => {
            let _ = reply.send(Response::Error {
                message: format!("cannot read the peer store: {message}"),
            });
        }
    }
}

impl LocalRegistry {
    /// Re-reads the store as one snapshot and swaps in a new peer table; peers
    /// that left get their `session_closed` event. On error the table in force
    /// stays (the timer still expires its peers from memory).
    fn reload(&mut self, engine: &Engine) -> anyhow::Result<usize> {
        let store = self.open()?;
        let pause = self.pause;
        let snapshot = store
            .snapshot(|| {
                if !pause.is_zero() {
                    // Announced, so a test can act inside the pause without guessing.
                    tracing::info!(
                        event = "test_hook",
                        hook = "reload_pause_ms",
                        ms = pause.as_millis() as u64
                    );
                    std::thread::sleep(pause);
                }
            })
            .context("cannot read the peer store")?;
        let active = apply(engine, &snapshot);
        self.registry_version = snapshot.version;
        Ok(active)
    }

    /// Reloads when another process changed the registry since the snapshot
    /// in force (the safety net behind the control socket's notify).
    fn poll(&mut self, engine: &Engine) {
        let version = self
            .open()
            .and_then(|s| s.registry_version().context("cannot read the peer store"));
        match version {
            Ok(v) if v == self.registry_version => {}
            Ok(_) => {
                if let Err(e) = self.reload(engine) {
                    self.failed(engine, &e);
                }
            }
            Err(e) => self.failed(engine, &e),
        }
    }

    fn open(&self) -> anyhow::Result<Store> {
        Store::open_sealed(&self.store, self.seal.clone()).context("cannot open the peer store")
    }

    /// Logs a failed read, throttled: the first at once, then a summary with
    /// the count at most every few seconds.
    fn failed(&self, engine: &Engine, e: &anyhow::Error) {
        if self.failures.hit(engine.clock.now_ms()) {
            tracing::error!(event = "reload_failed", error = %format!("{e:#}"), count = 1u64);
        }
    }

    fn summarise(&self, engine: &Engine) {
        if let Some(count) = self.failures.take_summary(engine.clock.now_ms()) {
            tracing::error!(event = "reload_failed", count, summary = true);
        }
    }
}

/// Ends peers whose expiry has passed, from the table in memory: no store
/// read is needed, so expiry holds while the store cannot be read.
fn expire(engine: &Engine) {
    if let Some((table, removed)) = engine.table.load().without_expired(unix_now()) {
        engine.table.store(Arc::new(table));
        close_removed(removed);
    }
}

/// `session_closed` for removed peers that had a session.
fn close_removed(removed: Vec<Removed>) {
    for r in removed {
        if r.slot.lock().session_up {
            timers::session_closed(&r.slot, r.reason);
        }
    }
}

/// The daemon's socket files, removed when dropped: at the end of `run`, and
/// also when a later start step fails (a refused `[api]` section, say), so
/// that no stale socket is left for `wg show` and the CLI to find. After a
/// privilege drop the daemon cannot unlink in the root-owned socket
/// directories: the cleanup helper forked before the drop does it.
struct SocketFiles {
    paths: Vec<std::path::PathBuf>,
    helper: Option<privilege::Cleanup>,
}

impl Drop for SocketFiles {
    fn drop(&mut self) {
        match &mut self.helper {
            Some(helper) => helper.remove_now(),
            None => {
                for path in &self.paths {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// Runs blocking store work (the PostgreSQL driver runs its own runtime,
/// which must not nest in the daemon's) on a scoped thread.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// A packet loop that ended on its own: a panic or an error it cannot survive.
#[derive(Debug)]
struct Fatal {
    thread: &'static str,
    error: String,
}

/// Runs the gateway until `shutdown` completes.
///
/// # Errors
/// Startup failures, with the file, device or port named.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let iface = &cfg.interface;
    let hooks = match std::env::var(Hooks::ENV) {
        Ok(v) => Hooks::parse(&v).map_err(anyhow::Error::msg)?,
        Err(_) => Hooks::default(),
    };
    // `[daemon] user`, looked up before anything is created so that an
    // unknown user stops the start; its state files are handed over before
    // the first store open (SQLite, as root, gives new -wal/-shm files the
    // database file's owner).
    let drop_plan = match &cfg.daemon.user {
        Some(user) => {
            let target = Target::resolve(user)?;
            let plan = target.plan(nix::unistd::geteuid().as_raw())?;
            if plan == Plan::Switch {
                privilege::prepare_state(&cfg, &target)?;
            }
            Some((target, plan))
        }
        None => None,
    };
    // Opened once here so that a missing, too-new or wrongly sealed store, or
    // an unreadable seal key, stops the start before anything is created (and
    // clear secrets left from before sealing get sealed). The key is dropped
    // (zeroized) again so the cleanup helper forked below holds no copy.
    off_runtime(|| -> anyhow::Result<()> {
        drop(Store::open_sealed(
            &cfg.store,
            crate::registry::store::seal_key(&cfg)?,
        )?);
        Ok(())
    })?;

    // One receive and one transmit worker per core (up to MAX_RX_WORKERS),
    // each with its own UDP socket and TUN queue.
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_RX_WORKERS);
    let mut builder = tun_rs::DeviceBuilder::new()
        .name(&iface.name)
        .ipv4(iface.address_v4.addr(), iface.address_v4.prefix_len(), None)
        .mtu(iface.mtu)
        // Virtio-net headers: GSO super-packets in, GRO-coalesced packets out.
        .offload(true)
        // One queue per worker: the kernel steers each flow to one queue, so
        // a flow's packets are read, encrypted and sent in order.
        .multi_queue(workers > 1);
    if let Some(v6) = iface.address_v6 {
        builder = builder.ipv6(v6.addr(), v6.prefix_len());
    }
    let tun = builder.build_sync().with_context(|| {
        format!(
            "cannot create TUN device {} (is /dev/net/tun available and are you root?)",
            iface.name
        )
    })?;
    let mut queues = vec![tun];
    for _ in 1..workers {
        let queue = queues[0]
            .try_clone()
            .with_context(|| format!("cannot open another queue of TUN device {}", iface.name))?;
        queues.push(queue);
    }
    for q in &queues {
        q.set_nonblocking(true)
            .context("cannot make the TUN device non-blocking")?;
    }
    let udp = Udp::bind_group(iface.listen_port, workers).with_context(|| {
        format!(
            "cannot bind UDP port {} (interface.listen_port)",
            iface.listen_port
        )
    })?;
    // The table goes in before any packet moves, and out when `run` returns
    // (or unwinds); a leftover from a killed daemon is replaced here.
    let firewall = if cfg.firewall.manage {
        let spec = crate::firewall::render::FirewallSpec::from_config(&cfg);
        let installed = crate::firewall::apply::Installed::install(&spec)
            .context("[firewall] manage = true: cannot install the nftables table inet sitegate")?;
        tracing::info!(event = "firewall_installed", table = "inet sitegate");
        let changed = crate::firewall::apply::enable_forwarding(iface.address_v6.is_some())
            .context("[firewall] manage = true")?;
        if !changed.is_empty() {
            tracing::info!(event = "forwarding_enabled", sysctl = changed.join(","));
        }
        Some(installed)
    } else {
        None
    };
    let uapi_path = control::uapi_socket_path(&iface.name);
    let uapi = control::bind_private_socket(&uapi_path, 0o755)
        .with_context(|| format!("cannot serve {}", uapi_path.display()))?;
    let mut socket_files = SocketFiles {
        paths: vec![uapi_path],
        helper: None,
    };
    let control_path = protocol::control_socket_path(&iface.name);
    let control = control::bind_private_socket(&control_path, 0o700)
        .with_context(|| format!("cannot serve {}", control_path.display()))?;
    socket_files.paths.push(control_path);
    if let Some((_, Plan::Switch)) = &drop_plan {
        // Forked before the secrets are read, so its memory holds none.
        socket_files.helper = Some(privilege::Cleanup::spawn(&socket_files.paths)?);
    }
    let key = PrivateKey::from_file(&iface.private_key_file)?;
    // Read once, before privileges go: the reloads, the audit head store and
    // the API use this copy.
    let seal = crate::registry::store::seal_key(&cfg)?;

    // tun-rs falls back to plain packets where the kernel refuses offload.
    let offload = queues[0].tcp_gso();
    let mtu = usize::from(iface.mtu);
    let device = Arc::new(Device {
        udp,
        tun: queues,
        offload,
    });
    let interrupt =
        Arc::new(tun_rs::InterruptEvent::new().context("cannot create the shutdown event")?);
    let policy = crate::policy::Policy::from_config(&cfg);
    let engine = Arc::new(Engine::new(&key, policy));
    let runtime = Arc::new(Runtime::new(hooks));
    let local = || LocalRegistry {
        store: cfg.store.clone(),
        seal: seal.clone(),
        registry_version: -1,
        pause: std::time::Duration::from_millis(hooks.reload_pause_ms),
        failures: Throttle::default(),
    };
    let (to_loop, requests) = tokio::sync::mpsc::channel::<server::Pending>(64);
    // The admin API: bound now (the tunnel address exists) so that a bad
    // [api] section stops the start; served on this runtime until the end.
    let api_listener = crate::api::Listener::bind(
        Arc::new(cfg.clone()),
        Arc::clone(&engine),
        to_loop.clone(),
        key.public_key(),
        seal.clone(),
    )
    .await?;

    // Everything that needs root exists now: drop to `[daemon] user` while
    // this is the only thread, so every thread started below inherits it.
    let dropped = match &drop_plan {
        Some((target, plan)) => Some(privilege::drop_to(target, *plan)?),
        None => None,
    };
    // Keyed with the seal key read before the drop: never an unkeyed fallback.
    let audit_sink = match audit::writer_sealed(&cfg, seal.as_deref()) {
        Some(writer) => {
            let sink = match &cfg.store {
                // The writer thread keeps its own connection: SQLite serializes it
                // against admin commands and the registry reads.
                StoreConfig::Sqlite { .. } => {
                    let heads = Store::open_sealed(&cfg.store, seal.clone())?;
                    audit::sink::start(writer, heads)
                }
                // Connects on its thread, and outlives database outages.
                StoreConfig::Postgres { .. } => audit::sink::start(
                    writer,
                    crate::registry::postgres::AuditTable::new(&cfg.store),
                ),
            };
            Some(sink.context("cannot start the audit writer")?)
        }
        None => None,
    };
    if let Some(d) = dropped {
        // Logged once the audit sink runs, so the audit log records it too.
        tracing::info!(
            event = "privileges_dropped",
            user = %d.user,
            uid = d.uid,
            gid = d.gid,
            capabilities = %d.caps,
        );
    }
    // The channel of the shared registry's follower; a SQLite registry keeps
    // the sender so that the control loop's receive simply never fires.
    let (updates_tx, updates) = tokio::sync::mpsc::unbounded_channel();
    let (mut registry, active) = match &cfg.store {
        StoreConfig::Sqlite { .. } => {
            let mut r = local();
            let active = r.reload(&engine)?;
            (Registry::Local(r), active)
        }
        StoreConfig::Postgres { .. } => {
            let public = key.public_key();
            let (follower, first) = off_runtime(|| -> anyhow::Result<_> {
                // Every gateway of one registry answers with one server key.
                Store::open_sealed(&cfg.store, seal.clone())?.bind_server_key(&public)?;
                Ok(follow::Follower::start(
                    &cfg.store,
                    seal.clone(),
                    updates_tx.clone(),
                )?)
            })?;
            let active = apply(&engine, &first);
            let shared = SharedRegistry {
                follower,
                outage: Throttle::default(),
            };
            (Registry::Shared(shared), active)
        }
    };

    let (fatal_tx, fatal_rx) = tokio::sync::mpsc::unbounded_channel::<Fatal>();
    let (initiations, queued) = std::sync::mpsc::sync_channel(rx::HANDSHAKE_QUEUE);
    let handshake_thread = {
        let (engine, runtime, device) = (
            Arc::clone(&engine),
            Arc::clone(&runtime),
            Arc::clone(&device),
        );
        spawn_loop("sg-handshake", fatal_tx.clone(), move || {
            rx::run_handshakes(&engine, &runtime, queued, device.sender())
        })?
    };
    let mut loop_threads = Vec::with_capacity(device.udp.len() + 2);
    for (i, name) in RX_THREAD_NAMES.iter().enumerate().take(device.udp.len()) {
        let (engine, runtime, device, interrupt, initiations) = (
            Arc::clone(&engine),
            Arc::clone(&runtime),
            Arc::clone(&device),
            Arc::clone(&interrupt),
            initiations.clone(),
        );
        loop_threads.push(spawn_loop(name, fatal_tx.clone(), move || {
            let tun = DeviceTun {
                tun: &device.tun[i],
                interrupt: &interrupt,
            };
            rx::run(
                &engine,
                &runtime,
                &device.udp[i],
                &tun,
                device.offload,
                initiations,
            )
        })?);
    }
    // The workers hold the queue's senders: when they end, the handshake
    // worker sees it closed and ends too.
    drop(initiations);
    for (i, name) in TX_THREAD_NAMES.iter().enumerate().take(device.tun.len()) {
        let (engine, runtime, device, interrupt) = (
            Arc::clone(&engine),
            Arc::clone(&runtime),
            Arc::clone(&device),
            Arc::clone(&interrupt),
        );
        loop_threads.push(spawn_loop(name, fatal_tx.clone(), move || {
            let tun = DeviceTun {
                tun: &device.tun[i],
                interrupt: &interrupt,
            };
            tx::run(&engine, &runtime, &device.udp[i], &tun, mtu)
        })?);
    }
    drop(fatal_tx);
    tracing::info!(
        event = "started",
        interface = %iface.name,
        listen_port = iface.listen_port,
        address = %iface.address_v4,
        public_key = %key.public_key(),
        peers = active,
    );

    let info = Info {
        interface: iface.name.clone(),
        public_key: key.public_key().to_base64(),
        listen_port: iface.listen_port,
        started_at: unix_now(),
        private_key: Arc::new(key.clone()),
    };
    let api_task = match api_listener {
        Some(listener) => {
            if let Some(api) = &cfg.api {
                tracing::info!(event = "api_listening", listen = %api.listen, tls = api.tls.is_some());
            }
            Some(tokio::spawn(listener.serve()))
        }
        None => None,
    };
    let sockets = Sockets {
        uapi,
        control,
        fatal: fatal_rx,
        to_loop,
        requests,
    };
    let result = serve(
        &info,
        &engine,
        &runtime,
        device.sender(),
        (&mut registry, updates),
        sockets,
        shutdown,
    )
    .await;
    drop(updates_tx);
    if let Registry::Shared(shared) = registry {
        // The follower ends at its next wait (see `follow::Follower`).
        drop(shared.follower);
    }
    if let Some(task) = api_task {
        task.abort();
    }

    runtime.stopping.store(true, Ordering::Relaxed);
    let _ = interrupt.trigger();
    loop_threads.push(handshake_thread);
    for t in loop_threads {
        // A loop's failure was reported through the fatal channel already.
        let _ = t.join();
    }
    for peer in engine.table.load().peers.iter() {
        if peer.lock().session_up {
            timers::session_closed(peer, CloseReason::Shutdown);
        }
    }
    drop(socket_files);
    drop(engine);
    drop(device); // the last reference: closes the TUN fd, the kernel removes the device
    drop(firewall);
    tracing::info!(event = "stopped", interface = %cfg.interface.name);
    if let Some(sink) = audit_sink {
        sink.stop();
    }
    result
}

/// Starts a packet loop on its own thread. If the loop panics or returns an
/// error, the control loop hears of it through `fatal` and ends the daemon: a
/// gateway with one direction dead must not keep answering `wg show`.
/// Thread names of the receive workers (`top -H`, the bench's per-thread CPU).
const RX_THREAD_NAMES: [&str; MAX_RX_WORKERS] = ["sg-rx", "sg-rx-1", "sg-rx-2", "sg-rx-3"];
/// Thread names of the transmit workers.
const TX_THREAD_NAMES: [&str; MAX_RX_WORKERS] = ["sg-tx", "sg-tx-1", "sg-tx-2", "sg-tx-3"];

fn spawn_loop(
    name: &'static str,
    fatal: tokio::sync::mpsc::UnboundedSender<Fatal>,
    body: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let error = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .copied()
                        .or_else(|| panic.downcast_ref::<String>().map(String::as_str));
                    format!("panic: {}", message.unwrap_or("(no message)"))
                }
            };
            let _ = fatal.send(Fatal {
                thread: name,
                error,
            });
        })
        .with_context(|| format!("cannot start thread {name}"))
}

/// What the control loop reports about itself.
struct Info {
    interface: String,
    public_key: String,
    listen_port: u16,
    started_at: i64,
    private_key: Arc<PrivateKey>,
}

struct Sockets {
    uapi: tokio::net::UnixListener,
    control: tokio::net::UnixListener,
    fatal: tokio::sync::mpsc::UnboundedReceiver<Fatal>,
    /// Requests for the loop from control clients and the admin API.
    to_loop: tokio::sync::mpsc::Sender<server::Pending>,
    requests: tokio::sync::mpsc::Receiver<server::Pending>,
}

/// The control loop: timers, store changes, SIGHUP, UAPI and admin clients,
/// until shutdown. It alone owns the registry, so every reload is serialized.
async fn serve(
    info: &Info,
    engine: &Arc<Engine>,
    runtime: &Runtime,
    udp: &Udp,
    (registry, mut updates): (&mut Registry, Updates),
    mut sockets: Sockets,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let mut tick = tokio::time::interval(timers::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut timers = Timers::default();
    let mut ticks: u64 = 0;
    let to_loop = sockets.to_loop.clone();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            Some(f) = sockets.fatal.recv() => {
                tracing::error!(event = "fatal", thread = f.thread, error = %f.error);
                anyhow::bail!("packet thread {} failed: {}", f.thread, f.error);
            }
            _ = tick.tick() => {
                // Expiry from memory, every tick (within 250 ms of the deadline),
                // before the timers run so an expired peer gets no keepalive.
                expire(engine);
                engine.poll_timers(&mut timers, runtime, udp);
                ticks += 1;
                // Commits by other processes, once a second: the safety net
                // behind the control socket.
                if ticks.is_multiple_of(4) {
                    registry.tick(engine);
                }
            }
            _ = hup.recv() => registry.reload_signal(engine),
            Some(update) = updates.recv() => {
                if let Registry::Shared(r) = registry {
                    r.update(engine, update);
                }
            }
            Some((request, reply)) = sockets.requests.recv() => {
                match request {
                    Request::Reload { event } => {
                        if let Some(e) = &event {
                            log_admin_event(e);
                        }
                        registry.reload_request(engine, reply);
                    }
                    Request::Status {} => {
                        let _ = reply.send(Response::Status(status_view(info, engine)));
                    }
                }
            }
            accepted = sockets.control.accept() => {
                if let Ok((stream, _)) = accepted {
                    let to_loop = to_loop.clone();
                    tokio::spawn(async move {
                        if let Err(e) = server::serve_client(stream, to_loop).await {
                            tracing::debug!(event = "control_error", error = %e);
                        }
                    });
                }
            }
            accepted = sockets.uapi.accept() => {
                if let Ok((stream, _)) = accepted {
                    let engine = Arc::clone(engine);
                    let (key, port) = (Arc::clone(&info.private_key), info.listen_port);
                    tokio::spawn(async move {
                        if let Err(e) = control::serve_uapi_client(stream, engine, key, port).await {
                            tracing::debug!(event = "uapi_error", error = %e);
                        }
                    });
                }
            }
        }
    }
}

/// Logs an admin action relayed by a CLI command (already audited by it);
/// its `actor` was set from the connection's peer credentials.
fn log_admin_event(e: &AdminEvent) {
    let field = |k: &str| e.fields.get(k).map(String::as_str);
    tracing::info!(
        event = e.event.as_str(),
        actor = e.actor.as_str(),
        peer = field("peer"),
        public_key = field("public_key"),
        old_public_key = field("old_public_key"),
        reason = field("reason"),
        sudo_user = field("sudo_user"),
        origin = "control",
    );
}

fn status_view(info: &Info, engine: &Engine) -> StatusView {
    let table = engine.table.load();
    let (now_ms, wall_now) = (engine.clock.now_ms(), unix_now());
    let peers = table
        .peers
        .iter()
        .map(|p| {
            let live = p.live();
            let expires = p.expires_at.load(Ordering::Relaxed);
            PeerLive {
                name: p.name.to_string(),
                public_key: p.public_key.to_base64(),
                addresses: p.addresses.iter().map(ToString::to_string).collect(),
                endpoint: live.endpoint.map(|e| e.to_string()),
                latest_handshake: live.last_handshake.map(|d| d.as_secs() as i64),
                rx_bytes: live.rx_bytes,
                tx_bytes: live.tx_bytes,
                session: live.session,
                expires_at: (expires != i64::MAX).then_some(expires),
                denied: crate::policy::DenyReason::ALL
                    .iter()
                    .map(|r| (r.as_str().to_string(), p.denied[r.index()].total()))
                    .collect(),
                noise_dropped: p.noise.load(Ordering::Relaxed),
                ipv6_dropped: p.ipv6_dropped.load(Ordering::Relaxed),
                internet_seen_at: match p.internet_seen_ms.load(Ordering::Relaxed) {
                    0 => None,
                    ms => Some(wall_now - (now_ms.saturating_sub(ms) / 1000) as i64),
                },
            }
        })
        .collect();
    StatusView {
        interface: info.interface.clone(),
        public_key: info.public_key.clone(),
        listen_port: info.listen_port,
        started_at: info.started_at,
        udp_send_errors: engine.io_errors.udp_send_errors(),
        tun_write_errors: engine.io_errors.tun_write_errors(),
        peers,
    }
}
