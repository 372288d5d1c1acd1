//! What every admin action does after its store transaction: append the audit
//! record, hand out the client config, tell a running daemon. And the two
//! actions that only change existing peers: `peer revoke`, `peer rotate`.
//!
//! Order and crash semantics: (1) the store commits (one transaction), (2) the
//! audit record is appended, (3) the daemon is told. A process killed between
//! (1) and (2) leaves a committed but unaudited action; the chain itself stays
//! intact because nothing was half-written to it (one `write(2)` per line, under
//! a lock). Auditing first instead would log actions that then never happened,
//! which is worse for a trail that must match the registry. A failed append is
//! reported (exit 1) after the action's output, since the store already holds
//! the change and a generated private key would otherwise be lost.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

use super::{create_new_file, unix_now, write_stdout, PeerRotateArgs};
use crate::clientconf::{self, ClientConfig};
use crate::config::Config;
use crate::control::client::{self, ClientError};
use crate::control::protocol::{control_socket_path, AdminEvent, Request, Response};
use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use crate::registry::{NewPeer, Peer, PeerName, Store};

/// Longest `--reason` accepted: it is a note, not a document.
const MAX_REASON_CHARS: usize = 200;

/// One admin action as audited and as sent to the daemon.
pub(crate) struct AdminAction {
    pub event: &'static str,
    pub actor: String,
    /// Never secrets: names, public keys, addresses, times, reasons.
    pub fields: Vec<(&'static str, Value)>,
}

impl AdminAction {
    /// `peer`, `public_key` and `actor` first, as every admin record carries
    /// them (then `sudo_user` when there is one). `actor` is whoever runs the
    /// command ([`actor`]), or `api:<peer>`.
    pub fn by(event: &'static str, peer: &Peer, actor: impl Into<Actor>) -> Self {
        let actor = actor.into();
        let mut fields = vec![
            ("peer", peer.name.as_str().into()),
            ("public_key", peer.public_key.to_base64().into()),
            ("actor", actor.name.clone().into()),
        ];
        if let Some(s) = actor.sudo_user {
            fields.push(("sudo_user", s.into()));
        }
        Self {
            event,
            fields,
            actor: actor.name,
        }
    }

    pub fn with(mut self, key: &'static str, value: impl Into<Value>) -> Self {
        self.fields.push((key, value.into()));
        self
    }

    pub(crate) fn audit_fields(&self) -> Map<String, Value> {
        self.fields
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect()
    }

    /// The control protocol carries text values: strings as they are, the rest
    /// as JSON.
    pub(crate) fn daemon_event(&self) -> AdminEvent {
        let fields: BTreeMap<String, String> = self
            .fields
            .iter()
            .filter(|(k, _)| *k != "actor")
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                ((*k).to_string(), text)
            })
            .collect();
        AdminEvent {
            event: self.event.to_string(),
            actor: self.actor.clone(),
            fields,
        }
    }
}

/// Who acts: the name recorded as `actor`, and the sudo caller, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Actor {
    pub name: String,
    /// `SUDO_USER`: an environment variable anyone can set, so only ever an
    /// extra field (`sudo_user`), never the actor itself.
    pub sudo_user: Option<String>,
}

impl From<String> for Actor {
    fn from(name: String) -> Actor {
        Actor {
            name,
            sudo_user: None,
        }
    }
}

/// Who runs this command: the user of the real uid (`uid:N` when it has no
/// name), plus the sudo caller, since root alone says nothing about who acted.
/// The daemon records the same name from the control socket's `SO_PEERCRED`.
pub(super) fn actor() -> Actor {
    let sudo_user = std::env::var("SUDO_USER")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    Actor {
        name: crate::control::server::uid_actor(nix::unistd::getuid().as_raw()),
        sudo_user,
    }
}

/// Step (2): the audit record, with the chain head in the store. Returns the
/// failure, if any.
pub(crate) fn audit(cfg: &Config, store: &Store, action: &AdminAction) -> Option<String> {
    crate::audit::writer_for(cfg)
        .and_then(|w| match w {
            Some(w) => w
                .append(store, action.event, &action.audit_fields())
                .map(drop),
            None => Ok(()),
        })
        .err()
        .map(|e| e.to_string())
}

/// A new peer as the CLI and the API ask for it, already checked.
pub(crate) struct IssueRequest {
    pub name: PeerName,
    /// `None`: generate a key pair; its private half goes only into the config.
    pub public_key: Option<PublicKey>,
    pub address: Option<IpAddr>,
    /// Resolved service names (see [`resolve_services`]).
    pub services: Vec<String>,
    /// Unix seconds: the instant `expires_at` was reckoned from, so that
    /// `--expires 8s` is 8 s after `created_at`, however long the store took.
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub psk: bool,
    pub admin: bool,
}

/// A committed and audited issue or rotation.
pub(crate) struct Issued {
    pub peer: Peer,
    pub private_key: Option<PrivateKey>,
    pub action: AdminAction,
    pub audit_error: Option<String>,
}

/// The given public key, or a fresh pair whose private half only the issued
/// config carries; never the gateway's own key.
fn key_pair(
    given: Option<PublicKey>,
    server: &PublicKey,
) -> Result<(Option<PrivateKey>, PublicKey)> {
    let (private_key, public_key) = match given {
        Some(k) => (None, k),
        None => {
            let sk = PrivateKey::generate();
            let pk = sk.public_key();
            (Some(sk), pk)
        }
    };
    if public_key == *server {
        bail!("public key {public_key} is the gateway's own public key");
    }
    Ok((private_key, public_key))
}

/// Steps (1) and (2) of `peer add`, for the CLI and the API alike.
///
/// # Errors
/// The gateway's own key, or the store's refusal (name or key taken,
/// address, ...); nothing is committed then.
pub(crate) fn issue(
    cfg: &Config,
    store: &mut Store,
    server: &PublicKey,
    req: IssueRequest,
    actor: impl Into<Actor>,
) -> Result<Issued> {
    let (private_key, public_key) = key_pair(req.public_key, server)?;
    let peer = store.add_peer(
        &cfg.interface,
        NewPeer {
            name: req.name,
            public_key,
            preshared_key: req.psk.then(PresharedKey::generate),
            address: req.address,
            services: req.services,
            created_at: req.created_at,
            expires_at: req.expires_at,
            admin: req.admin,
        },
    )?;
    let mut action = AdminAction::by("peer_added", &peer, actor)
        .with("addresses", addresses_text(&peer.addresses))
        .with("services", peer.services.join(","));
    if let Some(t) = peer.expires_at {
        action = action.with("expires_at", t);
    }
    if peer.admin {
        action = action.with("admin", true);
    }
    let audit_error = audit(cfg, store, &action);
    Ok(Issued {
        peer,
        private_key,
        action,
        audit_error,
    })
}

/// Steps (1) and (2) of `peer rotate`.
///
/// # Errors
/// The gateway's own key, or the store's refusal (unknown or revoked peer,
/// key taken or revoked).
pub(crate) fn rotate(
    cfg: &Config,
    store: &mut Store,
    server: &PublicKey,
    name: &PeerName,
    public_key: Option<PublicKey>,
    psk: bool,
    actor: impl Into<Actor>,
) -> Result<Issued> {
    let (private_key, public_key) = key_pair(public_key, server)?;
    let psk = psk.then(PresharedKey::generate);
    let (peer, old) = store.rotate_peer(name, public_key, psk, unix_now())?;
    let action = AdminAction::by("peer_rotated", &peer, actor)
        .with("old_public_key", old.to_base64())
        .with("addresses", addresses_text(&peer.addresses));
    let audit_error = audit(cfg, store, &action);
    Ok(Issued {
        peer,
        private_key,
        action,
        audit_error,
    })
}

/// Steps (1) and (2) of `peer revoke`: the revoked peer, the addresses it
/// freed, the action and the audit failure, if any.
///
/// # Errors
/// The store's refusal (unknown or already revoked peer).
pub(crate) fn revoke(
    cfg: &Config,
    store: &mut Store,
    name: &PeerName,
    reason: Option<&str>,
    actor: impl Into<Actor>,
) -> Result<(Peer, Vec<IpAddr>, AdminAction, Option<String>)> {
    let peer = store.revoke_peer(name, reason, unix_now())?;
    // Committed: a failed read now must not stop the audit record.
    let freed = store.former_addresses(name).unwrap_or_default();
    let mut action =
        AdminAction::by("peer_revoked", &peer, actor).with("addresses", addresses_text(&freed));
    if let Some(r) = reason {
        action = action.with("reason", r);
    }
    let audit_error = audit(cfg, store, &action);
    Ok((peer, freed, action, audit_error))
}

/// The wg-quick client config for `peer`.
pub(crate) fn client_config(
    cfg: &Config,
    server: &PublicKey,
    peer: &Peer,
    private_key: Option<&PrivateKey>,
    kill_switch: bool,
) -> String {
    clientconf::render(&ClientConfig {
        private_key,
        addresses: &peer.addresses,
        dns: &cfg.interface.dns,
        gateway_public_key: server,
        preshared_key: peer.preshared_key.as_ref(),
        endpoint: &cfg.interface.endpoint,
        kill_switch,
    })
}

/// Exit 1 for an action that is committed but not audited.
pub(super) fn audit_failure(what: &str, error: Option<String>) -> Result<()> {
    match error {
        None => Ok(()),
        Some(e) => bail!(
            "{what} is committed to the peer store, but its audit record could not be written: {e}"
        ),
    }
}

/// Tells a running daemon to reload now. Never fails the command: the store is
/// committed, and a daemon that missed the message still finds the change at
/// its periodic store check.
pub(super) fn notify(cfg: &Config, action: &AdminAction) {
    let socket = control_socket_path(&cfg.interface.name);
    let req = Request::Reload {
        event: Some(action.daemon_event()),
    };
    match client::request(&socket, &req) {
        Ok(Response::Reloaded { active_peers }) => eprintln!(
            "note: the daemon on {} applied the change ({active_peers} active peers)",
            socket.display()
        ),
        Ok(other) => eprintln!(
            "warning: the change is committed to the peer store, but the daemon on {} answered unexpectedly ({other:?}); it applies the change at its next store check",
            socket.display()
        ),
        Err(ClientError::NotRunning(_)) => eprintln!(
            "note: no daemon running on {}; the change takes effect at next start",
            socket.display()
        ),
        Err(e) => eprintln!(
            "warning: the change is committed to the peer store, but the daemon was not told ({e}); it applies the change at its next store check"
        ),
    }
}

/// Where an issued client config goes: `--output FILE` (created before the
/// store transaction so that an unwritable path refuses the whole action, and
/// removed again if the store refuses), stdout, and/or a QR code on stdout.
pub(super) struct ConfigSink {
    file: Option<(PathBuf, File)>,
    qr: bool,
}

impl ConfigSink {
    /// # Errors
    /// `output` exists or cannot be created.
    pub fn new(output: Option<&Path>, qr: bool) -> Result<Self> {
        let file = match output {
            Some(p) => Some((p.to_path_buf(), create_new_file(p, 0o600)?)),
            None => None,
        };
        Ok(Self { file, qr })
    }

    /// The action was refused: leave no file behind.
    pub fn discard(self) {
        if let Some((p, f)) = self.file {
            drop(f);
            let _ = std::fs::remove_file(p);
        }
    }

    /// Writes the config. With `--qr` stdout gets only the QR code (the text,
    /// private key included, goes nowhere but FILE when given).
    pub fn deliver(self, peer: &Peer, text: &str, verb: &str) -> Result<()> {
        let shown: Vec<String> = peer.addresses.iter().map(IpAddr::to_string).collect();
        if let Some((path, mut f)) = self.file {
            f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).with_context(|| {
                format!(
                    "peer `{}` was {verb} but its config could not be written to {}; rotate it to get a new config",
                    peer.name,
                    path.display()
                )
            })?;
            eprintln!(
                "{verb} peer `{}` ({}); client config written to {}",
                peer.name,
                shown.join(", "),
                path.display()
            );
            if !self.qr {
                return Ok(());
            }
        }
        if self.qr {
            return write_stdout(&qr_text(text)?);
        }
        write_stdout(text)
    }
}

/// The config as a terminal QR code: two modules per character cell (unicode
/// half blocks), light on dark so it scans from the usual dark terminal, with
/// the quiet zone the scanners need.
pub(super) fn qr_text(text: &str) -> Result<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::with_error_correction_level(text.as_bytes(), qrcode::EcLevel::L)
        .map_err(|e| anyhow!("the client config does not fit in a QR code: {e}"))?;
    let mut out = code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build();
    out.push('\n');
    Ok(out)
}

/// The gateway's public key, for issued configs and to refuse issuing it.
pub(super) fn server_public_key(cfg: &Config) -> Result<PublicKey> {
    Ok(PrivateKey::from_file(&cfg.interface.private_key_file)?.public_key())
}

pub(crate) fn addresses_text(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `--reason`: one line of printable text, so audit lines and tables stay readable.
pub(crate) fn check_reason(reason: Option<&str>) -> Result<Option<&str>> {
    let Some(r) = reason else { return Ok(None) };
    if r.trim().is_empty() {
        bail!("--reason is empty; give a short note or leave the flag out");
    }
    if r.chars().any(char::is_control) {
        bail!("--reason {r:?} contains control characters; give one line of text");
    }
    if r.chars().count() > MAX_REASON_CHARS {
        bail!("--reason is longer than {MAX_REASON_CHARS} characters");
    }
    Ok(Some(r.trim()))
}

/// `sitegate peer revoke NAME [--reason TEXT]`.
pub fn peer_revoke(config: &Path, name: &str, reason: Option<&str>) -> Result<()> {
    let name = PeerName::new(name)?;
    let reason = check_reason(reason)?;
    let cfg = Config::load(config)?;
    let mut store = Store::open_config(&cfg)?;
    let (peer, freed, action, audit) = revoke(&cfg, &mut store, &name, reason, actor())?;
    notify(&cfg, &action);
    write_stdout(&format!(
        "revoked peer `{}`: key {} is on the revocation list; address {} freed\n",
        peer.name,
        peer.public_key,
        if freed.is_empty() {
            "none".to_string()
        } else {
            addresses_text(&freed)
        }
    ))?;
    audit_failure(&format!("the revocation of `{name}`"), audit)
}

/// `sitegate peer rotate NAME [--public-key KEY]`: prints the new client config.
pub fn peer_rotate(config: &Path, a: &PeerRotateArgs) -> Result<()> {
    let name = PeerName::new(&a.name)?;
    let cfg = Config::load(config)?;
    let server = server_public_key(&cfg)?;
    let given = match a.public_key.as_deref() {
        Some(k) => Some(PublicKey::from_base64(k).map_err(|e| anyhow!("--public-key {e}"))?),
        None => None,
    };
    let mut store = Store::open_config(&cfg)?;
    let sink = ConfigSink::new(a.delivery.output.as_deref(), a.delivery.qr)?;
    let rotated = rotate(
        &cfg,
        &mut store,
        &server,
        &name,
        given,
        !a.delivery.no_psk,
        actor(),
    );
    let issued = match rotated {
        Ok(r) => r,
        Err(e) => {
            sink.discard();
            return Err(e);
        }
    };
    notify(&cfg, &issued.action);
    let text = client_config(
        &cfg,
        &server,
        &issued.peer,
        issued.private_key.as_ref(),
        a.delivery.kill_switch,
    );
    sink.deliver(&issued.peer, &text, "rotated")?;
    audit_failure(&format!("the rotation of `{name}`"), issued.audit_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The QR code is made of half blocks and spaces only, one row per two modules.
    #[test]
    fn qr_is_half_blocks() {
        let q = qr_text("[Interface]\nAddress = 10.8.0.2/32\n").unwrap();
        assert!(q
            .chars()
            .all(|c| matches!(c, ' ' | '\u{2580}' | '\u{2584}' | '\u{2588}' | '\n')));
        assert!(q.contains('\u{2588}'));
        let widths: Vec<usize> = q.lines().map(|l| l.chars().count()).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{widths:?}");
    }

    /// Reasons are one printable line of bounded length.
    #[test]
    fn reasons() {
        assert_eq!(check_reason(None).unwrap(), None);
        assert_eq!(check_reason(Some(" lost ")).unwrap(), Some("lost"));
        for bad in ["", "  ", "a\nb", &"x".repeat(201)] {
            assert!(check_reason(Some(bad)).is_err(), "{bad:?}");
        }
    }

    /// The daemon event carries the fields as text, and the actor apart.
    #[test]
    fn daemon_event_fields() {
        let a = AdminAction {
            event: "peer_added",
            actor: "root".into(),
            fields: vec![
                ("peer", "alice".into()),
                ("actor", "root".into()),
                ("expires_at", 17.into()),
            ],
        };
        let e = a.daemon_event();
        assert_eq!(e.actor, "root");
        assert_eq!(e.fields.get("expires_at").map(String::as_str), Some("17"));
        assert!(!e.fields.contains_key("actor"));
        assert_eq!(a.audit_fields()["actor"], "root");
    }
}
