//! The verdict on each decrypted packet, decided before it reaches the TUN
//! device. Pure: the data plane passes the parsed header, the sending peer and the
//! current routing snapshot.
//!
//! Order (SPEC "Policy"): noise that stock clients send into a `::/0` tunnel is
//! dropped quietly; then the source must route back to the very peer that
//! decrypted the packet (gotatun's strict anti-spoof: being *one of* the allowed
//! sources is not enough, it must be the sender's own).

use std::net::{IpAddr, Ipv6Addr};

use crate::dataplane::packet::Header;
use crate::routing::AllowedIps;

/// Why a packet was refused; the `reason` of a `packet_denied` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    SpoofedSource,
    Acl,
    PeerIsolation,
}

impl DenyReason {
    pub const ALL: [DenyReason; 3] = [
        DenyReason::SpoofedSource,
        DenyReason::Acl,
        DenyReason::PeerIsolation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::SpoofedSource => "spoofed_source",
            DenyReason::Acl => "acl",
            DenyReason::PeerIsolation => "peer_isolation",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it to the TUN device.
    Forward,
    /// IPv6 link-local/multicast chatter from a stock client: drop and count, no event.
    Noise,
    Deny(DenyReason),
}

fn is_v6_noise(src: &Ipv6Addr, dst: &Ipv6Addr) -> bool {
    let link_local = (src.segments()[0] & 0xffc0) == 0xfe80;
    link_local || src.is_unspecified() || dst.is_multicast()
}

/// Decides what happens to a packet that `sender` sent through its session.
#[inline]
pub fn decide<T: PartialEq>(sender: &T, header: &Header, routes: &AllowedIps<T>) -> Verdict {
    if let (IpAddr::V6(src), IpAddr::V6(dst)) = (header.src, header.dst) {
        if is_v6_noise(&src, &dst) {
            return Verdict::Noise;
        }
    }
    match routes.lookup(header.src) {
        Some(owner) if owner == sender => Verdict::Forward,
        _ => Verdict::Deny(DenyReason::SpoofedSource),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::packet::tests::{v4, v6};
    use crate::dataplane::packet::{PROTO_ICMP, PROTO_ICMPV6};

    fn routes() -> AllowedIps<u32> {
        let mut r = AllowedIps::new();
        r.insert("10.8.0.2/32".parse().unwrap(), 1);
        r.insert("10.8.0.3/32".parse().unwrap(), 2);
        r.insert("fd00:8::2/128".parse().unwrap(), 1);
        r
    }

    fn verdict(sender: u32, pkt: &[u8]) -> Verdict {
        decide(&sender, &Header::parse(pkt).unwrap(), &routes())
    }

    /// A peer's own address passes; anything else is spoofed.
    #[test]
    fn own_source_only() {
        assert_eq!(
            verdict(1, &v4([10, 8, 0, 2], [10, 8, 0, 1], PROTO_ICMP, 0, 0)),
            Verdict::Forward
        );
        assert_eq!(
            verdict(1, &v4([10, 8, 0, 99], [10, 8, 0, 1], PROTO_ICMP, 0, 0)),
            Verdict::Deny(DenyReason::SpoofedSource)
        );
        assert_eq!(
            verdict(1, &v4([192, 0, 2, 1], [10, 8, 0, 1], PROTO_ICMP, 0, 0)),
            Verdict::Deny(DenyReason::SpoofedSource)
        );
    }

    /// Another issued peer's address is still spoofing when a different peer sends it.
    #[test]
    fn other_peers_source_is_spoofed() {
        assert_eq!(
            verdict(1, &v4([10, 8, 0, 3], [10, 8, 0, 1], PROTO_ICMP, 0, 0)),
            Verdict::Deny(DenyReason::SpoofedSource)
        );
        assert_eq!(
            verdict(2, &v4([10, 8, 0, 3], [10, 8, 0, 1], PROTO_ICMP, 0, 0)),
            Verdict::Forward
        );
    }

    /// Router solicitations and MLD from fe80:: or :: are noise, not spoofing.
    #[test]
    fn ipv6_link_local_is_noise() {
        let rs = v6(
            "fe80::1".parse().unwrap(),
            "ff02::2".parse().unwrap(),
            PROTO_ICMPV6,
        );
        assert_eq!(verdict(1, &rs), Verdict::Noise);
        let mld = v6(
            "::".parse().unwrap(),
            "ff02::16".parse().unwrap(),
            PROTO_ICMPV6,
        );
        assert_eq!(verdict(1, &mld), Verdict::Noise);
        let own = v6(
            "fd00:8::2".parse().unwrap(),
            "fd00:8::1".parse().unwrap(),
            PROTO_ICMPV6,
        );
        assert_eq!(verdict(1, &own), Verdict::Forward);
        let global = v6(
            "2001:db8::5".parse().unwrap(),
            "fd00:8::1".parse().unwrap(),
            PROTO_ICMPV6,
        );
        assert_eq!(
            verdict(1, &global),
            Verdict::Deny(DenyReason::SpoofedSource)
        );
    }
}
