//! The wg-quick client config an issued peer receives (pure rendering).
//!
//! Always one `[Peer]` with `AllowedIPs = 0.0.0.0/0, ::/0`: full tunnel, no split
//! routes (which is also what engages the Windows client's own kill switch).

use std::fmt::Write;
use std::net::IpAddr;

use crate::keys::{PresharedKey, PrivateKey, PublicKey};

/// wg-quick `PersistentKeepalive`, keeping NAT mappings at remote sites open.
pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;

/// Linux kill switch for wg-quick: reject any traffic that leaves outside the
/// tunnel (not via the WireGuard interface, not the tunnel's own encrypted
/// packets — marked with its fwmark — and not to a local address).
const KILL_SWITCH_RULE: &str =
    "OUTPUT ! -o %i -m mark ! --mark $(wg show %i fwmark) -m addrtype ! --dst-type LOCAL -j REJECT";

/// Everything a client config holds.
#[derive(Debug)]
pub struct ClientConfig<'a> {
    /// Only when sitegate generated the key pair.
    pub private_key: Option<&'a PrivateKey>,
    /// The peer's tunnel host addresses (rendered /32, /128).
    pub addresses: &'a [IpAddr],
    pub dns: &'a [IpAddr],
    pub gateway_public_key: &'a PublicKey,
    pub preshared_key: Option<&'a PresharedKey>,
    /// `HOST:PORT` from `[interface] endpoint`.
    pub endpoint: &'a str,
    /// Add `PostUp`/`PreDown` lines rejecting traffic outside the tunnel (Linux).
    pub kill_switch: bool,
}

/// Renders the config in wg-quick format, ending with a newline.
pub fn render(c: &ClientConfig<'_>) -> String {
    let mut out = String::from("[Interface]\n");
    // `write!` to a String cannot fail.
    if let Some(k) = c.private_key {
        let _ = writeln!(out, "PrivateKey = {}", k.to_base64());
    }
    let addrs: Vec<String> = c
        .addresses
        .iter()
        .map(|a| match a {
            IpAddr::V4(a) => format!("{a}/32"),
            IpAddr::V6(a) => format!("{a}/128"),
        })
        .collect();
    let _ = writeln!(out, "Address = {}", addrs.join(", "));
    if !c.dns.is_empty() {
        let dns: Vec<String> = c.dns.iter().map(IpAddr::to_string).collect();
        let _ = writeln!(out, "DNS = {}", dns.join(", "));
    }
    if c.kill_switch {
        let _ = writeln!(
            out,
            "PostUp = iptables -I {KILL_SWITCH_RULE} && ip6tables -I {KILL_SWITCH_RULE}"
        );
        let _ = writeln!(
            out,
            "PreDown = iptables -D {KILL_SWITCH_RULE} && ip6tables -D {KILL_SWITCH_RULE}"
        );
    }
    out.push_str("\n[Peer]\n");
    let _ = writeln!(out, "PublicKey = {}", c.gateway_public_key.to_base64());
    if let Some(psk) = c.preshared_key {
        let _ = writeln!(out, "PresharedKey = {}", psk.to_base64());
    }
    let _ = writeln!(out, "Endpoint = {}", c.endpoint);
    out.push_str("AllowedIPs = 0.0.0.0/0, ::/0\n");
    let _ = writeln!(out, "PersistentKeepalive = {PERSISTENT_KEEPALIVE_SECS}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SK: &str = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
    const GW: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    const PSK: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

    /// A generated key pair with PSK and DNS renders exactly the spec's lines.
    #[test]
    fn golden_full() {
        let sk = PrivateKey::from_base64(SK).unwrap();
        let gw = PublicKey::from_base64(GW).unwrap();
        let psk = PresharedKey::from_base64(PSK).unwrap();
        let addrs = ["10.8.0.7".parse().unwrap(), "fd00:8::7".parse().unwrap()];
        let dns = ["10.8.0.1".parse().unwrap()];
        let text = render(&ClientConfig {
            private_key: Some(&sk),
            addresses: &addrs,
            dns: &dns,
            gateway_public_key: &gw,
            preshared_key: Some(&psk),
            endpoint: "vpn.example.org:51820",
            kill_switch: false,
        });
        assert_eq!(
            text,
            "[Interface]
PrivateKey = dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=
Address = 10.8.0.7/32, fd00:8::7/128
DNS = 10.8.0.1

[Peer]
PublicKey = hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=
PresharedKey = AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=
Endpoint = vpn.example.org:51820
AllowedIPs = 0.0.0.0/0, ::/0
PersistentKeepalive = 25
"
        );
    }

    /// With the admin's own key, no PSK and no DNS, those lines are absent.
    #[test]
    fn golden_minimal() {
        let gw = PublicKey::from_base64(GW).unwrap();
        let addrs = ["10.8.0.2".parse().unwrap()];
        let text = render(&ClientConfig {
            private_key: None,
            addresses: &addrs,
            dns: &[],
            gateway_public_key: &gw,
            preshared_key: None,
            endpoint: "[2001:db8::1]:51820",
            kill_switch: false,
        });
        assert_eq!(
            text,
            "[Interface]
Address = 10.8.0.2/32

[Peer]
PublicKey = hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=
Endpoint = [2001:db8::1]:51820
AllowedIPs = 0.0.0.0/0, ::/0
PersistentKeepalive = 25
"
        );
    }

    /// The kill switch adds matching PostUp/PreDown lines for IPv4 and IPv6 in [Interface].
    #[test]
    fn kill_switch_lines() {
        let gw = PublicKey::from_base64(GW).unwrap();
        let addrs = ["10.8.0.2".parse().unwrap()];
        let text = render(&ClientConfig {
            private_key: None,
            addresses: &addrs,
            dns: &[],
            gateway_public_key: &gw,
            preshared_key: None,
            endpoint: "h:1",
            kill_switch: true,
        });
        let iface = text.split("[Peer]").next().unwrap();
        let up = iface
            .lines()
            .find(|l| l.starts_with("PostUp = iptables -I OUTPUT ! -o %i"))
            .unwrap();
        let down = iface
            .lines()
            .find(|l| l.starts_with("PreDown = iptables -D OUTPUT ! -o %i"))
            .unwrap();
        assert!(up.contains("&& ip6tables -I OUTPUT") && down.contains("&& ip6tables -D OUTPUT"));
        assert_eq!(
            up.replace(" -I ", " -D ")["PostUp".len()..],
            down["PreDown".len()..]
        );
    }
}
