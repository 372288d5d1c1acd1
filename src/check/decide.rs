//! The verdicts of `sitegate check` over gathered facts (pure). Each function
//! returns the lines of one check; `now` is passed in, never read here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::Value;

use super::procnet::canonical;
use super::Line;
use crate::config::{ApiConfig, InterfaceConfig, Protocol, Unenforced};
use crate::control::protocol::StatusView;
use crate::registry::{Peer, RevokedKey, SecretCounts};

/// Seconds a revocation or expiry may take to reach the daemon's memory before
/// a live peer counts as a fault: the SPEC gives a revocation one second, the
/// daemon expires peers every 250 ms and polls the store every second.
pub const LIVE_GRACE_SECS: i64 = 2;

// ---------------------------------------------------------------- file-permissions

/// Which configured file a [`FileFacts`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    /// `sitegate.toml` itself: whoever can write it controls the gateway.
    Config,
    ServerKey,
    SealKey,
    ApiToken,
    /// `[api] tls_key_file`: the API's TLS private key.
    ApiTlsKey,
    Store,
    /// The store's `-wal` or `-shm` file: it holds the same secrets.
    StoreJournal,
    /// `[store] password_file`: the shared registry's login.
    StorePassword,
    AuditLog,
}

impl FileRole {
    /// The config key naming the file.
    fn key(self) -> &'static str {
        match self {
            FileRole::Config => "the config file",
            FileRole::ServerKey => "interface.private_key_file",
            FileRole::SealKey => "daemon.seal_key_file",
            FileRole::ApiToken => "api.token_file",
            FileRole::ApiTlsKey => "api.tls_key_file",
            FileRole::Store | FileRole::StoreJournal => "store.url",
            FileRole::StorePassword => "store.password_file",
            FileRole::AuditLog => "log.audit_file",
        }
    }
    fn what(self) -> &'static str {
        match self {
            FileRole::Config => "the config",
            FileRole::ServerKey => "the server private key",
            FileRole::SealKey => "the seal key",
            FileRole::ApiToken => "the API token",
            FileRole::ApiTlsKey => "the API's TLS private key",
            FileRole::Store | FileRole::StoreJournal => "the peer store (preshared keys)",
            FileRole::StorePassword => "the peer store's database password",
            FileRole::AuditLog => "the audit log",
        }
    }
    /// Secrets must not be readable by group/others; the config and the audit
    /// log must not be writable by them (reading may be delegated to a group).
    fn forbidden_bits(self) -> u32 {
        match self {
            FileRole::Config | FileRole::AuditLog => 0o022,
            _ => 0o077,
        }
    }
    /// Whether a missing file is a fault (`run` would refuse to start); the
    /// store's journals and the audit log appear with their first write.
    fn required(self) -> bool {
        matches!(
            self,
            FileRole::Config
                | FileRole::ServerKey
                | FileRole::SealKey
                | FileRole::ApiToken
                | FileRole::ApiTlsKey
                | FileRole::Store
                | FileRole::StorePassword
        )
    }
}

/// What `stat` said about a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    Missing,
    Unreadable(String),
    NotAFile,
    /// Permission bits (`mode & 0o7777`).
    Present {
        mode: u32,
    },
}

/// One file to judge, with its directory.
#[derive(Debug, Clone)]
pub struct FileFacts {
    pub role: FileRole,
    pub path: PathBuf,
    pub state: FileState,
    /// The parent directory and its permission bits, when it could be read.
    pub dir: Option<(PathBuf, u32)>,
    /// For key files: whether the contents are a 32-byte base64 key.
    pub holds_key: Option<bool>,
}

/// Key and store file permissions: a secret readable by group/others, a config
/// or audit log they can write, a directory that lets others replace the file (writable
/// by group/others without the sticky bit), a key file that holds no key, or a
/// required file that is missing, each FAIL naming the file and its mode.
pub fn file_permissions(files: &[FileFacts]) -> Vec<Line> {
    const CHECK: &str = "file-permissions";
    let mut out = Vec::new();
    for f in files {
        let p = f.path.display();
        let key = f.role.key();
        let mode = match &f.state {
            FileState::Missing if f.role.required() => {
                out.push(Line::fail(CHECK, format!("{p} ({key}) does not exist")));
                continue;
            }
            FileState::Missing => continue,
            FileState::Unreadable(e) => {
                out.push(Line::fail(CHECK, format!("{p} ({key}): {e}")));
                continue;
            }
            FileState::NotAFile => {
                out.push(Line::fail(
                    CHECK,
                    format!("{p} ({key}) is not a regular file"),
                ));
                continue;
            }
            FileState::Present { mode } => *mode,
        };
        let mut problems = Vec::new();
        let loose = mode & f.role.forbidden_bits();
        if loose != 0 {
            let verb = if f.role.forbidden_bits() == 0o022 {
                "write"
            } else {
                "read"
            };
            problems.push(format!(
                "is mode {mode:04o}: group/others can {verb} {}; run `chmod {:o} {p}`",
                f.role.what(),
                mode & 0o777 & !loose
            ));
        }
        if f.holds_key == Some(false) {
            problems.push("does not hold a WireGuard-format key (44 characters of base64)".into());
        }
        if let Some((dir, dmode)) = &f.dir {
            if dmode & 0o022 != 0 && dmode & 0o1000 == 0 {
                problems.push(format!(
                    "its directory {} is mode {dmode:04o}: group/others can replace the file",
                    dir.display()
                ));
            }
        }
        if problems.is_empty() {
            out.push(Line::pass(CHECK, format!("{p} ({key}) mode {mode:04o}")));
        } else {
            out.push(Line::fail(
                CHECK,
                format!("{p} ({key}) {}", problems.join("; ")),
            ));
        }
    }
    out
}

// ---------------------------------------------------------------- full-routes

/// A client config rendered for an active peer, as `peer add` prints it.
#[derive(Debug, Clone)]
pub struct IssuedConfig {
    pub peer: String,
    pub text: String,
}

/// No issued peer lacks full routes: every active peer's config, rendered by
/// the same code as `peer add`, has exactly one `[Peer]` whose `AllowedIPs` is
/// `0.0.0.0/0, ::/0`. Configs are never stored, so this guards the renderer
/// ([`crate::clientconf::render`]) against a regression or a future option
/// that would hand a site split routes.
pub fn full_routes(configs: Result<&[IssuedConfig], &str>) -> Vec<Line> {
    const CHECK: &str = "full-routes";
    let configs = match configs {
        Ok(c) => c,
        Err(e) => return vec![Line::fail(CHECK, format!("cannot list issued peers: {e}"))],
    };
    let mut out: Vec<Line> = configs
        .iter()
        .filter_map(|c| {
            route_problem(&c.text)
                .map(|why| Line::fail(CHECK, format!("peer `{}`: its client config {why}", c.peer)))
        })
        .collect();
    if out.is_empty() {
        out.push(Line::pass(
            CHECK,
            format!(
                "{} active peer(s): each client config has one [Peer] with AllowedIPs = 0.0.0.0/0, ::/0",
                configs.len()
            ),
        ));
    }
    out
}

/// Why a wg-quick config is not a full tunnel, or None when it is.
pub(crate) fn route_problem(text: &str) -> Option<String> {
    let mut peers = 0;
    let mut section = String::new();
    let mut allowed: Vec<String> = Vec::new();
    for raw in text.lines() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.starts_with('[') {
            section = line.to_ascii_lowercase();
            if section == "[peer]" {
                peers += 1;
            }
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            if section == "[peer]" && k.trim().eq_ignore_ascii_case("allowedips") {
                allowed.extend(
                    v.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty()),
                );
            }
        }
    }
    if peers != 1 {
        return Some(format!("has {peers} [Peer] sections, not one"));
    }
    let nets: Option<Vec<IpNet>> = allowed.iter().map(|s| s.parse().ok()).collect();
    // `Default` of each is the whole family: 0.0.0.0/0 and ::/0.
    let want = [IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())];
    let full = nets.is_some_and(|n| n.len() == 2 && want.iter().all(|w| n.contains(w)));
    if full {
        None
    } else {
        Some(format!(
            "routes AllowedIPs = {} instead of 0.0.0.0/0, ::/0",
            if allowed.is_empty() {
                "(none)".to_string()
            } else {
                allowed.join(", ")
            }
        ))
    }
}

// ---------------------------------------------------------------- api-listen, service-listener

/// The sockets bound to one port, or why they could not be read.
pub type Bound = Result<Vec<SocketAddr>, String>;

fn show(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The API listens only inside the tunnel subnet: `[api] listen` lies in it,
/// and whatever holds its port is bound to an address in the tunnel subnet
/// (or loopback), never a wildcard or an underlay address.
pub fn api_listen(api: Option<&ApiConfig>, iface: &InterfaceConfig, bound: &Bound) -> Vec<Line> {
    const CHECK: &str = "api-listen";
    let Some(api) = api else {
        return vec![Line::pass(CHECK, "no [api] section: no API listener")];
    };
    let l = api.listen;
    if !iface.in_tunnel(l.ip()) {
        return vec![Line::fail(
            CHECK,
            format!("api.listen {l} lies outside the tunnel subnet"),
        )];
    }
    let bound = match bound {
        Ok(b) => b,
        Err(e) => {
            return vec![Line::fail(
                CHECK,
                format!("cannot read the listeners on port {}: {e}", l.port()),
            )]
        }
    };
    let outside: Vec<SocketAddr> = bound
        .iter()
        .copied()
        .filter(|s| {
            let ip = canonical(s.ip());
            !(iface.in_tunnel(ip) || ip.is_loopback())
        })
        .collect();
    if !outside.is_empty() {
        return vec![Line::fail(
            CHECK,
            format!(
                "api.listen port {} is bound to {} outside the tunnel subnet{}",
                l.port(),
                show(&outside),
                if outside.iter().any(|s| s.ip().is_unspecified()) {
                    " (a wildcard: every address, the underlay included)"
                } else {
                    ""
                }
            ),
        )];
    }
    vec![Line::pass(
        CHECK,
        format!(
            "api.listen {l} lies in the tunnel subnet; port {}: {}",
            l.port(),
            if bound.is_empty() {
                "nothing listens".to_string()
            } else {
                format!("bound to {}", show(bound))
            }
        ),
    )]
}

/// One `[[service]]` and what holds its port on this host.
#[derive(Debug, Clone)]
pub struct ServiceFacts {
    pub name: String,
    pub address: SocketAddr,
    pub protocol: Protocol,
    /// Whether the address belongs to this host (the gateway tunnel address,
    /// or an address of a local interface): only then are its listeners here.
    pub local: bool,
    /// Sockets bound to the service's port in its protocol (TCP: listening).
    pub bound: Bound,
}

/// Each service's listener is bound to its own (tunnel or internal) address,
/// not a wildcard reachable from the underlay: FAIL on a wildcard bind of the
/// port, PASS when the service address holds it, WARN when nothing listens.
/// A service on another internal host cannot be inspected from here: PASS, said so.
pub fn service_listeners(services: &[ServiceFacts]) -> Vec<Line> {
    const CHECK: &str = "service-listener";
    if services.is_empty() {
        return vec![Line::pass(CHECK, "no [[service]] configured")];
    }
    services
        .iter()
        .map(|s| {
            let proto = match s.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            };
            let id = format!("service `{}` ({}/{proto})", s.name, s.address);
            if !s.local {
                return Line::pass(
                    CHECK,
                    format!("{id}: on internal host {}, not checked here", s.address.ip()),
                );
            }
            let bound = match &s.bound {
                Ok(b) => b,
                Err(e) => return Line::fail(CHECK, format!("{id}: cannot read listeners: {e}")),
            };
            let wild: Vec<SocketAddr> = bound
                .iter()
                .copied()
                .filter(|b| canonical(b.ip()).is_unspecified())
                .collect();
            if !wild.is_empty() {
                return Line::fail(
                    CHECK,
                    format!(
                        "{id}: port {} is bound to {} (every address, reachable from the underlay); bind it to {} only",
                        s.address.port(),
                        show(&wild),
                        s.address.ip()
                    ),
                );
            }
            let own = canonical(s.address.ip());
            let others: Vec<SocketAddr> = bound
                .iter()
                .copied()
                .filter(|b| canonical(b.ip()) != own)
                .collect();
            let also = if others.is_empty() {
                String::new()
            } else {
                format!(" (port {} also bound to {})", s.address.port(), show(&others))
            };
            if bound.iter().any(|b| canonical(b.ip()) == own) {
                Line::pass(CHECK, format!("{id}: listening on {} only{also}", s.address))
            } else {
                Line::warn(CHECK, format!("{id}: nothing listens on {}{also}", s.address))
            }
        })
        .collect()
}

// ---------------------------------------------------------------- audit-log

/// What verifying the configured audit chain found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditFacts {
    /// `[log] audit_file` is absent.
    NotConfigured { config: PathBuf },
    /// Intact; the verifier's summary.
    Intact(String),
    /// The verifier's error: it names the file and the first bad line.
    Broken(String),
}

/// Audit log configured and its chain intact (the same verification as
/// `sitegate audit verify`, including the head recorded in the store). The
/// SPEC requires a complete audit trail, so no audit file is a FAIL.
pub fn audit_log(f: &AuditFacts) -> Line {
    const CHECK: &str = "audit-log";
    match f {
        AuditFacts::NotConfigured { config } => Line::fail(
            CHECK,
            format!(
                "{} sets no [log] audit_file: admin actions and security events leave no tamper-evident trail",
                config.display()
            ),
        ),
        AuditFacts::Intact(summary) => Line::pass(CHECK, summary.clone()),
        AuditFacts::Broken(e) => Line::fail(CHECK, format!("chain broken: {e}")),
    }
}

// ---------------------------------------------------------------- daemon-dependent checks

/// What the control socket said.
#[derive(Debug, Clone)]
pub enum Daemon {
    NotRunning,
    Running(StatusView),
    /// A socket exists but did not answer (permissions, timeout, bad reply).
    Unreachable(String),
}

/// `nft -j list table inet sitegate`, when it was looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableFacts {
    /// Not looked at (not managed, or no daemon).
    NotLooked,
    /// nft ran and found no such table (its message).
    Missing(String),
    /// nft could not be run or said something unreadable.
    Unknown(String),
    /// Rules per chain, as listed.
    Listed(BTreeMap<String, usize>),
}

/// Rules per chain in an nft JSON document: the rendered ruleset (`add rule`
/// commands) or a listing (`rule` objects), so the two compare directly.
pub fn rules_per_chain(doc: &Value) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in doc["nftables"].as_array().into_iter().flatten() {
        let rule = e
            .get("rule")
            .or_else(|| e.get("add").and_then(|a| a.get("rule")));
        if let Some(chain) = rule.and_then(|r| r["chain"].as_str()) {
            *out.entry(chain.to_string()).or_insert(0) += 1;
        }
    }
    out
}

fn count_rules(m: &BTreeMap<String, usize>) -> String {
    let parts: Vec<String> = m.iter().map(|(c, n)| format!("{c} {n}")).collect();
    if parts.is_empty() {
        "no rules".into()
    } else {
        parts.join(", ")
    }
}

/// Firewall table present when the daemon runs. `manage = false` leaves the
/// host's firewall alone, so that is a WARN saying what the host must do.
/// With `manage = true` and a running daemon the table must hold the rules
/// the config renders, chain by chain (`expected`).
pub fn firewall(
    manage: bool,
    daemon: &Daemon,
    table: &TableFacts,
    expected: &BTreeMap<String, usize>,
) -> Line {
    const CHECK: &str = "firewall";
    if !manage {
        return Line::warn(
            CHECK,
            "firewall not managed by sitegate ([firewall] manage = false): the host's own firewall must drop underlay traffic to the tunnel subnet and NAT egress",
        );
    }
    match daemon {
        Daemon::NotRunning => {
            return Line::pass(
                CHECK,
                "daemon not running; table inet sitegate is installed at start",
            )
        }
        Daemon::Unreachable(e) => {
            return Line::fail(CHECK, format!("cannot ask the daemon whether it runs: {e}"))
        }
        Daemon::Running(_) => {}
    }
    match table {
        TableFacts::NotLooked => Line::fail(CHECK, "table inet sitegate was not looked at"),
        TableFacts::Missing(e) => Line::fail(
            CHECK,
            format!("table inet sitegate is missing while the daemon runs (nft: {e})"),
        ),
        TableFacts::Unknown(e) => Line::fail(
            CHECK,
            format!("cannot list table inet sitegate while the daemon runs: {e}"),
        ),
        TableFacts::Listed(rules) if rules != expected => Line::fail(
            CHECK,
            format!(
                "table inet sitegate holds rules {} where the config renders {} (edited, or the config changed since start)",
                count_rules(rules),
                count_rules(expected)
            ),
        ),
        TableFacts::Listed(rules) => Line::pass(
            CHECK,
            format!(
                "table inet sitegate present with the daemon running ({})",
                count_rules(rules)
            ),
        ),
    }
}

/// The registry as `check` reads it.
#[derive(Debug, Clone)]
pub struct RegistryFacts {
    /// Every peer, revoked and expired included.
    pub peers: Vec<Peer>,
    pub revoked: Vec<RevokedKey>,
}

/// No expired (or revoked) peer still active: each peer live in the daemon
/// must be active in the registry by its key, and its own in-memory expiry
/// must not have passed (beyond [`LIVE_GRACE_SECS`]).
pub fn live_peers(daemon: &Daemon, registry: Result<&RegistryFacts, &str>, now: i64) -> Vec<Line> {
    const CHECK: &str = "expired-peers";
    let view = match daemon {
        Daemon::NotRunning => {
            return vec![Line::pass(CHECK, "daemon not running: no peer is live")]
        }
        Daemon::Unreachable(e) => {
            return vec![Line::fail(
                CHECK,
                format!("cannot ask the daemon for its live peers: {e}"),
            )]
        }
        Daemon::Running(v) => v,
    };
    let reg = match registry {
        Ok(r) => r,
        Err(e) => {
            return vec![Line::fail(
                CHECK,
                format!("cannot read the registry to compare the daemon's live peers: {e}"),
            )]
        }
    };
    let past = |t: i64| t.saturating_add(LIVE_GRACE_SECS) <= now;
    let mut out = Vec::new();
    for live in &view.peers {
        let who = format!("peer `{}` is live in the daemon", live.name);
        if let Some(t) = live.expires_at.filter(|t| past(*t)) {
            out.push(Line::fail(
                CHECK,
                format!("{who} past its own expiry {}", time(t)),
            ));
            continue;
        }
        let record = reg
            .peers
            .iter()
            .find(|p| p.public_key.to_base64() == live.public_key);
        let Some(p) = record else {
            let revoked = reg
                .revoked
                .iter()
                .find(|r| r.public_key.to_base64() == live.public_key);
            out.push(Line::fail(
                CHECK,
                match revoked {
                    Some(r) => format!(
                        "{who} with key {} revoked at {} ({})",
                        live.public_key,
                        time(r.revoked_at),
                        r.reason.as_deref().unwrap_or("no reason")
                    ),
                    None => format!(
                        "{who} with key {} that the registry does not hold",
                        live.public_key
                    ),
                },
            ));
            continue;
        };
        if let Some(t) = p.revoked_at.filter(|t| past(*t)) {
            out.push(Line::fail(
                CHECK,
                format!("{who} but the registry revoked it at {}", time(t)),
            ));
        } else if let Some(t) = p.expires_at.filter(|t| past(*t)) {
            out.push(Line::fail(
                CHECK,
                format!("{who} but expired at {} in the registry", time(t)),
            ));
        }
    }
    if out.is_empty() {
        out.push(Line::pass(
            CHECK,
            format!(
                "daemon running: its {} live peer(s) are all active in the registry",
                view.peers.len()
            ),
        ));
    }
    out
}

/// Unix seconds as RFC 3339 UTC.
fn time(t: i64) -> String {
    let at = u64::try_from(t)
        .ok()
        .and_then(|s| std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(s)))
        .unwrap_or(std::time::UNIX_EPOCH);
    humantime::format_rfc3339_seconds(at).to_string()
}

// ---------------------------------------------------------------- config keys

/// No config key that the code does not enforce (SPEC, "Fail closed"): one
/// FAIL per key of [`crate::config::Config::unenforced_keys`].
pub fn unenforced_keys(config: &Path, keys: &[Unenforced]) -> Vec<Line> {
    const CHECK: &str = "unenforced-keys";
    if keys.is_empty() {
        return vec![Line::pass(
            CHECK,
            "every key in the config is enforced by this build",
        )];
    }
    keys.iter()
        .map(|k| {
            Line::fail(
                CHECK,
                format!(
                    "`{}` is set in {} but {}; remove it until it is",
                    k.key,
                    config.display(),
                    k.missing
                ),
            )
        })
        .collect()
}

/// Whether `[daemon] user` names an existing account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserFacts {
    Exists,
    /// It exists and is uid 0: the daemon keeps root's uid, sheds only capabilities.
    Root,
    NoSuchUser,
    LookupFailed(String),
}

/// The privilege drop: no `[daemon] user` is a WARN (the daemon runs as root);
/// a user that does not exist is a FAIL (SPEC, "Fail closed": `run` refuses
/// it too); an existing user PASSes (the daemon drops to it at start).
pub fn privileges(user: Option<(&str, UserFacts)>) -> Line {
    const CHECK: &str = "privileges";
    match user {
        None => Line::warn(CHECK, "no [daemon] user: the daemon runs as root"),
        Some((u, UserFacts::NoSuchUser)) => {
            Line::fail(CHECK, format!("daemon.user = \"{u}\": no such user"))
        }
        Some((u, UserFacts::LookupFailed(e))) => Line::fail(
            CHECK,
            format!("daemon.user = \"{u}\": cannot look the user up: {e}"),
        ),
        Some((u, UserFacts::Root)) => Line::warn(
            CHECK,
            format!(
                "daemon.user = \"{u}\" is uid 0: the daemon sheds capabilities but runs as root"
            ),
        ),
        Some((u, UserFacts::Exists)) => Line::pass(
            CHECK,
            format!(
                "daemon.user = \"{u}\": the daemon drops to it after start, keeping only {}",
                crate::privilege::kept_names()
            ),
        ),
    }
}

/// What `check` learns about sealing.
#[derive(Debug, Clone)]
pub struct SealFacts {
    /// Preshared keys in the store, counted before anything seals them.
    pub counts: Result<SecretCounts, String>,
    /// With `[daemon] seal_key_file`: whether the key reads and opens the store.
    pub key: Option<Result<(), String>>,
}

/// Sealing of secrets in the store: without `[daemon] seal_key_file` they are
/// stored unsealed (WARN); with it, the key must read and open the store, and
/// any preshared key still in clear is a FAIL naming the count.
pub fn sealing(seal_key_file: Option<&Path>, facts: SealFacts) -> Line {
    const CHECK: &str = "sealing";
    let counts = match facts.counts {
        Ok(c) => c,
        Err(e) => return Line::fail(CHECK, format!("cannot inspect the peer store: {e}")),
    };
    match (seal_key_file, facts.key) {
        (None, _) if counts.sealed_store => Line::fail(
            CHECK,
            "the peer store is sealed but no [daemon] seal_key_file is configured",
        ),
        (None, _) => Line::warn(
            CHECK,
            format!(
                "no [daemon] seal_key_file: secrets stored unsealed in the peer store ({} preshared keys in clear)",
                counts.clear
            ),
        ),
        (Some(p), Some(Err(e))) => Line::fail(
            CHECK,
            format!("daemon.seal_key_file = {}: {e}", p.display()),
        ),
        (Some(_), _) if counts.clear > 0 => Line::fail(
            CHECK,
            format!(
                "{} preshared keys are stored unsealed in the peer store; the next admin command or daemon start seals them",
                counts.clear
            ),
        ),
        (Some(p), _) => Line::pass(
            CHECK,
            format!(
                "{} preshared keys sealed under daemon.seal_key_file = {}; none in clear",
                counts.sealed,
                p.display()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Status;
    use crate::config::Config;
    use crate::control::protocol::PeerLive;
    use crate::firewall::render::FirewallSpec;
    use crate::keys::PublicKey;
    use crate::registry::PeerName;

    fn statuses(lines: &[Line]) -> Vec<Status> {
        lines.iter().map(|l| l.status).collect()
    }

    fn key_file(mode: u32, dir_mode: u32) -> FileFacts {
        FileFacts {
            role: FileRole::ServerKey,
            path: "/etc/sitegate/server.key".into(),
            state: FileState::Present { mode },
            dir: Some(("/etc/sitegate".into(), dir_mode)),
            holds_key: Some(true),
        }
    }

    /// A key file readable by group/others fails naming the file, its mode and the fix.
    #[test]
    fn loose_key_file_fails() {
        let l = file_permissions(&[key_file(0o644, 0o700)]);
        assert_eq!(statuses(&l), [Status::Fail]);
        let d = &l[0].detail;
        assert!(
            d.contains("/etc/sitegate/server.key")
                && d.contains("interface.private_key_file")
                && d.contains("mode 0644")
                && d.contains("chmod 600"),
            "{d}"
        );
        let l = file_permissions(&[key_file(0o600, 0o755)]);
        assert_eq!(statuses(&l), [Status::Pass]);
        assert!(l[0].detail.contains("mode 0600"));
        // Group read alone is enough to fail; so is a key file holding no key.
        assert_eq!(
            statuses(&file_permissions(&[key_file(0o640, 0o700)])),
            [Status::Fail]
        );
        let mut f = key_file(0o600, 0o700);
        f.holds_key = Some(false);
        let l = file_permissions(&[f]);
        assert!(l[0].status == Status::Fail && l[0].detail.contains("does not hold"));
    }

    /// A directory others may write (without the sticky bit) lets them replace the file.
    #[test]
    fn writable_directory_fails() {
        let l = file_permissions(&[key_file(0o600, 0o777)]);
        assert_eq!(statuses(&l), [Status::Fail]);
        assert!(
            l[0].detail.contains("/etc/sitegate is mode 0777"),
            "{}",
            l[0].detail
        );
        assert_eq!(
            statuses(&file_permissions(&[key_file(0o600, 0o1777)])),
            [Status::Pass]
        );
    }

    /// Missing required files fail; an absent token file or journal is not looked at;
    /// the store must be private too; the audit log may be read but not written by others.
    #[test]
    fn other_roles() {
        let f = |role, state| FileFacts {
            role,
            path: "/x/f".into(),
            state,
            dir: None,
            holds_key: None,
        };
        let present = |mode| FileState::Present { mode };
        let l = file_permissions(&[
            f(FileRole::ServerKey, FileState::Missing),
            f(FileRole::SealKey, FileState::Missing),
            f(FileRole::Store, FileState::Missing),
            f(FileRole::ApiToken, FileState::Missing),
            f(FileRole::StoreJournal, FileState::Missing),
            f(FileRole::AuditLog, FileState::Missing),
        ]);
        // The daemon serves [api] now: a missing token file stops `run`.
        assert_eq!(statuses(&l), [Status::Fail; 4]);
        assert!(l[3].detail.contains("api.token_file"));
        assert!(
            l[1].detail.contains("daemon.seal_key_file") && l[1].detail.contains("does not exist")
        );
        let l = file_permissions(&[
            f(FileRole::Store, present(0o640)),
            f(FileRole::StoreJournal, present(0o644)),
            f(FileRole::ApiToken, present(0o604)),
            f(FileRole::AuditLog, present(0o640)),
            f(FileRole::AuditLog, present(0o620)),
            f(FileRole::ServerKey, FileState::NotAFile),
            f(FileRole::ServerKey, FileState::Unreadable("denied".into())),
        ]);
        assert_eq!(
            statuses(&l),
            [
                Status::Fail,
                Status::Fail,
                Status::Fail,
                Status::Pass,
                Status::Fail,
                Status::Fail,
                Status::Fail
            ]
        );
        assert!(l[0].detail.contains("preshared keys") && l[0].detail.contains("0640"));
        assert!(
            l[4].detail.contains("can write the audit log"),
            "{}",
            l[4].detail
        );
        // The shared registry's password is a secret like a key.
        let l = file_permissions(&[
            f(FileRole::StorePassword, present(0o600)),
            f(FileRole::StorePassword, present(0o640)),
            f(FileRole::StorePassword, FileState::Missing),
        ]);
        assert_eq!(statuses(&l), [Status::Pass, Status::Fail, Status::Fail]);
        assert!(
            l[1].detail.contains("store.password_file"),
            "{}",
            l[1].detail
        );
        let l = file_permissions(&[
            f(FileRole::Config, present(0o640)),
            f(FileRole::Config, present(0o666)),
        ]);
        assert_eq!(statuses(&l), [Status::Pass, Status::Fail]);
        assert!(
            l[1].detail.contains("can write the config; run `chmod 644"),
            "{}",
            l[1].detail
        );
    }

    /// The real renderer's output is a full tunnel; split routes, extra or
    /// missing `[Peer]` sections are each caught.
    #[test]
    fn route_problems() {
        let gw = PublicKey::from_bytes([7; 32]);
        let addrs = ["10.8.0.2".parse().unwrap()];
        let text = crate::clientconf::render(&crate::clientconf::ClientConfig {
            private_key: None,
            addresses: &addrs,
            dns: &[],
            gateway_public_key: &gw,
            preshared_key: None,
            endpoint: "h:1",
            kill_switch: true,
        });
        assert_eq!(route_problem(&text), None);
        let split = text.replace("0.0.0.0/0, ::/0", "10.8.0.0/24");
        assert!(route_problem(&split).unwrap().contains("10.8.0.0/24"));
        let v4_only = text.replace("0.0.0.0/0, ::/0", "0.0.0.0/0, 0.0.0.0/0");
        assert!(route_problem(&v4_only).is_some());
        let extra = text.replace("0.0.0.0/0, ::/0", "0.0.0.0/0, ::/0, 192.168.0.0/16");
        assert!(route_problem(&extra).is_some());
        let none = text.replace("AllowedIPs = 0.0.0.0/0, ::/0\n", "");
        assert!(route_problem(&none).unwrap().contains("(none)"));
        let two = format!("{text}\n[Peer]\nPublicKey = x\nAllowedIPs = 10.0.0.0/8\n");
        assert!(route_problem(&two).unwrap().contains("2 [Peer]"));
        // wg-quick reads split lines and comments; so does the check.
        let lines = text.replace(
            "AllowedIPs = 0.0.0.0/0, ::/0",
            "AllowedIPs = 0.0.0.0/0 # v4\nallowedips = ::/0",
        );
        assert_eq!(route_problem(&lines), None);

        let configs = [
            IssuedConfig {
                peer: "good".into(),
                text: text.clone(),
            },
            IssuedConfig {
                peer: "bad".into(),
                text: split,
            },
        ];
        let l = full_routes(Ok(&configs));
        assert_eq!(statuses(&l), [Status::Fail]);
        assert!(l[0].detail.starts_with("peer `bad`"));
        assert_eq!(statuses(&full_routes(Ok(&configs[..1]))), [Status::Pass]);
        assert_eq!(statuses(&full_routes(Err("no store"))), [Status::Fail]);
    }

    fn svc(address: &str, protocol: Protocol, local: bool, bound: &[&str]) -> ServiceFacts {
        ServiceFacts {
            name: "sftp".into(),
            address: address.parse().unwrap(),
            protocol,
            local,
            bound: Ok(bound.iter().map(|b| b.parse().unwrap()).collect()),
        }
    }

    /// A wildcard bind fails naming service, port and address; the service's own
    /// address passes; nothing listening warns; another host is not inspected.
    #[test]
    fn service_verdicts() {
        let t = Protocol::Tcp;
        let l = service_listeners(&[
            svc("10.8.0.1:22", t, true, &["0.0.0.0:22"]),
            svc("10.8.0.1:22", t, true, &["[::]:22", "10.8.0.1:22"]),
            svc("10.8.0.1:22", t, true, &["10.8.0.1:22"]),
            svc("10.8.0.1:22", t, true, &["[::ffff:10.8.0.1]:22"]),
            svc("10.8.0.1:22", t, true, &[]),
            svc("10.8.0.1:22", t, true, &["192.168.1.1:22"]),
            svc("172.30.0.10:5432", t, false, &[]),
            svc("10.8.0.1:53", Protocol::Udp, true, &["0.0.0.0:53"]),
        ]);
        assert_eq!(
            statuses(&l),
            [
                Status::Fail,
                Status::Fail,
                Status::Pass,
                Status::Pass,
                Status::Warn,
                Status::Warn,
                Status::Pass,
                Status::Fail
            ]
        );
        let d = &l[0].detail;
        assert!(
            d.contains("service `sftp`") && d.contains("port 22") && d.contains("0.0.0.0:22"),
            "{d}"
        );
        assert!(l[1].detail.contains("[::]:22"));
        assert!(l[5].detail.contains("also bound to 192.168.1.1:22"));
        assert!(l[6]
            .detail
            .contains("on internal host 172.30.0.10, not checked here"));
        assert!(l[7].detail.contains("/udp"));
        let mut broken = svc("10.8.0.1:22", t, true, &[]);
        broken.bound = Err("cannot read /proc/net/tcp".into());
        assert_eq!(statuses(&service_listeners(&[broken])), [Status::Fail]);
        assert_eq!(statuses(&service_listeners(&[])), [Status::Pass]);
    }

    fn config() -> Config {
        let text = "[interface]\nname='sg0'\nprivate_key_file='/k'\naddress='10.8.0.1/24'\nendpoint='h:1'\n[api]\nlisten='10.8.0.1:8443'\ntoken_file='/t'\n[store]\nurl='sqlite:///d.db'\n";
        Config::parse(Path::new("/x/sitegate.toml"), text).unwrap()
    }

    /// The API's port may be held inside the tunnel subnet or on loopback, never
    /// on a wildcard or an underlay address.
    #[test]
    fn api_verdicts() {
        let c = config();
        let api = c.api.as_ref();
        let bound = |b: &[&str]| -> Bound { Ok(b.iter().map(|s| s.parse().unwrap()).collect()) };
        let run = |b: &[&str]| api_listen(api, &c.interface, &bound(b))[0].clone();
        assert_eq!(run(&[]).status, Status::Pass);
        assert_eq!(
            run(&["10.8.0.1:8443", "127.0.0.1:8443"]).status,
            Status::Pass
        );
        let wild = run(&["0.0.0.0:8443"]);
        assert!(wild.status == Status::Fail && wild.detail.contains("wildcard"));
        let under = run(&["192.168.1.1:8443"]);
        assert!(under.status == Status::Fail && under.detail.contains("192.168.1.1:8443"));
        assert_eq!(
            api_listen(None, &c.interface, &bound(&["0.0.0.0:1"]))[0].status,
            Status::Pass
        );
        assert_eq!(
            api_listen(api, &c.interface, &Err("x".into()))[0].status,
            Status::Fail
        );
    }

    /// No audit file fails (the SPEC wants a complete trail); a broken chain
    /// fails with the verifier's words, which name the file and line.
    #[test]
    fn audit_verdicts() {
        let none = audit_log(&AuditFacts::NotConfigured {
            config: "/x/sitegate.toml".into(),
        });
        assert!(none.status == Status::Fail && none.detail.contains("[log] audit_file"));
        let broken = audit_log(&AuditFacts::Broken(
            "/x/audit.jsonl: line 2: hash does not match".into(),
        ));
        assert!(broken.status == Status::Fail && broken.detail.contains("/x/audit.jsonl: line 2"));
        assert_eq!(
            audit_log(&AuditFacts::Intact("ok".into())).status,
            Status::Pass
        );
    }

    fn view(peers: Vec<PeerLive>) -> Daemon {
        Daemon::Running(StatusView {
            interface: "sg0".into(),
            public_key: "k".into(),
            listen_port: 51820,
            started_at: 0,
            udp_send_errors: 0,
            tun_write_errors: 0,
            peers,
        })
    }

    /// Unmanaged: a warning that names the host's duty. Managed: the table must
    /// be there, with the rendered rules, while the daemon runs.
    #[test]
    fn firewall_verdicts() {
        let spec = FirewallSpec::from_config(&config());
        let expected = rules_per_chain(&crate::firewall::render::ruleset(&spec));
        assert_eq!(expected.values().sum::<usize>(), 4);
        let running = view(vec![]);
        let l = firewall(false, &running, &TableFacts::NotLooked, &expected);
        assert!(l.status == Status::Warn && l.detail.contains("not managed"));
        let l = firewall(true, &Daemon::NotRunning, &TableFacts::NotLooked, &expected);
        assert!(l.status == Status::Pass && l.detail.contains("daemon not running"));
        let l = firewall(
            true,
            &running,
            &TableFacts::Missing("Error: No such file or directory".into()),
            &expected,
        );
        assert!(l.status == Status::Fail && l.detail.contains("table inet sitegate is missing"));
        let ok = firewall(
            true,
            &running,
            &TableFacts::Listed(expected.clone()),
            &expected,
        );
        assert_eq!(ok.status, Status::Pass);
        let mut fewer = expected.clone();
        fewer.insert("input".into(), 0);
        let l = firewall(true, &running, &TableFacts::Listed(fewer), &expected);
        assert!(
            l.status == Status::Fail && l.detail.contains("input 0"),
            "{}",
            l.detail
        );
        let l = firewall(
            true,
            &Daemon::Unreachable("denied".into()),
            &TableFacts::NotLooked,
            &expected,
        );
        assert_eq!(l.status, Status::Fail);
    }

    /// A listing from `nft -j list table` counts like the rendered commands.
    #[test]
    fn listing_rules_counted() {
        let listing = serde_json::json!({"nftables": [
            {"metainfo": {"json_schema_version": 1}},
            {"table": {"family": "inet", "name": "sitegate", "handle": 1}},
            {"chain": {"family": "inet", "table": "sitegate", "name": "input", "handle": 1}},
            {"rule": {"family": "inet", "table": "sitegate", "chain": "input", "handle": 4, "expr": []}},
            {"rule": {"family": "inet", "table": "sitegate", "chain": "forward", "handle": 5, "expr": []}},
            {"rule": {"family": "inet", "table": "sitegate", "chain": "input", "handle": 6, "expr": []}}
        ]});
        let m = rules_per_chain(&listing);
        assert_eq!(m.get("input"), Some(&2));
        assert_eq!(m.get("forward"), Some(&1));
        assert!(rules_per_chain(&serde_json::json!({})).is_empty());
    }

    const NOW: i64 = 1_800_000_000;

    fn peer(name: &str, key: u8, expires_at: Option<i64>, revoked_at: Option<i64>) -> Peer {
        Peer {
            id: i64::from(key),
            name: PeerName::new(name).unwrap(),
            public_key: PublicKey::from_bytes([key; 32]),
            preshared_key: None,
            addresses: vec![],
            created_at: 0,
            expires_at,
            revoked_at,
            revoked_reason: None,
            admin: false,
            services: vec![],
        }
    }

    fn live(name: &str, key: u8, expires_at: Option<i64>) -> PeerLive {
        PeerLive {
            name: name.into(),
            public_key: PublicKey::from_bytes([key; 32]).to_base64(),
            addresses: vec![],
            endpoint: None,
            latest_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            session: true,
            expires_at,
            denied: BTreeMap::new(),
            noise_dropped: 0,
            ipv6_dropped: 0,
            internet_seen_at: None,
        }
    }

    /// A live peer that the registry has expired or revoked, whose own expiry
    /// passed, or whose key is revoked or unknown, fails naming the peer;
    /// changes younger than the grace are still on their way to the daemon.
    #[test]
    fn live_peer_verdicts() {
        let reg = RegistryFacts {
            peers: vec![
                peer("ok", 1, Some(NOW + 60), None),
                peer("expired", 2, Some(NOW - 3600), None),
                peer("revoked", 3, None, Some(NOW - 10)),
                peer("just-expired", 4, Some(NOW - 1), None),
            ],
            revoked: vec![RevokedKey {
                public_key: PublicKey::from_bytes([5; 32]),
                peer: "rotated".into(),
                reason: Some("rotated".into()),
                revoked_at: NOW - 100,
            }],
        };
        let d = view(vec![
            live("ok", 1, Some(NOW + 60)),
            live("expired", 2, None),
            live("revoked", 3, None),
            live("just-expired", 4, Some(NOW - 1)),
            live("rotated", 5, None),
            live("stranger", 6, None),
            live("self-expired", 1, Some(NOW - 30)),
        ]);
        let l = live_peers(&d, Ok(&reg), NOW);
        let details: Vec<&str> = l.iter().map(|l| l.detail.as_str()).collect();
        assert_eq!(statuses(&l), [Status::Fail; 5], "{details:#?}");
        assert!(details[0].contains("peer `expired`") && details[0].contains("expired at"));
        assert!(details[1].contains("peer `revoked`") && details[1].contains("revoked it"));
        assert!(details[2].contains("peer `rotated`") && details[2].contains("revoked at"));
        assert!(details[3].contains("peer `stranger`") && details[3].contains("does not hold"));
        assert!(details[4].contains("peer `self-expired`") && details[4].contains("own expiry"));

        let good = view(vec![live("ok", 1, Some(NOW + 60))]);
        assert_eq!(statuses(&live_peers(&good, Ok(&reg), NOW)), [Status::Pass]);
        assert_eq!(
            statuses(&live_peers(&Daemon::NotRunning, Err("no store"), NOW)),
            [Status::Pass]
        );
        assert_eq!(
            statuses(&live_peers(&good, Err("no store"), NOW)),
            [Status::Fail]
        );
        assert_eq!(
            statuses(&live_peers(&Daemon::Unreachable("x".into()), Ok(&reg), NOW)),
            [Status::Fail]
        );
    }

    /// Each unenforced key is its own FAIL naming it; none is one PASS.
    #[test]
    fn unenforced_verdicts() {
        let c = config();
        assert!(c.unenforced_keys().is_empty(), "[api] is enforced");
        let keys = [
            crate::config::Unenforced {
                key: "daemon.user",
                missing: "the privilege drop is not built yet",
            },
            crate::config::Unenforced {
                key: "daemon.seal_key_file",
                missing: "sealing is not built yet",
            },
        ];
        let l = unenforced_keys(&c.path, &keys);
        assert_eq!(statuses(&l), [Status::Fail, Status::Fail]);
        assert!(l[0].detail.contains("`daemon.user`") && l[0].detail.contains("/x/sitegate.toml"));
        assert!(l[1].detail.contains("`daemon.seal_key_file`"));
        assert_eq!(statuses(&unenforced_keys(&c.path, &[])), [Status::Pass]);
    }

    /// Optional protections left off warn; a user that does not exist fails;
    /// an existing user passes.
    #[test]
    fn optional_protections() {
        let l = privileges(None);
        assert!(l.status == Status::Warn && l.detail.contains("runs as root"));
        assert_eq!(
            privileges(Some(("sitegate", UserFacts::Exists))).status,
            Status::Pass
        );
        assert_eq!(
            privileges(Some(("root", UserFacts::Root))).status,
            Status::Warn
        );
        let l = privileges(Some(("nobody-here", UserFacts::NoSuchUser)));
        assert!(l.status == Status::Fail && l.detail.contains("no such user"));
        let counts = |sealed, clear, sealed_store| SecretCounts {
            sealed,
            clear,
            sealed_store,
        };
        let facts = |c, key| SealFacts { counts: Ok(c), key };
        let l = sealing(None, facts(counts(0, 3, false), None));
        assert!(l.status == Status::Warn && l.detail.contains("3 preshared keys in clear"));
        let l = sealing(None, facts(counts(3, 0, true), None));
        assert!(l.status == Status::Fail && l.detail.contains("sealed but no"));
        let key = Path::new("/s");
        let l = sealing(Some(key), facts(counts(2, 1, true), Some(Ok(()))));
        assert!(
            l.status == Status::Fail && l.detail.contains("1 preshared keys are stored unsealed")
        );
        let l = sealing(
            Some(key),
            facts(counts(2, 0, true), Some(Err("wrong key".into()))),
        );
        assert!(l.status == Status::Fail && l.detail.contains("wrong key"));
        let l = sealing(Some(key), facts(counts(2, 0, true), Some(Ok(()))));
        assert_eq!(l.status, Status::Pass, "{}", l.detail);
        let l = sealing(
            Some(key),
            SealFacts {
                counts: Err("gone".into()),
                key: None,
            },
        );
        assert_eq!(l.status, Status::Fail);
    }
}
