//! The nftables table `inet sitegate` against the real `nft`, in namespaces:
//! the rendered JSON loads, replaces a leftover of itself atomically, is
//! removed cleanly, and does what it claims: a host on the underlay that routes
//! the tunnel subnet via the gateway cannot reach a service bound to the tunnel
//! address, while the host itself still can.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;
use sitegate::firewall::render::{removal, ruleset, FirewallSpec, TABLE};

/// Feeds `doc` to `nft -j -f -` in `ns`; returns whether nft accepted it and its stderr.
fn nft_apply(ns: &Netns, doc: &Value) -> (bool, String) {
    let mut child = ns
        .cmd(&["nft", "-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(doc.to_string().as_bytes())
        .expect("write to nft");
    let out = child.wait_with_output().expect("nft ends");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Rules of table `inet sitegate` in `ns`, or None when there is no such table.
fn table_rules(ns: &Netns) -> Option<usize> {
    let out = run(&mut ns.cmd(&["nft", "-j", "list", "table", "inet", TABLE]));
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("nft -j lists JSON");
    Some(
        v["nftables"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|o| o.get("rule").is_some()).count()),
    )
}

/// Whether a TCP connection to `dst` opens from namespace `ns` within 1.5 s.
fn connects_from(ns: &Netns, dst: &'static str) -> bool {
    in_netns(&ns.name, move || {
        let addr: SocketAddr = dst.parse().expect("address");
        TcpStream::connect_timeout(&addr, Duration::from_millis(1_500)).is_ok()
    })
    .join()
    .expect("connect thread")
}

/// The table loads, replaces itself, blocks the underlay from a tunnel-bound
/// service (which it could reach before), spares the host, and goes cleanly.
#[test]
fn table_loads_replaces_and_blocks_the_underlay() {
    if !rig_ready("firewall_table") {
        return;
    }
    let nft_found = Command::new("nft").arg("--version").output().is_ok();
    if !nft_found {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "firewall_table needs nft (package nftables); CI=true never skips"
        );
        eprintln!("SKIPPED firewall_table: needs nft");
        return;
    }
    let n = names("fw");
    let gw = Netns::new(&n.netns("gw"));
    let attacker = Netns::new(&n.netns("at"));
    Underlay::attach(&n, &gw, &attacker, 1);
    // A stand-in for the TUN device (the table matches it by name only): one
    // end of a veth pair; the other end is a "tunnel side" namespace whose
    // packets arrive on it, as decrypted packets arrive on the TUN device.
    let tunside = Netns::new(&n.netns("ts"));
    let tun = n.name("t");
    veth(
        &gw,
        &tun,
        "10.8.0.1/24",
        &tunside,
        &n.name("u"),
        "10.8.0.2/24",
    );
    tunside.run_ok(&["ip", "route", "add", "default", "via", "10.8.0.1"]);
    let service = in_netns(&gw.name, || {
        TcpListener::bind("10.8.0.1:2222").expect("bind")
    })
    .join()
    .expect("listener thread");
    // Something on every host address (sshd on 0.0.0.0, say).
    let wildcard = in_netns(&gw.name, || {
        TcpListener::bind("0.0.0.0:2223").expect("bind wildcard")
    })
    .join()
    .expect("listener thread");
    assert!(
        connects_from(&tunside, "192.168.1.1:2223"),
        "without the table the tunnel reaches the host's underlay address (else this test proves nothing)"
    );

    // The attacker's default route points at the gateway: without the table,
    // Linux answers for a local address on any interface.
    assert!(
        connects_from(&attacker, "10.8.0.1:2222"),
        "without the table the underlay reaches the service (else this test proves nothing)"
    );

    let spec = FirewallSpec {
        tun: tun.clone(),
        subnet_v4: "10.8.0.0/24".parse().unwrap(),
        subnet_v6: Some("fd00:8::/64".parse().unwrap()),
        egress: Some(n.name("g1")),
        local_v4: vec!["10.8.0.1".parse().unwrap()],
        local_v6: vec![],
    };
    let doc = ruleset(&spec);
    let (ok, err) = nft_apply(&gw, &doc);
    assert!(ok, "nft refused the ruleset: {err}");
    let rules = table_rules(&gw).expect("table installed");
    assert!(rules >= 6, "{rules} rules");

    assert!(
        !connects_from(&attacker, "10.8.0.1:2222"),
        "the underlay still reaches a service on the tunnel address"
    );
    assert!(
        connects_from(&gw, "10.8.0.1:2222"),
        "the host itself must still reach its own tunnel address"
    );
    assert!(
        connects_from(&tunside, "10.8.0.1:2222"),
        "the tunnel side still reaches the gateway's tunnel address"
    );
    assert!(
        !connects_from(&tunside, "192.168.1.1:2223"),
        "the tunnel reaches a host address that is neither the tunnel address nor a service"
    );

    // A leftover table (a daemon killed with -9) is replaced, not doubled.
    let (ok, err) = nft_apply(&gw, &doc);
    assert!(ok, "nft refused the replacement: {err}");
    assert_eq!(table_rules(&gw), Some(rules), "replaced, not appended");

    let (ok, err) = nft_apply(&gw, &removal());
    assert!(ok, "nft refused the removal: {err}");
    assert_eq!(table_rules(&gw), None, "the table is gone");
    assert!(
        connects_from(&attacker, "10.8.0.1:2222"),
        "removal restores the host's own behaviour"
    );
    drop((service, wildcard));
}

/// `run` installs the table at start, a start after `kill -9` replaces the
/// leftover (same rules, not doubled), SIGTERM removes it; `manage = false`
/// leaves the host's firewall alone.
#[test]
fn daemon_installs_replaces_and_removes_the_table() {
    if !rig_ready("firewall_daemon") {
        return;
    }
    let n = names("fd");
    let gw_ns = Netns::new(&n.netns("gw"));
    let mut gw = Gateway::init(&gw_ns, &n.name("g"));
    let forwarding = || gw_ns.run_ok(&["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(
        forwarding().trim(),
        "0",
        "a new namespace starts without forwarding"
    );
    gw.start();
    let installed = table_rules(&gw_ns).expect("table installed at start");
    assert!(installed >= 4, "{installed} rules");
    assert!(!gw.events_named("firewall_installed").is_empty());
    assert_eq!(forwarding().trim(), "1", "run turns IPv4 forwarding on");
    assert!(!gw.events_named("forwarding_enabled").is_empty());

    assert!(
        gw.signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
            .is_some(),
        "kill -9"
    );
    assert_eq!(table_rules(&gw_ns), Some(installed), "kill -9 leaves it");
    // The killed daemon left its UAPI socket; the next start binds anew.
    let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", gw.ifname));
    gw.restart();
    assert_eq!(
        table_rules(&gw_ns),
        Some(installed),
        "replaced, not doubled"
    );

    let st = gw
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
        .expect("stops on SIGTERM");
    assert!(st.success(), "clean stop: {st}");
    assert_eq!(table_rules(&gw_ns), None, "removed at stop");
    assert!(!gw.events_named("firewall_removed").is_empty());

    let text = std::fs::read_to_string(&gw.config).expect("config");
    assert!(text.contains("manage = true"), "init writes manage = true");
    std::fs::write(&gw.config, text.replace("manage = true", "manage = false"))
        .expect("rewrite config");
    gw.restart();
    assert_eq!(table_rules(&gw_ns), None, "manage = false installs nothing");
    assert!(gw.events_named("firewall_installed").is_empty());
}
