//! The verdict on each decrypted packet, decided before it reaches the TUN
//! device. Pure and allocation-free: the data plane passes the parsed header,
//! the sending peer, its grants and the current routing snapshot; the
//! [`Policy`] itself is built once from the config.
//!
//! Order (SPEC "Policy on decrypted packets"):
//! 0. IPv6 link-local/multicast chatter that stock clients send into a `::/0`
//!    tunnel is dropped quietly, and so is all IPv6 when the gateway has no
//!    IPv6 tunnel address (counted, never forwarded, not spoofing);
//! 1. the source must route back to the very peer that decrypted the packet
//!    (gotatun's strict anti-spoof: being *one of* the allowed sources is not
//!    enough, it must be the sender's own);
//! 2. a destination on the gateway's own address or on a service's host needs
//!    a granted service (address, port and protocol); ICMP echo and errors to
//!    the gateway address are always allowed, and so is port 53 on the DNS
//!    servers pushed in issued configs;
//! 3. another peer's address only with `peer_to_peer`;
//! 4. private ranges that are not services, never; the rest (the internet)
//!    only with `allow_internet`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::config::{Config, Protocol};
use crate::dataplane::packet::{Header, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
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

/// Drops that are counted per peer but are no event: what a stock client sends
/// on its own, not what its user tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiet {
    /// IPv6 link-local or multicast chatter (router solicitations, MLD).
    Ipv6Noise,
    /// IPv6 while the gateway has no IPv6 tunnel address.
    Ipv6Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it to the TUN device: for the gateway, a service or another peer.
    Forward,
    /// Write it to the TUN device; it leaves through egress to the internet
    /// (what "internet seen" records).
    Internet,
    Quiet(Quiet),
    Deny(DenyReason),
}

/// The services a peer may reach: bit `i` grants [`Policy`]'s service `i`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grants(u64);

impl Grants {
    pub const NONE: Grants = Grants(0);

    pub fn bits(self) -> u64 {
        self.0
    }
    pub fn from_bits(bits: u64) -> Grants {
        Grants(bits)
    }
    #[inline]
    fn has(self, i: usize) -> bool {
        i < 64 && self.0 & (1 << i) != 0
    }
}

/// One reachable endpoint: a `[[service]]`, or port 53 on a pushed DNS server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Endpoint {
    ip: IpAddr,
    port: u16,
    protocol: u8,
}

impl Endpoint {
    #[inline]
    fn matches(&self, h: &Header) -> bool {
        self.ip == h.dst
            && self.protocol == h.protocol
            && (self.port == h.dst_port || h.later_fragment)
    }
}

/// The rules from the config, fixed for the daemon's life.
#[derive(Debug, Clone)]
pub struct Policy {
    gateway_v4: Ipv4Addr,
    gateway_v6: Option<Ipv6Addr>,
    tunnel_v4: Ipv4Net,
    tunnel_v6: Option<Ipv6Net>,
    /// `[[service]]` sections in config order; the position is the grant bit.
    services: Vec<(String, Endpoint)>,
    /// Port 53, TCP and UDP, on each `[interface] dns` server: open to every peer.
    dns: Vec<Endpoint>,
    peer_to_peer: bool,
    allow_internet: bool,
}

impl Policy {
    /// Config validation caps services at [`crate::config::validate::MAX_SERVICES`],
    /// which fits [`Grants`].
    pub fn from_config(cfg: &Config) -> Policy {
        let proto = |p: Protocol| match p {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        };
        Policy {
            gateway_v4: cfg.interface.gateway_v4(),
            gateway_v6: cfg.interface.gateway_v6(),
            tunnel_v4: cfg.interface.address_v4.trunc(),
            tunnel_v6: cfg.interface.address_v6.map(|n| n.trunc()),
            services: cfg
                .services
                .iter()
                .take(64)
                .map(|s| {
                    let ep = Endpoint {
                        ip: s.address.ip(),
                        port: s.address.port(),
                        protocol: proto(s.protocol),
                    };
                    (s.name.clone(), ep)
                })
                .collect(),
            dns: cfg
                .interface
                .dns
                .iter()
                .flat_map(|ip| {
                    [PROTO_UDP, PROTO_TCP].map(|protocol| Endpoint {
                        ip: *ip,
                        port: 53,
                        protocol,
                    })
                })
                .collect(),
            peer_to_peer: cfg.egress.peer_to_peer,
            allow_internet: cfg.egress.allow_internet,
        }
    }

    /// The grant bits for service names as stored with a peer. Names the config
    /// no longer defines grant nothing.
    pub fn grants<S: AsRef<str>>(&self, names: &[S]) -> Grants {
        let mut bits = 0u64;
        for (i, (name, _)) in self.services.iter().enumerate() {
            if names.iter().any(|n| n.as_ref() == name) {
                bits |= 1 << i;
            }
        }
        Grants(bits)
    }

    fn is_gateway(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => a == self.gateway_v4,
            IpAddr::V6(a) => Some(a) == self.gateway_v6,
        }
    }

    fn in_tunnel(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.tunnel_v4.contains(&a),
            IpAddr::V6(a) => self.tunnel_v6.is_some_and(|n| n.contains(&a)),
        }
    }
}

fn is_v6_noise(src: &Ipv6Addr, dst: &Ipv6Addr) -> bool {
    let link_local = (src.segments()[0] & 0xffc0) == 0xfe80;
    link_local || src.is_unspecified() || dst.is_multicast()
}

/// ICMP a site may always send to the gateway address: echo (ping and its
/// replies) and the errors that path MTU discovery and failing connections need.
fn icmp_to_gateway(h: &Header) -> bool {
    match h.protocol {
        // echo reply, unreachable (incl. fragmentation needed), echo, time exceeded
        PROTO_ICMP => matches!(h.icmp_type, 0 | 3 | 8 | 11),
        // unreachable, packet too big, time exceeded, echo request, echo reply
        PROTO_ICMPV6 => matches!(h.icmp_type, 1 | 2 | 3 | 128 | 129),
        _ => false,
    }
}

/// Addresses that are never "the internet": private, shared, loopback,
/// link-local, multicast, reserved and unspecified ranges. Documentation
/// ranges are not among them (tests use them as the internet).
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || o[0] >= 224
        }
        IpAddr::V6(a) => {
            let s0 = a.segments()[0];
            a.is_loopback()
                || a.is_unspecified()
                || (s0 & 0xfe00) == 0xfc00
                || (s0 & 0xffc0) == 0xfe80
                || a.is_multicast()
                || a.to_ipv4_mapped().is_some()
        }
    }
}

/// Decides what happens to a packet that `sender` (holding `grants`) sent
/// through its session.
#[inline]
pub fn decide<T: PartialEq>(
    policy: &Policy,
    sender: &T,
    grants: Grants,
    header: &Header,
    routes: &AllowedIps<T>,
) -> Verdict {
    if let (IpAddr::V6(src), IpAddr::V6(dst)) = (header.src, header.dst) {
        if is_v6_noise(&src, &dst) {
            return Verdict::Quiet(Quiet::Ipv6Noise);
        }
        if policy.gateway_v6.is_none() {
            return Verdict::Quiet(Quiet::Ipv6Off);
        }
    }
    // 1. Cryptokey routing: the source is the sender's own.
    match routes.lookup(header.src) {
        Some(owner) if owner == sender => {}
        _ => return Verdict::Deny(DenyReason::SpoofedSource),
    }
    let dst = header.dst;
    // DNS servers the issued configs push are reachable for every peer.
    if policy.dns.iter().any(|e| e.matches(header)) {
        return if policy.in_tunnel(dst) || is_private(dst) {
            Verdict::Forward
        } else {
            Verdict::Internet
        };
    }
    // 2. The gateway and service hosts: granted services only.
    let gateway = policy.is_gateway(dst);
    if gateway || policy.services.iter().any(|(_, e)| e.ip == dst) {
        if gateway && icmp_to_gateway(header) {
            return Verdict::Forward;
        }
        let granted = policy
            .services
            .iter()
            .enumerate()
            .any(|(i, (_, e))| grants.has(i) && e.matches(header));
        return if granted {
            Verdict::Forward
        } else {
            Verdict::Deny(DenyReason::Acl)
        };
    }
    // 3. Other sites.
    if policy.in_tunnel(dst) {
        if !policy.peer_to_peer {
            return Verdict::Deny(DenyReason::PeerIsolation);
        }
        return match routes.lookup(dst) {
            Some(_) => Verdict::Forward,
            // No peer there: nothing to reach, and the kernel would only
            // bounce it back into the tunnel.
            None => Verdict::Deny(DenyReason::Acl),
        };
    }
    // 4. Internal networks that are not services, never; the internet if allowed.
    if is_private(dst) || !policy.allow_internet {
        return Verdict::Deny(DenyReason::Acl);
    }
    Verdict::Internet
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::packet::tests::{v4, v6};
    use crate::dataplane::packet::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

    const A: u32 = 1;
    const B: u32 = 2;

    fn config(extra_interface: &str, egress: &str) -> Config {
        let text = format!(
            r#"
[interface]
name = "sg0"
private_key_file = "k"
listen_port = 51820
{extra_interface}
mtu = 1420
endpoint = "vpn.example.org:51820"

[egress]
{egress}

[[service]]
name = "sftp"
address = "10.8.0.1:22"
protocol = "tcp"
default = true

[[service]]
name = "api"
address = "10.8.0.1:8443"

[[service]]
name = "db"
address = "172.30.0.10:5432"

[[service]]
name = "syslog"
address = "172.30.0.10:514"
protocol = "udp"

[[service]]
name = "sftp6"
address = "[fd00:8::1]:22"

[store]
url = "sqlite:///tmp/x.db"
"#
        );
        Config::parse(std::path::Path::new("/x/sitegate.toml"), &text).unwrap()
    }

    fn dual() -> Policy {
        Policy::from_config(&config(
            "address = [\"10.8.0.1/24\", \"fd00:8::1/64\"]\ndns = [\"10.8.0.1\", \"9.9.9.9\"]",
            "interface = \"eth0\"\nallow_internet = true\npeer_to_peer = false",
        ))
    }

    fn routes() -> AllowedIps<u32> {
        let mut r = AllowedIps::new();
        r.insert("10.8.0.2/32".parse().unwrap(), A);
        r.insert("10.8.0.3/32".parse().unwrap(), B);
        r.insert("fd00:8::2/128".parse().unwrap(), A);
        r.insert("fd00:8::3/128".parse().unwrap(), B);
        r
    }

    fn verdict_with(policy: &Policy, sender: u32, grants: &[&str], pkt: &[u8]) -> Verdict {
        decide(
            policy,
            &sender,
            policy.grants(grants),
            &Header::parse(pkt).unwrap(),
            &routes(),
        )
    }

    fn verdict(grants: &[&str], pkt: &[u8]) -> Verdict {
        verdict_with(&dual(), A, grants, pkt)
    }

    fn tcp(dst: [u8; 4], port: u16) -> Vec<u8> {
        v4([10, 8, 0, 2], dst, PROTO_TCP, 40000, port)
    }

    fn ping(dst: [u8; 4]) -> Vec<u8> {
        let mut p = v4([10, 8, 0, 2], dst, PROTO_ICMP, 0, 0);
        p[20] = 8;
        p
    }

    const ACL: Verdict = Verdict::Deny(DenyReason::Acl);
    const ISOLATION: Verdict = Verdict::Deny(DenyReason::PeerIsolation);
    const SPOOFED: Verdict = Verdict::Deny(DenyReason::SpoofedSource);

    /// Step 1: a peer's own address passes; anything else is spoofed,
    /// another issued peer's address included.
    #[test]
    fn own_source_only() {
        assert_eq!(verdict(&[], &ping([10, 8, 0, 1])), Verdict::Forward);
        for src in [[10, 8, 0, 99], [10, 8, 0, 3], [192, 0, 2, 1]] {
            let p = v4(src, [10, 8, 0, 1], PROTO_ICMP, 0, 0);
            assert_eq!(verdict(&["sftp"], &p), SPOOFED, "{src:?}");
        }
        let p = v4([10, 8, 0, 3], [10, 8, 0, 1], PROTO_ICMP, 0, 0);
        assert_eq!(verdict_with(&dual(), B, &[], &p), Verdict::Forward);
    }

    /// Spoofing is decided before the destination: a spoofed packet to the
    /// internet is spoofed, not internet traffic.
    #[test]
    fn spoofing_checked_first() {
        let p = v4([198, 51, 100, 7], [203, 0, 113, 10], PROTO_TCP, 1, 80);
        assert_eq!(verdict(&["sftp"], &p), SPOOFED);
    }

    /// Step 2, the gateway address: only granted services (port and protocol).
    #[test]
    fn gateway_services_need_a_grant() {
        assert_eq!(
            verdict(&["sftp"], &tcp([10, 8, 0, 1], 22)),
            Verdict::Forward
        );
        assert_eq!(verdict(&[], &tcp([10, 8, 0, 1], 22)), ACL);
        assert_eq!(verdict(&["api"], &tcp([10, 8, 0, 1], 22)), ACL);
        assert_eq!(
            verdict(&["api"], &tcp([10, 8, 0, 1], 8443)),
            Verdict::Forward
        );
        assert_eq!(verdict(&["sftp"], &tcp([10, 8, 0, 1], 8443)), ACL);
        // Not a service at all.
        assert_eq!(verdict(&["sftp", "api"], &tcp([10, 8, 0, 1], 5201)), ACL);
        // Right port, wrong protocol.
        let udp = v4([10, 8, 0, 2], [10, 8, 0, 1], PROTO_UDP, 40000, 22);
        assert_eq!(verdict(&["sftp"], &udp), ACL);
    }

    /// ICMP echo and errors to the gateway are allowed without a grant; other
    /// ICMP types are not.
    #[test]
    fn icmp_to_the_gateway() {
        assert_eq!(verdict(&[], &ping([10, 8, 0, 1])), Verdict::Forward);
        for t in [0u8, 3, 11] {
            let mut p = ping([10, 8, 0, 1]);
            p[20] = t;
            assert_eq!(verdict(&[], &p), Verdict::Forward, "type {t}");
        }
        let mut redirect = ping([10, 8, 0, 1]);
        redirect[20] = 5;
        assert_eq!(verdict(&[], &redirect), ACL);
        // Echo to an internal service host is not echo to the gateway.
        assert_eq!(verdict(&["db"], &ping([172, 30, 0, 10])), ACL);
        let echo6 = {
            let mut p = v6(
                "fd00:8::2".parse().unwrap(),
                "fd00:8::1".parse().unwrap(),
                PROTO_ICMPV6,
            );
            p[40] = 128;
            p
        };
        assert_eq!(verdict(&[], &echo6), Verdict::Forward);
    }

    /// Step 2, internal service hosts: the granted port and protocol only.
    #[test]
    fn internal_services() {
        let db = tcp([172, 30, 0, 10], 5432);
        assert_eq!(verdict(&["db"], &db), Verdict::Forward);
        assert_eq!(verdict(&["sftp"], &db), ACL);
        assert_eq!(verdict(&["db"], &tcp([172, 30, 0, 10], 22)), ACL);
        let syslog = v4([10, 8, 0, 2], [172, 30, 0, 10], PROTO_UDP, 5000, 514);
        assert_eq!(verdict(&["syslog"], &syslog), Verdict::Forward);
        assert_eq!(verdict(&["db"], &syslog), ACL);
    }

    /// A later fragment has no ports: it passes only to a host and protocol
    /// the peer holds a grant for (its first fragment was checked in full).
    #[test]
    fn later_fragments() {
        let mut frag = tcp([172, 30, 0, 10], 0);
        frag[6..8].copy_from_slice(&0x0020u16.to_be_bytes());
        assert_eq!(verdict(&["db"], &frag), Verdict::Forward);
        assert_eq!(verdict(&["syslog"], &frag), ACL);
        assert_eq!(verdict(&[], &frag), ACL);
    }

    /// Step 3, other sites: isolation unless peer_to_peer; then only real peers.
    #[test]
    fn peer_isolation() {
        let to_b = tcp([10, 8, 0, 3], 22);
        assert_eq!(verdict(&["sftp"], &to_b), ISOLATION);
        assert_eq!(verdict(&["sftp"], &ping([10, 8, 0, 3])), ISOLATION);
        assert_eq!(verdict(&[], &ping([10, 8, 0, 77])), ISOLATION);
        let open = Policy::from_config(&config("address = \"10.8.0.1/24\"", "peer_to_peer = true"));
        assert_eq!(verdict_with(&open, A, &[], &to_b), Verdict::Forward);
        assert_eq!(verdict_with(&open, A, &[], &ping([10, 8, 0, 77])), ACL);
        // peer_to_peer does not open the gateway's own ports.
        assert_eq!(verdict_with(&open, A, &[], &tcp([10, 8, 0, 1], 22)), ACL);
    }

    /// Step 4: the internet when allowed; private ranges that are not services never.
    #[test]
    fn internet_and_private_ranges() {
        assert_eq!(
            verdict(&[], &tcp([203, 0, 113, 10], 443)),
            Verdict::Internet
        );
        assert_eq!(verdict(&[], &ping([198, 51, 100, 1])), Verdict::Internet);
        for private in [
            [10, 1, 2, 3],
            [172, 30, 0, 11],
            [192, 168, 1, 1],
            [100, 64, 0, 1],
            [127, 0, 0, 1],
            [169, 254, 1, 1],
            [0, 0, 0, 0],
            [224, 0, 0, 1],
            [255, 255, 255, 255],
        ] {
            assert_eq!(verdict(&["db"], &tcp(private, 80)), ACL, "{private:?}");
        }
        let closed = Policy::from_config(&config(
            "address = \"10.8.0.1/24\"",
            "allow_internet = false",
        ));
        assert_eq!(
            verdict_with(&closed, A, &[], &tcp([203, 0, 113, 10], 443)),
            ACL
        );
        assert_eq!(
            verdict_with(&closed, A, &["sftp"], &tcp([10, 8, 0, 1], 22)),
            Verdict::Forward
        );
    }

    /// Port 53 on pushed DNS servers is open to every peer, TCP and UDP; other
    /// ports there follow the usual rules.
    #[test]
    fn dns_servers() {
        let gw53 = v4([10, 8, 0, 2], [10, 8, 0, 1], PROTO_UDP, 5000, 53);
        assert_eq!(verdict(&[], &gw53), Verdict::Forward);
        assert_eq!(verdict(&[], &tcp([10, 8, 0, 1], 53)), Verdict::Forward);
        let public53 = v4([10, 8, 0, 2], [9, 9, 9, 9], PROTO_UDP, 5000, 53);
        assert_eq!(verdict(&[], &public53), Verdict::Internet);
        let closed = Policy::from_config(&config(
            "address = \"10.8.0.1/24\"\ndns = [\"9.9.9.9\"]",
            "allow_internet = false",
        ));
        assert_eq!(verdict_with(&closed, A, &[], &public53), Verdict::Internet);
        assert_eq!(verdict_with(&closed, A, &[], &tcp([9, 9, 9, 9], 443)), ACL);
    }

    /// IPv6: the same rules; link-local chatter is quiet noise.
    #[test]
    fn ipv6_rules() {
        let pkt = |src: &str, dst: &str, proto: u8, port: u16| {
            let mut p = v6(src.parse().unwrap(), dst.parse().unwrap(), proto);
            p[42..44].copy_from_slice(&port.to_be_bytes());
            p
        };
        let rs = v6(
            "fe80::1".parse().unwrap(),
            "ff02::2".parse().unwrap(),
            PROTO_ICMPV6,
        );
        assert_eq!(verdict(&[], &rs), Verdict::Quiet(Quiet::Ipv6Noise));
        let mld = v6(
            "::".parse().unwrap(),
            "ff02::16".parse().unwrap(),
            PROTO_ICMPV6,
        );
        assert_eq!(verdict(&[], &mld), Verdict::Quiet(Quiet::Ipv6Noise));
        let sftp6 = pkt("fd00:8::2", "fd00:8::1", PROTO_TCP, 22);
        assert_eq!(verdict(&["sftp6"], &sftp6), Verdict::Forward);
        assert_eq!(verdict(&["sftp"], &sftp6), ACL);
        assert_eq!(
            verdict(&[], &pkt("2001:db8::5", "fd00:8::1", PROTO_TCP, 22)),
            SPOOFED
        );
        assert_eq!(
            verdict(&[], &pkt("fd00:8::2", "fd00:8::3", PROTO_TCP, 22)),
            ISOLATION
        );
        assert_eq!(
            verdict(&[], &pkt("fd00:8::2", "fd12::9", PROTO_TCP, 22)),
            ACL
        );
        assert_eq!(
            verdict(&[], &pkt("fd00:8::2", "2001:db8::80", PROTO_TCP, 443)),
            Verdict::Internet
        );
    }

    /// Without an IPv6 tunnel address every IPv6 packet is dropped quietly,
    /// never forwarded and never a spoofing event.
    #[test]
    fn no_ipv6_address_drops_ipv6() {
        let v4only = Policy::from_config(&config(
            "address = \"10.8.0.1/24\"",
            "interface = \"eth0\"\nallow_internet = true",
        ));
        let p = v6(
            "fd00:8::2".parse().unwrap(),
            "2001:db8::80".parse().unwrap(),
            PROTO_TCP,
        );
        assert_eq!(
            verdict_with(&v4only, A, &[], &p),
            Verdict::Quiet(Quiet::Ipv6Off)
        );
    }

    /// Stored service names map to grant bits; unknown names grant nothing.
    #[test]
    fn grants_from_names() {
        let p = dual();
        assert_eq!(p.grants(&["sftp"]).bits(), 0b1);
        assert_eq!(p.grants(&["api", "db"]).bits(), 0b110);
        assert_eq!(p.grants(&["gone"]), Grants::NONE);
    }

    /// The private-range table, by family.
    #[test]
    fn private_ranges() {
        for ip in [
            "10.0.0.1",
            "172.31.255.255",
            "100.127.0.1",
            "::1",
            "fe80::1",
            "fc00::1",
            "ff02::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "100.128.0.1",
            "172.32.0.1",
            "203.0.113.10",
            "2001:db8::1",
            "2a00::1",
        ] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }
}
