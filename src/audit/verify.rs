//! Verifying an audit chain (pure): each line's hash (HMAC when keyed), its
//! `prev` link and its `seq` run. The first bad line is reported by its 1-based
//! line number and one sentence saying what is wrong with it.
//!
//! Keying is one-way: once a line is keyed (`"mac":"hmac-sha256"`), every later
//! line must be keyed too, so a writer without the key cannot append plain SHA-256
//! lines after keyed ones, nor strip the marker from one line (its hash would
//! have to be recomputed as plain SHA-256, which then sits after a keyed line).
//! A chain that was never keyed, or the unkeyed lines before the first keyed one
//! (a deployment that added a seal key later), are plain SHA-256.

use serde_json::Value;

use super::chain::{sha256_hex, AuditKey, Head, GENESIS, MAC_HMAC_SHA256};

/// What is wrong with one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("not a JSON audit record")]
    NotJson,
    #[error("missing or malformed `{member}`")]
    Missing { member: &'static str },
    #[error("hash does not match its contents (edited)")]
    BadHash,
    #[error("HMAC does not match its contents under the seal key (edited, forged without the key, or the wrong seal key)")]
    BadHmac,
    #[error("unknown `mac` {mac:?} (only \"hmac-sha256\" is defined)")]
    UnknownMac { mac: String },
    #[error("keyed line (hmac-sha256) but no seal key was given: the chain is keyed, and verifying it needs `[daemon] seal_key_file` from the config (--config)")]
    KeyNeeded,
    #[error("plain SHA-256 line in a keyed chain (keyed since seq {since}): appended or rewritten without the seal key")]
    UnkeyedInKeyedChain { since: u64 },
    #[error("`prev` does not link to the line before it (deleted, inserted or reordered lines)")]
    BrokenLink,
    #[error("seq {found} where {expected} was expected: {}", seq_cause(*.expected, *.found))]
    BadSeq { expected: u64, found: u64 },
}

fn seq_cause(expected: u64, found: u64) -> &'static str {
    if found > expected {
        "a gap (lines deleted before it)"
    } else {
        "repeated or reordered lines"
    }
}

/// The first problem found, with the file line it is on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {fault}")]
pub struct ChainError {
    pub line: usize,
    pub fault: Fault,
}

/// What an intact run of lines establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `prev` and `seq - 1` of the first line: where this run attaches.
    pub start: Head,
    /// The last line's seq and hash (equal to `start` when there are no lines).
    pub end: Head,
    pub lines: usize,
    /// The seq of the first keyed line, if any: from there on the chain is keyed.
    pub keyed_since: Option<u64>,
}

impl Verified {
    /// Whether this run begins the chain (not a continuation of a rotated file).
    pub fn starts_at_genesis(&self) -> bool {
        self.start.seq == 0 && self.start.hash == GENESIS
    }
}

/// One line's own claims, after its hash checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineHead {
    pub seq: u64,
    pub prev: String,
    pub hash: String,
    pub keyed: bool,
}

impl LineHead {
    pub fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }
}

/// Verifies lines one at a time, across files: the state (last head, whether
/// the chain is keyed yet) carries over from one file to the next.
#[derive(Debug)]
pub struct Verifier<'k> {
    key: Option<&'k AuditKey>,
    start: Option<Head>,
    end: Option<Head>,
    keyed_since: Option<u64>,
    lines: usize,
}

impl<'k> Verifier<'k> {
    /// With `after`, the first line must link to that head; without, it may
    /// attach anywhere (a rotated file on its own). `key` checks keyed lines;
    /// without it the first keyed line is [`Fault::KeyNeeded`].
    pub fn new(key: Option<&'k AuditKey>, after: Option<&Head>) -> Self {
        Self {
            key,
            start: after.cloned(),
            end: after.cloned(),
            keyed_since: None,
            lines: 0,
        }
    }

    /// Checks the next line (without its newline), `line` numbering it in errors.
    ///
    /// # Errors
    /// The line is not JSON, lacks a member, fails its hash or HMAC, is keyed
    /// without a key given, is unkeyed after a keyed line, or breaks the
    /// `prev`/`seq` run. The verifier is unchanged by a failed line.
    pub fn push(&mut self, raw: &[u8], line: usize) -> Result<(), ChainError> {
        let at = |fault| ChainError { line, fault };
        let l = check_line(raw, self.key).map_err(at)?;
        if let (Some(since), false) = (self.keyed_since, l.keyed) {
            return Err(at(Fault::UnkeyedInKeyedChain { since }));
        }
        match &self.end {
            Some(head) => {
                if l.prev != head.hash {
                    return Err(at(Fault::BrokenLink));
                }
                if l.seq != head.seq + 1 {
                    return Err(at(Fault::BadSeq {
                        expected: head.seq + 1,
                        found: l.seq,
                    }));
                }
            }
            None => {
                self.start = Some(Head {
                    seq: l.seq.saturating_sub(1),
                    hash: l.prev.clone(),
                })
            }
        }
        if l.keyed && self.keyed_since.is_none() {
            self.keyed_since = Some(l.seq);
        }
        self.end = Some(l.head());
        self.lines += 1;
        Ok(())
    }

    /// What the lines pushed so far establish.
    pub fn result(&self) -> Verified {
        let start = self.start.clone().unwrap_or_else(Head::genesis);
        Verified {
            end: self.end.clone().unwrap_or_else(|| start.clone()),
            start,
            lines: self.lines,
            keyed_since: self.keyed_since,
        }
    }
}

/// Verifies `lines` (without newlines) as one run; see [`Verifier::new`].
/// `first_line_no` numbers the first line in messages.
///
/// # Errors
/// The first bad line (see [`Verifier::push`]).
pub fn verify<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    after: Option<&Head>,
    key: Option<&AuditKey>,
    first_line_no: usize,
) -> Result<Verified, ChainError> {
    let mut v = Verifier::new(key, after);
    for (i, raw) in lines.into_iter().enumerate() {
        v.push(raw.as_bytes(), first_line_no + i)?;
    }
    Ok(v.result())
}

/// A file's bytes as records: the newline-terminated lines, and what follows
/// the last newline. A record is only ever written whole with its newline, so
/// bytes after the last newline are a torn append (a writer that died mid-write,
/// before its fsync and before the store's head moved), never a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Records<'a> {
    pub lines: Vec<&'a [u8]>,
    pub torn: Option<&'a [u8]>,
}

pub fn split_records(bytes: &[u8]) -> Records<'_> {
    let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    // `split` yields the (possibly empty) remainder after the last newline.
    let rest = lines.pop().unwrap_or_default();
    Records {
        lines,
        torn: (!rest.is_empty()).then_some(rest),
    }
}

/// Checks one line's own hash (HMAC when the line is keyed) without context.
///
/// # Errors
/// Any [`Fault`] a line can have on its own.
pub fn check_line(raw: &[u8], key: Option<&AuditKey>) -> Result<LineHead, Fault> {
    let raw = std::str::from_utf8(raw).map_err(|_| Fault::NotJson)?;
    let v: Value = serde_json::from_str(raw).map_err(|_| Fault::NotJson)?;
    let obj = v.as_object().ok_or(Fault::NotJson)?;
    let text = |member: &'static str| {
        obj.get(member)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or(Fault::Missing { member })
    };
    let hash = text("hash")?;
    let prev = text("prev")?;
    text("ts")?;
    text("event")?;
    let seq = obj
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or(Fault::Missing { member: "seq" })?;
    let keyed = match obj.get("mac") {
        None => false,
        Some(Value::String(m)) if m == MAC_HMAC_SHA256 => true,
        Some(other) => {
            return Err(Fault::UnknownMac {
                mac: other
                    .as_str()
                    .map_or_else(|| other.to_string(), str::to_string),
            })
        }
    };
    // The hash member is the last one as written: strip it byte-exactly.
    let suffix = format!(",\"hash\":\"{hash}\"}}");
    let bad = if keyed {
        Fault::BadHmac
    } else {
        Fault::BadHash
    };
    let body = format!("{}}}", raw.strip_suffix(&suffix).ok_or(bad.clone())?);
    let ok = match (keyed, key) {
        (false, _) => sha256_hex(body.as_bytes()) == hash,
        (true, Some(k)) => k.verify_hex(body.as_bytes(), &hash),
        (true, None) => return Err(Fault::KeyNeeded),
    };
    if !ok {
        return Err(bad);
    }
    Ok(LineHead {
        seq,
        prev,
        hash,
        keyed,
    })
}

#[cfg(test)]
mod tests {
    use super::super::chain::{seal, AuditKey};
    use super::*;
    use serde_json::Map;
    use zeroize::Zeroizing;

    fn key(b: u8) -> AuditKey {
        AuditKey::new(Zeroizing::new([b; 32]))
    }

    /// `n` lines after `head`, keyed under `key` when given.
    fn extend(head: &mut Head, n: usize, key: Option<&AuditKey>) -> Vec<String> {
        (0..n)
            .map(|i| {
                let mut f = Map::new();
                f.insert("i".into(), i.into());
                let s = seal(head, "2026-01-01T00:00:00Z", "e", &f, key);
                *head = s.head;
                s.line
            })
            .collect()
    }

    fn chain(n: usize) -> Vec<String> {
        extend(&mut Head::genesis(), n, None)
    }

    fn run(lines: &[String]) -> Result<Verified, ChainError> {
        run_keyed(lines, None)
    }

    fn run_keyed(lines: &[String], k: Option<&AuditKey>) -> Result<Verified, ChainError> {
        verify(
            lines.iter().map(String::as_str),
            Some(&Head::genesis()),
            k,
            1,
        )
    }

    fn err(line: usize, fault: Fault) -> Result<Verified, ChainError> {
        Err(ChainError { line, fault })
    }

    /// An untouched chain verifies and reports its head.
    #[test]
    fn intact() {
        let lines = chain(5);
        let v = run(&lines).unwrap();
        assert_eq!(v.lines, 5);
        assert_eq!(v.end.seq, 5);
        assert_eq!(v.keyed_since, None);
        assert!(v.starts_at_genesis());
    }

    /// Editing one value is caught on that line.
    #[test]
    fn edit_detected() {
        let mut lines = chain(5);
        lines[2] = lines[2].replace("\"i\":2", "\"i\":9");
        assert_eq!(run(&lines), err(3, Fault::BadHash));
    }

    /// Deleting a line is caught on the line that followed it.
    #[test]
    fn delete_detected() {
        let mut lines = chain(5);
        lines.remove(1);
        assert_eq!(run(&lines), err(2, Fault::BrokenLink));
    }

    /// Swapping two lines is caught on the first of them.
    #[test]
    fn reorder_detected() {
        let mut lines = chain(5);
        lines.swap(2, 3);
        assert_eq!(run(&lines), err(3, Fault::BrokenLink));
    }

    /// A line that links but skips or repeats a seq is named as a gap or a repeat.
    #[test]
    fn seq_gap_and_repeat_named() {
        let mut head = Head::genesis();
        let mut lines = extend(&mut head, 2, None);
        head.seq += 3;
        lines.extend(extend(&mut head, 1, None));
        let e = run(&lines).unwrap_err();
        assert_eq!(
            e.fault,
            Fault::BadSeq {
                expected: 3,
                found: 6
            }
        );
        assert!(e
            .to_string()
            .starts_with("line 3: seq 6 where 3 was expected: a gap"));
        let mut head = Head::genesis();
        let mut lines = extend(&mut head, 2, None);
        head.seq = 1;
        lines.extend(extend(&mut head, 1, None));
        assert!(run(&lines)
            .unwrap_err()
            .to_string()
            .contains("repeated or reordered"));
    }

    /// Inserting a copy of a line, or a line with a made-up hash, is caught there.
    #[test]
    fn insert_detected() {
        let mut lines = chain(4);
        let copy = lines[1].clone();
        lines.insert(2, copy);
        assert_eq!(run(&lines), err(3, Fault::BrokenLink));
        let mut lines = chain(4);
        lines.insert(
            1,
            "{\"ts\":\"t\",\"seq\":2,\"event\":\"x\",\"prev\":\"00\",\"hash\":\"ff\"}".into(),
        );
        assert_eq!(run(&lines), err(2, Fault::BadHash));
        let mut lines = chain(2);
        lines.insert(1, "not json".into());
        assert_eq!(run(&lines), err(2, Fault::NotJson));
    }

    /// A continuation file verifies alone and then against its predecessor's head.
    #[test]
    fn continuation_links() {
        let lines = chain(6);
        let first = verify(lines[..3].iter().map(String::as_str), None, None, 1).unwrap();
        let second = verify(lines[3..].iter().map(String::as_str), None, None, 1).unwrap();
        assert!(!second.starts_at_genesis());
        assert_eq!(second.start, first.end);
        verify(
            lines[3..].iter().map(String::as_str),
            Some(&first.end),
            None,
            1,
        )
        .unwrap();
    }

    /// A keyed chain verifies with its key only: no key says the key is needed,
    /// a wrong key fails the HMAC, and it never passes as plain SHA-256.
    #[test]
    fn keyed_needs_its_key() {
        let k = key(1);
        let lines = extend(&mut Head::genesis(), 4, Some(&k));
        let v = run_keyed(&lines, Some(&k)).unwrap();
        assert_eq!((v.lines, v.keyed_since), (4, Some(1)));
        assert_eq!(run(&lines), err(1, Fault::KeyNeeded));
        assert_eq!(run_keyed(&lines, Some(&key(2))), err(1, Fault::BadHmac));
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("\"i\":2", "\"i\":7");
        assert_eq!(run_keyed(&edited, Some(&k)), err(3, Fault::BadHmac));
    }

    /// A line appended without the key, correctly linked, fails: plain SHA-256
    /// after keyed lines, or an HMAC under another key.
    #[test]
    fn forged_append_detected() {
        let k = key(1);
        let mut head = Head::genesis();
        let mut lines = extend(&mut head, 3, Some(&k));
        let mut plain = lines.clone();
        plain.extend(extend(&mut head.clone(), 1, None));
        assert_eq!(
            run_keyed(&plain, Some(&k)),
            err(4, Fault::UnkeyedInKeyedChain { since: 1 })
        );
        lines.extend(extend(&mut head, 1, Some(&key(9))));
        assert_eq!(run_keyed(&lines, Some(&k)), err(4, Fault::BadHmac));
    }

    /// Stripping the marker from a keyed line and re-hashing it as plain SHA-256
    /// (linked, so only the keying can tell) is caught on that line; a marker
    /// removed without re-hashing fails the hash.
    #[test]
    fn marker_stripped_detected() {
        let k = key(1);
        let mut head = Head::genesis();
        let mut lines = extend(&mut head, 2, Some(&k));
        let third = extend(&mut head, 1, Some(&k)).remove(0);
        let v: Value = serde_json::from_str(&third).unwrap();
        let mut f = Map::new();
        f.insert("i".into(), v["i"].clone());
        let prev = Head {
            seq: 2,
            hash: v["prev"].as_str().unwrap().to_string(),
        };
        let restamped = seal(&prev, v["ts"].as_str().unwrap(), "e", &f, None);
        lines.push(restamped.line);
        assert_eq!(
            run_keyed(&lines, Some(&k)),
            err(3, Fault::UnkeyedInKeyedChain { since: 1 })
        );
        lines.pop();
        lines.push(third.replace(",\"mac\":\"hmac-sha256\"", ""));
        assert_eq!(run_keyed(&lines, Some(&k)), err(3, Fault::BadHash));
        lines.pop();
        lines.push(third.replace("hmac-sha256", "none"));
        assert_eq!(
            run_keyed(&lines, Some(&k)),
            err(3, Fault::UnknownMac { mac: "none".into() })
        );
    }

    /// A deployment that adds a seal key: the first keyed line links to the
    /// unkeyed head, and from then on every line must be keyed, also in a later
    /// file verified with the state carried over.
    #[test]
    fn switch_over_from_unkeyed() {
        let k = key(3);
        let mut head = Head::genesis();
        let mut lines = extend(&mut head, 3, None);
        let tail_start = head.clone();
        let keyed = extend(&mut head, 3, Some(&k));
        lines.extend(keyed.iter().cloned());
        let v = run_keyed(&lines, Some(&k)).unwrap();
        assert_eq!((v.lines, v.keyed_since), (6, Some(4)));
        // Without the key the unkeyed part verifies up to the first keyed line.
        assert_eq!(run(&lines), err(4, Fault::KeyNeeded));
        // Across files: the second file's unkeyed line after keyed ones fails.
        let mut ver = Verifier::new(Some(&k), Some(&Head::genesis()));
        for (i, l) in lines.iter().enumerate() {
            ver.push(l.as_bytes(), i + 1).unwrap();
        }
        let forged = extend(&mut head.clone(), 1, None).remove(0);
        assert_eq!(
            ver.push(forged.as_bytes(), 1),
            Err(ChainError {
                line: 1,
                fault: Fault::UnkeyedInKeyedChain { since: 4 }
            })
        );
        assert_eq!(ver.result().lines, 6, "a failed line changes nothing");
        // The keyed part alone continues the unkeyed head.
        let alone = verify(keyed.iter().map(String::as_str), None, Some(&k), 1).unwrap();
        assert_eq!(alone.start, tail_start);
    }

    /// Bytes after the last newline are a torn append, not a record.
    #[test]
    fn split_keeps_torn_tail_apart() {
        let r = split_records(b"a\nb\nhalf");
        assert_eq!(r.lines, [&b"a"[..], &b"b"[..]]);
        assert_eq!(r.torn, Some(&b"half"[..]));
        let r = split_records(b"a\n");
        assert_eq!((r.lines.len(), r.torn), (1, None));
        let r = split_records(b"");
        assert_eq!((r.lines.len(), r.torn), (0, None));
        assert_eq!(check_line(b"\xff\xfe", None), Err(Fault::NotJson));
    }
}
