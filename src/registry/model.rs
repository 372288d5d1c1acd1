//! Registry records as plain data.

use std::fmt;
use std::net::IpAddr;

use crate::keys::{PresharedKey, PublicKey};

/// A validated peer name: `[a-z0-9][a-z0-9_.-]{0,62}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid peer name `{0}`: use 1 to 63 characters of a-z, 0-9, `_`, `.`, `-`, starting with a letter or digit")]
pub struct NameError(pub String);

impl PeerName {
    /// # Errors
    /// [`NameError`] unless `s` matches `[a-z0-9][a-z0-9_.-]{0,62}`.
    pub fn new(s: &str) -> Result<Self, NameError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-'));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(NameError(s.to_string()))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerName({})", self.0)
    }
}

/// One issued peer as stored. Times are Unix seconds.
#[derive(Debug, Clone)]
pub struct Peer {
    pub id: i64,
    pub name: PeerName,
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    /// Tunnel addresses (host addresses: /32, /128).
    pub addresses: Vec<IpAddr>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub revoked_reason: Option<String>,
    pub admin: bool,
    pub services: Vec<String>,
}

impl Peer {
    /// Whether the daemon should accept this peer's handshakes at `now`.
    pub fn is_active(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|t| now < t)
    }
}
