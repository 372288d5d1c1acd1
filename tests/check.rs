//! `sitegate check` against real setups in network namespaces: it passes on a
//! sound setup (daemon down and up) and fails, naming the cause, on each fault
//! it is there to catch. `check` runs inside the gateway's namespace, because
//! `/proc/net/tcp` and the nftables table are per namespace.
//!
//! Needs root, `/dev/net/tun`, wireguard-go, wireguard-tools and nftables;
//! without them a test prints a skip note, except under `CI=true`, where it fails.

mod common;

use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;

/// What one `sitegate check` printed.
struct Checked {
    code: Option<i32>,
    lines: Vec<String>,
    stderr: String,
}

impl Checked {
    /// Lines starting `STATUS check:` whose detail contains every one of `parts`.
    fn find(&self, status: &str, check: &str, parts: &[&str]) -> Vec<&str> {
        let head = format!("{status} {check}: ");
        self.lines
            .iter()
            .filter(|l| l.starts_with(&head) && parts.iter().all(|p| l.contains(p)))
            .map(String::as_str)
            .collect()
    }

    /// Asserts that exactly one such line exists and returns it.
    fn one(&self, status: &str, check: &str, parts: &[&str]) -> &str {
        let found = self.find(status, check, parts);
        assert_eq!(
            found.len(),
            1,
            "expected one `{status} {check}` line containing {parts:?}:\n{self}"
        );
        found[0]
    }

    fn fails(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| l.starts_with("FAIL "))
            .map(String::as_str)
            .collect()
    }

    /// Every line is a verdict except the last, the summary.
    fn assert_shape(&self) {
        let (last, verdicts) = self.lines.split_last().expect("some output");
        assert!(last.starts_with("summary: "), "no summary line:\n{self}");
        for l in verdicts {
            assert!(
                ["PASS ", "WARN ", "FAIL "].iter().any(|s| l.starts_with(s)),
                "not a verdict line `{l}`:\n{self}"
            );
        }
        let fails = self.fails().len();
        assert!(last.ends_with(&format!(", {fails} fail")), "{self}");
        assert_eq!(self.code, Some(if fails == 0 { 0 } else { 1 }), "{self}");
    }

    /// Exit 0, no FAIL line.
    fn assert_ok(&self) {
        self.assert_shape();
        assert!(self.fails().is_empty(), "unexpected FAIL:\n{self}");
    }

    /// Exit 1, and every FAIL line is one of `expected` (check names).
    fn assert_fails_only(&self, expected: &[&str]) {
        self.assert_shape();
        assert_eq!(self.code, Some(1), "{self}");
        for f in self.fails() {
            assert!(
                expected
                    .iter()
                    .any(|c| f.starts_with(&format!("FAIL {c}: "))),
                "unexpected FAIL `{f}`:\n{self}"
            );
        }
    }
}

impl std::fmt::Display for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n{}\nstderr: {}",
            self.code,
            self.lines.join("\n"),
            self.stderr
        )
    }
}

/// `ip netns exec NS sitegate --config CONFIG check`.
fn check(ns: &Netns, gw: &Gateway) -> Checked {
    let out = run(ns
        .cmd(&[sitegate_bin(), "--config"])
        .arg(&gw.config)
        .arg("check"));
    Checked {
        code: out.status.code(),
        lines: String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `text` without the section whose header line is exactly `header`.
fn without_section(text: &str, header: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        if line.starts_with('[') {
            skipping = line.trim() == header;
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert_ne!(out, text, "no section {header}");
    out
}

/// A gateway whose config `init` wrote minus `[api]` and `[daemon]` (keys no
/// code enforces yet), firewall managed: the sound setup of these tests.
fn sound_gateway(ns: &Netns, ifname: &str) -> Gateway {
    let gw = Gateway::init(ns, ifname);
    let text = fs::read_to_string(&gw.config).expect("read config");
    let text = without_section(&without_section(&text, "[api]"), "[daemon]");
    assert!(text.contains("manage = true"), "{text}");
    fs::write(&gw.config, text).expect("write config");
    gw
}

/// Binds `addr` (TCP) inside `ns`, retrying until the address exists there
/// (the daemon assigns the tunnel address to its TUN device at start).
fn listen_in(ns: &Netns, addr: &'static str) -> TcpListener {
    let mut bound = None;
    let ok = poll_until(Duration::from_secs(5), || {
        bound = in_netns(&ns.name, move || TcpListener::bind(addr).ok())
            .join()
            .expect("bind thread");
        bound.is_some()
    });
    assert!(ok, "cannot bind {addr} in {}", ns.name);
    bound.expect("bound")
}

/// The daemon's live peers (`status --json`), by name.
fn live_peers(gw: &Gateway) -> Vec<String> {
    let out = run(&mut gw.cli(&["status", "--json"]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect()
}

/// A sound setup passes with the daemon down and up: exit 0, every line PASS
/// or WARN, each check present, and the daemon-dependent checks say which.
#[test]
fn sound_setup_passes() {
    if !rig_ready("check_sound_setup") {
        return;
    }
    let n = names("cs");
    let ns = Netns::new(&n.netns("gw"));
    let mut gw = sound_gateway(&ns, &n.name("g"));
    gw.add_peer("site1");

    let c = check(&ns, &gw);
    c.assert_ok();
    c.one("PASS", "config", &["is valid"]);
    c.one("PASS", "firewall", &["daemon not running"]);
    c.one("PASS", "expired-peers", &["daemon not running"]);
    c.one("WARN", "service-listener", &["`sftp`", "nothing listens"]);

    gw.start();
    let _sftp = listen_in(&ns, "10.8.0.1:22");
    let _api = listen_in(&ns, "10.8.0.1:8443");
    assert!(
        poll_until(Duration::from_secs(5), || live_peers(&gw) == ["site1"]),
        "the daemon does not hold site1"
    );
    let c = check(&ns, &gw);
    c.assert_ok();
    let dir = gw.dir.path.display().to_string();
    c.one("PASS", "config", &["is valid"]);
    c.one(
        "PASS",
        "file-permissions",
        &[&format!("{dir}/server.key"), "mode 0600"],
    );
    c.one(
        "PASS",
        "file-permissions",
        &[&format!("{dir}/sitegate.db "), "mode 0600"],
    );
    c.one("PASS", "file-permissions", &[&format!("{dir}/audit.jsonl")]);
    c.one(
        "PASS",
        "file-permissions",
        &[&format!("{dir}/sitegate.toml"), "mode 0640"],
    );
    c.one("PASS", "full-routes", &["1 active peer"]);
    c.one("PASS", "api-listen", &["no [api] section"]);
    c.one(
        "PASS",
        "service-listener",
        &["`sftp`", "listening on 10.8.0.1:22"],
    );
    c.one(
        "PASS",
        "service-listener",
        &["`api`", "listening on 10.8.0.1:8443"],
    );
    c.one("PASS", "audit-log", &["intact"]);
    c.one("PASS", "firewall", &["table inet sitegate present"]);
    c.one("PASS", "expired-peers", &["daemon running", "1 live peer"]);
    c.one("PASS", "unenforced-keys", &["every key"]);
    c.one("WARN", "privileges", &["runs as root"]);
    c.one("WARN", "sealing", &["unsealed"]);
    let warns = c.lines.iter().filter(|l| l.starts_with("WARN ")).count();
    assert_eq!(warns, 2, "only the two optional protections warn:\n{c}");
}

/// A server key file readable by others fails the permissions line naming the
/// file and its mode, and nothing else fails (`Config::load` would refuse
/// the whole config instead).
#[test]
fn loose_key_file_fails() {
    if !rig_ready("check_loose_key") {
        return;
    }
    let n = names("ck");
    let ns = Netns::new(&n.netns("gw"));
    let gw = sound_gateway(&ns, &n.name("g"));
    let key = gw.dir.path.join("server.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
    let c = check(&ns, &gw);
    c.assert_fails_only(&["file-permissions"]);
    c.one(
        "FAIL",
        "file-permissions",
        &[&key.display().to_string(), "mode 0644", "chmod 600"],
    );
}

/// A service on the gateway address whose port is bound to the wildcard fails
/// naming the service, the port and the bound address; so does a UDP service.
/// A service on an internal address of this host is judged the same way (here
/// bound to its own address: pass); one on another host is not inspected.
#[test]
fn wildcard_service_listener_fails() {
    if !rig_ready("check_wildcard_listener") {
        return;
    }
    let n = names("cw");
    let ns = Netns::new(&n.netns("gw"));
    let gw = sound_gateway(&ns, &n.name("g"));
    let text = fs::read_to_string(&gw.config).expect("config");
    let extra = r#"
[[service]]
name = "db"
address = "172.30.0.10:5432"

[[service]]
name = "remote-db"
address = "172.30.0.20:5432"

[[service]]
name = "dns"
address = "10.8.0.1:5353"
protocol = "udp"
"#;
    let text = text.replacen("\n[store]", &format!("{extra}\n[store]"), 1);
    fs::write(&gw.config, text).expect("write config");
    ns.run_ok(&["ip", "addr", "add", "172.30.0.10/32", "dev", "lo"]);

    let _wild = listen_in(&ns, "0.0.0.0:22");
    let _db = listen_in(&ns, "172.30.0.10:5432");
    let _dns = in_netns(&ns.name, || {
        UdpSocket::bind("0.0.0.0:5353").expect("bind udp")
    })
    .join()
    .expect("bind thread");
    let c = check(&ns, &gw);
    c.assert_fails_only(&["service-listener"]);
    c.one(
        "FAIL",
        "service-listener",
        &["`sftp`", "10.8.0.1:22", "port 22", "0.0.0.0:22"],
    );
    c.one(
        "FAIL",
        "service-listener",
        &["`dns`", "10.8.0.1:5353/udp", "0.0.0.0:5353"],
    );
    c.one(
        "PASS",
        "service-listener",
        &["`db`", "listening on 172.30.0.10:5432 only"],
    );
    c.one(
        "PASS",
        "service-listener",
        &[
            "`remote-db`",
            "on internal host 172.30.0.20, not checked here",
        ],
    );
    assert_eq!(c.fails().len(), 2, "{c}");
}

/// With the daemon running, a deleted `inet sitegate` table fails naming it.
#[test]
fn missing_firewall_table_fails() {
    if !rig_ready("check_missing_table") {
        return;
    }
    let n = names("cf");
    let ns = Netns::new(&n.netns("gw"));
    let mut gw = sound_gateway(&ns, &n.name("g"));
    gw.start();
    let _sftp = listen_in(&ns, "10.8.0.1:22");
    let _api = listen_in(&ns, "10.8.0.1:8443");
    check(&ns, &gw).assert_ok();
    ns.run_ok(&["nft", "delete", "table", "inet", "sitegate"]);
    let c = check(&ns, &gw);
    c.assert_fails_only(&["firewall"]);
    c.one(
        "FAIL",
        "firewall",
        &["table inet sitegate is missing while the daemon runs"],
    );
}

/// A peer expired in the registry behind the daemon's back (the registry
/// version left as it was, so the daemon keeps it in memory) fails naming it.
#[test]
fn expired_peer_still_active_fails() {
    if !rig_ready("check_expired_peer") {
        return;
    }
    let n = names("ce");
    let ns = Netns::new(&n.netns("gw"));
    let mut gw = sound_gateway(&ns, &n.name("g"));
    gw.start();
    let _sftp = listen_in(&ns, "10.8.0.1:22");
    let _api = listen_in(&ns, "10.8.0.1:8443");
    gw.add_peer("lingers");
    assert!(
        poll_until(Duration::from_secs(5), || live_peers(&gw) == ["lingers"]),
        "the daemon does not hold the peer"
    );
    check(&ns, &gw).assert_ok();

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let mut db = rusqlite::Connection::open(gw.dir.path.join("sitegate.db")).expect("open store");
    db.busy_timeout(Duration::from_secs(10)).expect("timeout");
    let tx = db.transaction().expect("begin");
    let version: i64 = tx
        .query_row("SELECT v FROM registry_version WHERE id = 1", [], |r| {
            r.get(0)
        })
        .expect("version");
    let changed = tx
        .execute(
            "UPDATE peers SET expires_at = ?1 WHERE name = 'lingers'",
            [now - 3600],
        )
        .expect("expire");
    assert_eq!(changed, 1);
    // The trigger bumped the version; put it back so the daemon never reloads.
    tx.execute("UPDATE registry_version SET v = ?1 WHERE id = 1", [version])
        .expect("restore version");
    tx.commit().expect("commit");
    drop(db);
    assert_eq!(live_peers(&gw), ["lingers"], "the daemon still holds it");

    let c = check(&ns, &gw);
    c.assert_fails_only(&["expired-peers"]);
    c.one(
        "FAIL",
        "expired-peers",
        &["peer `lingers`", "expired at", "registry"],
    );
    assert_eq!(live_peers(&gw), ["lingers"], "the check changed nothing");
}

/// An edited audit line fails naming the audit file and the line.
#[test]
fn broken_audit_chain_fails() {
    if !rig_ready("check_broken_audit") {
        return;
    }
    let n = names("ca");
    let ns = Netns::new(&n.netns("gw"));
    let gw = sound_gateway(&ns, &n.name("g"));
    gw.add_peer("one");
    gw.add_peer("two");
    let audit = gw.dir.path.join("audit.jsonl");
    let text = fs::read_to_string(&audit).expect("audit log");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[1].contains("\"peer_added\""), "{text}");
    let edited = format!(
        "{}\n{}\n",
        lines[0],
        lines[1].replace("\"peer_added\"", "\"peer_addex\"")
    );
    fs::write(&audit, edited).expect("edit audit log");
    let c = check(&ns, &gw);
    c.assert_fails_only(&["audit-log"]);
    c.one(
        "FAIL",
        "audit-log",
        &[&audit.display().to_string(), "line 2"],
    );
}

/// The keys `init` writes are all enforced: `[daemon] user` (a root user only
/// warns), `[api]`, and `seal_key_file` (the sealing line passes). A
/// PostgreSQL `store.url` is enforced too; one that cannot be reached fails
/// the check, named without its password.
#[test]
fn unenforced_key_fails() {
    if !rig_ready("check_unenforced_key") {
        return;
    }
    let n = names("cu");
    let ns = Netns::new(&n.netns("gw"));
    let gw = sound_gateway(&ns, &n.name("g"));
    let sound = fs::read_to_string(&gw.config).expect("config");

    fs::write(&gw.config, format!("{sound}\n[daemon]\nuser = \"root\"\n")).expect("write");
    let c = check(&ns, &gw);
    c.assert_ok();
    c.one("PASS", "unenforced-keys", &["every key"]);
    c.one("WARN", "privileges", &["daemon.user = \"root\"", "uid 0"]);

    let token = gw.dir.path.join("api.token");
    fs::write(
        &gw.config,
        format!(
            "{sound}\n[api]\nlisten = \"10.8.0.1:8443\"\ntoken_file = \"{}\"\n",
            token.display()
        ),
    )
    .expect("write");
    let c = check(&ns, &gw);
    c.assert_ok();
    c.one("PASS", "file-permissions", &["api.token_file"]);

    let seal = gw.dir.path.join("seal.key");
    fs::write(
        &gw.config,
        format!(
            "{sound}\n[daemon]\nseal_key_file = \"{}\"\n",
            seal.display()
        ),
    )
    .expect("write");
    let c = check(&ns, &gw);
    c.assert_ok();
    c.one("PASS", "unenforced-keys", &["every key"]);
    c.one(
        "PASS",
        "sealing",
        &["sealed under daemon.seal_key_file", "none in clear"],
    );

    let url = sound
        .lines()
        .find(|l| l.starts_with("url = \"sqlite://"))
        .expect("store url line");
    fs::write(
        &gw.config,
        sound.replace(url, "url = \"postgres://sg:hunter2@db.invalid/sitegate\""),
    )
    .expect("write");
    let c = check(&ns, &gw);
    c.one("PASS", "unenforced-keys", &["every key"]);
    let text = format!("{}\n{}", c.lines.join("\n"), c.stderr);
    assert_ne!(
        c.code,
        Some(0),
        "check passed with an unreachable store:\n{text}"
    );
    assert!(
        text.contains("cannot connect to peer store postgres://sg:***@db.invalid/sitegate"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}

/// `manage = false` is a warning that the host's firewall is not managed; on an
/// otherwise sound setup with the daemon running the check still passes.
#[test]
fn unmanaged_firewall_warns() {
    if !rig_ready("check_unmanaged_firewall") {
        return;
    }
    let n = names("cm");
    let ns = Netns::new(&n.netns("gw"));
    let mut gw = sound_gateway(&ns, &n.name("g"));
    let text = fs::read_to_string(&gw.config).expect("config");
    fs::write(&gw.config, text.replace("manage = true", "manage = false")).expect("write");
    gw.start();
    let _sftp = listen_in(&ns, "10.8.0.1:22");
    let _api = listen_in(&ns, "10.8.0.1:8443");
    assert!(
        !ns.succeeds(&["nft", "list", "table", "inet", "sitegate"]),
        "manage = false installs no table"
    );
    let c = check(&ns, &gw);
    c.assert_ok();
    c.one(
        "WARN",
        "firewall",
        &[
            "firewall not managed by sitegate",
            "host's own firewall must",
        ],
    );
}

/// A config that does not validate is one FAIL line naming the key, exit 1.
#[test]
fn malformed_config_fails() {
    if !rig_ready("check_malformed_config") {
        return;
    }
    let n = names("cx");
    let ns = Netns::new(&n.netns("gw"));
    let gw = sound_gateway(&ns, &n.name("g"));
    let sound = fs::read_to_string(&gw.config).expect("config");
    for (from, to, key) in [
        (
            "listen_port = 51820",
            "listen_port = 0",
            "`interface.listen_port`",
        ),
        ("mtu = 1420", "mtu = 1420\ncolour = \"blue\"", "`colour`"),
    ] {
        assert!(sound.contains(from), "{from}");
        fs::write(&gw.config, sound.replacen(from, to, 1)).expect("write");
        let c = check(&ns, &gw);
        c.assert_shape();
        assert_eq!(c.code, Some(1), "{c}");
        assert_eq!(c.lines.len(), 2, "one FAIL line and the summary:\n{c}");
        c.one("FAIL", "config", &[key, &gw.config.display().to_string()]);
    }
}
