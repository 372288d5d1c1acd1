//! Allowed-IPs table: longest-prefix match from an address to a value (a peer
//! slot). Built once per registry change and then read-only, so lookups take no
//! lock. One hash map per populated prefix length, probed longest first: a
//! gateway's table is almost all /32 and /128 entries, so a lookup is usually a
//! single hash probe, whatever the peer count.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// Prefix length → (masked address → value), longest prefix first.
#[derive(Debug, Clone)]
struct Family<K, T> {
    levels: Vec<(u8, HashMap<K, T>)>,
}

impl<K: std::hash::Hash + Eq + Copy, T> Default for Family<K, T> {
    fn default() -> Self {
        Self { levels: Vec::new() }
    }
}

impl<K: std::hash::Hash + Eq + Copy, T> Family<K, T> {
    fn insert(&mut self, len: u8, key: K, value: T) -> Option<T> {
        let pos = match self.levels.iter().position(|(l, _)| *l <= len) {
            Some(p) if self.levels[p].0 == len => p,
            Some(p) => {
                self.levels.insert(p, (len, HashMap::new()));
                p
            }
            None => {
                self.levels.push((len, HashMap::new()));
                self.levels.len() - 1
            }
        };
        self.levels[pos].1.insert(key, value)
    }
}

fn mask_v4(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask_v6(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

/// Longest-prefix-match table over IPv4 and IPv6 networks.
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: Family<u32, T>,
    v6: Family<u128, T>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            v4: Family::default(),
            v6: Family::default(),
        }
    }
}

impl<T> AllowedIps<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `net` (host bits ignored, as the kernel does) and returns the value
    /// it replaced, if any.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                self.v4
                    .insert(len, mask_v4(u32::from(n.addr()), len), value)
            }
            IpNet::V6(n) => {
                let len = n.prefix_len();
                self.v6
                    .insert(len, mask_v6(u128::from(n.addr()), len), value)
            }
        }
    }

    /// The value of the longest prefix containing `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4
                    .levels
                    .iter()
                    .find_map(|(len, map)| map.get(&mask_v4(a, *len)))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6
                    .levels
                    .iter()
                    .find_map(|(len, map)| map.get(&mask_v6(a, *len)))
            }
        }
    }

    pub fn len(&self) -> usize {
        self.v4.levels.iter().map(|(_, m)| m.len()).sum::<usize>()
            + self.v6.levels.iter().map(|(_, m)| m.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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

    /// Longest prefix wins regardless of insertion order (boringtun/kernel cases).
    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), 'a');
        t.insert(net("10.8.0.7/32"), 'c');
        t.insert(net("10.8.0.0/24"), 'b');
        t.insert(net("::/0"), 'x');
        t.insert(net("fd00::/8"), 'y');
        t.insert(net("fd00::7/128"), 'z');
        assert_eq!(t.lookup(ip("10.8.0.7")), Some(&'c'));
        assert_eq!(t.lookup(ip("10.8.0.8")), Some(&'b'));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&'a'));
        assert_eq!(t.lookup(ip("fd00::7")), Some(&'z'));
        assert_eq!(t.lookup(ip("fd00::8")), Some(&'y'));
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(&'x'));
    }

    /// Host bits of an inserted network are ignored; re-inserting replaces.
    #[test]
    fn host_bits_masked_and_replace() {
        let mut t = AllowedIps::new();
        assert_eq!(t.insert(net("192.168.4.77/16"), 1), None);
        assert_eq!(t.lookup(ip("192.168.200.1")), Some(&1));
        assert_eq!(t.insert(net("192.168.0.0/16"), 2), Some(1));
        assert_eq!(t.lookup(ip("192.168.200.1")), Some(&2));
        assert_eq!(t.lookup(ip("192.169.0.1")), None);
        assert_eq!(t.len(), 1);
    }

    /// Families do not mix: an IPv4 default route does not answer IPv6 lookups.
    #[test]
    fn families_separate() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), 1);
        assert_eq!(t.lookup(ip("::1")), None);
        assert_eq!(t.lookup(ip("::ffff:10.0.0.1")), None);
        assert!(!t.is_empty());
    }

    /// Ten thousand host routes: each resolves to its own value.
    #[test]
    fn many_hosts() {
        let mut t = AllowedIps::new();
        for i in 0..10_000u32 {
            let a = std::net::Ipv4Addr::from(0x0a80_0000 + i);
            t.insert(IpNet::from(IpAddr::V4(a)), i);
        }
        for i in (0..10_000u32).step_by(97) {
            let a = std::net::Ipv4Addr::from(0x0a80_0000 + i);
            assert_eq!(t.lookup(IpAddr::V4(a)), Some(&i));
        }
        assert_eq!(t.lookup(ip("10.128.200.200")), None);
    }
}
