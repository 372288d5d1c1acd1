//! `sitegate run`: brings up TUN and UDP, starts the packet loops, serves UAPI,
//! drives timers, follows the peer store, and shuts down cleanly.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arc_swap::ArcSwap;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;

use crate::config::Config;
use crate::control;
use crate::dataplane::peers::PeerTable;
use crate::dataplane::timers::{self, Timers};
use crate::dataplane::{rx, tx, udp::Udp, AnonFailures, Clock, Shared, HANDSHAKE_RATE_LIMIT};
use crate::events::CloseReason;
use crate::keys::PrivateKey;
use crate::registry::Store;

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

/// The reloadable part of the daemon: the store and the index counter for new
/// `Tunn`s.
struct Registry {
    store: Store,
    data_version: i64,
    next_index: u32,
    secret: x25519_dalek::StaticSecret,
}

impl Registry {
    /// Re-reads the store and swaps in a new peer table; peers that left get
    /// their `session_closed` event.
    fn reload(&mut self, shared: &Shared) -> anyhow::Result<usize> {
        let records = self.store.peers().context("cannot read the peer store")?;
        self.data_version = self
            .store
            .data_version()
            .context("cannot read the peer store")?;
        let secret = &self.secret;
        let old = shared.table.load_full();
        let (table, removed) =
            old.rebuild(&records, unix_now(), &mut self.next_index, |index, p| {
                Tunn::new(
                    secret.clone(),
                    p.public_key.to_x25519(),
                    p.preshared_key.as_ref().map(|k| *k.as_bytes()),
                    None,
                    index,
                    None,
                )
            });
        let active = table.peers.len();
        shared.table.store(Arc::new(table));
        for r in removed {
            if r.slot.lock().session_up {
                timers::session_closed(&r.slot, r.reason);
            }
        }
        Ok(active)
    }

    /// Whether another process committed to the store since the last read.
    fn changed(&self) -> bool {
        self.store
            .data_version()
            .is_ok_and(|v| v != self.data_version)
    }
}

/// Runs the gateway until `shutdown` completes.
///
/// # Errors
/// Startup failures, with the file, device or port named.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let iface = &cfg.interface;
    let key = PrivateKey::from_file(&iface.private_key_file)?;
    let secret = key.to_x25519();
    let public = x25519_dalek::PublicKey::from(&secret);
    let store = crate::registry::Store::open(&cfg.store)?;

    let mut builder = tun_rs::DeviceBuilder::new()
        .name(&iface.name)
        .ipv4(iface.address_v4.addr(), iface.address_v4.prefix_len(), None)
        .mtu(iface.mtu);
    if let Some(v6) = iface.address_v6 {
        builder = builder.ipv6(v6.addr(), v6.prefix_len());
    }
    let tun = builder.build_sync().with_context(|| {
        format!(
            "cannot create TUN device {} (is /dev/net/tun available and are you root?)",
            iface.name
        )
    })?;
    tun.set_nonblocking(true)
        .context("cannot make the TUN device non-blocking")?;
    let udp = Udp::bind(iface.listen_port).with_context(|| {
        format!(
            "cannot bind UDP port {} (interface.listen_port)",
            iface.listen_port
        )
    })?;
    let uapi_path = control::uapi_socket_path(&iface.name);
    let uapi = control::bind_uapi(&uapi_path)
        .with_context(|| format!("cannot serve {}", uapi_path.display()))?;

    let shared = Arc::new(Shared {
        table: ArcSwap::from_pointee(PeerTable::default()),
        udp,
        tun,
        interrupt: tun_rs::InterruptEvent::new().context("cannot create the shutdown event")?,
        static_secret: secret.clone(),
        static_public: public,
        rate_limiter: RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT),
        clock: Clock::new(),
        anon: AnonFailures::default(),
        no_route: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
    });
    let mut registry = Registry {
        store,
        data_version: -1,
        next_index: 1,
        secret,
    };
    let active = registry.reload(&shared)?;

    let rx_thread = spawn_loop("sg-rx", &shared, rx::run)?;
    let tx_thread = spawn_loop("sg-tx", &shared, tx::run)?;
    tracing::info!(
        event = "started",
        interface = %iface.name,
        listen_port = iface.listen_port,
        address = %iface.address_v4,
        public_key = %key.public_key(),
        peers = active,
    );

    let result = serve(
        &cfg,
        &shared,
        &mut registry,
        uapi,
        *key.as_bytes(),
        shutdown,
    )
    .await;

    shared.stopping.store(true, Ordering::Relaxed);
    let _ = shared.interrupt.trigger();
    for t in [rx_thread, tx_thread] {
        if t.join().is_err() {
            tracing::error!(event = "thread_panicked");
        }
    }
    for peer in shared.table.load().peers.iter() {
        if peer.lock().session_up {
            timers::session_closed(peer, CloseReason::Shutdown);
        }
    }
    let _ = std::fs::remove_file(&uapi_path);
    drop(shared); // closes the TUN fd: the kernel removes the device
    tracing::info!(event = "stopped", interface = %cfg.interface.name);
    result
}

fn spawn_loop(
    name: &str,
    shared: &Arc<Shared>,
    body: fn(&Shared),
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let shared = Arc::clone(shared);
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || body(&shared))
        .with_context(|| format!("cannot start thread {name}"))
}

/// The control loop: timers, store changes, SIGHUP, UAPI clients, until shutdown.
async fn serve(
    cfg: &Config,
    shared: &Arc<Shared>,
    registry: &mut Registry,
    uapi: tokio::net::UnixListener,
    private_key: [u8; 32],
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let mut tick = tokio::time::interval(timers::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut timers = Timers::default();
    let mut ticks: u64 = 0;
    let listen_port = cfg.interface.listen_port;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tick.tick() => {
                timers.tick(shared);
                ticks += 1;
                // Once a second: pick up commits from admin commands and expiries.
                if ticks.is_multiple_of(4) {
                    let expired = shared.table.load().next_expiry().is_some_and(|t| t <= unix_now());
                    if expired || registry.changed() {
                        if let Err(e) = registry.reload(shared) {
                            tracing::error!(event = "reload_failed", error = %format!("{e:#}"));
                        }
                    }
                }
            }
            _ = hup.recv() => {
                match registry.reload(shared) {
                    Ok(peers) => tracing::info!(event = "config_reloaded", trigger = "sighup", peers, actor = "signal"),
                    Err(e) => tracing::error!(event = "reload_failed", error = %format!("{e:#}")),
                }
            }
            accepted = uapi.accept() => {
                if let Ok((stream, _)) = accepted {
                    let shared = Arc::clone(shared);
                    tokio::spawn(async move {
                        if let Err(e) = control::serve_uapi_client(stream, shared, private_key, listen_port).await {
                            tracing::debug!(event = "uapi_error", error = %e);
                        }
                    });
                }
            }
        }
    }
}
