//! Sealing audit records into a hash chain (pure).
//!
//! A line is the compact JSON object `{"ts":…,"seq":…,"event":…,<fields>,"prev":…}`
//! whose SHA-256 (hex, over exactly those bytes) is appended as a last member
//! `"hash"`. Verification strips that member and re-hashes the bytes, so no JSON
//! canonicalization is involved: any edit to a line changes its hash, and any
//! deletion, insertion or reordering breaks a `prev` link or the `seq` run.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `prev` of the very first line of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Members every line carries; record fields may not use these names.
pub const RESERVED: [&str; 5] = ["ts", "seq", "event", "prev", "hash"];

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

/// Seals one record after `prev`. Fields named like a reserved member are
/// prefixed with `field_` rather than dropped, so nothing is lost.
pub fn seal(prev: &Head, ts: &str, event: &str, fields: &Map<String, Value>) -> Sealed {
    let seq = prev.seq + 1;
    let mut body = String::with_capacity(160 + fields.len() * 48);
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
    body.push_str(",\"prev\":\"");
    body.push_str(&prev.hash);
    body.push_str("\"}");
    let hash = sha256_hex(body.as_bytes());
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

    /// A sealed line is JSON whose hash covers the line without its hash member.
    #[test]
    fn sealed_line_hash_covers_body() {
        let mut f = Map::new();
        f.insert("peer".into(), "alpha".into());
        let s = seal(&Head::genesis(), "2026-01-01T00:00:00Z", "peer_added", &f);
        let v: Value = serde_json::from_str(&s.line).unwrap();
        assert_eq!(v["seq"], 1);
        assert_eq!(v["prev"], GENESIS);
        assert_eq!(v["peer"], "alpha");
        let cut = s.line.rfind(",\"hash\":").unwrap();
        let body = format!("{}}}", &s.line[..cut]);
        assert_eq!(sha256_hex(body.as_bytes()), s.head.hash);
        assert_eq!(v["hash"], s.head.hash.as_str());
    }

    /// Reserved names in fields cannot overwrite the chain members.
    #[test]
    fn reserved_field_names_are_renamed() {
        let mut f = Map::new();
        f.insert("prev".into(), "forged".into());
        let s = seal(&Head::genesis(), "t", "x", &f);
        let v: Value = serde_json::from_str(&s.line).unwrap();
        assert_eq!(v["prev"], GENESIS);
        assert_eq!(v["field_prev"], "forged");
    }
}
