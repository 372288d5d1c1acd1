//! `peer list`, `peer show`, `status`: the registry merged with the daemon's
//! live view when one runs. JSON is the stable interface (Unix seconds, fixed
//! member names, `live: null` without a daemon); tables are for people (RFC 3339).

use std::net::IpAddr;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::{format_time, unix_now, write_stdout};
use crate::config::Config;
use crate::control::client::{self, ClientError};
use crate::control::protocol::{control_socket_path, PeerLive, Request, Response, StatusView};
use crate::registry::{Peer, PeerName, Store};

/// What the control socket said.
enum Live {
    Running(StatusView),
    NotRunning,
    /// A daemon may run but could not be asked (permissions, timeout, bad reply).
    Unknown(String),
}

fn ask_daemon(cfg: &Config) -> Live {
    let socket = control_socket_path(&cfg.interface.name);
    match client::request(&socket, &Request::Status {}) {
        Ok(Response::Status(v)) => Live::Running(v),
        Ok(other) => Live::Unknown(format!("unexpected reply {other:?}")),
        Err(ClientError::NotRunning(_)) => Live::NotRunning,
        Err(e) => Live::Unknown(e.to_string()),
    }
}

/// The daemon's view, or none (with a warning when it could not be asked).
fn live_view(cfg: &Config) -> Option<StatusView> {
    match ask_daemon(cfg) {
        Live::Running(v) => Some(v),
        Live::NotRunning => None,
        Live::Unknown(e) => {
            eprintln!("warning: showing the registry only; the daemon could not be asked: {e}");
            None
        }
    }
}

fn state(p: &Peer, now: i64) -> &'static str {
    p.lifecycle(now).as_str()
}

/// A registry peer and its live state, matched by public key (a peer rotated a
/// moment ago has no live state under its new key yet).
struct Row<'a> {
    peer: &'a Peer,
    former: Vec<IpAddr>,
    live: Option<&'a PeerLive>,
}

fn rows<'a>(
    store: &Store,
    peers: &'a [Peer],
    view: Option<&'a StatusView>,
) -> Result<Vec<Row<'a>>> {
    peers
        .iter()
        .map(|p| {
            let former = if p.revoked_at.is_some() {
                store.former_addresses(&p.name)?
            } else {
                Vec::new()
            };
            let key = p.public_key.to_base64();
            let live = view.and_then(|v| v.peers.iter().find(|l| l.public_key == key));
            Ok(Row {
                peer: p,
                former,
                live,
            })
        })
        .collect()
}

fn addrs(a: &[IpAddr]) -> Vec<String> {
    a.iter().map(IpAddr::to_string).collect()
}

/// The stable JSON form of one peer (`peer list --json` elements, `peer show --json`).
fn peer_json(r: &Row<'_>, now: i64) -> Value {
    let p = r.peer;
    json!({
        "name": p.name.as_str(),
        "public_key": p.public_key.to_base64(),
        "addresses": addrs(&p.addresses),
        "former_addresses": addrs(&r.former),
        "services": p.services,
        "admin": p.admin,
        "preshared_key": p.preshared_key.is_some(),
        "created_at": p.created_at,
        "expires_at": p.expires_at,
        "revoked_at": p.revoked_at,
        "revoked_reason": p.revoked_reason,
        "state": state(p, now),
        "live": r.live.map(|l| json!({
            "endpoint": l.endpoint,
            "latest_handshake": l.latest_handshake,
            "rx_bytes": l.rx_bytes,
            "tx_bytes": l.tx_bytes,
            "session": l.session,
            "expires_at": l.expires_at,
            "denied": l.denied,
            "noise_dropped": l.noise_dropped,
            "ipv6_dropped": l.ipv6_dropped,
            "internet_seen_at": l.internet_seen_at,
        })),
    })
}

/// The JSON objects of `peer list --json` for `peers`, with live state from
/// `view`: one shape for the CLI and the admin API.
///
/// # Errors
/// A store read fails.
pub(crate) fn peer_values(
    store: &Store,
    peers: &[Peer],
    view: Option<&StatusView>,
    now: i64,
) -> Result<Vec<Value>> {
    Ok(rows(store, peers, view)?
        .iter()
        .map(|r| peer_json(r, now))
        .collect())
}

fn print_json(v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).context("cannot render JSON")?;
    write_stdout(&format!("{text}\n"))
}

/// `sitegate peer list [--json]`.
pub fn peer_list(config: &Path, json: bool) -> Result<()> {
    let cfg = Config::load(config)?;
    let store = Store::open_config(&cfg)?;
    let peers = store.peers()?;
    let view = live_view(&cfg);
    let rows = rows(&store, &peers, view.as_ref())?;
    let now = unix_now();
    if json {
        return print_json(&Value::Array(
            rows.iter().map(|r| peer_json(r, now)).collect(),
        ));
    }
    let mut header = vec![
        "NAME",
        "ADDRESSES",
        "PUBLIC KEY",
        "CREATED",
        "EXPIRES",
        "STATE",
    ];
    if view.is_some() {
        header.extend(["ENDPOINT", "HANDSHAKE", "RX", "TX", "INTERNET SEEN"]);
    }
    let mut table = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for r in &rows {
        let p = r.peer;
        let addresses = if p.revoked_at.is_some() && !r.former.is_empty() {
            format!("({})", addrs(&r.former).join(","))
        } else {
            addrs(&p.addresses).join(",")
        };
        let mut row = vec![
            p.name.to_string(),
            addresses,
            p.public_key.to_base64(),
            format_time(p.created_at),
            p.expires_at.map_or("never".into(), format_time),
            state(p, now).to_string(),
        ];
        if view.is_some() {
            match r.live {
                Some(l) => row.extend([
                    l.endpoint.clone().unwrap_or_else(|| "-".into()),
                    l.latest_handshake.map_or("-".into(), format_time),
                    bytes(l.rx_bytes),
                    bytes(l.tx_bytes),
                    internet_seen(l.internet_seen_at),
                ]),
                None => row.extend(["-", "-", "-", "-", "-"].map(String::from)),
            }
        }
        table.push(row);
    }
    write_stdout(&render_table(&table))
}

/// `sitegate peer show NAME [--json]`.
pub fn peer_show(config: &Path, name: &str, json: bool) -> Result<()> {
    let name = PeerName::new(name)?;
    let cfg = Config::load(config)?;
    let store = Store::open_config(&cfg)?;
    let peer = store
        .peer(&name)?
        .ok_or_else(|| anyhow!("no peer named `{name}`"))?;
    let view = live_view(&cfg);
    let peers = [peer];
    let rows = rows(&store, &peers, view.as_ref())?;
    let Some(r) = rows.first() else {
        bail!("no peer named `{name}`");
    };
    let now = unix_now();
    if json {
        return print_json(&peer_json(r, now));
    }
    let p = r.peer;
    let mut out = format!("peer: {}\n", p.name);
    let mut line = |k: &str, v: String| out.push_str(&format!("  {k}: {v}\n"));
    line("state", state(p, now).into());
    line("public key", p.public_key.to_base64());
    line(
        "preshared key",
        if p.preshared_key.is_some() {
            "yes"
        } else {
            "no"
        }
        .into(),
    );
    if p.revoked_at.is_none() {
        line("addresses", addrs(&p.addresses).join(", "));
    }
    line(
        "services",
        if p.services.is_empty() {
            "none".into()
        } else {
            p.services.join(", ")
        },
    );
    line("admin", if p.admin { "yes" } else { "no" }.into());
    line("created", format_time(p.created_at));
    line("expires", p.expires_at.map_or("never".into(), format_time));
    if let Some(t) = p.revoked_at {
        line("revoked", format_time(t));
        line(
            "revoked reason",
            p.revoked_reason
                .clone()
                .unwrap_or_else(|| "none given".into()),
        );
        line("former addresses", addrs(&r.former).join(", "));
    }
    match (view.is_some(), r.live) {
        (_, Some(l)) => {
            line(
                "endpoint",
                l.endpoint.clone().unwrap_or_else(|| "none".into()),
            );
            line(
                "latest handshake",
                l.latest_handshake.map_or("none".into(), format_time),
            );
            line(
                "transfer",
                format!("{} received, {} sent", bytes(l.rx_bytes), bytes(l.tx_bytes)),
            );
            line("session", if l.session { "up" } else { "none" }.into());
            line("internet seen", internet_seen(l.internet_seen_at));
            if !l.denied.is_empty() {
                let d: Vec<String> = l.denied.iter().map(|(k, n)| format!("{k} {n}")).collect();
                line("denied packets", d.join(", "));
            }
        }
        (true, None) => line("live", "not loaded by the running daemon".into()),
        (false, None) => line("live", "no daemon running".into()),
    }
    write_stdout(&out)
}

/// `sitegate status [--json]`: exit 1 when no daemon runs; with `--json` stdout
/// then still gets `{"running": false, "socket": ...}` so scripts can parse it.
pub fn status(config: &Path, json: bool) -> Result<()> {
    let cfg = Config::load(config)?;
    let socket = control_socket_path(&cfg.interface.name);
    let view = match ask_daemon(&cfg) {
        Live::Running(v) => v,
        Live::NotRunning => {
            if json {
                print_json(&json!({"running": false, "socket": socket.display().to_string()}))?;
            }
            bail!("no daemon running on {}", socket.display());
        }
        Live::Unknown(e) => bail!("cannot ask the daemon on {}: {e}", socket.display()),
    };
    if json {
        let mut v = serde_json::to_value(&view).context("cannot render JSON")?;
        if let Value::Object(m) = &mut v {
            m.insert("running".into(), Value::Bool(true));
        }
        return print_json(&v);
    }
    let mut out = format!(
        "interface: {}\n  public key: {}\n  listening port: {}\n  started: {}\n  active peers: {}\n  udp send errors: {}\n  tun write errors: {}\n",
        view.interface,
        view.public_key,
        view.listen_port,
        format_time(view.started_at),
        view.peers.len(),
        view.udp_send_errors,
        view.tun_write_errors,
    );
    for p in &view.peers {
        out.push_str(&format!("\npeer: {} ({})\n", p.name, p.public_key));
        if let Some(e) = &p.endpoint {
            out.push_str(&format!("  endpoint: {e}\n"));
        }
        out.push_str(&format!("  allowed ips: {}\n", p.addresses.join(", ")));
        if let Some(t) = p.latest_handshake {
            out.push_str(&format!("  latest handshake: {}\n", format_time(t)));
        }
        out.push_str(&format!(
            "  transfer: {} received, {} sent\n",
            bytes(p.rx_bytes),
            bytes(p.tx_bytes)
        ));
        out.push_str(&format!(
            "  internet seen: {}\n",
            internet_seen(p.internet_seen_at)
        ));
        if let Some(t) = p.expires_at {
            out.push_str(&format!("  expires: {}\n", format_time(t)));
        }
        if !p.denied.is_empty() {
            let d: Vec<String> = p.denied.iter().map(|(k, n)| format!("{k} {n}")).collect();
            out.push_str(&format!("  denied packets: {}\n", d.join(", ")));
        }
    }
    write_stdout(&out)
}

/// Whether (and when last) internet-bound traffic came through the tunnel:
/// "no" says the site has not used the tunnel for the internet since the
/// daemon started, which is what a site routing around it looks like.
fn internet_seen(at: Option<i64>) -> String {
    at.map_or("no".into(), |t| format!("yes, last {}", format_time(t)))
}

/// Byte counts the way `wg show` prints them.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// Left-aligned columns two spaces apart, no trailing blanks.
fn render_table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte counts use binary units with two decimals past 1 KiB.
    #[test]
    fn byte_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(5 << 30), "5.00 GiB");
    }

    /// Tables pad every column to its widest cell and trim line ends.
    #[test]
    fn table_layout() {
        let t = render_table(&[
            vec!["A".into(), "BB".into()],
            vec!["ccc".into(), "d".into()],
        ]);
        assert_eq!(t, "A    BB\nccc  d\n");
    }
}
