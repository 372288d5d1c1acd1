//! Property tests on every parser and on the pure core: arbitrary input never
//! panics, and the fast structures agree with obvious reference versions.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};
use proptest::prelude::*;
use serde_json::Map;
use sitegate::audit::chain::{seal, AuditKey, Head};
use sitegate::audit::verify::verify;
use sitegate::config::Config;
use sitegate::control::protocol::Request;
use sitegate::dataplane::packet::{destination, Header};
use sitegate::keys::{PresharedKey, PrivateKey, PublicKey};
use sitegate::registry::PeerName;
use sitegate::routing::AllowedIps;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The test-hook variable parses or is refused with a message, never panics.
    #[test]
    fn hooks_parse_total(text in ".{0,40}") {
        if let Err(e) = sitegate::dataplane::Hooks::parse(&text) {
            prop_assert!(e.starts_with("SITEGATE_TEST_HOOKS: "));
        }
    }

    /// Whatever the failures, the source table stays within its capacity, and a
    /// source is blocked only after as many failures as the threshold, all
    /// within one window and counted by a reference model.
    #[test]
    fn source_table_bounded_and_exact(
        ops in proptest::collection::vec((0u8..24, 0u64..400), 1..600),
    ) {
        use sitegate::dataplane::sources::{SourceTable, FAILURE_THRESHOLD, FAILURE_WINDOW_MS};
        let cap = 16;
        let mut t = SourceTable::with_capacity(cap);
        let mut now = 1u64;
        for (src, step) in ops {
            now += step * 50;
            let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, src));
            if let Some(b) = t.record_failure(ip, now) {
                prop_assert_eq!(b.source, ip);
                prop_assert_eq!(b.failures, FAILURE_THRESHOLD);
                prop_assert!(t.is_blocked(ip, now));
            }
            prop_assert!(t.len() <= cap);
        }
        // The window ends: a lone failure later never blocks anyone.
        let later = now + FAILURE_WINDOW_MS * 100;
        prop_assert!(t.record_failure(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), later).is_none());
    }

    /// Header parsing never panics, and agrees with the destination-only view.
    #[test]
    fn header_parse_total(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
        let h = Header::parse(&bytes);
        prop_assert_eq!(h.map(|h| h.dst), destination(&bytes));
    }

    /// Key decoding never panics and round-trips what it accepts.
    #[test]
    fn key_decoding_total(text in ".{0,60}") {
        if let Ok(k) = PublicKey::from_base64(&text) {
            prop_assert_eq!(PublicKey::from_base64(&k.to_base64()).ok(), Some(k));
        }
        let _ = PrivateKey::from_base64(&text);
        let _ = PresharedKey::from_base64(&text);
    }

    /// Names are accepted exactly when they match `[a-z0-9][a-z0-9_.-]{0,62}`.
    #[test]
    fn peer_name_rule(name in "[a-zA-Z0-9_.\\- ]{0,70}") {
        let b = name.as_bytes();
        let valid = !b.is_empty() && b.len() <= 63
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(c));
        prop_assert_eq!(PeerName::new(&name).is_ok(), valid);
    }

    /// The allowed-IPs table answers like a linear longest-prefix scan.
    #[test]
    fn allowed_ips_matches_linear_scan(
        routes in proptest::collection::vec((any::<u32>(), 0u8..=32), 1..40),
        probes in proptest::collection::vec(any::<u32>(), 1..40),
    ) {
        let mut table = AllowedIps::new();
        let mut reference: Vec<(Ipv4Net, usize)> = Vec::new();
        for (i, (addr, len)) in routes.iter().enumerate() {
            let net = Ipv4Net::new(Ipv4Addr::from(*addr), *len).unwrap().trunc();
            table.insert(IpNet::V4(net), i);
            reference.retain(|(n, _)| *n != net);
            reference.push((net, i));
        }
        for p in probes.iter().chain(routes.iter().map(|(a, _)| a)) {
            let ip = Ipv4Addr::from(*p);
            let expected = reference
                .iter()
                .filter(|(n, _)| n.contains(&ip))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, v)| *v);
            prop_assert_eq!(table.lookup(IpAddr::V4(ip)).copied(), expected);
        }
    }

    /// Any single edit, deletion, swap or insertion in an audit chain is caught,
    /// on the line where it happened or the one after it, keyed or not.
    #[test]
    fn audit_tamper_detected(
        n in 2usize..12,
        at in any::<prop::sample::Index>(),
        kind in 0u8..4,
        byte in any::<prop::sample::Index>(),
        keyed in any::<bool>(),
    ) {
        let key = keyed.then(|| AuditKey::new(zeroize::Zeroizing::new([7u8; 32])));
        let mut head = Head::genesis();
        let mut lines: Vec<String> = (0..n).map(|i| {
            let mut f = Map::new();
            f.insert("i".into(), i.into());
            f.insert("peer".into(), format!("p{i}").into());
            let s = seal(&head, "2026-01-01T00:00:00Z", "e", &f, key.as_ref());
            head = s.head;
            s.line
        }).collect();
        let i = at.index(n);
        match kind {
            0 => {
                // Flip one byte of the line (keep it UTF-8).
                let mut b = lines[i].clone().into_bytes();
                let j = byte.index(b.len());
                b[j] = if b[j] == b'a' { b'b' } else { b'a' };
                match String::from_utf8(b) {
                    Ok(s) if s != lines[i] => lines[i] = s,
                    _ => return Ok(()),
                }
            }
            1 => { lines.remove(i); }
            2 => {
                if i + 1 >= n { return Ok(()); }
                lines.swap(i, i + 1);
            }
            _ => { let dup = lines[i].clone(); lines.insert(i, dup); }
        }
        let result = verify(lines.iter().map(String::as_str), Some(&Head::genesis()), key.as_ref(), 1);
        // Deleting the last line leaves a valid shorter chain: only the store's head
        // catches that, so here it must at least end earlier than the original.
        if kind == 1 && i == n - 1 {
            prop_assert!(result.map(|v| v.end != head).unwrap_or(true));
        } else {
            prop_assert!(result.is_err(), "tampering not detected: kind {} at {}", kind, i);
        }
    }

    /// Audit verification never panics on arbitrary lines.
    #[test]
    fn audit_verify_total(lines in proptest::collection::vec(".{0,80}", 0..6)) {
        let _ = verify(lines.iter().map(String::as_str), None, None, 1);
    }

    /// Control requests parse or are refused, never panic.
    #[test]
    fn control_request_total(text in ".{0,120}") {
        let _ = serde_json::from_str::<Request>(&text);
    }

    /// Config parsing never panics on arbitrary text, including near-valid TOML.
    #[test]
    fn config_parse_total(text in "(\\[[a-z]{0,10}\\]\n|[a-z_]{1,12} = (\"[ -~]{0,20}\"|[0-9]{1,6}|true)\n){0,12}") {
        let _ = Config::parse(Path::new("/x/sitegate.toml"), &text);
    }
}
