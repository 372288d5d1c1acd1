//! Raw → validated config. Every error is one sentence naming the file and the key
//! (as `section.key`) or the value at fault.

use std::collections::HashSet;
use std::fmt::Debug;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::raw::{ConfigRaw, ServiceRaw};
use super::{
    ApiConfig, Config, DaemonConfig, DbPassword, EgressConfig, FirewallConfig, InterfaceConfig,
    LogConfig, LogFormat, Protocol, ServiceConfig, StoreConfig,
};
use crate::keys::{KeyError, PrivateKey};

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read config file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not TOML.
    #[error("{}: malformed TOML at line {line}: {message}", .path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A key sitegate does not know (`section` reads `in [interface]` or `at the top level`).
    #[error("{}: unknown key `{key}` {section}", .path.display())]
    UnknownKey {
        path: PathBuf,
        key: String,
        section: String,
    },
    /// A required key is absent.
    #[error("{}: missing key `{key}` {section}", .path.display())]
    MissingKey {
        path: PathBuf,
        key: String,
        section: String,
    },
    /// A required section is absent.
    #[error("{}: missing section [{section}]", .path.display())]
    MissingSection { path: PathBuf, section: String },
    /// A value of the wrong TOML type (string where a number belongs, ...).
    #[error("{}: wrong type for `{key}` at line {line}: {message}", .path.display())]
    WrongType {
        path: PathBuf,
        key: String,
        line: usize,
        message: String,
    },
    /// A value of the right type that breaks a rule.
    #[error("{}: `{key}` = {value} {reason}", .path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        value: String,
        reason: String,
    },
    /// The private key file named by `interface.private_key_file` is unusable.
    #[error("{}: `interface.private_key_file`: {source}", .path.display())]
    KeyFile { path: PathBuf, source: KeyError },
}

/// Reads, validates, and checks the server key file (exists, is a key, mode
/// without group/other bits). `path` is made absolute first.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let mut cfg = parse(&path, &text)?;
    PrivateKey::from_file(&cfg.interface.private_key_file).map_err(|source| {
        ConfigError::KeyFile {
            path: path.clone(),
            source,
        }
    })?;
    load_store_secret(&path, &mut cfg.store)?;
    Ok(cfg)
}

/// A database password belongs in a file only root (or the daemon) reads:
/// `[store] password_file` is read here, under the rules of key files, and a
/// password inline in `store.url` is refused when the config file is readable
/// by others.
fn load_store_secret(config: &Path, store: &mut StoreConfig) -> Result<(), ConfigError> {
    let StoreConfig::Postgres {
        url,
        password_file,
        password,
        ca_file,
        ca_pem,
        ..
    } = store
    else {
        return Ok(());
    };
    if let Some(file) = ca_file {
        let pem = std::fs::read(&*file).map_err(|e| ConfigError::Invalid {
            path: config.to_path_buf(),
            key: "store.ca_file".into(),
            value: format!("{:?}", file.display().to_string()),
            reason: format!("cannot be read: {e}"),
        })?;
        *ca_pem = Some(std::sync::Arc::new(pem));
    }
    let bad = |key: &str, value: String, reason: String| ConfigError::Invalid {
        path: config.to_path_buf(),
        key: key.to_string(),
        value: format!("{value:?}"),
        reason,
    };
    if let Some(file) = password_file {
        let read = crate::keys::read_secret_file(file).map_err(|e| {
            bad(
                "store.password_file",
                file.display().to_string(),
                e.to_string(),
            )
        })?;
        let line = read.trim_end_matches(['\n', '\r']);
        if line.is_empty() || line.contains('\n') {
            return Err(bad(
                "store.password_file",
                file.display().to_string(),
                "must hold the password on one line".into(),
            ));
        }
        *password = Some(DbPassword(std::sync::Arc::new(zeroize::Zeroizing::new(
            line.to_string(),
        ))));
    } else if url
        .parse::<postgres::Config>()
        .is_ok_and(|c| c.get_password().is_some())
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(config).map_or(0, |m| m.permissions().mode() & 0o777);
        if mode & 0o004 != 0 {
            return Err(bad(
                "store.url",
                redact_url(url),
                format!(
                    "carries a database password, but {} is readable by others (mode {mode:o}); run `chmod o-r` on it, or move the password to `store.password_file`",
                    config.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Validates `text` as if read from `path` (relative paths in it resolve against
/// `path`'s directory). Touches no file.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw: ConfigRaw = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
    Validator {
        path,
        dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
    }
    .config(raw)
}

/// Turns a toml/serde error into a one-line [`ConfigError`], recovering the key
/// and section from the error's span in the source text.
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let path = path.to_path_buf();
    let message = e.message().trim().replace('\n', "; ");
    let span = e.span().unwrap_or(0..0);
    let start = (0..=span.start.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let line_no = text[..start].matches('\n').count() + 1;
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let ticked = message.split('`').nth(1).unwrap_or("").to_string();

    // The section a span lies in: the last header above its line, or the header on
    // its own line when the span is a header (then the key is a section name).
    // Headers are kept as written: `[interface]`, `[[service]]`.
    let header_of = |l: &str| -> Option<String> {
        let t = l.trim();
        let end = t.rfind(']')?;
        t.starts_with('[').then(|| t[..=end].to_string())
    };
    let bare = |h: &str| h.trim_matches(|c| c == '[' || c == ']').trim().to_string();
    let own_header = header_of(line);
    let section_above = text[..line_start].lines().rev().find_map(header_of);
    let section = match (&own_header, &section_above) {
        (None, Some(s)) => format!("in {s}"),
        _ => "at the top level".to_string(),
    };

    if message.starts_with("unknown field") {
        ConfigError::UnknownKey {
            path,
            key: ticked,
            section,
        }
    } else if message.starts_with("missing field") {
        match (span.is_empty(), own_header) {
            (false, Some(h)) => ConfigError::MissingKey {
                path,
                key: ticked,
                section: format!("in {h}"),
            },
            _ => ConfigError::MissingSection {
                path,
                section: ticked,
            },
        }
    } else if message.starts_with("invalid type")
        || message.starts_with("invalid value")
        || message.starts_with("data did not match")
    {
        let key = line.split('=').next().unwrap_or("").trim().to_string();
        let key = match section_above.filter(|_| own_header.is_none()) {
            Some(s) => format!("{}.{key}", bare(&s)),
            None => key,
        };
        let message = if message.starts_with("data did not match") {
            "expected a string or a list of strings".to_string()
        } else {
            message
        };
        ConfigError::WrongType {
            path,
            key,
            line: line_no,
            message,
        }
    } else {
        ConfigError::Syntax {
            path,
            line: line_no,
            message,
        }
    }
}

struct Validator<'a> {
    path: &'a Path,
    dir: PathBuf,
}

impl Validator<'_> {
    fn bad(&self, key: &str, value: impl Debug, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            value: format!("{value:?}"),
            reason: reason.into(),
        }
    }

    /// A file path; relative ones resolve against the config file's directory.
    fn file(&self, key: &str, value: &str) -> Result<PathBuf, ConfigError> {
        if value.trim().is_empty() {
            return Err(self.bad(key, value, "is empty; give a file path"));
        }
        Ok(self.dir.join(value))
    }

    fn config(&self, raw: ConfigRaw) -> Result<Config, ConfigError> {
        let interface = self.interface(&raw.interface)?;
        let egress = match &raw.egress {
            Some(e) => {
                let interface = match &e.interface {
                    Some(n) => Some(self.ifname("egress.interface", n)?),
                    None => None,
                };
                // Internet egress is NAT'ed out of a named uplink; asking for it
                // without one would forward un-NAT'ed or not at all.
                if e.allow_internet == Some(true) && interface.is_none() {
                    return Err(self.bad(
                        "egress.allow_internet",
                        true,
                        "needs `egress.interface`, the uplink that full-tunnel traffic leaves through with NAT",
                    ));
                }
                EgressConfig {
                    allow_internet: e.allow_internet.unwrap_or(interface.is_some()),
                    interface,
                    peer_to_peer: e.peer_to_peer.unwrap_or(false),
                }
            }
            None => EgressConfig::default(),
        };
        let mut services = Vec::new();
        let mut names = HashSet::new();
        for s in &raw.services {
            let svc = self.service(&interface, s)?;
            if !names.insert(svc.name.clone()) {
                return Err(self.bad(
                    "service.name",
                    &svc.name,
                    "is used by two [[service]] sections",
                ));
            }
            services.push(svc);
        }
        if services.len() > MAX_SERVICES {
            return Err(self.bad(
                "service",
                format!("{} sections", services.len()),
                format!("exceeds the limit of {MAX_SERVICES} [[service]] sections"),
            ));
        }
        let api = match &raw.api {
            Some(a) => {
                let listen: SocketAddr = a
                    .listen
                    .parse()
                    .map_err(|_| self.bad("api.listen", &a.listen, "is not an IP:PORT address"))?;
                if !interface.in_tunnel(listen.ip()) {
                    return Err(self.bad(
                        "api.listen",
                        &a.listen,
                        format!(
                            "lies outside the tunnel subnet {}",
                            interface.address_v4.trunc()
                        ),
                    ));
                }
                if Some(listen.ip()) != gateway_for(&interface, listen.ip()) {
                    return Err(self.bad(
                        "api.listen",
                        &a.listen,
                        "is not the gateway's own tunnel address",
                    ));
                }
                if listen.port() == 0 {
                    return Err(self.bad("api.listen", &a.listen, "needs a port from 1 to 65535"));
                }
                let tls = match (&a.tls_cert_file, &a.tls_key_file) {
                    (None, None) => None,
                    (Some(c), Some(k)) => Some((
                        self.file("api.tls_cert_file", c)?,
                        self.file("api.tls_key_file", k)?,
                    )),
                    (Some(_), None) => {
                        return Err(self.bad(
                            "api.tls_key_file",
                            "",
                            "is missing: `api.tls_cert_file` needs its private key",
                        ))
                    }
                    (None, Some(_)) => {
                        return Err(self.bad(
                            "api.tls_cert_file",
                            "",
                            "is missing: `api.tls_key_file` needs its certificate",
                        ))
                    }
                };
                Some(ApiConfig {
                    listen,
                    token_file: self.file("api.token_file", &a.token_file)?,
                    tls,
                })
            }
            None => None,
        };
        let store = self.store(&interface, &raw.store)?;
        let log = match &raw.log {
            Some(l) => LogConfig {
                format: match l.format.as_deref() {
                    None | Some("json") => LogFormat::Json,
                    Some("text") => LogFormat::Text,
                    Some(other) => {
                        return Err(self.bad(
                            "log.format",
                            other,
                            "is not one of \"json\", \"text\"",
                        ))
                    }
                },
                audit_file: match &l.audit_file {
                    Some(f) => Some(self.file("log.audit_file", f)?),
                    None => None,
                },
                audit_rotate_bytes: match l.audit_rotate_bytes {
                    None => crate::audit::writer::ROTATE_BYTES,
                    Some(n) => u64::try_from(n)
                        .ok()
                        .filter(|n| *n >= super::MIN_AUDIT_ROTATE_BYTES)
                        .ok_or_else(|| {
                            self.bad(
                                "log.audit_rotate_bytes",
                                n,
                                format!(
                                    "is below the minimum of {}",
                                    super::MIN_AUDIT_ROTATE_BYTES
                                ),
                            )
                        })?,
                },
            },
            None => LogConfig::default(),
        };
        let firewall = FirewallConfig {
            manage: raw.firewall.as_ref().and_then(|f| f.manage).unwrap_or(true),
        };
        let daemon = match &raw.daemon {
            Some(d) => DaemonConfig {
                user: match &d.user {
                    Some(u) if valid_user(u) => Some(u.clone()),
                    Some(u) => return Err(self.bad("daemon.user", u, "is not a valid user name")),
                    None => None,
                },
                seal_key_file: match &d.seal_key_file {
                    Some(f) => Some(self.file("daemon.seal_key_file", f)?),
                    None => None,
                },
            },
            None => DaemonConfig::default(),
        };
        Ok(Config {
            path: self.path.to_path_buf(),
            interface,
            egress,
            services,
            api,
            store,
            log,
            firewall,
            daemon,
        })
    }

    fn interface(&self, raw: &super::raw::InterfaceRaw) -> Result<InterfaceConfig, ConfigError> {
        let name = self.ifname("interface.name", &raw.name)?;
        let private_key_file = self.file("interface.private_key_file", &raw.private_key_file)?;
        let listen_port = match raw.listen_port {
            None => 51820,
            Some(p) => u16::try_from(p).ok().filter(|&p| p != 0).ok_or_else(|| {
                self.bad("interface.listen_port", p, "is not a port from 1 to 65535")
            })?,
        };
        let (mut v4, mut v6) = (None, None);
        let addresses = raw.address.to_vec();
        for a in &addresses {
            let net: IpNet = a.parse().map_err(|_| {
                self.bad(
                    "interface.address",
                    a,
                    "is not an address with prefix, e.g. \"10.8.0.1/24\"",
                )
            })?;
            match net {
                IpNet::V4(n) if v4.is_none() => v4 = Some(self.gateway_v4(a, n)?),
                IpNet::V6(n) if v6.is_none() => v6 = Some(self.gateway_v6(a, n)?),
                _ => {
                    return Err(self.bad(
                        "interface.address",
                        a,
                        "repeats an address family; give one IPv4 and at most one IPv6",
                    ))
                }
            }
        }
        let address_v4 = v4.ok_or_else(|| {
            self.bad(
                "interface.address",
                addresses,
                "has no IPv4 address; give e.g. \"10.8.0.1/24\"",
            )
        })?;
        let mtu = match raw.mtu {
            None => 1420,
            Some(m) => {
                let min = if v6.is_some() { 1280 } else { 576 };
                u16::try_from(m)
                    .ok()
                    .filter(|m| (min..=9000).contains(m))
                    .ok_or_else(|| {
                        self.bad("interface.mtu", m, format!("is outside {min}..=9000"))
                    })?
            }
        };
        check_endpoint(&raw.endpoint)
            .map_err(|why| self.bad("interface.endpoint", &raw.endpoint, why))?;
        let dns = raw
            .dns
            .iter()
            .map(|d| {
                d.parse()
                    .map_err(|_| self.bad("interface.dns", d, "is not an IP address"))
            })
            .collect::<Result<Vec<IpAddr>, _>>()?;
        if dns.len() > MAX_DNS {
            return Err(self.bad(
                "interface.dns",
                format!("{} servers", dns.len()),
                format!("exceeds the limit of {MAX_DNS} servers"),
            ));
        }
        Ok(InterfaceConfig {
            name,
            private_key_file,
            listen_port,
            address_v4,
            address_v6: v6,
            mtu,
            endpoint: raw.endpoint.clone(),
            dns,
        })
    }

    fn gateway_v4(&self, text: &str, n: Ipv4Net) -> Result<Ipv4Net, ConfigError> {
        if n.prefix_len() > 30 {
            return Err(self.bad(
                "interface.address",
                text,
                "leaves no room for peers; use a prefix of /30 or shorter",
            ));
        }
        if n.addr() == n.network() {
            return Err(self.bad(
                "interface.address",
                text,
                format!("is the subnet's network address; give the gateway's own address, e.g. \"{}/{}\"", first_host_v4(n), n.prefix_len()),
            ));
        }
        if n.addr() == n.broadcast() {
            return Err(self.bad(
                "interface.address",
                text,
                "is the subnet's broadcast address",
            ));
        }
        Ok(n)
    }

    fn gateway_v6(&self, text: &str, n: Ipv6Net) -> Result<Ipv6Net, ConfigError> {
        if n.prefix_len() > 126 {
            return Err(self.bad(
                "interface.address",
                text,
                "leaves no room for peers; use a prefix of /126 or shorter",
            ));
        }
        if n.addr() == n.network() {
            return Err(self.bad(
                "interface.address",
                text,
                "is the subnet's network address; give the gateway's own address",
            ));
        }
        Ok(n)
    }

    fn ifname(&self, key: &str, name: &str) -> Result<String, ConfigError> {
        check_ifname(name).map_err(|why| self.bad(key, name, why))?;
        Ok(name.to_string())
    }

    fn service(
        &self,
        iface: &InterfaceConfig,
        s: &ServiceRaw,
    ) -> Result<ServiceConfig, ConfigError> {
        if crate::registry::PeerName::new(&s.name).is_err() {
            return Err(self.bad(
                "service.name",
                &s.name,
                "is not a valid service name (1 to 63 of a-z, 0-9, `_`, `.`, `-`, starting with a letter or digit)",
            ));
        }
        let key = "service.address";
        let of = format!("of service {:?}", s.name);
        let address: SocketAddr = s
            .address
            .parse()
            .map_err(|_| self.bad(key, &s.address, format!("{of} is not an IP:PORT address")))?;
        if address.port() == 0 {
            return Err(self.bad(
                key,
                &s.address,
                format!("{of} needs a port from 1 to 65535"),
            ));
        }
        let ip = address.ip();
        let reachable = if iface.in_tunnel(ip) {
            Some(ip) == gateway_for(iface, ip)
        } else {
            is_internal(ip)
        };
        if !reachable {
            return Err(self.bad(
                key,
                &s.address,
                format!("{of} is neither the gateway's tunnel address nor an internal (private-range) host"),
            ));
        }
        let protocol = match s.protocol.as_deref() {
            None | Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some(other) => {
                return Err(self.bad(
                    "service.protocol",
                    other,
                    format!("{of} is not one of \"tcp\", \"udp\""),
                ))
            }
        };
        Ok(ServiceConfig {
            name: s.name.clone(),
            address,
            protocol,
            default: s.default.unwrap_or(false),
        })
    }

    fn store(
        &self,
        iface: &InterfaceConfig,
        raw: &super::raw::StoreRaw,
    ) -> Result<StoreConfig, ConfigError> {
        let (url, pool) = (raw.url.as_str(), raw.pool.as_deref());
        if let Some(rest) = url.strip_prefix("sqlite://") {
            if rest.is_empty() {
                return Err(self.bad("store.url", url, "names no database file"));
            }
            if pool.is_some() {
                return Err(self.bad("store.pool", pool, "applies only to a postgres:// store"));
            }
            if let Some(g) = &raw.gateway {
                return Err(self.bad("store.gateway", g, "applies only to a postgres:// store"));
            }
            for (key, value) in [
                ("store.password_file", &raw.password_file),
                ("store.ca_file", &raw.ca_file),
            ] {
                if let Some(v) = value {
                    return Err(self.bad(key, v, "applies only to a postgres:// store"));
                }
            }
            return Ok(StoreConfig::Sqlite {
                path: self.dir.join(rest),
            });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let parsed = url.parse::<postgres::Config>().map_err(|e| {
                self.bad("store.url", redact_url(url), format!("does not parse: {e}"))
            })?;
            let password_file = match &raw.password_file {
                Some(_) if parsed.get_password().is_some() => {
                    return Err(self.bad(
                        "store.password_file",
                        raw.password_file.as_deref(),
                        "is set, but `store.url` carries a password too; give it once",
                    ))
                }
                Some(f) => Some(self.file("store.password_file", f)?),
                None => None,
            };
            let ca_file = match &raw.ca_file {
                Some(f) => {
                    if parsed.get_ssl_mode() == postgres::config::SslMode::Disable {
                        return Err(self.bad(
                            "store.ca_file",
                            f,
                            "is set, but `store.url` says sslmode=disable",
                        ));
                    }
                    Some(self.file("store.ca_file", f)?)
                }
                // Without roots to check the server against, TLS would be
                // encryption to anyone: refused rather than pretended.
                None if parsed.get_ssl_mode() != postgres::config::SslMode::Disable
                    && parsed.get_ssl_mode() != postgres::config::SslMode::Prefer =>
                {
                    return Err(self.bad(
                        "store.url",
                        redact_url(url),
                        "asks for TLS (sslmode); set `store.ca_file` to the CA that signed the database server's certificate",
                    ))
                }
                None => None,
            };
            let pool = match pool {
                None => None,
                Some(p) => {
                    let net: Ipv4Net = p
                        .parse()
                        .map_err(|_| self.bad("store.pool", p, "is not an IPv4 CIDR"))?;
                    if !iface.address_v4.trunc().contains(&net) {
                        return Err(self.bad(
                            "store.pool",
                            p,
                            format!(
                                "lies outside the tunnel subnet {}",
                                iface.address_v4.trunc()
                            ),
                        ));
                    }
                    if net.contains(&iface.address_v4.addr()) && net.hosts().count() <= 1 {
                        return Err(self.bad(
                            "store.pool",
                            p,
                            "holds no address but the gateway's",
                        ));
                    }
                    Some(net)
                }
            };
            let gateway = match &raw.gateway {
                Some(g) if valid_gateway_name(g) => g.clone(),
                Some(g) => {
                    return Err(self.bad(
                        "store.gateway",
                        g,
                        "must be 1-64 characters of letters, digits, `.`, `-`, `_`, `/` or `:`",
                    ))
                }
                None => format!("{}/{}", host_name(), iface.name),
            };
            return Ok(StoreConfig::Postgres {
                url: url.to_string(),
                pool,
                gateway,
                password_file,
                password: None,
                ca_file,
                ca_pem: None,
            });
        }
        Err(self.bad(
            "store.url",
            redact_url(url),
            "is neither sqlite:///PATH nor postgres://...",
        ))
    }
}

/// `[store] gateway`: printable, short, no spaces (it appears in audit rows and logs).
fn valid_gateway_name(g: &str) -> bool {
    (1..=64).contains(&g.len())
        && g.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/' | ':'))
}

/// The kernel's host name (the default gateway name's first half).
fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| valid_gateway_name(h))
        .unwrap_or_else(|| "localhost".to_string())
}

/// Most `[[service]]` sections: each peer's grants are one bitmask word
/// (see [`crate::policy::Grants`]).
pub const MAX_SERVICES: usize = 32;
/// Most `[interface] dns` servers (every peer may reach port 53 on each).
pub const MAX_DNS: usize = 8;

/// The gateway's own address in `ip`'s family.
fn gateway_for(iface: &InterfaceConfig, ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(_) => Some(IpAddr::V4(iface.gateway_v4())),
        IpAddr::V6(_) => iface.gateway_v6().map(IpAddr::V6),
    }
}

/// Private ranges a gateway may publish services on: RFC 1918 and IPv6 ULA.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_private(),
        IpAddr::V6(a) => (a.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// The first host of `n` (network + 1).
pub fn first_host_v4(n: Ipv4Net) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(n.network()).saturating_add(1))
}

/// A network interface name as Linux accepts it: 1..=15 of `[A-Za-z0-9_.-]`.
///
/// # Errors
/// The reason, as the end of a sentence.
pub fn check_ifname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err("is not an interface name (1 to 15 of A-Z, a-z, 0-9, `_`, `.`, `-`)".into())
    }
}

/// `HOST:PORT` as wg-quick's `Endpoint` takes it (IPv6 in brackets).
///
/// # Errors
/// The reason, as the end of a sentence.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    const WHY: &str = "is not HOST:PORT (e.g. \"vpn.example.org:51820\", \"[2001:db8::1]:51820\")";
    let (host, port) = endpoint.rsplit_once(':').ok_or(WHY)?;
    if !port.parse::<u16>().is_ok_and(|p| p != 0) {
        return Err(WHY.into());
    }
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            })
    };
    if host_ok {
        Ok(())
    } else {
        Err(WHY.into())
    }
}

fn valid_user(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 32
        && u.bytes()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == b'_')
        && u.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'))
}

/// A URL with any password replaced, so errors never echo secrets.
/// `url` without its password (in the user part or a `password=` parameter),
/// for messages and logs.
pub(crate) fn redact_url(url: &str) -> String {
    let base = match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s && url[s + 3..at].contains(':') => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{user}:***{}", &url[..s], &url[at..])
        }
        _ => url.to_string(),
    };
    match base.split_once('?') {
        Some((head, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_string(),
                })
                .collect();
            format!("{head}?{}", params.join("&"))
        }
        None => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[interface]
name = "sg0"
private_key_file = "server.key"
listen_port = 51820
address = "10.8.0.1/24"
mtu = 1420
endpoint = "vpn.example.org:51820"
dns = ["10.8.0.1"]

[egress]
interface = "eth0"
allow_internet = true
peer_to_peer = false

[[service]]
name = "sftp"
address = "10.8.0.1:22"
protocol = "tcp"
default = true

[[service]]
name = "db"
address = "172.30.0.10:5432"

[api]
listen = "10.8.0.1:8443"
token_file = "/etc/sitegate/api.token"

[store]
url = "sqlite://sitegate.db"

[log]
format = "text"
audit_file = "/var/log/sitegate/audit.jsonl"

[firewall]
manage = false

[daemon]
user = "sitegate"
seal_key_file = "seal.key"
"#;

    fn path() -> &'static Path {
        Path::new("/x/sitegate.toml")
    }

    fn parse_with(from: &str, to: &str) -> Result<Config, ConfigError> {
        assert!(BASE.contains(from), "{from}");
        parse(path(), &BASE.replacen(from, to, 1))
    }

    fn err_with(from: &str, to: &str) -> String {
        parse_with(from, to)
            .expect_err("should be refused")
            .to_string()
    }

    /// A complete config parses, with relative paths resolved against its directory.
    #[test]
    fn full_config_parses() {
        let c = parse(path(), BASE).unwrap();
        assert_eq!(c.interface.name, "sg0");
        assert_eq!(c.interface.private_key_file, PathBuf::from("/x/server.key"));
        assert_eq!(c.interface.gateway_v4().to_string(), "10.8.0.1");
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[1].protocol, Protocol::Tcp);
        assert!(!c.services[1].default);
        assert!(
            matches!(&c.store, StoreConfig::Sqlite { path } if path == Path::new("/x/sitegate.db"))
        );
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.daemon.seal_key_file, Some(PathBuf::from("/x/seal.key")));
        assert!(!c.firewall.manage);
    }

    /// Optional sections may be left out; the defaults are the safe ones.
    #[test]
    fn minimal_config_defaults() {
        let text = "[interface]\nname='sg0'\nprivate_key_file='/k'\naddress='10.8.0.1/24'\nendpoint='h:1'\n[store]\nurl='sqlite:///d.db'\n";
        let c = parse(path(), text).unwrap();
        assert_eq!((c.interface.listen_port, c.interface.mtu), (51820, 1420));
        assert!(!c.egress.allow_internet && !c.egress.peer_to_peer && c.firewall.manage);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.audit_rotate_bytes, crate::audit::writer::ROTATE_BYTES);
        assert!(c.api.is_none() && c.services.is_empty());
    }

    /// `log.audit_rotate_bytes` takes 4096 or more; smaller or negative values are refused naming the key.
    #[test]
    fn audit_rotate_bytes() {
        let from = "format = \"text\"\n";
        let c = parse_with(from, "format = \"text\"\naudit_rotate_bytes = 4096\n").unwrap();
        assert_eq!(c.log.audit_rotate_bytes, 4096);
        for bad in ["4095", "-1", "0"] {
            let e = err_with(
                from,
                &format!("format = \"text\"\naudit_rotate_bytes = {bad}\n"),
            );
            assert!(
                e.contains("`log.audit_rotate_bytes`") && e.contains(bad) && e.contains("4096"),
                "{e}"
            );
        }
    }

    /// An unknown key is refused naming the file, the key and its section.
    #[test]
    fn unknown_key_named() {
        let e = err_with("mtu = 1420\n", "mtu = 1420\nfoo = 1\n");
        assert_eq!(e, "/x/sitegate.toml: unknown key `foo` in [interface]");
        let e = err_with("default = true\n", "default = true\nbar = 2\n");
        assert_eq!(e, "/x/sitegate.toml: unknown key `bar` in [[service]]");
        let e = err_with("[firewall]", "[bogus]\nx = 1\n[firewall]");
        assert_eq!(e, "/x/sitegate.toml: unknown key `bogus` at the top level");
    }

    /// Malformed TOML and wrong types are one line naming the file and line.
    #[test]
    fn syntax_and_type_errors() {
        let e = err_with("[egress]", "[egress");
        assert!(
            e.starts_with("/x/sitegate.toml: malformed TOML at line 11"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        let e = err_with("address = \"10.8.0.1/24\"", "address = 5");
        assert!(
            e.ends_with("`interface.address` at line 6: expected a string or a list of strings"),
            "{e}"
        );
        let e = err_with("listen_port = 51820", "listen_port = \"x\"");
        assert!(
            e.contains("`interface.listen_port`") && e.contains("line 5"),
            "{e}"
        );
    }

    /// Missing keys and sections are named.
    #[test]
    fn missing_key_and_section() {
        let e = err_with("endpoint = \"vpn.example.org:51820\"\n", "");
        assert_eq!(e, "/x/sitegate.toml: missing key `endpoint` in [interface]");
        let e = err_with("[store]\nurl = \"sqlite://sitegate.db\"\n", "");
        assert_eq!(e, "/x/sitegate.toml: missing section [store]");
    }

    /// `api.listen` outside the tunnel subnet is refused naming key and value.
    #[test]
    fn api_listen_outside_subnet() {
        let e = err_with("10.8.0.1:8443", "192.168.1.1:8443");
        assert_eq!(
            e,
            "/x/sitegate.toml: `api.listen` = \"192.168.1.1:8443\" lies outside the tunnel subnet 10.8.0.0/24"
        );
        let e = err_with("10.8.0.1:8443", "10.8.0.9:8443");
        assert!(
            e.contains("`api.listen`") && e.contains("10.8.0.9:8443"),
            "{e}"
        );
    }

    /// Services must sit on the gateway's tunnel address or a private-range host.
    #[test]
    fn service_address_reachability() {
        for bad in ["8.8.8.8:53", "10.8.0.5:22", "127.0.0.1:22", "0.0.0.0:22"] {
            let e = err_with("172.30.0.10:5432", bad);
            let want = format!("`service.address` = \"{bad}\" of service \"db\" is neither");
            assert!(e.contains(&want), "{e}");
        }
        assert!(parse_with("172.30.0.10:5432", "192.168.5.5:80").is_ok());
        let e = err_with("name = \"db\"", "name = \"sftp\"");
        assert!(e.contains("`service.name` = \"sftp\""), "{e}");
        let e = err_with("protocol = \"tcp\"", "protocol = \"sctp\"");
        assert!(e.contains("`service.protocol` = \"sctp\""), "{e}");
    }

    /// Bad addresses, ports, MTUs and names are refused naming the key.
    #[test]
    fn bad_values_named() {
        let cases = [
            (
                "address = \"10.8.0.1/24\"",
                "address = \"10.8.0.0/24\"",
                "`interface.address` = \"10.8.0.0/24\"",
            ),
            (
                "address = \"10.8.0.1/24\"",
                "address = \"10.8.0.255/24\"",
                "`interface.address`",
            ),
            (
                "address = \"10.8.0.1/24\"",
                "address = \"10.8.0.1/31\"",
                "`interface.address`",
            ),
            (
                "address = \"10.8.0.1/24\"",
                "address = \"nope\"",
                "`interface.address` = \"nope\"",
            ),
            (
                "address = \"10.8.0.1/24\"",
                "address = [\"fd00::1/64\"]",
                "has no IPv4",
            ),
            (
                "listen_port = 51820",
                "listen_port = 70000",
                "`interface.listen_port` = 70000",
            ),
            (
                "listen_port = 51820",
                "listen_port = 0",
                "`interface.listen_port` = 0",
            ),
            ("mtu = 1420", "mtu = 100", "`interface.mtu` = 100"),
            (
                "name = \"sg0\"",
                "name = \"a-very-long-interface\"",
                "`interface.name`",
            ),
            (
                "name = \"sg0\"",
                "name = \"sg 0\"",
                "`interface.name` = \"sg 0\"",
            ),
            (
                "vpn.example.org:51820",
                "vpn.example.org",
                "`interface.endpoint` = \"vpn.example.org\"",
            ),
            (
                "vpn.example.org:51820",
                "vpn.example.org:0",
                "`interface.endpoint`",
            ),
            (
                "dns = [\"10.8.0.1\"]",
                "dns = [\"ten\"]",
                "`interface.dns` = \"ten\"",
            ),
            (
                "interface = \"eth0\"",
                "interface = \"\"",
                "`egress.interface`",
            ),
            (
                "format = \"text\"",
                "format = \"xml\"",
                "`log.format` = \"xml\"",
            ),
            (
                "sqlite://sitegate.db",
                "mysql://x",
                "`store.url` = \"mysql://x\"",
            ),
            ("user = \"sitegate\"", "user = \"Root Me\"", "`daemon.user`"),
            (
                "interface = \"eth0\"",
                "# no uplink",
                "`egress.allow_internet` = true needs `egress.interface`",
            ),
        ];
        for (from, to, want) in cases {
            let e = err_with(from, to);
            assert!(
                e.starts_with("/x/sitegate.toml: ") && e.contains(want),
                "{to}: {e}"
            );
        }
    }

    /// An IPv6 ULA may be added next to the IPv4 address; then MTU must be >= 1280.
    #[test]
    fn ipv6_address() {
        let c = parse_with(
            "address = \"10.8.0.1/24\"",
            "address = [\"10.8.0.1/24\", \"fd00:8::1/64\"]",
        )
        .unwrap();
        assert_eq!(c.interface.gateway_v6().unwrap().to_string(), "fd00:8::1");
        let text = BASE.replacen(
            "address = \"10.8.0.1/24\"",
            "address = [\"10.8.0.1/24\", \"fd00:8::1/64\"]",
            1,
        );
        let e = parse(path(), &text.replacen("mtu = 1420", "mtu = 1000", 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`interface.mtu` = 1000"), "{e}");
    }

    /// `[store] pool`, `gateway` and `ca_file`: only with postgres, a pool inside
    /// the tunnel subnet, a gateway name of safe characters, TLS only with a CA;
    /// each refusal names its key.
    #[test]
    fn store_pool_and_gateway() {
        let pg = |extra: &str| {
            parse_with(
                "url = \"sqlite://sitegate.db\"",
                &format!("url = \"postgres://u@db/reg\"\n{extra}"),
            )
        };
        let c = pg("pool = \"10.8.0.128/25\"\ngateway = \"gw-1.eu:a/b\"").unwrap();
        assert!(matches!(
            &c.store,
            StoreConfig::Postgres { pool: Some(p), gateway, .. }
                if p.to_string() == "10.8.0.128/25" && gateway == "gw-1.eu:a/b"
        ));
        for (extra, key, why) in [
            (
                "pool = \"10.9.0.0/25\"",
                "store.pool",
                "outside the tunnel subnet",
            ),
            ("pool = \"fd00::/64\"", "store.pool", "not an IPv4 CIDR"),
            (
                "pool = \"10.8.0.1/32\"",
                "store.pool",
                "no address but the gateway's",
            ),
            (
                "gateway = \"two words\"",
                "store.gateway",
                "1-64 characters",
            ),
            ("gateway = \"\"", "store.gateway", "1-64 characters"),
        ] {
            let e = pg(extra).expect_err(extra).to_string();
            assert!(
                e.contains(&format!("`{key}`")) && e.contains(why),
                "{extra}: {e}"
            );
        }
        // TLS needs roots to check the server against, and roots need TLS.
        let tls = |url: &str, extra: &str| {
            parse_with(
                "url = \"sqlite://sitegate.db\"",
                &format!("url = \"{url}\"\n{extra}"),
            )
        };
        let e = tls("postgres://u@db/reg?sslmode=require", "")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`store.url`") && e.contains("`store.ca_file`"),
            "{e}"
        );
        let e = tls(
            "postgres://u@db/reg?sslmode=disable",
            "ca_file = \"ca.pem\"",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`store.ca_file`") && e.contains("sslmode=disable"),
            "{e}"
        );
        let c = tls(
            "postgres://u@db/reg?sslmode=require",
            "ca_file = \"ca.pem\"",
        )
        .unwrap();
        assert!(
            matches!(&c.store, StoreConfig::Postgres { ca_file: Some(p), .. } if p == Path::new("/x/ca.pem"))
        );
        for extra in [
            "pool = \"10.8.0.0/25\"",
            "gateway = \"a\"",
            "ca_file = \"ca.pem\"",
        ] {
            let e = parse_with(
                "url = \"sqlite://sitegate.db\"",
                &format!("url = \"sqlite://sitegate.db\"\n{extra}"),
            )
            .expect_err(extra)
            .to_string();
            assert!(e.contains("applies only to a postgres:// store"), "{e}");
        }
    }

    /// Store URLs: absolute and relative sqlite paths, postgres parsed, password never echoed.
    #[test]
    fn store_urls() {
        let c = parse_with("sqlite://sitegate.db", "sqlite:///var/lib/s.db").unwrap();
        assert!(
            matches!(&c.store, StoreConfig::Sqlite { path } if path == Path::new("/var/lib/s.db"))
        );
        let c = parse_with("sqlite://sitegate.db", "postgres://u@db/reg").unwrap();
        assert!(
            matches!(&c.store, StoreConfig::Postgres { url, pool: None, gateway, .. } if url == "postgres://u@db/reg" && gateway.ends_with("/sg0"))
        );
        let e = err_with("sqlite://sitegate.db", "pg://u:hunter2@db/x");
        assert!(!e.contains("hunter2"), "{e}");
        let e = err_with(
            "sqlite://sitegate.db",
            "postgres://u:hunter2@db/x?sslmode=sometimes",
        );
        assert!(
            !e.contains("hunter2") && e.contains("does not parse"),
            "{e}"
        );
        assert_eq!(
            redact_url("postgres://u:pw@h/db?host=/run&password=pw2"),
            "postgres://u:***@h/db?host=/run&password=***"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }

    /// A database password stays out of reach of other users: an inline one
    /// needs a config file others cannot read, `store.password_file` follows the
    /// key-file rules and is read by `load`, and the two together are refused.
    #[test]
    fn database_password_rules() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let dir = std::env::temp_dir().join(format!("sitegate-cfgpw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("server.key");
        std::fs::write(&key, format!("{}\n", PrivateKey::generate().to_base64())).unwrap();
        mode(&key, 0o600);
        let cfg = dir.join("sitegate.toml");
        let with = |store: &str| {
            std::fs::write(&cfg, BASE.replace("url = \"sqlite://sitegate.db\"", store)).unwrap();
        };

        with("url = \"postgres://u:hunter2@db/reg\"");
        mode(&cfg, 0o644);
        let e = load(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("readable by others") && e.contains("store.password_file"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        mode(&cfg, 0o640);
        assert!(load(&cfg).is_ok());

        let pw = dir.join("db.password");
        std::fs::write(&pw, "s3cret\n").unwrap();
        mode(&pw, 0o640);
        with("url = \"postgres://u@db/reg\"\npassword_file = \"db.password\"");
        mode(&cfg, 0o644);
        let e = load(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("`store.password_file`") && e.contains("readable by group or others"),
            "{e}"
        );
        mode(&pw, 0o600);
        let c = load(&cfg).unwrap();
        match &c.store {
            StoreConfig::Postgres {
                password: Some(p), ..
            } => {
                assert_eq!(p.0.as_str(), "s3cret");
                assert_eq!(format!("{p:?}"), "DbPassword(<redacted>)");
            }
            other => panic!("password not loaded: {other:?}"),
        }
        std::fs::write(&pw, "").unwrap();
        assert!(load(&cfg).unwrap_err().to_string().contains("on one line"));

        with("url = \"postgres://u:pw@db/reg\"\npassword_file = \"db.password\"");
        assert!(load(&cfg).unwrap_err().to_string().contains("give it once"));
        with("url = \"sqlite://s.db\"\npassword_file = \"db.password\"");
        assert!(load(&cfg)
            .unwrap_err()
            .to_string()
            .contains("applies only to a postgres:// store"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `load` refuses a key file readable by group or others, naming the file.
    #[test]
    fn load_refuses_loose_key_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sitegate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("server.key");
        std::fs::write(&key, format!("{}\n", PrivateKey::generate().to_base64())).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let cfg = dir.join("sitegate.toml");
        std::fs::write(&cfg, BASE).unwrap();
        let e = load(&cfg).unwrap_err().to_string();
        assert!(
            e.contains(&key.display().to_string()) && e.contains("readable by group or others"),
            "{e}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load(&cfg).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The example `config/sitegate.toml` in the repository is valid (key file not checked: `parse`).
    #[test]
    fn example_config_parses() {
        let text = include_str!("../../config/sitegate.toml");
        let c = parse(Path::new("/etc/sitegate/sitegate.toml"), text).unwrap();
        assert_eq!(c.services.len(), 3);
        assert!(c.api.is_some() && c.daemon.user.is_some());
    }

    /// No key is listed: every key parsed is enforced (PostgreSQL stores included).
    #[test]
    fn unenforced_keys_listed() {
        let keys =
            |c: &Config| -> Vec<&str> { c.unenforced_keys().iter().map(|u| u.key).collect() };
        let full = parse(path(), BASE).unwrap();
        assert!(keys(&full).is_empty(), "{:?}", keys(&full));
        let text = "[interface]\nname='sg0'\nprivate_key_file='/k'\naddress='10.8.0.1/24'\nendpoint='h:1'\n[store]\nurl='sqlite:///d.db'\n";
        assert!(keys(&parse(path(), text).unwrap()).is_empty());
        let pg = text.replace(
            "'sqlite:///d.db'",
            "'postgres://u@db/sg'\npool='10.8.0.0/25'",
        );
        assert!(keys(&parse(path(), &pg).unwrap()).is_empty());
        // `daemon.user` is enforced (the privilege drop): never listed.
        let user_only = parse_with("seal_key_file = \"seal.key\"\n", "").unwrap();
        assert!(keys(&user_only).is_empty());
    }

    /// Endpoint syntax: hostnames, IPv4 and bracketed IPv6 with a port.
    #[test]
    fn endpoints() {
        for ok in [
            "vpn.example.org:51820",
            "192.0.2.1:1",
            "[2001:db8::1]:51820",
            "localhost:5",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ":51820",
            "host:",
            "host:x",
            "2001:db8::1:51820",
            "a..b:1",
            "h st:1",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }
}
