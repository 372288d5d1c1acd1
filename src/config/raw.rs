//! Serde mirror of `sitegate.toml`: every section refuses unknown keys, and values
//! stay loosely typed (strings, `i64`) so that `validate` can name the key and the
//! value in its own words instead of serde's.

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigRaw {
    pub interface: InterfaceRaw,
    pub egress: Option<EgressRaw>,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceRaw>,
    pub api: Option<ApiRaw>,
    pub store: StoreRaw,
    pub log: Option<LogRaw>,
    pub firewall: Option<FirewallRaw>,
    pub daemon: Option<DaemonRaw>,
}

/// `[interface]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceRaw {
    pub name: String,
    pub private_key_file: String,
    pub listen_port: Option<i64>,
    /// `"10.8.0.1/24"` or `["10.8.0.1/24", "fd00:8::1/64"]`.
    pub address: OneOrMany,
    pub mtu: Option<i64>,
    pub endpoint: String,
    #[serde(default)]
    pub dns: Vec<String>,
}

/// A key that takes one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// `[egress]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRaw {
    pub interface: Option<String>,
    pub allow_internet: Option<bool>,
    pub peer_to_peer: Option<bool>,
}

/// One `[[service]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRaw {
    pub name: String,
    pub address: String,
    pub protocol: Option<String>,
    pub default: Option<bool>,
}

/// `[api]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiRaw {
    pub listen: String,
    pub token_file: String,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
}

/// `[store]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreRaw {
    pub url: String,
    pub pool: Option<String>,
    pub gateway: Option<String>,
    pub password_file: Option<String>,
    pub ca_file: Option<String>,
}

/// `[log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogRaw {
    pub format: Option<String>,
    pub audit_file: Option<String>,
    pub audit_rotate_bytes: Option<i64>,
}

/// `[firewall]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallRaw {
    pub manage: Option<bool>,
}

/// `[daemon]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonRaw {
    pub user: Option<String>,
    pub seal_key_file: Option<String>,
}
