//! Who may talk to the admin API: a per-source rate limit, the admin-peer
//! source filter, and the bearer token. Pure apart from the clock the caller
//! passes, so the rules are unit-tested without sockets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Requests a source may make at once, and per second after that.
pub(crate) const BURST: f64 = 60.0;
pub(crate) const PER_SECOND: f64 = 20.0;
/// Sources tracked at most; beyond, the fullest (idlest) bucket is forgotten.
pub(crate) const MAX_SOURCES: usize = 4096;

/// One token bucket per source address.
#[derive(Debug, Default)]
pub(crate) struct RateLimits {
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl RateLimits {
    /// Takes one request from `src`'s bucket at `now`; `Err(wait)` when empty,
    /// with the time until the next request would pass.
    pub(crate) fn take(&mut self, src: IpAddr, now: Instant) -> Result<(), Duration> {
        if !self.buckets.contains_key(&src) && self.buckets.len() >= MAX_SOURCES {
            self.evict(now);
        }
        let (tokens, last) = self.buckets.entry(src).or_insert((BURST, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * PER_SECOND;
        *tokens = (*tokens + refill).min(BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / PER_SECOND))
        }
    }

    /// Drops the bucket that would be fullest by now: forgetting it costs its
    /// source the least.
    fn evict(&mut self, now: Instant) {
        let fullest = self
            .buckets
            .iter()
            .max_by(|a, b| {
                let level = |(t, at): &(f64, Instant)| {
                    t + now.saturating_duration_since(*at).as_secs_f64() * PER_SECOND
                };
                level(a.1).total_cmp(&level(b.1))
            })
            .map(|(ip, _)| *ip);
        if let Some(ip) = fullest {
            self.buckets.remove(&ip);
        }
    }
}

/// The API token, held in memory that is wiped when dropped.
pub(crate) struct Token(Zeroizing<Vec<u8>>);

impl Token {
    /// The shortest token accepted: guessing 16 random characters is hopeless,
    /// a short human password is not.
    pub(crate) const MIN_LEN: usize = 16;

    /// # Errors
    /// The file's (trimmed) text is shorter than [`Token::MIN_LEN`] or not one line.
    pub(crate) fn from_text(text: &str) -> Result<Token, &'static str> {
        let t = text.trim();
        if t.len() < Self::MIN_LEN {
            return Err("holds a token shorter than 16 characters");
        }
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("holds more than one token (whitespace inside)");
        }
        Ok(Token(Zeroizing::new(t.as_bytes().to_vec())))
    }

    /// Compares an `Authorization` header value in constant time (in the
    /// token's contents; a length mismatch fails at once, which reveals only
    /// the length).
    pub(crate) fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some(given) = value.strip_prefix(b"Bearer ") else {
            return false;
        };
        bool::from(given.ct_eq(self.0.as_slice()))
    }
}

/// Who sent a request, as the source filter sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// An issued peer, by its tunnel address.
    Peer { name: String, admin: bool },
    /// Not a peer's address (the gateway host itself, say).
    Other(IpAddr),
}

impl Caller {
    /// The audit `actor` of an action this caller takes.
    pub(crate) fn actor(&self) -> String {
        match self {
            Caller::Peer { name, .. } => format!("api:{name}"),
            Caller::Other(ip) => format!("api:{ip}"),
        }
    }

    /// The source filter: once any peer is an admin, only admins are served.
    pub(crate) fn allowed(&self, any_admin: bool) -> bool {
        match self {
            Caller::Peer { admin, .. } => *admin || !any_admin,
            Caller::Other(_) => !any_admin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst passes, the next request waits, and time refills the bucket.
    #[test]
    fn rate_limit_per_source() {
        let mut r = RateLimits::default();
        let t0 = Instant::now();
        let a: IpAddr = "10.8.0.2".parse().unwrap();
        let b: IpAddr = "10.8.0.3".parse().unwrap();
        for _ in 0..BURST as usize {
            assert!(r.take(a, t0).is_ok());
        }
        let wait = r.take(a, t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(50));
        assert!(r.take(b, t0).is_ok(), "another source has its own bucket");
        assert!(r.take(a, t0 + Duration::from_millis(100)).is_ok());
    }

    /// The table stays bounded; a full table forgets the idlest source.
    #[test]
    fn rate_limit_bounded() {
        let mut r = RateLimits::default();
        let t0 = Instant::now();
        for i in 0..(MAX_SOURCES as u32 + 10) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = r.take(ip, t0);
        }
        assert_eq!(r.buckets.len(), MAX_SOURCES);
    }

    /// Only the exact bearer token passes.
    #[test]
    fn token_compare() {
        let t = Token::from_text("0123456789abcdef0123\n").unwrap();
        assert!(t.accepts(Some(b"Bearer 0123456789abcdef0123")));
        for bad in [
            &b"Bearer 0123456789abcdef012"[..],
            b"Bearer 0123456789abcdef01234",
            b"bearer 0123456789abcdef0123",
            b"0123456789abcdef0123",
            b"Bearer ",
        ] {
            assert!(!t.accepts(Some(bad)), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(!t.accepts(None));
        assert!(Token::from_text("short").is_err());
        assert!(Token::from_text("0123456789abcdef 0123").is_err());
    }

    /// With admins, only admins; without, any peer; actors name the caller.
    #[test]
    fn source_filter() {
        let admin = Caller::Peer {
            name: "ops".into(),
            admin: true,
        };
        let site = Caller::Peer {
            name: "clinic".into(),
            admin: false,
        };
        let host = Caller::Other("10.8.0.1".parse().unwrap());
        assert!(admin.allowed(true) && !site.allowed(true) && !host.allowed(true));
        assert!(site.allowed(false) && host.allowed(false));
        assert_eq!(admin.actor(), "api:ops");
        assert_eq!(host.actor(), "api:10.8.0.1");
    }
}
