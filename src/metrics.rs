//! `GET /metrics`: the gateway's counters in the Prometheus text format
//! (version 0.0.4), encoded by the `prometheus-client` crate.
//!
//! Two halves, so that the format is tested without a data plane:
//! - [`render`] is pure: a [`MetricsSnapshot`] of plain numbers in, the
//!   exposition text out.
//! - [`snapshot`] reads the live peer table and the data plane's counters
//!   (relaxed atomics that the packet loops keep; see
//!   [`crate::dataplane::tally`]); [`peer_states`] counts the registry's peers
//!   by [`Lifecycle`].
//!
//! The API serves `render(&snapshot(&shared, peer_states(&store, now)?))`.
//!
//! Counters are read, not kept, here: the values already exist where the
//! packets are handled, so a scrape costs the data plane nothing but the
//! brief per-peer lock that `wg show` takes too. Per-peer series exist while
//! the peer is in the data plane's table (active); a rotated peer's counters
//! start again from zero, which Prometheus treats as a counter reset.
//!
//! Labels carry peer names (validated [`PeerName`]s) and fixed reason words
//! only: never a key, an endpoint or an address.

use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::dataplane::tally::Direction;
use crate::dataplane::{DropReason, Engine};
use crate::events::HandshakeFailure;
use crate::policy::DenyReason;
use crate::registry::{Lifecycle, PeerName, Store, StoreError};

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every number `/metrics` reports, as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// One entry per peer in the data plane (active peers), in output order.
    /// Names are unique (the registry's rule); [`snapshot`] sorts them.
    pub peers: Vec<PeerMetrics>,
    /// Handshake failures by reason, indexed by [`HandshakeFailure::index`]:
    /// anonymous ones (unknown, revoked and expired keys, bad MACs, junk)
    /// and those of issued peers together.
    pub handshake_failures: [u64; HandshakeFailure::ALL.len()],
    /// Datagrams dropped before any peer could be charged with them,
    /// indexed by [`DropReason::index`].
    pub datagrams_dropped: [u64; DropReason::ALL.len()],
    /// Datagrams the data plane failed to send ([`crate::dataplane::IoErrors`]).
    pub udp_send_errors: u64,
    /// TUN write passes that failed, wholly or in part.
    pub tun_write_errors: u64,
    /// Registry peers by lifecycle, as the caller counted them.
    pub states: PeerStates,
}

/// One active peer's numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMetrics {
    pub name: PeerName,
    /// Handshakes completed (sessions established or renewed).
    pub handshakes: u64,
    /// Inner (IP) bytes as boringtun counts them, indexed by
    /// [`Direction::index`]: decrypted from the peer (whatever the policy then
    /// decided), encrypted to it.
    pub bytes: [u64; Direction::ALL.len()],
    /// IP packets forwarded from the peer to the TUN device, and sent to the
    /// peer as transport messages, indexed by [`Direction::index`].
    pub packets: [u64; Direction::ALL.len()],
    /// Decrypted packets the policy denied, indexed by [`DenyReason::index`].
    pub denied: [u64; DenyReason::ALL.len()],
    /// Unix seconds of the latest completed handshake, if any.
    pub last_handshake: Option<i64>,
}

impl PeerMetrics {
    /// A peer with nothing counted yet.
    pub fn new(name: PeerName) -> PeerMetrics {
        PeerMetrics {
            name,
            handshakes: 0,
            bytes: [0; Direction::ALL.len()],
            packets: [0; Direction::ALL.len()],
            denied: [0; DenyReason::ALL.len()],
            last_handshake: None,
        }
    }
}

/// Registry peers counted by [`Lifecycle`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStates {
    pub active: u64,
    pub expired: u64,
    pub revoked: u64,
}

impl PeerStates {
    /// Counts `peers` as they stand at `now` (Unix seconds).
    pub fn count<'a>(peers: impl IntoIterator<Item = &'a crate::registry::Peer>, now: i64) -> Self {
        let mut s = PeerStates::default();
        for p in peers {
            *s.get_mut(p.lifecycle(now)) += 1;
        }
        s
    }

    fn get(&self, l: Lifecycle) -> u64 {
        match l {
            Lifecycle::Active => self.active,
            Lifecycle::Expired => self.expired,
            Lifecycle::Revoked => self.revoked,
        }
    }

    fn get_mut(&mut self, l: Lifecycle) -> &mut u64 {
        match l {
            Lifecycle::Active => &mut self.active,
            Lifecycle::Expired => &mut self.expired,
            Lifecycle::Revoked => &mut self.revoked,
        }
    }
}

/// The registry's peers counted by lifecycle at `now` (Unix seconds), read in
/// one transaction.
///
/// # Errors
/// The store's read errors ([`Store::peers`]).
pub fn peer_states(store: &Store, now: i64) -> Result<PeerStates, StoreError> {
    Ok(PeerStates::count(&store.peers()?, now))
}

/// Reads the data plane's counters into a snapshot; `states` comes from the
/// registry (see [`peer_states`]).
///
/// Holds no lock but, one peer at a time, the peer's own state lock for
/// boringtun's byte counts (as `wg show` does), and the source table's lock
/// for one load. Counts kept by the packet loops may be up to one batch behind.
pub fn snapshot(engine: &Engine, states: PeerStates) -> MetricsSnapshot {
    let table = engine.table.load_full();
    let now_ms = engine.clock.now_ms();
    let wall_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut peers: Vec<PeerMetrics> = table
        .peers
        .iter()
        .map(|slot| {
            let live = slot.live();
            let mut bytes = [0; Direction::ALL.len()];
            bytes[Direction::Rx.index()] = live.rx_bytes;
            bytes[Direction::Tx.index()] = live.tx_bytes;
            PeerMetrics {
                name: slot.name.clone(),
                handshakes: slot.handshakes.load(Ordering::Relaxed),
                bytes,
                packets: Direction::ALL.map(|d| slot.packets.get(d)),
                denied: DenyReason::ALL.map(|r| slot.denied[r.index()].total()),
                last_handshake: match slot.last_handshake_ms.load(Ordering::Relaxed) {
                    0 => None,
                    ms => Some(wall_now - (now_ms.saturating_sub(ms) / 1000) as i64),
                },
            }
        })
        .collect();
    drop(table);
    peers.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    // Handshake messages ignored while their source is in backoff: the log
    // reports them as `handshake_failed` with reason `rate_limited`.
    let ignored = engine
        .sources
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .ignored_total();
    let handshake_failures = HandshakeFailure::ALL.map(|r| {
        let backoff = if r == HandshakeFailure::RateLimited {
            ignored
        } else {
            0
        };
        engine.anon.throttles[r.index()].total()
            + engine.peer_failures[r.index()].load(Ordering::Relaxed)
            + backoff
    });
    MetricsSnapshot {
        peers,
        handshake_failures,
        datagrams_dropped: DropReason::ALL.map(|r| engine.anon.dropped[r.index()].total()),
        udp_send_errors: engine.io_errors.udp_send_errors(),
        tun_write_errors: engine.io_errors.tun_write_errors(),
        states,
    }
}

/// The snapshot in the Prometheus text format (version 0.0.4), metric names
/// prefixed `sitegate_`, series in the snapshot's order.
pub fn render(s: &MetricsSnapshot) -> String {
    let mut registry = Registry::with_prefix("sitegate");
    registry.register_collector(Box::new(SnapshotCollector(s.clone())));
    let mut out = String::new();
    // Writing into a String cannot fail, and our collector returns only the
    // encoder's own errors.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// Encodes a snapshot on each scrape: values are read elsewhere, so
/// `prometheus-client`'s collector interface (with constant metrics) fits
/// better than mutable counters filled in only to be read back, and it keeps
/// series in a fixed order (a `Family` is a hash map).
#[derive(Debug)]
struct SnapshotCollector(MetricsSnapshot);

type Labels<'a, const N: usize> = [(&'static str, &'a str); N];

/// Writes one metric family: its descriptor, then each series.
fn family<'a, const N: usize, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels<'a, N>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut series = series.into_iter().peekable();
    let Some((_, first)) = series.peek() else {
        // No series: no descriptor either, as a scrape of a metric with no
        // labelled children would show.
        return Ok(());
    };
    let metric_type = first.metric_type();
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in series {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        family(
            &mut e,
            "build_info",
            "The running sitegate's version (always 1)",
            [(
                [("version", env!("CARGO_PKG_VERSION"))],
                ConstGauge::new(1i64),
            )],
        )?;
        family(
            &mut e,
            "peers",
            "Issued peers in the registry by state",
            Lifecycle::ALL.map(|l| ([("state", l.as_str())], gauge(s.states.get(l)))),
        )?;
        family(
            &mut e,
            "handshakes",
            "Handshakes completed with an active peer (sessions established or renewed)",
            s.peers
                .iter()
                .map(|p| ([("peer", p.name.as_str())], ConstCounter::new(p.handshakes))),
        )?;
        family(
            &mut e,
            "handshake_failures",
            "Handshake messages rejected, by reason, from issued peers and unknown senders alike",
            HandshakeFailure::ALL.map(|r| {
                (
                    [("reason", r.as_str())],
                    ConstCounter::new(s.handshake_failures[r.index()]),
                )
            }),
        )?;
        family(
            &mut e,
            "peer_last_handshake_timestamp_seconds",
            "Unix time of the latest completed handshake with an active peer",
            s.peers.iter().filter_map(|p| {
                p.last_handshake
                    .map(|t| ([("peer", p.name.as_str())], ConstGauge::new(t)))
            }),
        )?;
        let per_direction = |values: fn(&PeerMetrics) -> &[u64; 2]| {
            s.peers.iter().flat_map(move |p| {
                Direction::ALL.map(|d| {
                    (
                        [("peer", p.name.as_str()), ("direction", d.as_str())],
                        ConstCounter::new(values(p)[d.index()]),
                    )
                })
            })
        };
        family(
            &mut e,
            "peer_bytes",
            "Inner IP bytes through an active peer's tunnel: rx decrypted from it, tx encrypted to it",
            per_direction(|p| &p.bytes),
        )?;
        family(
            &mut e,
            "peer_packets",
            "IP packets through an active peer's tunnel: rx forwarded from it to the tunnel device, tx sent to it",
            per_direction(|p| &p.packets),
        )?;
        family(
            &mut e,
            "packets_denied",
            "Decrypted packets from an active peer dropped by policy, by reason",
            s.peers.iter().flat_map(|p| {
                DenyReason::ALL.map(|r| {
                    (
                        [("peer", p.name.as_str()), ("reason", r.as_str())],
                        ConstCounter::new(p.denied[r.index()]),
                    )
                })
            }),
        )?;
        family(
            &mut e,
            "datagrams_dropped",
            "Datagrams dropped before any peer could be charged with them, by reason",
            DropReason::ALL.map(|r| {
                (
                    [("reason", r.as_str())],
                    ConstCounter::new(s.datagrams_dropped[r.index()]),
                )
            }),
        )?;
        family(
            &mut e,
            "udp_send_errors",
            "Datagrams the data plane failed to send (no route, full socket buffer): packets lost on the way to a site",
            [([], ConstCounter::new(s.udp_send_errors))],
        )?;
        family(
            &mut e,
            "tun_write_errors",
            "TUN device write passes (one per received batch) that failed, wholly or in part",
            [([], ConstCounter::new(s.tun_write_errors))],
        )?;
        Ok(())
    }
}

/// A count as a gauge value; counts beyond `i64::MAX` are not a real case.
fn gauge(n: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MetricsSnapshot {
        let mut a = PeerMetrics::new(PeerName::new("clinic-a").unwrap());
        a.handshakes = 3;
        a.bytes = [1_500, 2_048];
        a.packets = [10, 12];
        a.denied[DenyReason::Acl.index()] = 4;
        a.last_handshake = Some(1_700_000_000);
        let b = PeerMetrics::new(PeerName::new("site.b_2").unwrap());
        let mut failures = [0; HandshakeFailure::ALL.len()];
        failures[HandshakeFailure::UnknownKey.index()] = 7;
        failures[HandshakeFailure::RateLimited.index()] = 2;
        MetricsSnapshot {
            peers: vec![a, b],
            handshake_failures: failures,
            datagrams_dropped: [1, 0],
            udp_send_errors: 9,
            tun_write_errors: 0,
            states: PeerStates {
                active: 2,
                expired: 1,
                revoked: 5,
            },
        }
    }

    /// The exposition text, byte for byte: names, help, types, label order,
    /// series order (the snapshot's), and zeros for every known reason.
    #[test]
    fn golden() {
        let text = render(&sample());
        let expected = r#"# HELP sitegate_build_info The running sitegate's version (always 1)
# TYPE sitegate_build_info gauge
sitegate_build_info{version="VERSION"} 1
# HELP sitegate_peers Issued peers in the registry by state
# TYPE sitegate_peers gauge
sitegate_peers{state="active"} 2
sitegate_peers{state="expired"} 1
sitegate_peers{state="revoked"} 5
# HELP sitegate_handshakes_total Handshakes completed with an active peer (sessions established or renewed)
# TYPE sitegate_handshakes_total counter
sitegate_handshakes_total{peer="clinic-a"} 3
sitegate_handshakes_total{peer="site.b_2"} 0
# HELP sitegate_handshake_failures_total Handshake messages rejected, by reason, from issued peers and unknown senders alike
# TYPE sitegate_handshake_failures_total counter
sitegate_handshake_failures_total{reason="unknown_key"} 7
sitegate_handshake_failures_total{reason="revoked"} 0
sitegate_handshake_failures_total{reason="expired"} 0
sitegate_handshake_failures_total{reason="bad_mac"} 0
sitegate_handshake_failures_total{reason="replay"} 0
sitegate_handshake_failures_total{reason="rate_limited"} 2
sitegate_handshake_failures_total{reason="decrypt"} 0
# HELP sitegate_peer_last_handshake_timestamp_seconds Unix time of the latest completed handshake with an active peer
# TYPE sitegate_peer_last_handshake_timestamp_seconds gauge
sitegate_peer_last_handshake_timestamp_seconds{peer="clinic-a"} 1700000000
# HELP sitegate_peer_bytes_total Inner IP bytes through an active peer's tunnel: rx decrypted from it, tx encrypted to it
# TYPE sitegate_peer_bytes_total counter
sitegate_peer_bytes_total{peer="clinic-a",direction="rx"} 1500
sitegate_peer_bytes_total{peer="clinic-a",direction="tx"} 2048
sitegate_peer_bytes_total{peer="site.b_2",direction="rx"} 0
sitegate_peer_bytes_total{peer="site.b_2",direction="tx"} 0
# HELP sitegate_peer_packets_total IP packets through an active peer's tunnel: rx forwarded from it to the tunnel device, tx sent to it
# TYPE sitegate_peer_packets_total counter
sitegate_peer_packets_total{peer="clinic-a",direction="rx"} 10
sitegate_peer_packets_total{peer="clinic-a",direction="tx"} 12
sitegate_peer_packets_total{peer="site.b_2",direction="rx"} 0
sitegate_peer_packets_total{peer="site.b_2",direction="tx"} 0
# HELP sitegate_packets_denied_total Decrypted packets from an active peer dropped by policy, by reason
# TYPE sitegate_packets_denied_total counter
sitegate_packets_denied_total{peer="clinic-a",reason="spoofed_source"} 0
sitegate_packets_denied_total{peer="clinic-a",reason="acl"} 4
sitegate_packets_denied_total{peer="clinic-a",reason="peer_isolation"} 0
sitegate_packets_denied_total{peer="site.b_2",reason="spoofed_source"} 0
sitegate_packets_denied_total{peer="site.b_2",reason="acl"} 0
sitegate_packets_denied_total{peer="site.b_2",reason="peer_isolation"} 0
# HELP sitegate_datagrams_dropped_total Datagrams dropped before any peer could be charged with them, by reason
# TYPE sitegate_datagrams_dropped_total counter
sitegate_datagrams_dropped_total{reason="malformed"} 1
sitegate_datagrams_dropped_total{reason="unknown_session"} 0
# HELP sitegate_udp_send_errors_total Datagrams the data plane failed to send (no route, full socket buffer): packets lost on the way to a site
# TYPE sitegate_udp_send_errors_total counter
sitegate_udp_send_errors_total 9
# HELP sitegate_tun_write_errors_total TUN device write passes (one per received batch) that failed, wholly or in part
# TYPE sitegate_tun_write_errors_total counter
sitegate_tun_write_errors_total 0
"#
        .replace("VERSION", env!("CARGO_PKG_VERSION"));
        assert_eq!(text, expected);
    }

    /// A real text-format parser reads every line back: each family's type,
    /// each series' label set and value.
    #[test]
    fn parses_back() {
        use prometheus_parse::{Scrape, Value};
        let text = render(&sample());
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let sample_lines = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(scrape.samples.len(), sample_lines, "no line skipped");
        let find = |name: &str, labels: &[(&str, &str)]| -> Value {
            let hits: Vec<_> = scrape
                .samples
                .iter()
                .filter(|s| {
                    s.metric == name
                        && s.labels.len() == labels.len()
                        && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                })
                .collect();
            assert_eq!(hits.len(), 1, "{name} {labels:?} in\n{text}");
            hits[0].value.clone()
        };
        let peer = |n| ("peer", n);
        assert_eq!(
            find("sitegate_handshakes_total", &[peer("clinic-a")]),
            Value::Counter(3.0)
        );
        assert_eq!(
            find(
                "sitegate_handshake_failures_total",
                &[("reason", "unknown_key")]
            ),
            Value::Counter(7.0)
        );
        assert_eq!(
            find(
                "sitegate_peer_bytes_total",
                &[peer("clinic-a"), ("direction", "tx")]
            ),
            Value::Counter(2048.0)
        );
        assert_eq!(
            find(
                "sitegate_peer_packets_total",
                &[peer("clinic-a"), ("direction", "rx")]
            ),
            Value::Counter(10.0)
        );
        assert_eq!(
            find(
                "sitegate_packets_denied_total",
                &[peer("clinic-a"), ("reason", "acl")]
            ),
            Value::Counter(4.0)
        );
        assert_eq!(
            find("sitegate_peers", &[("state", "revoked")]),
            Value::Gauge(5.0)
        );
        assert_eq!(
            find(
                "sitegate_peer_last_handshake_timestamp_seconds",
                &[peer("clinic-a")]
            ),
            Value::Gauge(1.7e9)
        );
        assert!(
            !scrape.samples.iter().any(|s| {
                s.metric == "sitegate_peer_last_handshake_timestamp_seconds"
                    && s.labels.get("peer") == Some("site.b_2")
            }),
            "no timestamp for a peer that never shook hands"
        );
        // The label sets, family by family.
        let label_names = |metric: &str| -> Vec<Vec<String>> {
            let mut sets: Vec<Vec<String>> = scrape
                .samples
                .iter()
                .filter(|s| s.metric == metric)
                .map(|s| {
                    let mut k: Vec<String> = s.labels.keys().cloned().collect();
                    k.sort();
                    k
                })
                .collect();
            sets.dedup();
            sets
        };
        for (metric, labels) in [
            ("sitegate_handshakes_total", vec!["peer"]),
            ("sitegate_handshake_failures_total", vec!["reason"]),
            ("sitegate_peer_bytes_total", vec!["direction", "peer"]),
            ("sitegate_peer_packets_total", vec!["direction", "peer"]),
            ("sitegate_packets_denied_total", vec!["peer", "reason"]),
            ("sitegate_peers", vec!["state"]),
            (
                "sitegate_peer_last_handshake_timestamp_seconds",
                vec!["peer"],
            ),
            ("sitegate_datagrams_dropped_total", vec!["reason"]),
            ("sitegate_udp_send_errors_total", vec![]),
            ("sitegate_tun_write_errors_total", vec![]),
        ] {
            assert_eq!(label_names(metric), vec![labels], "{metric}");
            assert!(scrape.docs.contains_key(metric), "{metric} has help");
        }
        // Counters are typed as counters, everything else as gauges.
        for s in &scrape.samples {
            match &s.value {
                Value::Counter(_) => assert!(s.metric.ends_with("_total"), "{}", s.metric),
                Value::Gauge(_) => assert!(!s.metric.ends_with("_total"), "{}", s.metric),
                other => panic!("{}: unexpected {other:?}", s.metric),
            }
        }
    }

    /// Stricter than the parser (which skips what it cannot read): every line
    /// is a HELP, a TYPE or a sample of the family just declared, with
    /// `sitegate_` names, quoted label values and an integer value; no series
    /// twice; snake_case names, `_total` on counters only (rules that
    /// `promtool check metrics` also lints).
    #[test]
    fn text_format_is_strict() {
        let text = render(&sample());
        assert!(text.ends_with('\n'));
        let mut family: Option<(String, String)> = None;
        let mut seen = std::collections::HashSet::new();
        let name_ok = |n: &str| {
            n.starts_with("sitegate_")
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap();
                assert!(name_ok(name) && !help.is_empty(), "{line}");
                assert!(seen.insert(format!("HELP {name}")), "one HELP: {line}");
                family = Some((name.to_string(), String::new()));
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                let (fam, _) = family.clone().unwrap();
                assert_eq!(name, fam, "TYPE follows its HELP");
                assert!(kind == "counter" || kind == "gauge", "{line}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
                family = Some((fam, kind.to_string()));
            } else {
                let (fam, kind) = family.clone().unwrap();
                assert!(!kind.is_empty(), "a sample after its TYPE: {line}");
                let (series, value) = line.rsplit_once(' ').unwrap();
                assert!(value.parse::<u64>().is_ok(), "{line}");
                // A gateway-wide counter has no labels and no braces.
                let (name, labels) = match series.split_once('{') {
                    Some((name, labels)) => (name, labels.strip_suffix('}').unwrap()),
                    None => (series, ""),
                };
                assert_eq!(name, fam, "{line}");
                for pair in labels.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap();
                    assert!(k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
                    assert!(v.len() >= 2 && v.starts_with('"') && v.ends_with('"'));
                    assert!(!v[1..v.len() - 1].contains(['"', '\\', '\n']), "{line}");
                }
                assert!(seen.insert(series.to_string()), "series once: {line}");
            }
        }
    }

    /// No line carries anything shaped like a WireGuard key (44 characters
    /// of base64 ending in `=`), whatever the snapshot holds.
    #[test]
    fn no_keys_in_output() {
        let mut s = sample();
        for i in 0..20 {
            let mut p = PeerMetrics::new(PeerName::new(&format!("p{i}")).unwrap());
            p.last_handshake = Some(i);
            s.peers.push(p);
        }
        let text = render(&s);
        assert!(!text.lines().any(looks_like_key), "{text}");
        // The detector itself finds a key.
        let key = crate::keys::PrivateKey::generate().public_key().to_base64();
        assert!(looks_like_key(&format!("x{{peer=\"{key}\"}} 1")));
    }

    /// A run of 43 base64 characters followed by `=`: the text form of a
    /// 32-byte key (public, private or preshared).
    pub(crate) fn looks_like_key(line: &str) -> bool {
        let b = line.as_bytes();
        let is_b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'+' || c == b'/';
        (0..b.len().saturating_sub(43)).any(|i| {
            b[i..i + 43].iter().all(|&c| is_b64(c))
                && b[i + 43] == b'='
                && (i == 0 || !is_b64(b[i - 1]))
        })
    }

    /// Registry peers are counted by the one lifecycle rule.
    #[test]
    fn states_count_by_lifecycle() {
        let peer = |expires: Option<i64>, revoked: Option<i64>| crate::registry::Peer {
            id: 1,
            name: PeerName::new("x").unwrap(),
            public_key: crate::keys::PublicKey::from_bytes([1; 32]),
            preshared_key: None,
            addresses: vec![],
            created_at: 0,
            expires_at: expires,
            revoked_at: revoked,
            revoked_reason: None,
            admin: false,
            services: vec![],
        };
        let peers = [
            peer(None, None),
            peer(Some(200), None),
            peer(Some(100), None),
            peer(Some(100), Some(50)),
            peer(None, Some(1)),
        ];
        assert_eq!(
            PeerStates::count(&peers, 100),
            PeerStates {
                active: 2,
                expired: 1,
                revoked: 2
            }
        );
    }

    /// `peer_states` reads the store and counts by the lifecycle rule.
    #[test]
    fn peer_states_from_a_store() {
        use crate::registry::NewPeer;
        let dir = std::env::temp_dir().join(format!("sitegate-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!(
            "[interface]\nname='sg0'\nprivate_key_file='/k'\naddress='10.8.0.1/24'\n\
             endpoint='h:1'\n[store]\nurl='sqlite://{}/s.db'\n",
            dir.display()
        );
        let cfg = crate::config::Config::parse(std::path::Path::new("/x/s.toml"), &text).unwrap();
        let mut store = Store::create(&cfg.store).unwrap();
        let new = |name: &str, expires_at| NewPeer {
            name: PeerName::new(name).unwrap(),
            public_key: crate::keys::PrivateKey::generate().public_key(),
            preshared_key: None,
            address: None,
            services: vec![],
            created_at: 0,
            expires_at,
            admin: false,
        };
        for (name, expires) in [
            ("a", None),
            ("b", Some(2_000)),
            ("c", Some(500)),
            ("d", None),
        ] {
            store.add_peer(&cfg.interface, new(name, expires)).unwrap();
        }
        store
            .revoke_peer(&PeerName::new("d").unwrap(), None, 900)
            .unwrap();
        assert_eq!(
            peer_states(&store, 1_000).unwrap(),
            PeerStates {
                active: 2,
                expired: 1,
                revoked: 1
            }
        );
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// With no peer in the table the per-peer families are left out, not
    /// printed as a descriptor with no samples; the gateway-wide ones stay.
    #[test]
    fn no_peers() {
        let text = render(&MetricsSnapshot::default());
        assert!(!text.contains("sitegate_handshakes_total"), "{text}");
        assert!(!text.contains("sitegate_peer_"), "{text}");
        assert!(text.contains("sitegate_handshake_failures_total{reason=\"decrypt\"} 0"));
        assert!(text.contains("sitegate_peers{state=\"active\"} 0"));
        assert!(
            text.contains("\nsitegate_udp_send_errors_total 0\n"),
            "{text}"
        );
        assert!(
            text.contains("\nsitegate_tun_write_errors_total 0\n"),
            "{text}"
        );
    }
}
