//! Zero-copy views of the IP header fields the gateway decides on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol numbers the policy distinguishes.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// The addressing of one IP packet. Ports are those of the first fragment's
/// TCP/UDP header (0 when absent or not TCP/UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// The ICMP or ICMPv6 type (0 otherwise; echo reply is also 0, which
    /// `protocol` tells apart).
    pub icmp_type: u8,
    /// An IPv4 fragment other than the first: it carries no transport header,
    /// so the policy can only match it by address and protocol.
    pub later_fragment: bool,
}

/// (source port, destination port, ICMP type) from the transport header.
fn transport(l4: &[u8], protocol: u8) -> (u16, u16, u8) {
    match protocol {
        PROTO_TCP | PROTO_UDP if l4.len() >= 4 => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
            0,
        ),
        PROTO_ICMP | PROTO_ICMPV6 if !l4.is_empty() => (0, 0, l4[0]),
        _ => (0, 0, 0),
    }
}

impl Header {
    /// Parses the IPv4 or IPv6 header at the start of `packet`; `None` when it is
    /// too short or not IP.
    #[inline]
    pub fn parse(packet: &[u8]) -> Option<Header> {
        match packet.first()? >> 4 {
            4 if packet.len() >= 20 => {
                let ihl = usize::from(packet[0] & 0x0f) * 4;
                let protocol = packet[9];
                let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
                let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
                let first_fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff == 0;
                let (src_port, dst_port, icmp_type) = match packet.get(ihl..) {
                    Some(l4) if ihl >= 20 && first_fragment => transport(l4, protocol),
                    _ => (0, 0, 0),
                };
                Some(Header {
                    src: src.into(),
                    dst: dst.into(),
                    protocol,
                    src_port,
                    dst_port,
                    icmp_type,
                    later_fragment: !first_fragment,
                })
            }
            6 if packet.len() >= 40 => {
                let mut s = [0u8; 16];
                let mut d = [0u8; 16];
                s.copy_from_slice(&packet[8..24]);
                d.copy_from_slice(&packet[24..40]);
                // Extension headers are not walked: ports stay 0 behind them, which
                // the policy treats as "no port" (deny unless ICMP).
                let protocol = packet[6];
                let (src_port, dst_port, icmp_type) = transport(&packet[40..], protocol);
                Some(Header {
                    src: Ipv6Addr::from(s).into(),
                    dst: Ipv6Addr::from(d).into(),
                    protocol,
                    src_port,
                    dst_port,
                    icmp_type,
                    later_fragment: false,
                })
            }
            _ => None,
        }
    }
}

/// Destination address only: the TUN→peer routing decision needs nothing more.
#[inline]
pub fn destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            Some(Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]).into())
        }
        6 if packet.len() >= 40 => {
            let mut d = [0u8; 16];
            d.copy_from_slice(&packet[24..40]);
            Some(Ipv6Addr::from(d).into())
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An IPv4 packet with the given addresses, protocol and ports.
    pub fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    /// An IPv6 packet with the given addresses and next header.
    pub fn v6(src: Ipv6Addr, dst: Ipv6Addr, next: u8) -> Vec<u8> {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&8u16.to_be_bytes());
        p[6] = next;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p
    }

    /// IPv4 TCP header fields are read from the right offsets.
    #[test]
    fn parses_v4_tcp() {
        let p = v4([10, 8, 0, 7], [10, 8, 0, 1], PROTO_TCP, 40000, 22);
        let h = Header::parse(&p).unwrap();
        assert_eq!(h.src, "10.8.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(h.dst, "10.8.0.1".parse::<IpAddr>().unwrap());
        assert_eq!((h.protocol, h.src_port, h.dst_port), (PROTO_TCP, 40000, 22));
        assert_eq!(destination(&p), Some(h.dst));
    }

    /// IPv6 addresses and next header are read; ICMPv6 has no ports.
    #[test]
    fn parses_v6() {
        let p = v6(
            "fe80::1".parse().unwrap(),
            "ff02::2".parse().unwrap(),
            PROTO_ICMPV6,
        );
        let h = Header::parse(&p).unwrap();
        assert_eq!(h.src, "fe80::1".parse::<IpAddr>().unwrap());
        assert_eq!(h.dst, "ff02::2".parse::<IpAddr>().unwrap());
        assert_eq!((h.src_port, h.dst_port), (0, 0));
        assert!(!h.later_fragment);
    }

    /// ICMP types are read; a later IPv4 fragment has no transport header.
    #[test]
    fn icmp_type_and_fragments() {
        let mut p = v4([10, 8, 0, 7], [10, 8, 0, 1], PROTO_ICMP, 0, 0);
        p[20] = 8;
        let h = Header::parse(&p).unwrap();
        assert_eq!((h.icmp_type, h.later_fragment), (8, false));
        let mut f = v4([10, 8, 0, 7], [10, 8, 0, 1], PROTO_TCP, 40000, 22);
        f[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        let h = Header::parse(&f).unwrap();
        assert!(h.later_fragment);
        assert_eq!(
            (h.src_port, h.dst_port),
            (0, 0),
            "no ports in a later fragment"
        );
    }

    /// Truncated or non-IP input yields None instead of panicking.
    #[test]
    fn short_or_garbage() {
        assert_eq!(Header::parse(&[]), None);
        assert_eq!(Header::parse(&[0x45; 19]), None);
        assert_eq!(Header::parse(&[0x60; 39]), None);
        assert_eq!(Header::parse(&[0x10; 60]), None);
        assert_eq!(destination(&[0x45; 10]), None);
        // A bogus IHL pointing past the end leaves ports at zero.
        let mut p = v4([1, 2, 3, 4], [5, 6, 7, 8], PROTO_TCP, 1, 2);
        p[0] = 0x4f;
        assert_eq!(Header::parse(&p).map(|h| h.dst_port), Some(0));
    }
}
