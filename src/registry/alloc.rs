//! Tunnel address allocation (pure): the lowest free host address of a subnet,
//! or a check of one the admin chose. Never the network address, the IPv4
//! broadcast address, or the gateway's own address.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

/// Why no address (or not that address) can be given to a peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    /// Every host address of the subnet is taken.
    #[error("the tunnel subnet {subnet} has no free address left")]
    Exhausted { subnet: IpNet },
    /// The chosen address lies outside the subnet (or its family has no subnet).
    #[error("address {addr} lies outside the tunnel subnet {subnet}")]
    Outside { addr: IpAddr, subnet: String },
    /// The chosen address is the gateway's own.
    #[error("address {addr} is the gateway's own address")]
    Gateway { addr: IpAddr },
    /// The chosen address is the network or broadcast address.
    #[error("address {addr} is the {which} address of the tunnel subnet {subnet}")]
    Reserved {
        addr: IpAddr,
        which: &'static str,
        subnet: IpNet,
    },
    /// The chosen address belongs to another peer.
    #[error("address {addr} is already assigned to another peer")]
    Taken { addr: IpAddr },
}

/// The subnet and gateway address, as in `[interface] address` (`10.8.0.1/24`).
fn subnet_of(gateway: IpNet) -> IpNet {
    gateway.trunc()
}

/// The lowest free host address in `gateway`'s subnet.
///
/// # Errors
/// [`AllocError::Exhausted`] when none is left.
pub fn next_free(gateway: IpNet, used: &BTreeSet<IpAddr>) -> Result<IpAddr, AllocError> {
    let subnet = subnet_of(gateway);
    // `hosts()` skips the IPv4 network and broadcast addresses; for IPv6 skip the
    // subnet-router anycast address (the network address) by hand. The search
    // stops at the first gap, so it is short even in a /64.
    subnet
        .hosts()
        .filter(|a| *a != subnet.network())
        .find(|a| *a != gateway.addr() && !used.contains(a))
        .ok_or(AllocError::Exhausted { subnet })
}

/// Checks an address the admin chose with `--address`.
///
/// # Errors
/// Outside the subnet, reserved, the gateway's, or taken.
pub fn check_explicit(
    gateway: IpNet,
    addr: IpAddr,
    used: &BTreeSet<IpAddr>,
) -> Result<(), AllocError> {
    let subnet = subnet_of(gateway);
    if !subnet.contains(&addr) {
        return Err(AllocError::Outside {
            addr,
            subnet: subnet.to_string(),
        });
    }
    if addr == gateway.addr() {
        return Err(AllocError::Gateway { addr });
    }
    if addr == subnet.network() {
        return Err(AllocError::Reserved {
            addr,
            which: "network",
            subnet,
        });
    }
    if matches!(subnet, IpNet::V4(_)) && addr == subnet.broadcast() {
        return Err(AllocError::Reserved {
            addr,
            which: "broadcast",
            subnet,
        });
    }
    if used.contains(&addr) {
        return Err(AllocError::Taken { addr });
    }
    Ok(())
}

/// The addresses of a new peer: `explicit` (either family) checked against
/// the whole subnet, and the lowest free address of every family it does not
/// cover. IPv4 comes from `pool` when this gateway has one (`[store] pool`),
/// so gateways that allocate from disjoint pools never compete. Sorted.
///
/// # Errors
/// As [`check_explicit`] and [`next_free`] ([`AllocError::Exhausted`] names
/// the pool when it is the pool that is full).
pub fn assign(
    v4: IpNet,
    v6: Option<IpNet>,
    pool: Option<ipnet::Ipv4Net>,
    explicit: Option<IpAddr>,
    used: &BTreeSet<IpAddr>,
) -> Result<Vec<IpAddr>, AllocError> {
    let nets: Vec<IpNet> = std::iter::once(v4).chain(v6).collect();
    let mut addresses = Vec::new();
    if let Some(addr) = explicit {
        let net = nets
            .iter()
            .find(|n| n.addr().is_ipv4() == addr.is_ipv4())
            .copied()
            .unwrap_or(v4);
        check_explicit(net, addr, used)?;
        addresses.push(addr);
    }
    for net in &nets {
        if addresses
            .iter()
            .any(|a| a.is_ipv4() == net.addr().is_ipv4())
        {
            continue;
        }
        let next = match (net, pool) {
            (IpNet::V4(gw), Some(pool)) => pool
                .hosts()
                .map(IpAddr::V4)
                .find(|a| *a != IpAddr::V4(gw.addr()) && !used.contains(a))
                .ok_or(AllocError::Exhausted {
                    subnet: IpNet::V4(pool),
                })?,
            _ => next_free(*net, used)?,
        };
        addresses.push(next);
    }
    addresses.sort();
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn set(v: &[&str]) -> BTreeSet<IpAddr> {
        v.iter().map(|s| ip(s)).collect()
    }

    /// The first peer gets the first host after the gateway; gaps are reused.
    #[test]
    fn lowest_free_after_gateway() {
        let gw = net("10.8.0.1/24");
        assert_eq!(next_free(gw, &set(&[])), Ok(ip("10.8.0.2")));
        assert_eq!(
            next_free(gw, &set(&["10.8.0.2", "10.8.0.3"])),
            Ok(ip("10.8.0.4"))
        );
        assert_eq!(next_free(gw, &set(&["10.8.0.3"])), Ok(ip("10.8.0.2")));
        // A gateway in the middle of the range is skipped, the network address is not handed out.
        assert_eq!(next_free(net("10.8.0.5/24"), &set(&[])), Ok(ip("10.8.0.1")));
    }

    /// A full subnet is reported as exhausted, never handing out broadcast.
    #[test]
    fn exhaustion() {
        let gw = net("10.8.0.1/29"); // hosts .1-.6
        let used = set(&["10.8.0.2", "10.8.0.3", "10.8.0.4", "10.8.0.5"]);
        assert_eq!(next_free(gw, &used), Ok(ip("10.8.0.6")));
        let full = set(&["10.8.0.2", "10.8.0.3", "10.8.0.4", "10.8.0.5", "10.8.0.6"]);
        let err = next_free(gw, &full).unwrap_err();
        assert_eq!(
            err,
            AllocError::Exhausted {
                subnet: net("10.8.0.0/29")
            }
        );
        assert_eq!(
            err.to_string(),
            "the tunnel subnet 10.8.0.0/29 has no free address left"
        );
    }

    /// IPv6 allocation skips the subnet-router anycast and gateway addresses.
    #[test]
    fn ipv6() {
        assert_eq!(
            next_free(net("fd00:8::1/64"), &set(&[])),
            Ok(ip("fd00:8::2"))
        );
        assert_eq!(
            next_free(net("fd00:8::2/64"), &set(&["fd00:8::1"])),
            Ok(ip("fd00:8::3"))
        );
    }

    /// Explicit addresses: outside, gateway, network, broadcast and taken are refused.
    #[test]
    fn explicit_conflicts() {
        let gw = net("10.8.0.1/24");
        let used = set(&["10.8.0.7"]);
        assert_eq!(check_explicit(gw, ip("10.8.0.8"), &used), Ok(()));
        let cases = [
            (
                "10.9.0.8",
                "address 10.9.0.8 lies outside the tunnel subnet 10.8.0.0/24",
            ),
            ("10.8.0.1", "address 10.8.0.1 is the gateway's own address"),
            (
                "10.8.0.0",
                "address 10.8.0.0 is the network address of the tunnel subnet 10.8.0.0/24",
            ),
            (
                "10.8.0.255",
                "address 10.8.0.255 is the broadcast address of the tunnel subnet 10.8.0.0/24",
            ),
            (
                "10.8.0.7",
                "address 10.8.0.7 is already assigned to another peer",
            ),
        ];
        for (addr, want) in cases {
            assert_eq!(
                check_explicit(gw, ip(addr), &used).unwrap_err().to_string(),
                want
            );
        }
    }

    /// A pool confines IPv4 allocation to its slice; an explicit address may lie
    /// anywhere in the subnet; a full pool is named.
    #[test]
    fn pools() {
        let pool: ipnet::Ipv4Net = "10.8.0.128/30".parse().unwrap();
        let v4 = net("10.8.0.1/24");
        let got = assign(v4, None, Some(pool), None, &set(&[])).unwrap();
        assert_eq!(got, [ip("10.8.0.129")]);
        let got = assign(v4, None, Some(pool), None, &set(&["10.8.0.129"])).unwrap();
        assert_eq!(got, [ip("10.8.0.130")]);
        let e = assign(
            v4,
            None,
            Some(pool),
            None,
            &set(&["10.8.0.129", "10.8.0.130"]),
        );
        assert_eq!(
            e,
            Err(AllocError::Exhausted {
                subnet: net("10.8.0.128/30").trunc()
            })
        );
        let got = assign(v4, None, Some(pool), Some(ip("10.8.0.9")), &set(&[])).unwrap();
        assert_eq!(got, [ip("10.8.0.9")]);
        // A pool holding the gateway's address skips it.
        let low: ipnet::Ipv4Net = "10.8.0.0/30".parse().unwrap();
        assert_eq!(
            assign(v4, None, Some(low), None, &set(&[])).unwrap(),
            [ip("10.8.0.2")]
        );
        let v6 = net("fd00:8::1/64");
        let got = assign(v4, Some(v6), Some(pool), None, &set(&[])).unwrap();
        assert_eq!(got, [ip("10.8.0.129"), ip("fd00:8::2")]);
    }
}
