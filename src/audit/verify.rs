//! Verifying an audit chain (pure): each line's hash, its `prev` link and its
//! `seq` run. The first bad line is reported by its 1-based line number.

use serde_json::Value;

use super::chain::{sha256_hex, Head, GENESIS};

/// The first problem found, with the file line it is on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("line {line}: not a JSON audit record")]
    NotJson { line: usize },
    #[error("line {line}: missing or malformed `{member}`")]
    Missing { line: usize, member: &'static str },
    #[error("line {line}: hash does not match its contents (edited)")]
    BadHash { line: usize },
    #[error(
        "line {line}: does not link to the line before it (deleted, inserted or reordered lines)"
    )]
    BrokenLink { line: usize },
    #[error("line {line}: sequence number {found} where {expected} was expected (deleted, inserted or reordered lines)")]
    BadSeq {
        line: usize,
        expected: u64,
        found: u64,
    },
}

/// What an intact run of lines establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `prev` and `seq - 1` of the first line: where this run attaches.
    pub start: Head,
    /// The last line's seq and hash (equal to `start` when there are no lines).
    pub end: Head,
    pub lines: usize,
}

impl Verified {
    /// Whether this run begins the chain (not a continuation of a rotated file).
    pub fn starts_at_genesis(&self) -> bool {
        self.start.seq == 0 && self.start.hash == GENESIS
    }
}

/// Verifies `lines` (without newlines). With `after`, the first line must link
/// to that head; without, it may attach anywhere (a rotated file on its own).
/// `first_line_no` numbers the first line in messages.
///
/// # Errors
/// The first line that is not JSON, lacks a member, fails its hash, or breaks
/// the `prev`/`seq` run.
pub fn verify<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    after: Option<&Head>,
    first_line_no: usize,
) -> Result<Verified, ChainError> {
    let mut expected: Option<Head> = after.cloned();
    let mut start: Option<Head> = after.cloned();
    let mut count = 0usize;
    for (i, raw) in lines.into_iter().enumerate() {
        let line = first_line_no + i;
        let (seq, prev, hash) = check_line(raw, line)?;
        match &expected {
            Some(head) => {
                if prev != head.hash {
                    return Err(ChainError::BrokenLink { line });
                }
                if seq != head.seq + 1 {
                    return Err(ChainError::BadSeq {
                        line,
                        expected: head.seq + 1,
                        found: seq,
                    });
                }
            }
            None => {
                start = Some(Head {
                    seq: seq.saturating_sub(1),
                    hash: prev,
                })
            }
        }
        expected = Some(Head { seq, hash });
        count += 1;
    }
    let start = start.unwrap_or_else(Head::genesis);
    Ok(Verified {
        end: expected.unwrap_or_else(|| start.clone()),
        start,
        lines: count,
    })
}

/// Checks one line's own hash; returns its seq, prev and hash.
fn check_line(raw: &str, line: usize) -> Result<(u64, String, String), ChainError> {
    let v: Value = serde_json::from_str(raw).map_err(|_| ChainError::NotJson { line })?;
    let obj = v.as_object().ok_or(ChainError::NotJson { line })?;
    let text = |member: &'static str| {
        obj.get(member)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or(ChainError::Missing { line, member })
    };
    let hash = text("hash")?;
    let prev = text("prev")?;
    text("ts")?;
    text("event")?;
    let seq = obj
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or(ChainError::Missing {
            line,
            member: "seq",
        })?;
    // The hash member is the last one as written: strip it byte-exactly.
    let suffix = format!(",\"hash\":\"{hash}\"}}");
    let body = raw
        .strip_suffix(&suffix)
        .ok_or(ChainError::BadHash { line })?;
    if sha256_hex(format!("{body}}}").as_bytes()) != hash {
        return Err(ChainError::BadHash { line });
    }
    Ok((seq, prev, hash))
}

#[cfg(test)]
mod tests {
    use super::super::chain::seal;
    use super::*;
    use serde_json::Map;

    fn chain(n: usize) -> Vec<String> {
        let mut head = Head::genesis();
        (0..n)
            .map(|i| {
                let mut f = Map::new();
                f.insert("i".into(), i.into());
                let s = seal(&head, "2026-01-01T00:00:00Z", "e", &f);
                head = s.head;
                s.line
            })
            .collect()
    }

    fn run(lines: &[String]) -> Result<Verified, ChainError> {
        verify(lines.iter().map(String::as_str), Some(&Head::genesis()), 1)
    }

    /// An untouched chain verifies and reports its head.
    #[test]
    fn intact() {
        let lines = chain(5);
        let v = run(&lines).unwrap();
        assert_eq!(v.lines, 5);
        assert_eq!(v.end.seq, 5);
        assert!(v.starts_at_genesis());
    }

    /// Editing one value is caught on that line.
    #[test]
    fn edit_detected() {
        let mut lines = chain(5);
        lines[2] = lines[2].replace("\"i\":2", "\"i\":9");
        assert_eq!(run(&lines), Err(ChainError::BadHash { line: 3 }));
    }

    /// Deleting a line is caught on the line that followed it.
    #[test]
    fn delete_detected() {
        let mut lines = chain(5);
        lines.remove(1);
        assert_eq!(run(&lines), Err(ChainError::BrokenLink { line: 2 }));
    }

    /// Swapping two lines is caught on the first of them.
    #[test]
    fn reorder_detected() {
        let mut lines = chain(5);
        lines.swap(2, 3);
        assert_eq!(run(&lines), Err(ChainError::BrokenLink { line: 3 }));
    }

    /// Inserting a copy of a line, or a line with a made-up hash, is caught there.
    #[test]
    fn insert_detected() {
        let mut lines = chain(4);
        let copy = lines[1].clone();
        lines.insert(2, copy);
        assert_eq!(run(&lines), Err(ChainError::BrokenLink { line: 3 }));
        let mut lines = chain(4);
        lines.insert(
            1,
            "{\"ts\":\"t\",\"seq\":2,\"event\":\"x\",\"prev\":\"00\",\"hash\":\"ff\"}".into(),
        );
        assert_eq!(run(&lines), Err(ChainError::BadHash { line: 2 }));
        let mut lines = chain(2);
        lines.insert(1, "not json".into());
        assert_eq!(run(&lines), Err(ChainError::NotJson { line: 2 }));
    }

    /// A continuation file verifies alone and then against its predecessor's head.
    #[test]
    fn continuation_links() {
        let lines = chain(6);
        let first = verify(lines[..3].iter().map(String::as_str), None, 1).unwrap();
        let second = verify(lines[3..].iter().map(String::as_str), None, 1).unwrap();
        assert!(!second.starts_at_genesis());
        assert_eq!(second.start, first.end);
        verify(lines[3..].iter().map(String::as_str), Some(&first.end), 1).unwrap();
    }
}
