//! The privilege drop of issue 10 against the running daemon: `[daemon] user`
//! (`nobody`, present on every Debian) leaves the daemon with that uid and gid
//! and `CAP_NET_ADMIN` alone, on every thread; revoke, expiry, SIGHUP and the
//! clean stop (table and socket files removed) still work; the state files
//! belong to the user; an unknown user is refused; the admin actor comes from
//! the control socket's peer credentials, not from what the client says.
//!
//! Needs root, `/dev/net/tun`, wireguard-go and wireguard-tools; without them a
//! test prints a skip note, except under `CI=true`, where it fails.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// The unprivileged account the tests drop to (Debian's `nobody:nogroup`).
const USER: &str = "nobody";
const NOBODY_ID: u64 = 65534;
/// `CAP_NET_ADMIN` (bit 12), as `/proc/PID/status` prints it.
const CAP_NET_ADMIN_MASK: u64 = 0x1000;
/// A site's wireguard-go redials about 15 s after the gateway drops its session.
const EXPIRY_DEADLINE: Duration = Duration::from_secs(30);

/// One `/proc/PID[/task/TID]/status`: the id lists and capability masks.
#[derive(Debug)]
struct Creds {
    uid: Vec<u64>,
    gid: Vec<u64>,
    groups: Vec<u64>,
    cap_inh: u64,
    cap_prm: u64,
    cap_eff: u64,
    cap_amb: u64,
    no_new_privs: u64,
}

fn parse_status(text: &str) -> Creds {
    let field = |name: &str| -> &str {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {name} in status:\n{text}"))
            .trim()
    };
    let ids = |name: &str| -> Vec<u64> {
        field(name)
            .split_whitespace()
            .map(|v| v.parse().expect("numeric id"))
            .collect()
    };
    let hex = |name: &str| u64::from_str_radix(field(name), 16).expect("hex mask");
    Creds {
        uid: ids("Uid"),
        gid: ids("Gid"),
        groups: ids("Groups"),
        cap_inh: hex("CapInh"),
        cap_prm: hex("CapPrm"),
        cap_eff: hex("CapEff"),
        cap_amb: hex("CapAmb"),
        no_new_privs: field("NoNewPrivs").parse().expect("NoNewPrivs"),
    }
}

/// Asserts the dropped credentials on one status file.
fn assert_dropped(what: &str, status: &Path) {
    let text = fs::read_to_string(status).unwrap_or_else(|e| panic!("{what}: {e}"));
    let c = parse_status(&text);
    assert_eq!(c.uid, [NOBODY_ID; 4], "{what}: {c:?}");
    assert_eq!(c.gid, [NOBODY_ID; 4], "{what}: {c:?}");
    assert_eq!(c.groups, [NOBODY_ID], "{what}: {c:?}");
    assert_eq!(c.cap_eff, CAP_NET_ADMIN_MASK, "{what}: CapEff {c:?}");
    assert_eq!(c.cap_prm, CAP_NET_ADMIN_MASK, "{what}: CapPrm {c:?}");
    assert_eq!((c.cap_inh, c.cap_amb), (0, 0), "{what}: {c:?}");
    assert_eq!(c.no_new_privs, 1, "{what}: {c:?}");
}

/// Processes whose command line names `config` (the daemon and its helper).
fn processes_of(config: &Path) -> Vec<i32> {
    let needle = config.to_string_lossy().into_owned();
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| {
                let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                let cmd = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                (cmd.contains(&needle) && cmd.contains(" run")).then_some(pid)
            })
            .collect()
        })
        .unwrap_or_default()
}

/// Sends one raw control request as root and returns the reply line.
fn control_request(ifname: &str, line: &str) -> String {
    let path = format!("/run/sitegate/{ifname}.sock");
    let mut s = std::os::unix::net::UnixStream::connect(&path).expect("connect control socket");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(format!("{line}\n").as_bytes()).expect("send");
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).expect("reply");
    reply
}

/// Pings the gateway's tunnel address from `ns` until it answers.
fn assert_connects(ns: &Netns, gw: &Gateway, who: &str) {
    assert!(
        ns.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE),
        "{who} cannot ping {GATEWAY_TUNNEL_ADDR}; gateway log:\n{}",
        gw.log_tail(40)
    );
}

/// With `init --user nobody`, the running daemon and each of its threads
/// show uid/gid 65534 in all four fields, CapEff = CapPrm = CAP_NET_ADMIN,
/// no inheritable or ambient capability, NoNewPrivs 1; sites connect and
/// pass traffic; expiry and revoke cut sessions; SIGHUP reloads; the store
/// and audit files belong to the user; SIGTERM stops cleanly with the nft
/// table, the TUN device, both socket files and the cleanup helper gone.
/// On the way, an admin event sent with a forged actor is recorded under
/// the connecting process's user (root), from SO_PEERCRED.
#[test]
fn dropped_daemon_keeps_net_admin_only_and_still_works() {
    if !rig_ready("privilege_drop") {
        return;
    }
    let n = names("pd");
    let gw_ns = Netns::new(&n.netns("gw"));
    let sites: Vec<Netns> = (1..=2)
        .map(|i| {
            let ns = Netns::new(&n.netns(&format!("s{i}")));
            Underlay::attach(&n, &gw_ns, &ns, i);
            ns
        })
        .collect();
    let mut gw = Gateway::init_with(&gw_ns, &n.name("g"), &["--user", USER]);
    let text = fs::read_to_string(&gw.config).expect("config");
    assert!(text.contains(&format!("user = \"{USER}\"")), "{text}");
    let conf_a = gw.add_peer("sitea");
    gw.start();
    let pid = gw.pid();

    let dropped = gw.wait_event("privileges_dropped", Duration::from_secs(5), |e| {
        field_str(e, "event") == "privileges_dropped"
    });
    assert_eq!(field_str(&dropped, "user"), USER);
    assert_eq!(field_u64(&dropped, "uid"), Some(NOBODY_ID));
    assert_eq!(field_str(&dropped, "capabilities"), "CAP_NET_ADMIN");
    assert_dropped("daemon", Path::new(&format!("/proc/{pid}/status")));
    let tasks: Vec<PathBuf> = fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|e| Some(e.ok()?.path().join("status")))
        .collect();
    assert!(tasks.len() >= 3, "rx, tx and the control loop: {tasks:?}");
    for t in &tasks {
        assert_dropped(&t.display().to_string(), t);
    }

    // Added live (over the control socket, by root): the actor is root.
    let conf_b = gw.cli_ok(&["peer", "add", "siteb", "--expires", "10s"]);
    let added = gw.wait_event("peer_added siteb", Duration::from_secs(3), |e| {
        field_str(e, "event") == "peer_added" && field_str(e, "peer") == "siteb"
    });
    assert_eq!(field_str(&added, "actor"), "root");
    let site_a = Site::up(&sites[0], &n.name("wa"), &conf_a);
    let _site_b = Site::up(&sites[1], &n.name("wb"), &conf_b);
    assert_connects(&sites[0], &gw, "sitea");
    assert_connects(&sites[1], &gw, "siteb");

    // A client cannot choose its actor: the daemon records its peer's uid.
    let reply = control_request(
        &gw.ifname,
        r#"{"cmd":"reload","event":{"event":"peer_rotated","actor":"mallory","fields":{"peer":"forged","sudo_user":"eve"}}}"#,
    );
    assert!(reply.contains("reloaded"), "{reply}");
    let forged = gw.wait_event("peer_rotated forged", Duration::from_secs(3), |e| {
        field_str(e, "event") == "peer_rotated" && field_str(e, "peer") == "forged"
    });
    assert_eq!(field_str(&forged, "actor"), "root", "{forged}");
    assert_eq!(field_str(&forged, "sudo_user"), "eve", "{forged}");

    gw.wait_event("session_closed reason=expired", EXPIRY_DEADLINE, |e| {
        is_event(e, "session_closed", "expired") && field_str(e, "peer") == "siteb"
    });
    assert!(
        !sites[1].ping_once(GATEWAY_TUNNEL_ADDR, None),
        "siteb still pings after its expiry"
    );

    let key_a = site_a.public_key();
    gw.cli_ok(&["peer", "revoke", "sitea", "--reason", "test"]);
    gw.wait_event(
        "session_closed reason=revoked",
        Duration::from_secs(2),
        |e| is_event(e, "session_closed", "revoked") && field_str(e, "public_key") == key_a,
    );
    assert!(
        !sites[0].ping_once(GATEWAY_TUNNEL_ADDR, None),
        "sitea still pings after its revocation"
    );

    // SAFETY: kill(2) on the daemon this test started, still running.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    gw.wait_event(
        "config_reloaded trigger=sighup",
        Duration::from_secs(3),
        |e| field_str(e, "event") == "config_reloaded" && field_str(e, "trigger") == "sighup",
    );

    let state = gw.dir.path.join("state");
    let audit = state.join("audit.jsonl");
    for f in [state.clone(), state.join("sitegate.db"), audit.clone()] {
        let m = fs::metadata(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert_eq!(
            (u64::from(m.uid()), u64::from(m.gid())),
            (NOBODY_ID, NOBODY_ID),
            "{} not owned by {USER}",
            f.display()
        );
    }
    let trail = fs::read_to_string(&audit).expect("audit log");
    assert!(
        trail.contains("\"privileges_dropped\"") && trail.contains("\"session_closed\""),
        "the dropped daemon appends to the audit log:\n{trail}"
    );

    let status = gw
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no exit within 10 s of SIGTERM; log:\n{}", gw.log_tail(40)));
    assert!(
        status.success(),
        "SIGTERM: {status}; log:\n{}",
        gw.log_tail(40)
    );
    assert!(
        gw.log_text().contains("\"firewall_removed\""),
        "no firewall_removed event; log:\n{}",
        gw.log_tail(20)
    );
    assert!(
        !gw_ns.succeeds(&["nft", "list", "table", "inet", "sitegate"]),
        "nftables table inet sitegate left after SIGTERM"
    );
    assert!(!link_exists(&gw.ns, &gw.ifname), "TUN left after SIGTERM");
    for sock in [
        format!("/var/run/wireguard/{}.sock", gw.ifname),
        format!("/run/sitegate/{}.sock", gw.ifname),
    ] {
        assert!(!Path::new(&sock).exists(), "{sock} left after SIGTERM");
    }
    assert!(
        poll_until(Duration::from_secs(3), || processes_of(&gw.config)
            .is_empty()),
        "the cleanup helper outlived the daemon: {:?}",
        processes_of(&gw.config)
    );
    let (code, out) = audit_verify(&gw, None);
    assert_eq!(code, 0, "audit verify after the run:\n{out}");
}

/// A `[daemon] user` that does not exist: `run` exits 1 naming `daemon.user`
/// before creating anything, and `check` fails naming it. An existing user
/// whose state directory it cannot write: `run` exits 1 naming the directory
/// and the fix.
#[test]
fn unknown_user_refused_by_run_and_check() {
    if !rig_ready("privilege_unknown_user") {
        return;
    }
    let n = names("pu");
    let gw_ns = Netns::new(&n.netns("gw"));
    let gw = Gateway::init(&gw_ns, &n.name("g"));
    gw.edit_config(
        "seal_key_file = ",
        "user = \"sg-no-such-user\"\nseal_key_file = ",
    );
    let out = run(Command::new("ip")
        .args(["netns", "exec", &gw.ns])
        .arg(sitegate_bin())
        .arg("--config")
        .arg(&gw.config)
        .arg("run"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "run: {stderr}");
    assert!(
        stderr.contains("daemon.user") && stderr.contains("sg-no-such-user"),
        "{stderr}"
    );
    assert!(
        !link_exists(&gw.ns, &gw.ifname),
        "TUN created before the refusal"
    );
    assert!(
        !Path::new(&format!("/run/sitegate/{}.sock", gw.ifname)).exists(),
        "control socket left"
    );
    let check = run(&mut gw.cli(&["check"]));
    let report = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "check:\n{report}");
    assert!(
        report
            .lines()
            .any(|l| l.contains("privileges") && l.contains("daemon.user")),
        "{report}"
    );

    // `init` without --user left the store in the root-only config directory.
    gw.edit_config("user = \"sg-no-such-user\"", &format!("user = \"{USER}\""));
    let out = run(Command::new("ip")
        .args(["netns", "exec", &gw.ns])
        .arg(sitegate_bin())
        .arg("--config")
        .arg(&gw.config)
        .arg("run"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "run: {stderr}");
    let dir = gw.dir.path.display().to_string();
    assert!(
        stderr.contains("daemon.user")
            && stderr.contains(&format!("chown {USER} {dir}"))
            && stderr.contains("writable"),
        "{stderr}"
    );
    assert!(
        !link_exists(&gw.ns, &gw.ifname),
        "TUN created before the refusal"
    );
}

/// The status parser reads the four ids and the masks.
#[test]
fn status_parser() {
    let c = parse_status(
        "Name:\tsitegate\nUid:\t65534\t65534\t65534\t65534\nGid:\t1\t2\t3\t4\nGroups:\t65534 \n\
         CapInh:\t0000000000000000\nCapPrm:\t0000000000001000\nCapEff:\t0000000000001000\n\
         CapBnd:\t0000000000001000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n",
    );
    assert_eq!(c.uid, [65534; 4]);
    assert_eq!(c.gid, [1, 2, 3, 4]);
    assert_eq!(c.groups, [65534]);
    assert_eq!(
        (c.cap_prm, c.cap_eff, c.cap_inh, c.cap_amb),
        (0x1000, 0x1000, 0, 0)
    );
    assert_eq!(c.no_new_privs, 1);
}
