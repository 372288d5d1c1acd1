//! Sealing audit records into a hash chain (pure).
//!
//! A line is the compact JSON object `{"ts":…,"seq":…,"event":…,<fields>,["mac":…,]"prev":…}`
//! whose digest (hex, over exactly those bytes) is appended as a last member
//! `"hash"`. Verification strips that member and re-hashes the bytes, so no JSON
//! canonicalization is involved: any edit to a line changes its hash, and any
//! deletion, insertion or reordering breaks a `prev` link or the `seq` run.
//!
//! The digest is plain SHA-256, or, when the chain is keyed (`[daemon]
//! seal_key_file`), HMAC-SHA256 under [`AuditKey`]; a keyed line says so with
//! `"mac":"hmac-sha256"` *inside* the digested bytes, so the marker cannot be
//! stripped without recomputing the digest, and a plain SHA-256 line after a keyed
//! one is refused by [`super::verify`]: whoever lacks the key can neither extend
//! nor rewrite a keyed chain.

use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// `prev` of the very first line of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Members every line carries (`mac` only when keyed); record fields may not use
/// these names.
pub const RESERVED: [&str; 6] = ["ts", "seq", "event", "mac", "prev", "hash"];

/// The `mac` member of a keyed line; the only one defined.
pub const MAC_HMAC_SHA256: &str = "hmac-sha256";

type HmacSha256 = Hmac<Sha256>;

/// The key of a keyed chain ([`crate::seal::SealKey::audit_key`]); zeroized on
/// drop, never printed.
pub struct AuditKey(Zeroizing<[u8; 32]>);

impl AuditKey {
    pub fn new(key: Zeroizing<[u8; 32]>) -> Self {
        Self(key)
    }

    /// The chain key derived from the seal key.
    pub fn from_seal(seal: &crate::seal::SealKey) -> Self {
        Self(seal.audit_key())
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length; 32 bytes cannot be refused.
        <HmacSha256 as Mac>::new_from_slice(self.0.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }

    /// HMAC-SHA256 of `body`, hex.
    pub fn hmac_hex(&self, body: &[u8]) -> String {
        let mut m = self.mac();
        m.update(body);
        hex::encode(m.finalize().into_bytes())
    }

    /// Whether `hash_hex` is the HMAC of `body` (constant-time comparison).
    pub fn verify_hex(&self, body: &[u8], hash_hex: &str) -> bool {
        let Ok(tag) = hex::decode(hash_hex) else {
            return false;
        };
        let mut m = self.mac();
        m.update(body);
        m.verify_slice(&tag).is_ok()
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(<redacted>)")
    }
}

/// Where a chain stands: the last line's sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl Head {
    /// The head of an empty chain.
    pub fn genesis() -> Head {
        Head {
            seq: 0,
            hash: GENESIS.to_string(),
        }
    }
}

/// A sealed line (without the trailing newline) and the new head.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub line: String,
    pub head: Head,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Seals one record after `prev`, keyed when `key` is given. Fields named like a
/// reserved member are prefixed with `field_` rather than dropped, so nothing is
/// lost.
pub fn seal(
    prev: &Head,
    ts: &str,
    event: &str,
    fields: &Map<String, Value>,
    key: Option<&AuditKey>,
) -> Sealed {
    let seq = prev.seq + 1;
    let mut body = String::with_capacity(180 + fields.len() * 48);
    body.push_str("{\"ts\":");
    push_json(&mut body, &Value::from(ts));
    body.push_str(",\"seq\":");
    body.push_str(&seq.to_string());
    body.push_str(",\"event\":");
    push_json(&mut body, &Value::from(event));
    for (k, v) in fields {
        body.push(',');
        if RESERVED.contains(&k.as_str()) {
            push_json(&mut body, &Value::from(format!("field_{k}")));
        } else {
            push_json(&mut body, &Value::from(k.as_str()));
        }
        body.push(':');
        push_json(&mut body, v);
    }
    if key.is_some() {
        body.push_str(",\"mac\":\"");
        body.push_str(MAC_HMAC_SHA256);
        body.push('"');
    }
    body.push_str(",\"prev\":\"");
    body.push_str(&prev.hash);
    body.push_str("\"}");
    let hash = match key {
        Some(k) => k.hmac_hex(body.as_bytes()),
        None => sha256_hex(body.as_bytes()),
    };
    body.pop();
    body.push_str(",\"hash\":\"");
    body.push_str(&hash);
    body.push_str("\"}");
    Sealed {
        line: body,
        head: Head { seq, hash },
    }
}

fn push_json(out: &mut String, v: &Value) {
    // Serializing a `Value` to a String cannot fail.
    out.push_str(&serde_json::to_string(v).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn key(b: u8) -> AuditKey {
        AuditKey::new(Zeroizing::new([b; 32]))
    }

    fn body_of(line: &str) -> String {
        let cut = line.rfind(",\"hash\":").unwrap();
        format!("{}}}", &line[..cut])
    }

    /// A sealed line is JSON whose hash covers the line without its hash member.
    #[test]
    fn sealed_line_hash_covers_body() {
        let mut f = Map::new();
        f.insert("peer".into(), "alpha".into());
        let s = seal(
            &Head::genesis(),
            "2026-01-01T00:00:00Z",
            "peer_added",
            &f,
            None,
        );
        let v: Value = serde_json::from_str(&s.line).unwrap();
        assert_eq!(v["seq"], 1);
        assert_eq!(v["prev"], GENESIS);
        assert_eq!(v["peer"], "alpha");
        assert!(v.get("mac").is_none(), "unkeyed lines carry no mac");
        assert_eq!(sha256_hex(body_of(&s.line).as_bytes()), s.head.hash);
        assert_eq!(v["hash"], s.head.hash.as_str());
    }

    /// A keyed line carries its marker inside the body and an HMAC that only the
    /// key reproduces.
    #[test]
    fn keyed_line_is_hmac_over_marked_body() {
        let s = seal(&Head::genesis(), "t", "x", &Map::new(), Some(&key(1)));
        let v: Value = serde_json::from_str(&s.line).unwrap();
        assert_eq!(v["mac"], MAC_HMAC_SHA256);
        let body = body_of(&s.line);
        assert!(body.contains("\"mac\":\"hmac-sha256\",\"prev\":"));
        assert_eq!(key(1).hmac_hex(body.as_bytes()), s.head.hash);
        assert!(key(1).verify_hex(body.as_bytes(), &s.head.hash));
        assert!(!key(2).verify_hex(body.as_bytes(), &s.head.hash));
        assert_ne!(sha256_hex(body.as_bytes()), s.head.hash);
        assert!(!format!("{:?}", key(1)).contains('1'));
    }

    /// Reserved names in fields cannot overwrite the chain members.
    #[test]
    fn reserved_field_names_are_renamed() {
        let mut f = Map::new();
        f.insert("prev".into(), "forged".into());
        f.insert("mac".into(), "none".into());
        let s = seal(&Head::genesis(), "t", "x", &f, None);
        let v: Value = serde_json::from_str(&s.line).unwrap();
        assert_eq!(v["prev"], GENESIS);
        assert_eq!(v["field_prev"], "forged");
        assert_eq!(v["field_mac"], "none");
        assert!(v.get("mac").is_none());
    }
}
