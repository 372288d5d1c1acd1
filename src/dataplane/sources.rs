//! Per-source accounting of failed handshakes: a fixed-size table keyed by the
//! sender's IP address. A source that fails too often in a window is ignored
//! (its handshake messages dropped unanswered, before the rate limiter and any
//! cryptography) for a backoff period.
//!
//! What counts as a failure is a handshake message that was processed and did
//! not authenticate or named a key that may not connect (unknown, revoked,
//! expired, bad MAC, replay, decrypt). A cookie reply under load is not one: it
//! is the protocol's answer to load, and it costs a sender that spoofs its
//! address nothing, so counting it would let anyone put a site's address into
//! backoff. Transport packets are never subject to the backoff: they carry their
//! own authentication, so a spoofed flood cannot cut a live session.
//!
//! Pure (the caller passes the time), so unit tests drive it directly.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

/// Sources tracked at once; the oldest entry is evicted for a new one.
pub const SOURCE_TABLE_SIZE: usize = 4096;
/// Failures are counted over windows of this length.
pub const FAILURE_WINDOW_MS: u64 = 10_000;
/// Failures within one window that put a source into backoff. A stock client
/// retries a failed handshake every 5 s, so even a few dozen sites behind one
/// NAT stay well under it.
pub const FAILURE_THRESHOLD: u32 = 50;
/// How long a source over the threshold is ignored.
pub const BACKOFF_MS: u64 = 30_000;

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    window_start_ms: u64,
    failures: u32,
    blocked_until_ms: u64,
    /// Handshake messages ignored since the last summary.
    ignored: u64,
}

/// The table. Its memory is reserved up front and never grows past
/// [`SOURCE_TABLE_SIZE`] entries, whatever the number of sources.
#[derive(Debug)]
pub struct SourceTable {
    entries: HashMap<IpAddr, Entry>,
    /// Insertion order, oldest first, for eviction.
    order: VecDeque<IpAddr>,
    capacity: usize,
    /// Messages ignored since start, all sources (evicted ones included), for
    /// `/metrics`: counted under the lock the caller already holds.
    ignored_total: u64,
}

impl Default for SourceTable {
    fn default() -> Self {
        Self::with_capacity(SOURCE_TABLE_SIZE)
    }
}

/// A source that went into backoff: what to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    pub source: IpAddr,
    pub failures: u32,
}

impl SourceTable {
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        SourceTable {
            entries: HashMap::with_capacity(capacity + 1),
            order: VecDeque::with_capacity(capacity + 1),
            capacity,
            ignored_total: 0,
        }
    }

    /// Whether a handshake message from `source` is to be ignored at `now_ms`;
    /// an ignored message is counted for the summary.
    #[inline]
    pub fn is_blocked(&mut self, source: IpAddr, now_ms: u64) -> bool {
        match self.entries.get_mut(&source) {
            Some(e) if e.blocked_until_ms > now_ms => {
                e.ignored += 1;
                self.ignored_total += 1;
                true
            }
            _ => false,
        }
    }

    /// Records one failed handshake from `source`. Returns the source and its
    /// failure count when this failure put it into backoff.
    pub fn record_failure(&mut self, source: IpAddr, now_ms: u64) -> Option<Blocked> {
        let entry = match self.entries.get_mut(&source) {
            Some(e) => e,
            None => {
                if self.entries.len() >= self.capacity {
                    if let Some(oldest) = self.order.pop_front() {
                        self.entries.remove(&oldest);
                    }
                }
                self.order.push_back(source);
                self.entries.entry(source).or_insert(Entry {
                    window_start_ms: now_ms,
                    ..Entry::default()
                })
            }
        };
        if entry.blocked_until_ms > now_ms {
            return None;
        }
        if now_ms.saturating_sub(entry.window_start_ms) >= FAILURE_WINDOW_MS {
            entry.window_start_ms = now_ms;
            entry.failures = 0;
        }
        entry.failures += 1;
        if entry.failures < FAILURE_THRESHOLD {
            return None;
        }
        let failures = entry.failures;
        entry.blocked_until_ms = now_ms + BACKOFF_MS;
        entry.failures = 0;
        entry.window_start_ms = now_ms;
        Some(Blocked { source, failures })
    }

    /// Ends a backoff at once (the caller found the source trustworthy).
    pub fn unblock(&mut self, source: IpAddr) {
        if let Some(e) = self.entries.get_mut(&source) {
            e.blocked_until_ms = 0;
        }
    }

    /// Drains the counts of ignored messages: up to `max` sources with the most
    /// (into `named`), and the number of further sources and their messages.
    pub fn take_ignored(&mut self, max: usize, named: &mut Vec<(IpAddr, u64)>) -> (usize, u64) {
        named.clear();
        let (mut others, mut other_count) = (0usize, 0u64);
        for (ip, e) in self.entries.iter_mut() {
            let n = std::mem::take(&mut e.ignored);
            if n > 0 {
                named.push((*ip, n));
            }
        }
        named.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        if named.len() > max {
            for (_, n) in named.drain(max..) {
                others += 1;
                other_count += n;
            }
        }
        (others, other_count)
    }

    /// Handshake messages ignored in backoff since start (never drained).
    pub fn ignored_total(&self) -> u64 {
        self.ignored_total
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    /// A source over the threshold is ignored for the backoff, then heard again.
    #[test]
    fn threshold_then_backoff_then_free() {
        let mut t = SourceTable::default();
        let src = ip(0x0a00_0001);
        for i in 1..FAILURE_THRESHOLD {
            assert_eq!(t.record_failure(src, 100 + u64::from(i)), None);
            assert!(!t.is_blocked(src, 100 + u64::from(i)));
        }
        assert_eq!(
            t.record_failure(src, 200),
            Some(Blocked {
                source: src,
                failures: FAILURE_THRESHOLD
            })
        );
        assert!(t.is_blocked(src, 201));
        assert!(t.is_blocked(src, 200 + BACKOFF_MS - 1));
        assert!(!t.is_blocked(src, 200 + BACKOFF_MS));
        let mut named = Vec::new();
        assert_eq!(t.take_ignored(8, &mut named), (0, 0));
        assert_eq!(named, vec![(src, 2)]);
        t.take_ignored(8, &mut named);
        assert!(named.is_empty(), "drained");
        assert_eq!(t.ignored_total(), 2, "the total is not drained");
    }

    /// Failures spread over windows never reach the threshold.
    #[test]
    fn slow_failures_never_block() {
        let mut t = SourceTable::default();
        let src = ip(7);
        for i in 0..1_000u64 {
            // A stock client's retry interval: one failure every 5 s.
            assert_eq!(t.record_failure(src, 1 + i * 5_000), None);
        }
        assert!(!t.is_blocked(src, 5_000_001));
    }

    /// A million sources keep the table at its capacity; the oldest go first.
    #[test]
    fn bounded_and_evicts_oldest() {
        let mut t = SourceTable::with_capacity(1_000);
        for n in 0..1_000_000u32 {
            t.record_failure(ip(n), 1);
        }
        assert_eq!(t.len(), 1_000);
        assert!(t.entries.contains_key(&ip(999_999)));
        assert!(!t.entries.contains_key(&ip(0)));
    }

    /// The summary names the sources with most ignored messages, then a total.
    #[test]
    fn summary_names_the_worst() {
        let mut t = SourceTable::default();
        for s in 1..=5u32 {
            for _ in 0..FAILURE_THRESHOLD {
                t.record_failure(ip(s), 10);
            }
            for _ in 0..s {
                assert!(t.is_blocked(ip(s), 11));
            }
        }
        let mut named = Vec::new();
        assert_eq!(t.take_ignored(2, &mut named), (3, 1 + 2 + 3));
        assert_eq!(named, vec![(ip(5), 5), (ip(4), 4)]);
    }
}
