//! `sitegate run`: brings up TUN and UDP, starts the packet loops, serves UAPI,
//! drives timers, follows the peer store, and shuts down cleanly.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use boringtun::noise::Tunn;

use crate::audit;
use crate::config::Config;
use crate::control::protocol::{self, AdminEvent, PeerLive, Request, Response, StatusView};
use crate::control::{self, server};
use crate::dataplane::timers::{self, Timers};
use crate::dataplane::{rx, tx, udp::Udp, Device, Shared};
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
    /// `Store::registry_version` at the last reload.
    registry_version: i64,
    next_index: u32,
    secret: x25519_dalek::StaticSecret,
}

impl Registry {
    /// Re-reads the store and swaps in a new peer table; peers that left get
    /// their `session_closed` event.
    fn reload(&mut self, shared: &Shared) -> anyhow::Result<usize> {
        let records = self.store.peers().context("cannot read the peer store")?;
        let revoked = self
            .store
            .revoked_keys()
            .context("cannot read the peer store")?;
        self.registry_version = self
            .store
            .registry_version()
            .context("cannot read the peer store")?;
        let secret = &self.secret;
        let old = shared.table.load_full();
        let (table, removed) = old.rebuild(
            &records,
            &revoked,
            unix_now(),
            &mut self.next_index,
            |index, p| {
                Tunn::new(
                    secret.clone(),
                    p.public_key.to_x25519(),
                    p.preshared_key.as_ref().map(|k| *k.as_bytes()),
                    None,
                    index,
                    None,
                )
            },
        );
        let active = table.peers.len();
        shared.table.store(Arc::new(table));
        for r in removed {
            if r.slot.lock().session_up {
                timers::session_closed(&r.slot, r.reason);
            }
        }
        Ok(active)
    }

    /// Whether another process changed the registry since the last read.
    fn changed(&self) -> bool {
        self.store
            .registry_version()
            .is_ok_and(|v| v != self.registry_version)
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
    let store = crate::registry::Store::open(&cfg.store)?;

    let mut builder = tun_rs::DeviceBuilder::new()
        .name(&iface.name)
        .ipv4(iface.address_v4.addr(), iface.address_v4.prefix_len(), None)
        .mtu(iface.mtu)
        // Virtio-net headers: GSO super-packets in, GRO-coalesced packets out.
        .offload(true);
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
    let uapi = control::bind_private_socket(&uapi_path, 0o755)
        .with_context(|| format!("cannot serve {}", uapi_path.display()))?;
    let control_path = protocol::control_socket_path(&iface.name);
    let control = control::bind_private_socket(&control_path, 0o700)
        .with_context(|| format!("cannot serve {}", control_path.display()))?;
    let audit_sink = match &cfg.log.audit_file {
        Some(path) => {
            // The writer thread keeps its own connection: SQLite serializes it
            // against admin commands and the registry reads.
            let heads = Store::open(&cfg.store)?;
            let writer =
                audit::writer::AuditWriter::new(path).with_rotate_bytes(cfg.log.audit_rotate_bytes);
            Some(audit::sink::start(writer, heads).context("cannot start the audit writer")?)
        }
        None => None,
    };

    // tun-rs falls back to plain packets where the kernel refuses offload.
    let offload = tun.tcp_gso();
    let mtu = usize::from(iface.mtu);
    let device = Arc::new(Device { udp, tun, offload });
    let interrupt =
        Arc::new(tun_rs::InterruptEvent::new().context("cannot create the shutdown event")?);
    let shared = Arc::new(Shared::new(Box::new(Arc::clone(&device)), &key));
    let mut registry = Registry {
        store,
        registry_version: -1,
        next_index: 1,
        secret,
    };
    let active = registry.reload(&shared)?;

    let rx_thread = {
        let (shared, device) = (Arc::clone(&shared), Arc::clone(&device));
        spawn_loop("sg-rx", move || {
            rx::run(&shared, &device.udp, &device.tun, device.offload)
        })?
    };
    let tx_thread = {
        let (shared, device, interrupt) = (
            Arc::clone(&shared),
            Arc::clone(&device),
            Arc::clone(&interrupt),
        );
        spawn_loop("sg-tx", move || {
            tx::run(&shared, &device.udp, &device.tun, &interrupt, mtu)
        })?
    };
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
        private_key: *key.as_bytes(),
    };
    let sockets = Sockets { uapi, control };
    let result = serve(&info, &shared, &mut registry, sockets, shutdown).await;

    shared.stopping.store(true, Ordering::Relaxed);
    let _ = interrupt.trigger();
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
    let _ = std::fs::remove_file(&control_path);
    drop(shared);
    drop(device); // the last reference: closes the TUN fd, the kernel removes the device
    tracing::info!(event = "stopped", interface = %cfg.interface.name);
    if let Some(sink) = audit_sink {
        sink.stop();
    }
    result
}

fn spawn_loop(
    name: &str,
    body: impl FnOnce() + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(body)
        .with_context(|| format!("cannot start thread {name}"))
}

/// What the control loop reports about itself.
struct Info {
    interface: String,
    public_key: String,
    listen_port: u16,
    started_at: i64,
    private_key: [u8; 32],
}

struct Sockets {
    uapi: tokio::net::UnixListener,
    control: tokio::net::UnixListener,
}

/// The control loop: timers, store changes, SIGHUP, UAPI and admin clients,
/// until shutdown. It alone owns the registry, so every reload is serialized.
async fn serve(
    info: &Info,
    shared: &Arc<Shared>,
    registry: &mut Registry,
    sockets: Sockets,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let mut tick = tokio::time::interval(timers::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut timers = Timers::default();
    let mut ticks: u64 = 0;
    let (to_loop, mut requests) = tokio::sync::mpsc::channel::<server::Pending>(64);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tick.tick() => {
                timers.tick(shared);
                ticks += 1;
                // Expiry is checked every tick (within 250 ms of the deadline);
                // commits by other processes once a second, as the safety net
                // behind the control socket.
                let expired = shared.table.load().next_expiry().is_some_and(|t| t <= unix_now());
                if expired || (ticks.is_multiple_of(4) && registry.changed()) {
                    if let Err(e) = registry.reload(shared) {
                        tracing::error!(event = "reload_failed", error = %format!("{e:#}"));
                    }
                }
            }
            _ = hup.recv() => {
                match registry.reload(shared) {
                    Ok(peers) => tracing::info!(event = "config_reloaded", trigger = "sighup", peers, actor = "signal"),
                    Err(e) => tracing::error!(event = "reload_failed", error = %format!("{e:#}")),
                }
            }
            Some((request, reply)) = requests.recv() => {
                let _ = reply.send(handle_request(info, shared, registry, request));
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
                    let shared = Arc::clone(shared);
                    let (key, port) = (info.private_key, info.listen_port);
                    tokio::spawn(async move {
                        if let Err(e) = control::serve_uapi_client(stream, shared, key, port).await {
                            tracing::debug!(event = "uapi_error", error = %e);
                        }
                    });
                }
            }
        }
    }
}

fn handle_request(
    info: &Info,
    shared: &Shared,
    registry: &mut Registry,
    request: Request,
) -> Response {
    match request {
        Request::Reload { event } => {
            if let Some(e) = &event {
                log_admin_event(e);
            }
            match registry.reload(shared) {
                Ok(active_peers) => Response::Reloaded { active_peers },
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            }
        }
        Request::Status {} => Response::Status(status_view(info, shared)),
    }
}

/// Logs an admin action relayed by a CLI command (already audited by it).
fn log_admin_event(e: &AdminEvent) {
    let field = |k: &str| e.fields.get(k).map(String::as_str);
    tracing::info!(
        event = e.event.as_str(),
        actor = e.actor.as_str(),
        peer = field("peer"),
        public_key = field("public_key"),
        old_public_key = field("old_public_key"),
        reason = field("reason"),
        origin = "control",
    );
}

fn status_view(info: &Info, shared: &Shared) -> StatusView {
    let table = shared.table.load();
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
            }
        })
        .collect();
    StatusView {
        interface: info.interface.clone(),
        public_key: info.public_key.clone(),
        listen_port: info.listen_port,
        started_at: info.started_at,
        peers,
    }
}
