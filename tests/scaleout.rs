//! Several gateways on one PostgreSQL registry (SPEC, Scale-out), with a real
//! PostgreSQL from Debian's package started per test in a temp dir, reached
//! over its unix socket from every namespace.
//!
//! Each gateway has its own namespace, and its site reaches it as
//! `192.168.1.1:51820`: the address every issued config names. A config issued
//! on one gateway therefore works against the other by its `Endpoint` alone,
//! as it would behind DNS round robin or failover.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::postgres::{postgres_ready, Postgres};
use common::*;

/// How soon a change on one gateway must be live on every other (SPEC).
const LIVE_WITHIN: Duration = Duration::from_secs(1);

/// `text` (a config as `init` writes it) with its `[store]` url line replaced
/// by `lines`.
fn with_store(text: &str, lines: &str) -> String {
    let line = text
        .lines()
        .find(|l| l.starts_with("url = "))
        .expect("init writes a [store] url line");
    text.replacen(line, lines.trim_end(), 1)
}

/// Points `gw`'s config at the shared registry, with further `[store]` lines.
fn use_registry(gw: &Gateway, url: &str, extra: &str) {
    let text = fs::read_to_string(&gw.config).expect("read config");
    fs::write(
        &gw.config,
        with_store(&text, &format!("url = \"{url}\"\n{extra}")),
    )
    .expect("write config");
}

/// `init` of a host that only admin commands use (no daemon, no namespace):
/// `dir/host/sitegate.toml`, interface `sgxHOST`.
fn admin_config(dir: &Path, host: &str) -> PathBuf {
    let config = dir.join(host).join("sitegate.toml");
    fs::create_dir_all(config.parent().expect("config dir")).expect("create config dir");
    run_ok(
        Command::new(sitegate_bin())
            .arg("--config")
            .arg(&config)
            .args([
                "init",
                "--endpoint",
                "vpn.example.org:51820",
                "--egress",
                "eth0",
                "--interface",
                &format!("sgx{host}"),
                "--subnet",
                "10.8.0.0/24",
            ]),
    );
    config
}

/// Gives `to` the server key and seal key of `from`: the gateways of one
/// registry share them (the README's setup step).
fn share_keys(from: &Gateway, to: &Gateway) {
    for f in ["server.key", "seal.key"] {
        fs::copy(from.dir.path.join(f), to.dir.path.join(f)).expect("copy key file");
    }
}

/// A gateway namespace with one site namespace linked to it as
/// `192.168.1.2` → `192.168.1.1`, veth names from `role`.
fn linked_pair(names: &Names, role: &str) -> (Netns, Netns) {
    let gw = Netns::new(&names.netns(&format!("g{role}")));
    let site = Netns::new(&names.netns(&format!("s{role}")));
    veth(
        &gw,
        &names.name(&format!("v{role}")),
        "192.168.1.1/24",
        &site,
        &names.name(&format!("w{role}")),
        "192.168.1.2/24",
    );
    site.run_ok(&["ip", "route", "add", "default", "via", "192.168.1.1"]);
    (gw, site)
}

/// The base64 public key of the peer a client config was issued for.
fn config_public_key(conf: &str) -> String {
    let private = conf_value(conf, "PrivateKey").expect("PrivateKey in issued config");
    let mut c = Command::new(sitegate_bin());
    c.arg("pubkey");
    use std::io::Write;
    let mut child = c
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sitegate pubkey");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{private}\n").as_bytes())
        .expect("write private key");
    let out = child.wait_with_output().expect("sitegate pubkey");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whether `gw`'s daemon serves a peer with this key (stock `wg show`).
fn serves(gw: &Gateway, key: &str) -> bool {
    String::from_utf8_lossy(&gw.wg_show().stdout).contains(key)
}

/// Two running gateways on one fresh registry, each in its own namespace with
/// one site namespace linked to it. Fields drop in order: gateways, then
/// namespaces, then the database.
struct TwoGateways {
    a: Gateway,
    b: Gateway,
    site_a_ns: Netns,
    site_b_ns: Netns,
    _a_ns: Netns,
    _b_ns: Netns,
    names: Names,
    pg: Postgres,
}

impl TwoGateways {
    /// `init` each gateway, share A's keys with B, point both at the
    /// registry, start both.
    fn start(tag: &str, code: &str) -> TwoGateways {
        let pg = Postgres::start(tag);
        let names = names(code);
        let (a_ns, site_a_ns) = linked_pair(&names, "a");
        let (b_ns, site_b_ns) = linked_pair(&names, "b");
        let mut a = Gateway::init(&a_ns, &names.name("ga"));
        let mut b = Gateway::init(&b_ns, &names.name("gb"));
        share_keys(&a, &b);
        use_registry(&a, &pg.url(), "");
        use_registry(&b, &pg.url(), "");
        a.start();
        b.start();
        TwoGateways {
            a,
            b,
            site_a_ns,
            site_b_ns,
            _a_ns: a_ns,
            _b_ns: b_ns,
            names,
            pg,
        }
    }
}

/// Runs `sitegate run` for `gw` and asserts that it refuses to start (exit 1,
/// stderr naming every one of `parts`, no TUN device left); returns stderr.
fn refused(gw: &Gateway, parts: &[&str]) -> String {
    let out = run(Command::new("timeout")
        .args([
            "15",
            "ip",
            "netns",
            "exec",
            &gw.ns,
            sitegate_bin(),
            "--config",
        ])
        .arg(&gw.config)
        .arg("run"));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a refusal to start:\n{err}"
    );
    for p in parts {
        assert!(err.contains(p), "refusal does not mention `{p}`:\n{err}");
    }
    assert!(
        !link_exists(&gw.ns, &gw.ifname),
        "a refused start left its TUN device"
    );
    err
}

/// A peer issued on gateway A connects through gateway B, and a peer issued on
/// B connects through A; revoking the latter on B cuts its session on A within
/// one second (the figure is printed).
#[test]
fn peer_from_one_gateway_connects_through_the_other_and_revocation_crosses() {
    if !rig_ready("scaleout cross") || !postgres_ready("scaleout cross") {
        return;
    }
    let rig = TwoGateways::start("cross", "so");
    let (a, b, pg, names) = (&rig.a, &rig.b, &rig.pg, &rig.names);
    let (site_a_ns, site_b_ns) = (&rig.site_a_ns, &rig.site_b_ns);

    // Issued on A, served by B within a second.
    let clinic = a.add_peer("clinic");
    let clinic_key = config_public_key(&clinic);
    let t0 = Instant::now();
    assert!(
        poll_until(Duration::from_secs(5), || serves(b, &clinic_key)),
        "gateway B never learned of the peer issued on A; B log:\n{}",
        b.log_tail(30)
    );
    let seen = t0.elapsed();
    assert!(
        seen <= LIVE_WITHIN + Duration::from_millis(300),
        "peer issued on A took {seen:?} to be served by B"
    );
    let site_b = Site::up(site_b_ns, &names.name("sb"), &clinic);
    assert!(
        site_b_ns.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE),
        "site with A's config got no answer through gateway B; B log:\n{}",
        b.log_tail(30)
    );

    // Issued on B, connected through A; revoked on B.
    let lab = b.add_peer("lab");
    let lab_key = config_public_key(&lab);
    assert!(poll_until(Duration::from_secs(5), || serves(a, &lab_key)));
    let site_a = Site::up(site_a_ns, &names.name("sa"), &lab);
    assert!(
        site_a_ns.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE),
        "site with B's config got no answer through gateway A; A log:\n{}",
        a.log_tail(30)
    );
    a.wait_event("handshake of lab on A", Duration::from_secs(5), |e| {
        field_str(e, "event") == "handshake" && field_str(e, "peer") == "lab"
    });

    let revoked_at = now_unix();
    b.cli_ok(&["peer", "revoke", "lab", "--reason", "cross-gateway test"]);
    let closed = a.wait_event("session_closed of lab on A", Duration::from_secs(5), |e| {
        is_event(e, "session_closed", "revoked") && field_str(e, "peer") == "lab"
    });
    let took = event_time(&closed) - revoked_at;
    println!(
        "cross-gateway revoke: revoked on B, session closed on A after {:.0} ms",
        took * 1000.0
    );
    assert!(
        took <= LIVE_WITHIN.as_secs_f64(),
        "revocation on B took {took:.3} s to close the session on A"
    );
    assert!(!serves(a, &lab_key), "A still serves the revoked peer");
    assert!(
        !site_a_ns.ping_once(GATEWAY_TUNNEL_ADDR, None),
        "the revoked site still reaches A"
    );
    // The other gateway's site is untouched.
    assert!(site_b_ns.ping_once(GATEWAY_TUNNEL_ADDR, None));

    // Both gateways' audit events are in the table, each its own chain.
    let gw_a = format!("{}/{}", hostname(), a.ifname);
    let rows_of = |gw: &str, like: &str| {
        pg.psql(
            "sitegate",
            &format!(
                "SELECT count(*) FROM audit_events WHERE gateway = '{gw}' AND line LIKE '{like}'"
            ),
        )
        .trim()
        .parse::<u64>()
        .unwrap_or(0)
    };
    assert!(
        poll_until(Duration::from_secs(5), || {
            rows_of(&gw_a, "%\"event\":\"session_closed\"%\"lab\"%") == 1
        }),
        "A's session_closed never reached the audit table"
    );
    let gw_b = format!("{}/{}", hostname(), b.ifname);
    assert!(rows_of(&gw_b, "%\"event\":\"handshake\"%\"clinic\"%") >= 1);
    let report = a.cli_ok(&["audit", "verify"]);
    assert!(
        report.contains(&format!("audit table, gateway {gw_a}: intact")),
        "{report}"
    );
    // An edited row is named by its seq.
    pg.psql(
        "sitegate",
        &format!(
            "UPDATE audit_events SET line = replace(line, 'lab', 'lbb') \
             WHERE gateway = '{gw_a}' AND line LIKE '%\"event\":\"handshake\"%\"lab\"%'"
        ),
    );
    let out = run(&mut a.cli(&["audit", "verify"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an edited audit row verified:\n{err}"
    );
    assert!(
        err.contains(&format!("audit table, gateway {gw_a}: row seq")) && err.contains("edited"),
        "{err}"
    );
    drop((site_a, site_b));
}

/// The kernel's host name: the first half of the default `[store] gateway`.
fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("read hostname")
        .trim()
        .to_string()
}

/// 24 `peer add` at once, split across two hosts' configs on one registry,
/// give 24 distinct addresses; a gateway with `[store] pool` allocates only
/// from its slice; a host may keep its password in `[store] password_file`.
#[test]
fn concurrent_adds_across_gateways_get_distinct_addresses() {
    if !postgres_ready("scaleout concurrent adds") {
        return;
    }
    let pg = Postgres::start("adds");
    let url = pg.url();
    let dir = TempDir::new(&format!("so-adds-{}", std::process::id()));
    let init = |host: &str, pool: &str| {
        let config = admin_config(&dir.path, host);
        let text = fs::read_to_string(&config).unwrap();
        fs::write(
            &config,
            with_store(&text, &format!("url = \"{url}\"\n{pool}")),
        )
        .unwrap();
        config
    };
    let a = init("a", "");
    let b = init("b", "pool = \"10.8.0.128/25\"");
    // Host B logs in with the password in `[store] password_file` (0600), not in its URL.
    let secret = b.with_file_name("db.password");
    fs::write(&secret, format!("{}\n", pg.password())).unwrap();
    fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let text = fs::read_to_string(&b).unwrap();
    fs::write(
        &b,
        text.replace(&url, &url.replace(&format!(":{}@", pg.password()), "@"))
            .replace("pool = ", "password_file = \"db.password\"\npool = "),
    )
    .unwrap();
    assert!(!fs::read_to_string(&b).unwrap().contains(pg.password()));
    fs::copy(a.with_file_name("seal.key"), b.with_file_name("seal.key")).unwrap();
    let handles: Vec<_> = (0..24)
        .map(|i| {
            let config = if i % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || {
                let out = run(Command::new(sitegate_bin())
                    .arg("--config")
                    .arg(&config)
                    .args(["peer", "add", &format!("site{i}")]));
                assert!(
                    out.status.success(),
                    "peer add site{i}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let conf = String::from_utf8_lossy(&out.stdout).to_string();
                let addr = conf_value(&conf, "Address").expect("Address");
                (i, addr.split('/').next().unwrap().to_string())
            })
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for h in handles {
        let (i, addr) = h.join().expect("peer add thread");
        let ip: std::net::Ipv4Addr = addr.parse().expect("IPv4 address");
        if i % 2 == 1 {
            assert!(
                ip.octets()[3] >= 128,
                "site{i} was added on the gateway with pool 10.8.0.128/25 but got {ip}"
            );
        }
        assert!(seen.insert(ip), "address {ip} issued twice");
    }
    assert_eq!(seen.len(), 24);
    // Every add is in the registry, whichever host made it.
    let list = run_ok(
        Command::new(sitegate_bin())
            .arg("--config")
            .arg(&b)
            .args(["peer", "list", "--json"]),
    );
    let peers: serde_json::Value = serde_json::from_str(&list).expect("peer list --json");
    assert_eq!(peers.as_array().map(Vec::len), Some(24), "{list}");

    // The admin API reads the store from tokio's blocking pool, next to the
    // daemon's runtime: the PostgreSQL driver (which runs its own) works there.
    let cfg = sitegate::config::Config::load(&b).expect("load config B");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let n = rt.block_on(async move {
        tokio::task::spawn_blocking(move || {
            sitegate::registry::Store::open_config(&cfg)
                .and_then(|s| s.peers())
                .map(|p| p.len())
        })
        .await
        .expect("blocking task")
    });
    assert_eq!(n.expect("read the registry from the blocking pool"), 24);
}

/// With the database stopped, both gateways keep serving the peers they know
/// and a peer revoked just before the outage stays refused; admin commands fail
/// clearly and write nothing; once the database is back, a peer added on one
/// gateway is live on the other.
#[test]
fn database_outage_keeps_known_peers_and_revocations() {
    if !rig_ready("scaleout outage") || !postgres_ready("scaleout outage") {
        return;
    }
    let mut rig = TwoGateways::start("outage", "sq");
    let (a, b) = (&mut rig.a, &mut rig.b);
    let (pg, names) = (&rig.pg, &rig.names);
    let (site_a_ns, site_b_ns) = (&rig.site_a_ns, &rig.site_b_ns);

    let one = a.add_peer("one");
    let two = a.add_peer("two");
    let gone = a.add_peer("gone");
    let gone_key = config_public_key(&gone);
    for key in [
        config_public_key(&one),
        config_public_key(&two),
        gone_key.clone(),
    ] {
        assert!(poll_until(Duration::from_secs(5), || serves(a, &key)
            && serves(b, &key)));
    }
    let site_one = Site::up(site_a_ns, &names.name("sa"), &one);
    let site_two = Site::up(site_b_ns, &names.name("sb"), &two);
    assert!(site_a_ns.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE));
    assert!(site_b_ns.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE));

    // Revoked just before the outage: both gateways drop it.
    b.cli_ok(&["peer", "revoke", "gone"]);
    assert!(poll_until(Duration::from_secs(5), || {
        !serves(a, &gone_key) && !serves(b, &gone_key)
    }));
    pg.stop();
    let outage = Instant::now();
    for gw in [&a, &b] {
        gw.wait_event("store_unavailable", Duration::from_secs(10), |e| {
            field_str(e, "event") == "store_unavailable"
        });
    }
    // Known peers are still served, through fresh pings.
    assert!(site_a_ns.ping_until(GATEWAY_TUNNEL_ADDR, Duration::from_secs(5)));
    assert!(site_b_ns.ping_until(GATEWAY_TUNNEL_ADDR, Duration::from_secs(5)));
    assert!(a.is_running() && b.is_running());
    // ... and through a new session: a site that comes back is let in.
    drop(site_two);
    let site_two = Site::up(site_b_ns, &names.name("sb"), &two);
    assert!(
        site_b_ns.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE),
        "a known peer's new handshake was refused during the outage; B log:\n{}",
        b.log_tail(30)
    );
    let handshakes = b.events_named("handshake");
    assert!(
        handshakes
            .iter()
            .filter(|e| field_str(e, "peer") == "two")
            .count()
            >= 2,
        "no second handshake of `two` on B: {handshakes:?}"
    );
    // The revoked peer stays refused: its stock client dials A and is turned away.
    let site_gone = Site::up(site_a_ns, &names.name("sg"), &gone);
    a.wait_event(
        "refusal of the revoked peer",
        Duration::from_secs(30),
        |e| is_event(e, "handshake_failed", "revoked") && field_str(e, "public_key") == gone_key,
    );
    drop(site_gone);
    // Admin commands fail with a clear error and write nothing.
    let out = run(&mut a.cli(&["peer", "add", "during"]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to peer store"), "{err}");
    assert!(!err.contains(pg.password()), "{err}");

    pg.start_again();
    let outage_secs = outage.elapsed().as_secs();
    for gw in [&a, &b] {
        gw.wait_event("store_reconnected", Duration::from_secs(15), |e| {
            field_str(e, "event") == "store_reconnected"
        });
    }
    // The outage was logged throttled (a line at once, then summaries at most
    // every 5 s), not a line per reconnect attempt (several a second at first).
    for gw in [&*a, &*b] {
        let lines = gw.events_named("store_unavailable").len() as u64;
        assert!(
            lines <= 2 + 2 * (outage_secs / 5),
            "{lines} store_unavailable lines in a {outage_secs} s outage"
        );
    }
    // What A audited during the outage reaches the table once it is back.
    let gw_a = format!("{}/{}", hostname(), a.ifname);
    assert!(
        poll_until(Duration::from_secs(20), || {
            pg.psql(
                "sitegate",
                &format!(
                    "SELECT count(*) FROM audit_events WHERE gateway = '{gw_a}' \
                     AND line LIKE '%\"event\":\"store_unavailable\"%'"
                ),
            )
            .trim()
                != "0"
        }),
        "A's audit lines from the outage never reached the table"
    );
    let report = a.cli_ok(&["audit", "verify"]);
    assert!(
        report.contains(&format!("audit table, gateway {gw_a}: intact")),
        "{report}"
    );
    let out = run(&mut a.cli(&["peer", "show", "during"]));
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed add left a peer behind"
    );
    let late = a.add_peer("late");
    let late_key = config_public_key(&late);
    let t0 = Instant::now();
    assert!(
        poll_until(Duration::from_secs(5), || serves(b, &late_key)),
        "B never learned of a peer added after the outage; B log:\n{}",
        b.log_tail(30)
    );
    println!(
        "after the outage, a peer added on A was live on B after {:?}",
        t0.elapsed()
    );
    assert!(t0.elapsed() <= LIVE_WITHIN + Duration::from_millis(300));
    // Nothing revoked came back with the catch-up.
    assert!(!serves(a, &gone_key) && !serves(b, &gone_key));
    drop((site_one, site_two));
}

/// Bad registries give a clear error at start naming the URL without its
/// password: unreachable, wrong credentials, a newer schema, another server key.
#[test]
fn bad_registry_refused_at_start() {
    if !rig_ready("scaleout bad input") || !postgres_ready("scaleout bad input") {
        return;
    }
    let pg = Postgres::start("bad");
    let names = names("sr");
    let ns = Netns::new(&names.netns("gw"));
    let gw = Gateway::init(&ns, &names.name("gw"));

    // Nothing listens on 127.0.0.1:1 in a fresh namespace.
    use_registry(&gw, "postgres://sitegate:hunter2@127.0.0.1:1/sitegate", "");
    let err = refused(
        &gw,
        &["cannot connect to peer store postgres://sitegate:***@127.0.0.1:1/sitegate"],
    );
    assert!(!err.contains("hunter2"), "{err}");

    let wrong = pg.url_for("sitegate", "not-the-password");
    use_registry(&gw, &wrong, "");
    let err = refused(
        &gw,
        &[
            "cannot connect to peer store",
            "password authentication failed",
        ],
    );
    assert!(!err.contains("not-the-password"), "{err}");

    // A registry written by a newer sitegate.
    use_registry(&gw, &pg.url(), "");
    gw.cli_ok(&["peer", "list"]);
    let current = pg.psql("sitegate", "SELECT version FROM sitegate_schema");
    pg.psql("sitegate", "UPDATE sitegate_schema SET version = 99");
    refused(
        &gw,
        &["schema version 99, newer than this sitegate supports"],
    );
    let out = run(&mut gw.cli(&["peer", "list"]));
    assert_eq!(
        out.status.code(),
        Some(1),
        "an admin command used a too-new schema"
    );
    pg.psql(
        "sitegate",
        &format!("UPDATE sitegate_schema SET version = {}", current.trim()),
    );

    // A registry whose gateways answer with another server key (same seal key).
    let other_ns = Netns::new(&names.netns("ot"));
    let mut other = Gateway::init(&other_ns, &names.name("ot"));
    fs::copy(
        gw.dir.path.join("seal.key"),
        other.dir.path.join("seal.key"),
    )
    .unwrap();
    use_registry(&other, &pg.url(), "");
    other.start();
    drop(other);
    refused(&gw, &["copy the shared server key"]);
}

/// With `[store] ca_file` the registry is reached over TLS only and the
/// server's certificate must chain to that CA: the database accepts TCP
/// logins only over TLS (`hostssl`), a certificate from another CA is refused,
/// and so is a plain connection or `sslmode=require` without a CA.
#[test]
fn registry_over_tls_checks_the_server_certificate() {
    if !postgres_ready("scaleout tls") {
        return;
    }
    let pg = Postgres::start("tls");
    let tls = pg.enable_tls();
    let dir = TempDir::new(&format!("so-tls-{}", std::process::id()));
    let config = admin_config(&dir.path, "tls");
    let sg = |args: &[&str]| {
        run(Command::new(sitegate_bin())
            .arg("--config")
            .arg(&config)
            .args(args))
    };
    let secret = config.with_file_name("db.password");
    fs::write(&secret, pg.password()).unwrap();
    fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let sqlite = fs::read_to_string(&config).unwrap();
    let store = |url_tail: &str, ca: Option<&std::path::Path>| {
        let mut lines = format!(
            "url = \"postgres://sitegate@127.0.0.1:{}/sitegate{url_tail}\"\npassword_file = \"db.password\"",
            tls.port
        );
        if let Some(ca) = ca {
            lines.push_str(&format!("\nca_file = \"{}\"", ca.display()));
        }
        fs::write(&config, with_store(&sqlite, &lines)).unwrap();
    };

    store("", Some(&tls.ca));
    let out = sg(&["peer", "add", "over-tls"]);
    assert!(
        out.status.success(),
        "peer add over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    store("", Some(&tls.other_ca));
    let out = sg(&["peer", "add", "wrong-ca"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot connect to peer store") && err.contains("certificate"),
        "{err}"
    );

    store("", None);
    let out = sg(&["peer", "add", "plain"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a plain login was accepted: {err}"
    );
    assert!(err.contains("no encryption"), "{err}");

    store("?sslmode=require", None);
    let out = sg(&["peer", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("`store.ca_file`"), "{err}");

    // Only the first add reached the registry.
    store("", Some(&tls.ca));
    let list = sg(&["peer", "list", "--json"]);
    let peers: serde_json::Value = serde_json::from_slice(&list.stdout).expect("peer list --json");
    let names: Vec<&str> = peers
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["over-tls"]);
}

/// The change log behind the followers' delta reads: after each kind of
/// change (issue, revoke, rotate, a hand-made SQL edit), what changed since
/// the last version, merged into the last state, equals a full read; a reader
/// whose version the log no longer reaches is told to read everything.
#[test]
fn change_log_deltas_match_full_reads() {
    use sitegate::registry::postgres::PgStore;
    use sitegate::registry::Snapshot;
    use std::collections::BTreeMap;
    if !postgres_ready("scaleout change log") {
        return;
    }
    let pg = Postgres::start("log");
    let dir = TempDir::new(&format!("so-log-{}", std::process::id()));
    let config = admin_config(&dir.path, "log");
    let sg = |args: &[&str]| {
        run_ok(
            Command::new(sitegate_bin())
                .arg("--config")
                .arg(&config)
                .args(args),
        )
    };
    let text = fs::read_to_string(&config).unwrap();
    fs::write(
        &config,
        with_store(&text, &format!("url = \"{}\"", pg.url())),
    )
    .unwrap();
    sg(&["peer", "add", "first"]);
    let cfg = sitegate::config::Config::load(&config).expect("load config");
    let seal = sitegate::registry::store::seal_key(&cfg).unwrap();
    let store = PgStore::open_sealed(&cfg.store, seal).expect("open registry");

    // The state a reader keeps, as (peers by id, revoked keys by base64).
    type State = (BTreeMap<i64, String>, BTreeMap<String, String>);
    let state_of = |s: &Snapshot| -> State {
        (
            s.peers.iter().map(|p| (p.id, format!("{p:?}"))).collect(),
            s.revoked
                .iter()
                .map(|r| (r.public_key.to_base64(), format!("{r:?}")))
                .collect(),
        )
    };
    let full = store.snapshot(|| {}).unwrap();
    let mut version = full.version;
    let mut state = state_of(&full);
    let mut step = |what: &str, change: &dyn Fn()| {
        change();
        let delta = store
            .changes_since(version)
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: the log should reach version {version}"));
        assert!(delta.version > version, "{what}: the version did not move");
        for p in &delta.peers {
            state.0.insert(p.id, format!("{p:?}"));
        }
        for id in &delta.gone {
            state.0.remove(id);
        }
        for r in &delta.revoked {
            state.1.insert(r.public_key.to_base64(), format!("{r:?}"));
        }
        for k in &delta.unrevoked {
            state.1.remove(k);
        }
        let full = store.snapshot(|| {}).unwrap();
        assert_eq!(delta.version, full.version, "{what}");
        assert_eq!(state, state_of(&full), "{what}: delta and full read differ");
        // Only what changed travelled.
        assert!(
            delta.peers.len() <= 2,
            "{what}: {} peers in the delta",
            delta.peers.len()
        );
        version = delta.version;
    };
    step("issue", &|| {
        sg(&["peer", "add", "second", "--service", "sftp"]);
    });
    step("revoke", &|| {
        sg(&["peer", "revoke", "first", "--reason", "test"]);
    });
    step("rotate", &|| {
        sg(&["peer", "rotate", "second"]);
    });
    step("hand-made edit", &|| {
        pg.psql(
            "sitegate",
            "UPDATE peers SET expires_at = 1 WHERE name = 'second'",
        );
    });
    step("hand-made un-revocation", &|| {
        pg.psql(
            "sitegate",
            "DELETE FROM revoked_keys WHERE peer_name = 'first'",
        );
    });
    // Nothing changed: an empty delta at the same version.
    let same = store.changes_since(version).unwrap().expect("delta");
    assert_eq!(same.version, version);
    assert!(same.peers.is_empty() && same.revoked.is_empty());
    // A log trimmed past a reader's version: read everything.
    sg(&["peer", "add", "third"]);
    pg.psql(
        "sitegate",
        "DELETE FROM registry_changes WHERE version < (SELECT max(version) FROM registry_changes)",
    );
    assert!(store.changes_since(version).unwrap().is_none());
}
