//! The WireGuard cross-platform userspace API (`get=1`) rendered as text, so
//! stock `wg show NAME` reads a running gateway. Pure: the socket lives in
//! [`super::serve_uapi_client`].

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use zeroize::Zeroizing;

use crate::keys::{PresharedKey, PrivateKey, KEY_LEN};

/// Interface-level state as UAPI reports it. Secrets stay in their zeroizing
/// key types; the rendered text is zeroized on drop too.
#[derive(Debug, Clone)]
pub struct InterfaceView {
    pub private_key: PrivateKey,
    pub listen_port: u16,
    pub peers: Vec<PeerView>,
}

/// One peer as UAPI reports it.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub public_key: [u8; KEY_LEN],
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<SocketAddr>,
    /// Wall-clock time of the latest handshake since the Unix epoch.
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub addresses: Vec<IpAddr>,
}

/// `errno=` value returned for `set=1`: peers are managed with `sitegate peer …`,
/// so a stock `wg set` is refused rather than silently diverging from the store.
pub const SET_ERRNO: i32 = libc::EPERM;

/// Upper bound of one peer's lines without its `allowed_ip` lines.
const PEER_TEXT: usize = 512;
/// Upper bound of one `allowed_ip=` line.
const ALLOWED_IP_TEXT: usize = 64;

/// Renders the reply to `get=1`, ending with `errno=0` and a blank line. The
/// buffer is sized up front so it never reallocates (a reallocation would leave
/// a copy of the keys behind), and keys are hex-encoded straight into it.
pub fn render_get(view: &InterfaceView) -> Zeroizing<String> {
    let cap = 256
        + view
            .peers
            .iter()
            .map(|p| PEER_TEXT + p.addresses.len() * ALLOWED_IP_TEXT)
            .sum::<usize>();
    let mut out = Zeroizing::new(String::with_capacity(cap));
    // Writing to a String cannot fail.
    out.push_str("private_key=");
    push_hex(&mut out, view.private_key.as_bytes());
    out.push('\n');
    let _ = writeln!(out, "listen_port={}", view.listen_port);
    for p in &view.peers {
        let _ = writeln!(out, "public_key={}", hex::encode(p.public_key));
        if let Some(psk) = &p.preshared_key {
            out.push_str("preshared_key=");
            push_hex(&mut out, psk.as_bytes());
            out.push('\n');
        }
        let _ = writeln!(out, "protocol_version=1");
        if let Some(ep) = p.endpoint {
            let _ = writeln!(out, "endpoint={ep}");
        }
        let hs = p.last_handshake.unwrap_or_default();
        let _ = writeln!(out, "last_handshake_time_sec={}", hs.as_secs());
        let _ = writeln!(out, "last_handshake_time_nsec={}", hs.subsec_nanos());
        let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(out, "persistent_keepalive_interval=0");
        for a in &p.addresses {
            let len = if a.is_ipv4() { 32 } else { 128 };
            let _ = writeln!(out, "allowed_ip={a}/{len}");
        }
    }
    out.push_str("errno=0\n\n");
    debug_assert!(out.len() <= cap, "the get=1 buffer grew");
    out
}

/// Lower-case hex without an intermediate String.
fn push_hex(out: &mut String, bytes: &[u8; KEY_LEN]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
}

/// Renders an error-only reply (`errno=N` and a blank line).
pub fn render_errno(errno: i32) -> String {
    format!("errno={errno}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden reply: field order and spelling as wireguard-go emits them.
    #[test]
    fn golden_get() {
        let view = InterfaceView {
            private_key: PrivateKey::from_base64(&base64_of([1; 32])).unwrap(),
            listen_port: 51820,
            peers: vec![
                PeerView {
                    public_key: [2; 32],
                    preshared_key: Some(PresharedKey::from_bytes([3; 32])),
                    endpoint: Some("192.0.2.7:40000".parse().unwrap()),
                    last_handshake: Some(Duration::new(1_700_000_000, 5)),
                    rx_bytes: 10,
                    tx_bytes: 20,
                    addresses: vec!["10.8.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
                },
                PeerView {
                    public_key: [4; 32],
                    preshared_key: None,
                    endpoint: None,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    addresses: vec!["10.8.0.3".parse().unwrap()],
                },
            ],
        };
        let h = |b: u8| hex::encode([b; 32]);
        let expected = format!(
            "private_key={}\nlisten_port=51820\n\
             public_key={}\npreshared_key={}\nprotocol_version=1\nendpoint=192.0.2.7:40000\n\
             last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\ntx_bytes=20\nrx_bytes=10\n\
             persistent_keepalive_interval=0\nallowed_ip=10.8.0.2/32\nallowed_ip=fd00::2/128\n\
             public_key={}\nprotocol_version=1\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n\
             tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\nallowed_ip=10.8.0.3/32\n\
             errno=0\n\n",
            h(1),
            h(2),
            h(3),
            h(4)
        );
        let text = render_get(&view);
        assert_eq!(*text, expected);
        assert!(text.capacity() >= text.len());
    }

    fn base64_of(b: [u8; 32]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    /// Error replies end with a blank line so `wg` stops reading.
    #[test]
    fn errno_reply() {
        assert_eq!(render_errno(1), "errno=1\n\n");
    }
}
