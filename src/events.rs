//! Log events (SPEC "Log events") and the throttle that turns floods of the
//! same failure into one immediate line plus periodic summaries.
//!
//! Events are `tracing` records whose `event` field carries the name; with
//! `format = "json"` each is one flattened JSON object on stderr.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::LogFormat;

/// Minimum spacing of summaries for the same (peer, reason).
pub const SUMMARY_INTERVAL_MS: u64 = 5_000;

/// Installs the global subscriber: the formatted stream on stderr plus the
/// audit layer (inert until the daemon starts its audit writer). sitegate's own
/// events are at `info`; boringtun's internal chatter is silenced (its outcomes
/// are logged as our events). `RUST_LOG` overrides the filter of the stderr
/// stream only: the audit layer has its own ([`crate::audit::sink::AuditFilter`]),
/// so no log setting can switch the audit trail off.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{fmt, EnvFilter, Layer};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,boringtun=off"));
    let stream = match format {
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_target(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => fmt::layer()
            .with_target(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // A second init (tests, embedding) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(stream.with_filter(filter))
        .with(crate::audit::sink::AuditLayer.with_filter(crate::audit::sink::AuditFilter))
        .try_init();
}

/// `reason` values of `handshake_failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    UnknownKey,
    Revoked,
    Expired,
    BadMac,
    Replay,
    RateLimited,
    Decrypt,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 7] = [
        HandshakeFailure::UnknownKey,
        HandshakeFailure::Revoked,
        HandshakeFailure::Expired,
        HandshakeFailure::BadMac,
        HandshakeFailure::Replay,
        HandshakeFailure::RateLimited,
        HandshakeFailure::Decrypt,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::UnknownKey => "unknown_key",
            HandshakeFailure::Revoked => "revoked",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::BadMac => "bad_mac",
            HandshakeFailure::Replay => "replay",
            HandshakeFailure::RateLimited => "rate_limited",
            HandshakeFailure::Decrypt => "decrypt",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// `reason` values of `session_closed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Revoked,
    Expired,
    Timeout,
    Rotated,
    Shutdown,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Revoked => "revoked",
            CloseReason::Expired => "expired",
            CloseReason::Timeout => "timeout",
            CloseReason::Rotated => "rotated",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// Counts occurrences of one repeated event and decides when to log.
///
/// The first occurrence after a quiet interval is logged at once (`hit` returns
/// true); later ones only increment a counter that `take_summary` drains at most
/// every [`SUMMARY_INTERVAL_MS`]. Lock-free, so the packet path may call `hit`.
/// Times are milliseconds on a caller-owned monotonic clock; 0 means "never".
#[derive(Debug, Default)]
pub struct Throttle {
    pending: AtomicU64,
    last_logged_ms: AtomicU64,
    total: AtomicU64,
}

impl Throttle {
    /// Records one occurrence; `true` when the caller should log it now.
    #[inline]
    pub fn hit(&self, now_ms: u64) -> bool {
        self.total.fetch_add(1, Ordering::Relaxed);
        let last = self.last_logged_ms.load(Ordering::Relaxed);
        if (last == 0 || now_ms.saturating_sub(last) >= SUMMARY_INTERVAL_MS)
            && self.pending.load(Ordering::Relaxed) == 0
            && self
                .last_logged_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return true;
        }
        self.pending.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// The count to report in a summary, when one is due at `now_ms`.
    pub fn take_summary(&self, now_ms: u64) -> Option<u64> {
        if self.pending.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let last = self.last_logged_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < SUMMARY_INTERVAL_MS {
            return None;
        }
        self.last_logged_ms.store(now_ms.max(1), Ordering::Relaxed);
        Some(self.pending.swap(0, Ordering::Relaxed))
    }

    /// Occurrences since start (for metrics and status).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// First hit logs at once; a flood is summarised once per interval with its count.
    #[test]
    fn flood_becomes_summaries() {
        let t = Throttle::default();
        assert!(t.hit(1_000));
        for i in 0..9_999 {
            assert!(!t.hit(1_000 + i / 10));
        }
        assert_eq!(t.take_summary(2_000), None, "too early");
        assert_eq!(t.take_summary(6_000), Some(9_999));
        assert_eq!(t.take_summary(20_000), None, "nothing pending");
        assert_eq!(t.total(), 10_000);
    }

    /// After a quiet interval the next occurrence is logged at once again.
    #[test]
    fn quiet_then_immediate() {
        let t = Throttle::default();
        assert!(t.hit(10));
        assert!(!t.hit(20));
        assert_eq!(t.take_summary(5_010), Some(1));
        assert!(!t.hit(6_000), "within the interval of the summary");
        assert_eq!(t.take_summary(10_010), Some(1));
        assert!(t.hit(20_000));
    }
}
