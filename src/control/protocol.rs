//! The admin control protocol on `/run/sitegate/NAME.sock`: one JSON request
//! line, one JSON response line. Admin commands commit to the store first, then
//! send [`Request::Reload`] so the daemon applies the change at once; the
//! daemon's periodic store check is only the safety net.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Directory of control sockets (root only).
pub const CONTROL_DIR: &str = "/run/sitegate";

pub fn control_socket_path(interface: &str) -> std::path::PathBuf {
    std::path::Path::new(CONTROL_DIR).join(format!("{interface}.sock"))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Re-read the peer store now. `event` is the admin action that changed it;
    /// the daemon logs it (the CLI has already appended it to the audit log).
    Reload {
        #[serde(default)]
        event: Option<AdminEvent>,
    },
    /// The live view of every peer.
    Status {},
}

/// An admin action, as logged: `event` is `peer_added`, `peer_revoked`,
/// `peer_rotated`, …; `fields` carries `peer`, `reason`, etc.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdminEvent {
    pub event: String,
    pub actor: String,
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// The reload is applied: sessions of removed peers are already closed.
    Reloaded {
        active_peers: usize,
    },
    Status(StatusView),
    Error {
        message: String,
    },
}

/// The daemon's live state (`sitegate status --json`, merged into `peer list`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusView {
    pub interface: String,
    pub public_key: String,
    pub listen_port: u16,
    /// Unix seconds.
    pub started_at: i64,
    /// Datagrams the data plane failed to send since start (no route, full
    /// socket buffer, ...): each is a packet lost on the way to a site.
    #[serde(default)]
    pub udp_send_errors: u64,
    /// TUN write passes (one per received batch) that failed since start,
    /// wholly or in part: decrypted packets lost on the way to the host.
    #[serde(default)]
    pub tun_write_errors: u64,
    pub peers: Vec<PeerLive>,
}

/// One active peer as the data plane sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerLive {
    pub name: String,
    pub public_key: String,
    pub addresses: Vec<String>,
    pub endpoint: Option<String>,
    /// Unix seconds of the latest handshake, while a session exists.
    pub latest_handshake: Option<i64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub session: bool,
    /// Unix seconds, when the peer expires.
    pub expires_at: Option<i64>,
    /// Denied packets by reason since start.
    pub denied: BTreeMap<String, u64>,
    /// IPv6 link-local/multicast packets dropped without an event.
    pub noise_dropped: u64,
    /// IPv6 packets dropped because the gateway has no IPv6 tunnel address.
    #[serde(default)]
    pub ipv6_dropped: u64,
    /// Unix seconds when internet-bound traffic last came through the tunnel
    /// (to within a second); `None`: not since the daemon started. The honest
    /// answer to "is this site bypassing the tunnel?".
    #[serde(default)]
    pub internet_seen_at: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests have a stable wire form; unknown fields are refused.
    #[test]
    fn request_wire_form() {
        let r = Request::Reload {
            event: Some(AdminEvent {
                event: "peer_revoked".into(),
                actor: "uid:0(root)".into(),
                fields: [("peer".to_string(), "alpha".to_string())].into(),
            }),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"cmd":"reload","event":{"event":"peer_revoked","actor":"uid:0(root)","fields":{"peer":"alpha"}}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(),
            Request::Status {}
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"status","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"drop_tables"}"#).is_err());
    }
}
