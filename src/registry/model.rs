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
            && b.iter().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-')
            });
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

    /// Where the peer stands at `now`: revocation wins over expiry, as it
    /// is final and expiry is not (an admin may issue a new expiry).
    pub fn lifecycle(&self, now: i64) -> Lifecycle {
        if self.revoked_at.is_some() {
            Lifecycle::Revoked
        } else if self.is_active(now) {
            Lifecycle::Active
        } else {
            Lifecycle::Expired
        }
    }
}

/// A peer's `state` in listings, the admin API and metrics: one rule for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Active,
    Expired,
    Revoked,
}

impl Lifecycle {
    pub const ALL: [Lifecycle; 3] = [Lifecycle::Active, Lifecycle::Expired, Lifecycle::Revoked];

    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Active => "active",
            Lifecycle::Expired => "expired",
            Lifecycle::Revoked => "revoked",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names follow `[a-z0-9][a-z0-9_.-]{0,62}`; anything else is refused naming the value.
    #[test]
    fn peer_names() {
        for ok in ["a", "alice", "site-7.clinic_b", "0day", &"a".repeat(63)] {
            assert_eq!(PeerName::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "Bad_Name",
            "-x",
            ".x",
            "_x",
            "a b",
            "caf\u{e9}",
            "a/b",
            &"a".repeat(64),
        ] {
            let e = PeerName::new(bad).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with(&format!("invalid peer name `{bad}`")),
                "{e}"
            );
        }
    }

    /// A peer is active until revoked or until its expiry instant.
    #[test]
    fn activity() {
        let mut p = Peer {
            id: 1,
            name: PeerName::new("a").unwrap(),
            public_key: PublicKey::from_bytes([9; 32]),
            preshared_key: None,
            addresses: vec![],
            created_at: 0,
            expires_at: Some(100),
            revoked_at: None,
            revoked_reason: None,
            admin: false,
            services: vec![],
        };
        assert!(p.is_active(99) && !p.is_active(100));
        assert_eq!(p.lifecycle(99), Lifecycle::Active);
        assert_eq!(p.lifecycle(100), Lifecycle::Expired);
        p.revoked_at = Some(5);
        assert_eq!(p.lifecycle(99), Lifecycle::Revoked, "revocation wins");
        p.expires_at = None;
        assert!(!p.is_active(1));
    }
}
