//! `/proc/net/{tcp,tcp6,udp,udp6}` parsed (pure), so `sitegate check` sees
//! which local addresses hold a service's port without `ss` or netlink.
//!
//! Each row's `local_address` is `ADDR:PORT` in hex. The kernel prints the
//! address as the raw 32-bit words of the in-memory (network-order) address,
//! formatted as host integers: on little-endian hosts `10.8.0.1` reads
//! `0100080A`. Converting each word back with `to_ne_bytes` undoes that on any
//! host. The port is printed as a number (`0016` = 22).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The `st` column of a listening TCP socket (`TCP_LISTEN`).
pub const TCP_LISTEN: u8 = 0x0A;

/// One socket row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSocket {
    pub local: SocketAddr,
    /// The kernel's TCP state number (UDP sockets reuse the numbering).
    pub state: u8,
}

/// A row that does not have the layout described above.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct ParseError {
    /// 1-based, counting the header.
    pub line: usize,
    pub what: &'static str,
}

/// Parses a whole table; the header line (`sl local_address ...`) is skipped.
///
/// # Errors
/// The first row without a readable local address or state.
pub fn parse(text: &str) -> Result<Vec<ProcSocket>, ParseError> {
    let mut out = Vec::new();
    for (i, row) in text.lines().enumerate() {
        let line = i + 1;
        let mut cols = row.split_whitespace();
        let Some(first) = cols.next() else {
            continue;
        };
        if first == "sl" {
            continue;
        }
        let bad = |what| ParseError { line, what };
        let local = cols.next().ok_or(bad("no local address"))?;
        let _remote = cols.next().ok_or(bad("no remote address"))?;
        let state = cols.next().ok_or(bad("no state"))?;
        let state = u8::from_str_radix(state, 16).map_err(|_| bad("state is not hex"))?;
        let local = parse_addr(local).ok_or(bad("local address is not ADDR:PORT in hex"))?;
        out.push(ProcSocket { local, state });
    }
    Ok(out)
}

/// `0100080A:0016` → 10.8.0.1:22; 32 hex digits for IPv6.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    if port.len() != 4 {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// An IPv4-mapped IPv6 address (`::ffff:10.8.0.1`, how a dual-stack socket
/// shows an IPv4 bind in tcp6) as the IPv4 address it stands for.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    // Rows as a little-endian kernel prints them (trailing columns shortened).
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100080A:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0
   1: 00000000:20FB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31338 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0101A8C0:D431 01 00000000:00000000 00:00000000 00000000     0        0 31339 1 0000000000000000 20 4 30 10 -1
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100080A:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 100 0 0 10 0
   2: 080000FD000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4244 1 0000000000000000 100 0 0 10 0
";

    /// IPv4 rows: addresses and ports decode, the state is kept.
    #[test]
    fn tcp_rows() {
        let s = parse(TCP).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].local, "10.8.0.1:22".parse().unwrap());
        assert_eq!(s[0].state, TCP_LISTEN);
        assert_eq!(s[1].local, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(s[2].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s[2].state, 0x01);
    }

    /// IPv6 rows: the wildcard, an IPv4-mapped bind and a ULA decode.
    #[test]
    fn tcp6_rows() {
        let s = parse(TCP6).unwrap();
        assert_eq!(s[0].local, "[::]:22".parse().unwrap());
        assert_eq!(s[1].local, "[::ffff:10.8.0.1]:22".parse().unwrap());
        assert_eq!(
            canonical(s[1].local.ip()),
            "10.8.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(s[2].local, "[fd00:8::1]:443".parse().unwrap());
        assert_eq!(canonical(s[2].local.ip()), s[2].local.ip());
    }

    /// UDP rows (state 07, unconnected) parse the same way; an empty table is no error.
    #[test]
    fn udp_rows_and_empty() {
        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1234: 0100080A:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 555 2 0000000000000000 0
";
        let s = parse(udp).unwrap();
        assert_eq!(s[0].local, "10.8.0.1:53".parse().unwrap());
        assert_eq!(s[0].state, 0x07);
        assert!(parse("  sl  local_address rem_address   st\n")
            .unwrap()
            .is_empty());
        assert!(parse("").unwrap().is_empty());
    }

    /// Malformed rows are refused with their line number, never skipped.
    #[test]
    fn malformed_rows() {
        for (row, what) in [
            ("   0: 0100080A:0016", "no remote address"),
            ("   0: 0100080A:0016 00000000:0000", "no state"),
            ("   0: 0100080A:0016 00000000:0000 ZZ", "state is not hex"),
            (
                "   0: 0100080A 00000000:0000 0A",
                "local address is not ADDR:PORT in hex",
            ),
            (
                "   0: 0100080:0016 00000000:0000 0A",
                "local address is not ADDR:PORT in hex",
            ),
            (
                "   0: 0100080A:16 00000000:0000 0A",
                "local address is not ADDR:PORT in hex",
            ),
            (
                "   0: 0100080G:0016 00000000:0000 0A",
                "local address is not ADDR:PORT in hex",
            ),
        ] {
            let text = format!("  sl  local_address\n{row}\n");
            assert_eq!(parse(&text), Err(ParseError { line: 2, what }), "{row}");
        }
    }
}
