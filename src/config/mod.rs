//! `sitegate.toml`: deserialized into `raw::*Raw` (unknown keys refused), then
//! validated into [`Config`], whose fields cannot hold a bad value.
//!
//! Sections `[interface]`, `[egress]`, `[[service]]`, `[store]`, `[log]` and
//! `[firewall]`, `[api]` and `[daemon] user` act; keys whose feature is not
//! built yet are listed by [`Config::unenforced_keys`] (`sitegate check` fails
//! on them).

pub mod raw;
pub mod validate;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};

pub use validate::ConfigError;

/// Default config path; overridden by `--config` or `SITEGATE_CONFIG`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sitegate/sitegate.toml";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages and relative paths).
    pub path: PathBuf,
    pub interface: InterfaceConfig,
    pub egress: EgressConfig,
    pub services: Vec<ServiceConfig>,
    pub api: Option<ApiConfig>,
    pub store: StoreConfig,
    pub log: LogConfig,
    pub firewall: FirewallConfig,
    pub daemon: DaemonConfig,
}

#[derive(Debug, Clone)]
pub struct InterfaceConfig {
    /// TUN device name (1..=15 chars, `[A-Za-z0-9_.-]`).
    pub name: String,
    pub private_key_file: PathBuf,
    pub listen_port: u16,
    /// Gateway IPv4 address with the tunnel subnet's prefix, e.g. 10.8.0.1/24.
    pub address_v4: Ipv4Net,
    /// Optional IPv6 ULA with its prefix.
    pub address_v6: Option<Ipv6Net>,
    pub mtu: u16,
    /// `HOST:PORT` that issued client configs dial.
    pub endpoint: String,
    pub dns: Vec<IpAddr>,
}

impl InterfaceConfig {
    pub fn gateway_v4(&self) -> Ipv4Addr {
        self.address_v4.addr()
    }
    pub fn gateway_v6(&self) -> Option<Ipv6Addr> {
        self.address_v6.map(|n| n.addr())
    }
    /// Whether `ip` lies in one of the tunnel subnets.
    pub fn in_tunnel(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.address_v4.trunc().contains(&a),
            IpAddr::V6(a) => self.address_v6.is_some_and(|n| n.trunc().contains(&a)),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct EgressConfig {
    pub interface: Option<String>,
    pub allow_internet: bool,
    pub peer_to_peer: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    pub address: SocketAddr,
    pub protocol: Protocol,
    pub default: bool,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub token_file: PathBuf,
    /// PEM certificate chain and private key: HTTPS when both are set.
    pub tls: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Sqlite {
        path: PathBuf,
    },
    Postgres {
        url: String,
        /// This gateway's slice of the tunnel subnet for allocation.
        pool: Option<Ipv4Net>,
        /// Names this gateway's audit chain in the shared table
        /// (`[store] gateway`; default `HOSTNAME/INTERFACE`).
        gateway: String,
        /// `[store] password_file`: the database password, kept out of the config.
        password_file: Option<PathBuf>,
        /// Its contents, read by [`Config::load`] (as root, before any
        /// privilege drop), so that a daemon that reconnects later can log in.
        password: Option<DbPassword>,
        /// `[store] ca_file`: TLS to the database is required and its
        /// certificate must chain to these roots (PEM).
        ca_file: Option<PathBuf>,
        /// Its contents, read by [`Config::load`] for the same reason.
        ca_pem: Option<std::sync::Arc<Vec<u8>>>,
    },
}

/// A database password: zeroized on drop, never printed.
#[derive(Clone)]
pub struct DbPassword(pub std::sync::Arc<zeroize::Zeroizing<String>>);

impl std::fmt::Debug for DbPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DbPassword(<redacted>)")
    }
}

impl StoreConfig {
    /// Where the store is, for messages: the file, or the URL without its password.
    pub fn location(&self) -> String {
        match self {
            StoreConfig::Sqlite { path } => path.display().to_string(),
            StoreConfig::Postgres { url, .. } => validate::redact_url(url),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub audit_file: Option<PathBuf>,
    /// The audit log starts a new file past this size (`[log] audit_rotate_bytes`;
    /// small values let tests exercise rotation).
    pub audit_rotate_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            audit_file: None,
            audit_rotate_bytes: crate::audit::writer::ROTATE_BYTES,
        }
    }
}

/// Smallest `[log] audit_rotate_bytes`: below a few records per file rotation
/// would churn through the kept generations and drop the chain's start.
pub const MIN_AUDIT_ROTATE_BYTES: u64 = 4096;

#[derive(Debug, Clone, Default)]
pub struct FirewallConfig {
    pub manage: bool,
}

#[derive(Debug, Clone, Default)]
pub struct DaemonConfig {
    pub user: Option<String>,
    pub seal_key_file: Option<PathBuf>,
}

/// A config key that parses and validates but that no running code acts on yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unenforced {
    /// `section.key`, as config errors name keys.
    pub key: &'static str,
    /// What is not built yet, as the end of a sentence.
    pub missing: &'static str,
}

impl Config {
    /// The keys present in this config that the code does not enforce yet
    /// (SPEC, "Fail closed": nothing the config asks for is silently ignored).
    /// This is the one list of them: `sitegate check` fails on each, and `run`
    /// refuses to start on them. Every key is enforced today; the list stays so
    /// that a key added before its feature lands has one place to go.
    pub fn unenforced_keys(&self) -> Vec<Unenforced> {
        Vec::new()
    }

    /// Reads and validates a config file.
    ///
    /// # Errors
    /// One [`ConfigError`] naming the file and the key at fault.
    /// Checks the server key file too (see [`validate::load`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        validate::load(path)
    }

    /// Validates `text` as if read from `path`, touching no file (so the server
    /// key file is not checked; `load` does that).
    ///
    /// # Errors
    /// One [`ConfigError`] naming the file and the key at fault.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        validate::parse(path, text)
    }
}
