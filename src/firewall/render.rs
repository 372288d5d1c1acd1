//! The nftables table `inet sitegate` as data: rendered as nftables' JSON
//! (`nft -j -f -`), never as shell strings, so a name or address can never
//! change the shape of a rule. Pure: golden-tested here, checked by the real
//! `nft` in the namespace tests.
//!
//! What the table does (SPEC, Firewall):
//! - packets for the tunnel subnet that arrive on any interface but the TUN
//!   device (or loopback, the host itself) and are not part of a connection a
//!   peer opened are dropped, on input (services bound to the tunnel address)
//!   and on forward (the peers behind it);
//! - tunnel sources leaving through the egress interface are masqueraded, and
//!   only established/related traffic is forwarded back;
//! - packets from the TUN device to the host's own addresses other than the
//!   gateway's tunnel address, the service and DNS addresses are dropped: the
//!   userspace policy passes a public address as "internet", and without this
//!   rule a peer would reach whatever listens on the host's public address.
//!
//! The document first adds, deletes and re-adds the table, all in one nft
//! transaction: a table left by a killed daemon is replaced atomically, and a
//! first start works the same way.

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{json, Value};

/// The table's name in the `inet` family.
pub const TABLE: &str = "sitegate";

/// What the ruleset is built from, taken from the validated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallSpec {
    /// The TUN device.
    pub tun: String,
    /// The IPv4 tunnel subnet.
    pub subnet_v4: Ipv4Net,
    /// The IPv6 tunnel subnet, when the gateway has an IPv6 tunnel address.
    pub subnet_v6: Option<Ipv6Net>,
    /// Where full-tunnel traffic leaves, NAT'ed; `None`: no egress rules.
    pub egress: Option<String>,
    /// The host addresses a peer may reach from the tunnel: the gateway's
    /// tunnel addresses, and service and DNS addresses (when they are local).
    pub local_v4: Vec<std::net::Ipv4Addr>,
    pub local_v6: Vec<std::net::Ipv6Addr>,
}

impl FirewallSpec {
    pub fn from_config(cfg: &crate::config::Config) -> FirewallSpec {
        use std::net::IpAddr;
        let mut local_v4 = vec![cfg.interface.gateway_v4()];
        let mut local_v6: Vec<_> = cfg.interface.gateway_v6().into_iter().collect();
        let others = cfg
            .services
            .iter()
            .map(|s| s.address.ip())
            .chain(cfg.interface.dns.iter().copied());
        for ip in others {
            match ip {
                IpAddr::V4(a) if !local_v4.contains(&a) => local_v4.push(a),
                IpAddr::V6(a) if !local_v6.contains(&a) => local_v6.push(a),
                _ => {}
            }
        }
        FirewallSpec {
            tun: cfg.interface.name.clone(),
            subnet_v4: cfg.interface.address_v4.trunc(),
            subnet_v6: cfg.interface.address_v6.map(|n| n.trunc()),
            egress: cfg.egress.interface.clone(),
            local_v4,
            local_v6,
        }
    }
}

fn table() -> Value {
    json!({"family": "inet", "name": TABLE})
}

fn chain(name: &str, kind: &str, hook: &str, prio: i32) -> Value {
    json!({"add": {"chain": {
        "family": "inet", "table": TABLE, "name": name,
        "type": kind, "hook": hook, "prio": prio, "policy": "accept"
    }}})
}

fn rule(chain: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": "inet", "table": TABLE, "chain": chain, "expr": expr}}})
}

fn iifname_not(names: &[&str]) -> Value {
    json!({"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": {"set": names}}})
}

fn ifname(key: &str, name: &str) -> Value {
    json!({"match": {"op": "==", "left": {"meta": {"key": key}}, "right": name}})
}

fn addr(proto: &str, field: &str, addr: String, len: u8) -> Value {
    json!({"match": {"op": "==",
        "left": {"payload": {"protocol": proto, "field": field}},
        "right": {"prefix": {"addr": addr, "len": len}}}})
}

/// The destination is one of this host's own addresses.
fn to_local_address() -> Value {
    json!({"match": {"op": "==",
        "left": {"fib": {"result": "type", "flags": ["daddr"]}},
        "right": "local"}})
}

fn daddr_not_in(proto: &str, addrs: Vec<String>) -> Value {
    json!({"match": {"op": "!=",
        "left": {"payload": {"protocol": proto, "field": "daddr"}},
        "right": {"set": addrs}}})
}

fn family(nfproto: &str) -> Value {
    json!({"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": nfproto}})
}

fn not_established() -> Value {
    json!({"match": {"op": "!=", "left": {"ct": {"key": "state"}},
        "right": {"set": ["established", "related"]}}})
}

fn established() -> Value {
    json!({"match": {"op": "in", "left": {"ct": {"key": "state"}},
        "right": {"set": ["established", "related"]}}})
}

/// Priority of the filter chains: ahead of a host firewall's default-priority
/// chains, so their accepts cannot let underlay traffic reach the tunnel.
pub const FILTER_PRIORITY: i32 = -10;
/// Priority of the masquerade chain (nftables' `srcnat`).
pub const SRCNAT_PRIORITY: i32 = 100;

/// The whole table as one `nft -j -f -` document.
pub fn ruleset(spec: &FirewallSpec) -> Value {
    let mut cmds = vec![
        json!({"add": {"table": table()}}),
        json!({"delete": {"table": table()}}),
        json!({"add": {"table": table()}}),
        chain("input", "filter", "input", FILTER_PRIORITY),
        chain("forward", "filter", "forward", FILTER_PRIORITY),
    ];
    let mut subnets = vec![(
        "ip",
        spec.subnet_v4.network().to_string(),
        spec.subnet_v4.prefix_len(),
    )];
    if let Some(v6) = spec.subnet_v6 {
        subnets.push(("ip6", v6.network().to_string(), v6.prefix_len()));
    }
    for (proto, net, len) in &subnets {
        // The host's own traffic to its tunnel address comes in on loopback.
        cmds.push(rule(
            "input",
            vec![
                iifname_not(&[spec.tun.as_str(), "lo"]),
                addr(proto, "daddr", net.clone(), *len),
                not_established(),
                json!({"drop": null}),
            ],
        ));
        cmds.push(rule(
            "forward",
            vec![
                iifname_not(&[spec.tun.as_str()]),
                addr(proto, "daddr", net.clone(), *len),
                not_established(),
                json!({"drop": null}),
            ],
        ));
    }
    // From the tunnel, the host itself is reachable only on the addresses the
    // userspace policy decides about.
    let v4: Vec<String> = spec.local_v4.iter().map(ToString::to_string).collect();
    cmds.push(rule(
        "input",
        vec![
            ifname("iifname", &spec.tun),
            to_local_address(),
            daddr_not_in("ip", v4),
            json!({"drop": null}),
        ],
    ));
    let v6: Vec<String> = spec.local_v6.iter().map(ToString::to_string).collect();
    let mut v6_rule = vec![ifname("iifname", &spec.tun), to_local_address()];
    v6_rule.push(if v6.is_empty() {
        family("ipv6")
    } else {
        daddr_not_in("ip6", v6)
    });
    v6_rule.push(json!({"drop": null}));
    cmds.push(rule("input", v6_rule));
    if let Some(egress) = &spec.egress {
        cmds.push(chain("postrouting", "nat", "postrouting", SRCNAT_PRIORITY));
        for (proto, net, len) in &subnets {
            cmds.push(rule(
                "forward",
                vec![
                    ifname("iifname", &spec.tun),
                    ifname("oifname", egress),
                    addr(proto, "saddr", net.clone(), *len),
                    json!({"accept": null}),
                ],
            ));
            cmds.push(rule(
                "postrouting",
                vec![
                    ifname("oifname", egress),
                    addr(proto, "saddr", net.clone(), *len),
                    json!({"masquerade": null}),
                ],
            ));
        }
        cmds.push(rule(
            "forward",
            vec![
                ifname("iifname", egress),
                ifname("oifname", &spec.tun),
                established(),
                json!({"accept": null}),
            ],
        ));
    }
    json!({ "nftables": cmds })
}

/// The document that removes the table (at stop).
pub fn removal() -> Value {
    json!({"nftables": [
        {"add": {"table": table()}},
        {"delete": {"table": table()}},
    ]})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v6: bool, egress: bool) -> FirewallSpec {
        FirewallSpec {
            tun: "sg0".into(),
            subnet_v4: "10.8.0.0/24".parse().unwrap(),
            subnet_v6: v6.then(|| "fd00:8::/64".parse().unwrap()),
            egress: egress.then(|| "eth0".to_string()),
            local_v4: vec!["10.8.0.1".parse().unwrap()],
            local_v6: if v6 {
                vec!["fd00:8::1".parse().unwrap()]
            } else {
                vec![]
            },
        }
    }

    fn commands(v: &Value) -> &Vec<Value> {
        v["nftables"].as_array().unwrap()
    }

    fn rules<'a>(v: &'a Value, chain: &str) -> Vec<&'a Value> {
        commands(v)
            .iter()
            .filter_map(|c| c.get("add")?.get("rule"))
            .filter(|r| r["chain"] == chain)
            .collect()
    }

    /// The table is replaced atomically: add, delete, add, then the chains.
    #[test]
    fn replaces_the_table_first() {
        let v = ruleset(&spec(false, true));
        let c = commands(&v);
        assert!(c[0]["add"]["table"]["name"] == TABLE);
        assert!(c[1]["delete"]["table"]["name"] == TABLE);
        assert!(c[2]["add"]["table"]["name"] == TABLE);
        assert_eq!(removal()["nftables"][1]["delete"]["table"]["name"], TABLE);
    }

    /// Underlay traffic to the tunnel subnet is dropped on input and forward
    /// unless it belongs to a connection a peer opened; loopback is the host.
    #[test]
    fn underlay_to_tunnel_dropped() {
        let v = ruleset(&spec(false, false));
        let input = rules(&v, "input");
        assert_eq!(input.len(), 3);
        let e = &input[0]["expr"];
        assert_eq!(e[0]["match"]["right"]["set"], json!(["sg0", "lo"]));
        assert_eq!(
            e[1]["match"]["right"]["prefix"],
            json!({"addr": "10.8.0.0", "len": 24})
        );
        assert_eq!(e[2]["match"]["op"], "!=");
        assert!(e[3].get("drop").is_some());
        let fwd = rules(&v, "forward");
        assert_eq!(fwd.len(), 1, "no egress: no accept rules");
        assert_eq!(fwd[0]["expr"][0]["match"]["right"]["set"], json!(["sg0"]));
        assert!(rules(&v, "postrouting").is_empty());
    }

    /// With egress: masquerade tunnel sources out of it, accept them forward,
    /// and let back only established/related traffic; IPv6 gets the same.
    #[test]
    fn egress_and_ipv6() {
        let v = ruleset(&spec(true, true));
        assert_eq!(rules(&v, "input").len(), 4);
        let nat = rules(&v, "postrouting");
        assert_eq!(nat.len(), 2);
        assert!(nat[1]["expr"][2].get("masquerade").is_some());
        assert_eq!(
            nat[1]["expr"][1]["match"]["left"]["payload"]["protocol"],
            "ip6"
        );
        let fwd = rules(&v, "forward");
        let back = fwd.last().unwrap();
        assert_eq!(back["expr"][0]["match"]["right"], "eth0");
        assert_eq!(back["expr"][1]["match"]["right"], "sg0");
        assert_eq!(back["expr"][2]["match"]["op"], "in");
    }

    /// From the tunnel, host addresses other than the allowed ones are
    /// dropped; without an IPv6 tunnel address, every local IPv6 destination.
    #[test]
    fn tunnel_to_other_host_addresses_dropped() {
        let v = ruleset(&spec(false, false));
        let input = rules(&v, "input");
        let r4 = &input[1]["expr"];
        assert_eq!(r4[0]["match"]["right"], "sg0");
        assert_eq!(r4[1]["match"]["right"], "local");
        assert_eq!(r4[2]["match"]["op"], "!=");
        assert_eq!(r4[2]["match"]["right"]["set"], json!(["10.8.0.1"]));
        assert_eq!(input[2]["expr"][2]["match"]["right"], "ipv6");
        let v = ruleset(&spec(true, false));
        let r6 = &rules(&v, "input")[3]["expr"];
        assert_eq!(r6[2]["match"]["right"]["set"], json!(["fd00:8::1"]));
    }

    /// Service and DNS addresses join the allowed host addresses, once each.
    #[test]
    fn allowed_host_addresses_from_config() {
        let text = r#"
[interface]
name = "sg0"
private_key_file = "k"
listen_port = 51820
address = "10.8.0.1/24"
endpoint = "vpn.example.org:51820"
dns = ["10.8.0.1", "172.30.0.53"]

[[service]]
name = "sftp"
address = "10.8.0.1:22"

[[service]]
name = "db"
address = "172.30.0.10:5432"

[store]
url = "sqlite:///tmp/x.db"
"#;
        let cfg = crate::config::Config::parse(std::path::Path::new("/x/s.toml"), text).unwrap();
        let spec = FirewallSpec::from_config(&cfg);
        let got: Vec<String> = spec.local_v4.iter().map(ToString::to_string).collect();
        assert_eq!(got, ["10.8.0.1", "172.30.0.10", "172.30.0.53"]);
        assert!(spec.local_v6.is_empty());
    }
}
