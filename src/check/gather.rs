//! The thin shell of `sitegate check`: reads the config, files, `/proc/net`,
//! local addresses, `nft`, the store and the control socket into the facts of
//! [`super::decide`], and orders the lines. No verdict is made here.

use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use super::decide::{
    self, AuditFacts, Bound, Daemon, FileFacts, FileRole, FileState, IssuedConfig, RegistryFacts,
    SealFacts, ServiceFacts, TableFacts, UserFacts,
};
use super::procnet::{self, TCP_LISTEN};
use super::{Line, Report};
use crate::clientconf::{self, ClientConfig};
use crate::config::{Config, ConfigError, Protocol, StoreConfig};
use crate::control::client::{self, ClientError};
use crate::control::protocol::{control_socket_path, Request, Response};
use crate::firewall::render::{self, FirewallSpec, TABLE};
use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use crate::registry::Store;

pub(super) fn run(config: &Path) -> Report {
    let path = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
    // `Config::parse`, not `load`: `load` refuses a loose key file, which
    // `check` must report as a file-permissions line instead.
    let parsed = std::fs::read_to_string(&path)
        .map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })
        .and_then(|text| Config::parse(&path, &text));
    let cfg = match parsed {
        Ok(c) => c,
        Err(e) => {
            return Report {
                lines: vec![Line::fail("config", e.to_string())],
            }
        }
    };
    let now = unix_now();
    let mut lines = vec![Line::pass("config", format!("{} is valid", path.display()))];

    lines.extend(decide::file_permissions(&files(&cfg)));

    // Counted before `registry` opens the store, which seals clear secrets.
    let sealing = SealFacts {
        counts: Store::inspect_secrets(&cfg.store).map_err(|e| e.to_string()),
        key: cfg.daemon.seal_key_file.as_ref().map(|_| {
            crate::registry::store::seal_key(&cfg)
                .map_err(|e| e.to_string())
                .and_then(|k| {
                    Store::open_sealed(&cfg.store, k)
                        .map(drop)
                        .map_err(|e| e.to_string())
                })
        }),
    };
    let registry = registry(&cfg);
    let issued = registry.as_ref().map(|r| issued_configs(&cfg, r, now));
    lines.extend(decide::full_routes(
        issued.as_deref().map_err(|e| e.as_str()),
    ));

    let mut sockets = Sockets::default();
    let api_bound = match &cfg.api {
        Some(a) => sockets.bound(Protocol::Tcp, a.listen.port()),
        None => Ok(Vec::new()),
    };
    lines.extend(decide::api_listen(
        cfg.api.as_ref(),
        &cfg.interface,
        &api_bound,
    ));
    lines.extend(decide::service_listeners(&services(&cfg, &mut sockets)));

    lines.push(decide::audit_log(&audit(&cfg)));

    let daemon = ask_daemon(&cfg);
    let table = if cfg.firewall.manage && matches!(daemon, Daemon::Running(_)) {
        list_table()
    } else {
        TableFacts::NotLooked
    };
    let expected = decide::rules_per_chain(&render::ruleset(&FirewallSpec::from_config(&cfg)));
    lines.push(decide::firewall(
        cfg.firewall.manage,
        &daemon,
        &table,
        &expected,
    ));
    lines.extend(decide::live_peers(
        &daemon,
        registry.as_ref().map_err(String::as_str),
        now,
    ));

    lines.extend(decide::unenforced_keys(&cfg.path, &cfg.unenforced_keys()));
    let user = cfg.daemon.user.as_deref().map(|u| {
        let facts = match nix::unistd::User::from_name(u) {
            Ok(Some(u)) if u.uid.is_root() => UserFacts::Root,
            Ok(Some(_)) => UserFacts::Exists,
            Ok(None) => UserFacts::NoSuchUser,
            Err(e) => UserFacts::LookupFailed(e.to_string()),
        };
        (u, facts)
    });
    lines.push(decide::privileges(user));
    lines.push(decide::sealing(
        cfg.daemon.seal_key_file.as_deref(),
        sealing,
    ));
    Report { lines }
}

fn registry(cfg: &Config) -> Result<RegistryFacts, String> {
    let store = Store::open_config(cfg).map_err(|e| e.to_string())?;
    Ok(RegistryFacts {
        peers: store.peers().map_err(|e| e.to_string())?,
        revoked: store.revoked_keys().map_err(|e| e.to_string())?,
    })
}

/// Each `[[service]]` with the sockets holding its port when it is local.
fn services(cfg: &Config, sockets: &mut Sockets) -> Vec<ServiceFacts> {
    let local = local_addresses();
    let gateway = [
        Some(IpAddr::V4(cfg.interface.gateway_v4())),
        cfg.interface.gateway_v6().map(IpAddr::V6),
    ];
    cfg.services
        .iter()
        .map(|s| {
            let ip = procnet::canonical(s.address.ip());
            // The gateway's tunnel address is its own even while the daemon,
            // and so the TUN device, is down. When the local addresses cannot
            // be listed, say so on the service's line (fail closed).
            let (is_local, failed) = match &local {
                _ if gateway.contains(&Some(ip)) => (true, None),
                Ok(set) => (set.contains(&ip), None),
                Err(e) => (true, Some(e.clone())),
            };
            let bound = match failed {
                Some(e) => Err(e),
                None if is_local => sockets.bound(s.protocol, s.address.port()),
                None => Ok(Vec::new()),
            };
            ServiceFacts {
                name: s.name.clone(),
                address: s.address,
                protocol: s.protocol,
                local: is_local,
                bound,
            }
        })
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Every file the config names that holds a secret or the audit trail.
fn files(cfg: &Config) -> Vec<FileFacts> {
    let mut out = vec![
        stat(FileRole::Config, &cfg.path),
        file(FileRole::ServerKey, &cfg.interface.private_key_file, |t| {
            PrivateKey::from_base64(t).is_ok()
        }),
    ];
    if let Some(p) = &cfg.daemon.seal_key_file {
        out.push(file(FileRole::SealKey, p, |t| {
            PresharedKey::from_base64(t).is_ok()
        }));
    }
    if let Some(a) = &cfg.api {
        out.push(stat(FileRole::ApiToken, &a.token_file));
        if let Some((_, key)) = &a.tls {
            out.push(stat(FileRole::ApiTlsKey, key));
        }
    }
    if let StoreConfig::Sqlite { path } = &cfg.store {
        out.push(stat(FileRole::Store, path));
        for suffix in ["-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            out.push(stat(FileRole::StoreJournal, Path::new(&p)));
        }
    }
    if let StoreConfig::Postgres {
        password_file: Some(p),
        ..
    } = &cfg.store
    {
        out.push(stat(FileRole::StorePassword, p));
    }
    if let Some(p) = &cfg.log.audit_file {
        out.push(stat(FileRole::AuditLog, p));
    }
    out
}

fn stat(role: FileRole, path: &Path) -> FileFacts {
    let state = match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => FileState::NotAFile,
        Ok(m) => FileState::Present {
            mode: m.permissions().mode() & 0o7777,
        },
        Err(e) if e.kind() == ErrorKind::NotFound => FileState::Missing,
        Err(e) => FileState::Unreadable(e.to_string()),
    };
    let dir = path.parent().and_then(|d| {
        let m = std::fs::metadata(d).ok()?;
        Some((d.to_path_buf(), m.permissions().mode() & 0o7777))
    });
    FileFacts {
        role,
        path: path.to_path_buf(),
        state,
        dir,
        holds_key: None,
    }
}

/// [`stat`] plus whether the contents decode as a key (read even when the
/// mode is loose: the verdict on the mode is the decider's, not a refusal here).
fn file(role: FileRole, path: &Path, is_key: impl Fn(&str) -> bool) -> FileFacts {
    let mut f = stat(role, path);
    if matches!(f.state, FileState::Present { .. }) {
        match std::fs::read_to_string(path) {
            Ok(mut text) => {
                f.holds_key = Some(is_key(&text));
                zeroize::Zeroize::zeroize(&mut text);
            }
            Err(e) => f.state = FileState::Unreadable(e.to_string()),
        }
    }
    f
}

/// Every active peer's client config, rendered as `peer add` renders it
/// (without a private key, which is never stored).
fn issued_configs(cfg: &Config, reg: &RegistryFacts, now: i64) -> Vec<IssuedConfig> {
    // The gateway key only fills the `PublicKey` line; the routes do not depend
    // on it, so an unreadable key file (reported above) does not stop this check.
    let gateway = std::fs::read_to_string(&cfg.interface.private_key_file)
        .ok()
        .and_then(|mut t| {
            let k = PrivateKey::from_base64(&t).ok();
            zeroize::Zeroize::zeroize(&mut t);
            k
        })
        .map_or(PublicKey::from_bytes([0; 32]), |k| k.public_key());
    reg.peers
        .iter()
        .filter(|p| p.is_active(now))
        .map(|p| IssuedConfig {
            peer: p.name.to_string(),
            text: clientconf::render(&ClientConfig {
                private_key: None,
                addresses: &p.addresses,
                dns: &cfg.interface.dns,
                gateway_public_key: &gateway,
                preshared_key: p.preshared_key.as_ref(),
                endpoint: &cfg.interface.endpoint,
                kill_switch: false,
            }),
        })
        .collect()
}

/// `/proc/net` tables of this network namespace, each read once.
#[derive(Default)]
struct Sockets {
    tables: HashMap<&'static str, Result<Vec<procnet::ProcSocket>, String>>,
}

impl Sockets {
    fn table(&mut self, name: &'static str) -> Result<Vec<procnet::ProcSocket>, String> {
        self.tables
            .entry(name)
            .or_insert_with(|| {
                let path = format!("/proc/net/{name}");
                match std::fs::read_to_string(&path) {
                    // No IPv6 in this kernel: no tcp6/udp6 sockets either.
                    Err(e) if e.kind() == ErrorKind::NotFound && name.ends_with('6') => {
                        Ok(Vec::new())
                    }
                    Err(e) => Err(format!("cannot read {path}: {e}")),
                    Ok(text) => procnet::parse(&text).map_err(|e| format!("{path}: {e}")),
                }
            })
            .clone()
    }

    /// Local addresses bound to `port`: TCP listeners, or any UDP socket.
    fn bound(&mut self, protocol: Protocol, port: u16) -> Bound {
        let names = match protocol {
            Protocol::Tcp => ["tcp", "tcp6"],
            Protocol::Udp => ["udp", "udp6"],
        };
        let mut out = Vec::new();
        for n in names {
            for s in self.table(n)? {
                let counts = protocol == Protocol::Udp || s.state == TCP_LISTEN;
                if counts && s.local.port() == port && !out.contains(&s.local) {
                    out.push(s.local);
                }
            }
        }
        Ok(out)
    }
}

/// The addresses of this network namespace's interfaces.
fn local_addresses() -> Result<HashSet<IpAddr>, String> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| format!("cannot list local addresses (getifaddrs): {e}"))?;
    let mut out = HashSet::new();
    for a in addrs {
        let Some(sa) = a.address else { continue };
        if let Some(v4) = sa.as_sockaddr_in() {
            out.insert(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            out.insert(procnet::canonical(IpAddr::V6(v6.ip())));
        }
    }
    Ok(out)
}

/// The configured audit chain, verified as `sitegate audit verify` does.
fn audit(cfg: &Config) -> AuditFacts {
    if cfg.log.audit_file.is_none() {
        return AuditFacts::NotConfigured {
            config: cfg.path.clone(),
        };
    }
    match crate::cli::verify_chain(cfg) {
        Ok(summary) => AuditFacts::Intact(summary.trim().to_string()),
        Err(e) => AuditFacts::Broken(format!("{e:#}")),
    }
}

fn ask_daemon(cfg: &Config) -> Daemon {
    let socket = control_socket_path(&cfg.interface.name);
    match client::request(&socket, &Request::Status {}) {
        Ok(Response::Status(v)) => Daemon::Running(v),
        Ok(other) => {
            Daemon::Unreachable(format!("{}: unexpected reply {other:?}", socket.display()))
        }
        Err(ClientError::NotRunning(_)) => Daemon::NotRunning,
        Err(e) => Daemon::Unreachable(e.to_string()),
    }
}

/// `nft -j list table inet sitegate` in this network namespace.
fn list_table() -> TableFacts {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", TABLE])
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => return TableFacts::Unknown(format!("cannot run nft: {e}")),
    };
    if !out.status.success() {
        // nft's first line is the message; the rest echoes the command with carets.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or("").trim().to_string();
        // ENOENT is how nft says the table does not exist; anything else
        // (no permission, no nf_tables) means it could not look.
        return if first.contains("No such file or directory") {
            TableFacts::Missing(first)
        } else {
            TableFacts::Unknown(format!("nft: {first}"))
        };
    }
    match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        Ok(doc) => TableFacts::Listed(decide::rules_per_chain(&doc)),
        Err(e) => TableFacts::Unknown(format!("nft printed no JSON: {e}")),
    }
}
