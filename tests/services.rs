//! What sites reach through the gateway, and what nobody reaches around it: the
//! real `sitegate run` in a network namespace with stock wg-quick +
//! wireguard-go sites, an internal LAN host, an "internet" host behind the
//! egress interface, and an attacker on the underlay that routes the tunnel
//! subnet via the gateway.
//!
//! ```text
//!  site i (192.168.i.2) ──┐                       ┌── LAN host 172.30.0.10 (route 10.8.0.0/24 via .1)
//!                         ├── gateway ns ─────────┤
//!  attacker 192.168.88.2 ─┘   sitegate run        └── internet host 203.0.113.10 (egress, NAT;
//!   (default via gateway)     TUN 10.8.0.1/24          no route to the tunnel subnet)
//! ```
//!
//! Needs root, `/dev/net/tun`, wireguard-go, wireguard-tools, nft, and per test
//! curl and tcpdump, or OpenSSH (sshd, sftp, ssh-keygen) and useradd; without
//! them a test prints a skip note, except under `CI=true`, where it fails.
//! All test traffic goes to addresses inside namespaces the test created.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The LAN host's address and the gateway's address on that link.
const LAN_HOST: &str = "172.30.0.10";
const LAN_GW: &str = "172.30.0.1";
/// The internet host's address and the gateway's egress address.
const INET_HOST: &str = "203.0.113.10";
const EGRESS_ADDR: &str = "203.0.113.1";
/// The attacker's underlay link number (`192.168.88.0/24`, see [`Underlay`]).
const ATTACKER_LINK: u8 = 88;
/// How long a connection attempt that must succeed is given.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);

/// The namespaces of one test. Declare it before the gateway and the sites so
/// it drops after them.
struct Net {
    gw: Netns,
    sites: Vec<Netns>,
    lan: Netns,
    inet: Netns,
    attacker: Netns,
    /// The gateway's end of the link to the internet host (`--egress`).
    egress: String,
}

impl Net {
    /// Builds the topology with `sites` site namespaces on underlay links 1..=sites.
    fn build(n: &Names, sites: u8) -> Net {
        let gw = Netns::new(&n.netns("gw"));
        let sites: Vec<Netns> = (1..=sites)
            .map(|i| {
                let ns = Netns::new(&n.netns(&format!("s{i}")));
                Underlay::attach(n, &gw, &ns, i);
                ns
            })
            .collect();

        let lan = Netns::new(&n.netns("lan"));
        veth(
            &gw,
            &n.name("lg"),
            &format!("{LAN_GW}/24"),
            &lan,
            &n.name("lh"),
            &format!("{LAN_HOST}/24"),
        );
        // Internal hosts answer sites directly (no NAT towards the LAN).
        lan.run_ok(&["ip", "route", "add", "default", "via", LAN_GW]);

        // The internet host knows only its own link: replies reach a site only
        // through the gateway's masquerade.
        let inet = Netns::new(&n.netns("net"));
        let egress = n.name("eg");
        veth(
            &gw,
            &egress,
            &format!("{EGRESS_ADDR}/24"),
            &inet,
            &n.name("eh"),
            &format!("{INET_HOST}/24"),
        );

        let attacker = Netns::new(&n.netns("at"));
        Underlay::attach(n, &gw, &attacker, ATTACKER_LINK);
        Net {
            gw,
            sites,
            lan,
            inet,
            attacker,
            egress,
        }
    }

    /// `sitegate init --egress <link to the internet host>`.
    fn gateway(&self, n: &Names) -> Gateway {
        Gateway::init_with(&self.gw, &n.name("g"), &["--egress", &self.egress])
    }
}

/// A TCP listener on `addr` in namespace `ns`. The kernel completes handshakes
/// into its backlog without `accept`, which is all a reachability check needs.
fn listen(ns: &Netns, addr: &str) -> TcpListener {
    let a: SocketAddr = addr.parse().expect("IP:PORT");
    in_netns(&ns.name, move || {
        TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}"))
    })
    .join()
    .expect("listener thread")
}

/// Asserts that a TCP connection from `ns` to `dst` opens.
fn assert_reaches(ns: &Netns, who: &str, dst: &str, gw: &Gateway) {
    if let Err(kind) = tcp_connect_from(&ns.name, dst, CONNECT_WITHIN) {
        panic!(
            "{who} cannot connect to {dst} ({kind:?}); gateway log:\n{}",
            gw.log_tail(30)
        );
    }
}

/// Whether `ev` is a `packet_denied` event with `reason` for `peer`.
fn denied(ev: &Value, reason: &str, peer: &str) -> bool {
    is_event(ev, "packet_denied", reason) && field_str(ev, "peer") == peer
}

/// The peer named `name` in `status --json`.
fn status_peer(gw: &Gateway, name: &str) -> Value {
    let st = gw.status_json();
    st["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("status --json lists no peer {name}:\n{st}"))
}

/// Serves one HTTP request on `listener` within `deadline`: answers `body` and
/// returns the client's address as this host saw it (None: nobody came).
fn serve_one_http(
    listener: TcpListener,
    body: &'static str,
    deadline: Duration,
) -> Option<SocketAddr> {
    listener.set_nonblocking(true).expect("nonblocking");
    let end = Instant::now() + deadline;
    let (mut s, peer) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= end {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    s.set_nonblocking(false).expect("blocking");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => req.extend_from_slice(&buf[..k]),
        }
    }
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(reply.as_bytes()).expect("write reply");
    Some(peer)
}

/// Lines `tcpdump -r CAPTURE -n FILTER` prints (the packets matching FILTER).
fn capture_lines(ns: &Netns, capture: &Path, filter: &str) -> Vec<String> {
    let cap = capture.to_str().expect("utf-8 path");
    let mut args = vec!["tcpdump", "-r", cap, "-n", "-q"];
    args.extend(filter.split_whitespace());
    let out = run(&mut ns.cmd(&args));
    assert!(
        out.status.success(),
        "tcpdump -r failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Full tunnel: a site fetches a page from the internet host through the
/// tunnel; the internet host sees the gateway's egress address as the client;
/// the site's underlay carries only UDP to the gateway's port meanwhile; and
/// `status --json` marks the peer's `internet_seen_at` (null before).
#[test]
fn full_tunnel_reaches_internet_via_nat_and_nothing_leaks() {
    if !rig_ready("full_tunnel") || !tools_ready("full_tunnel", &["nft", "curl", "tcpdump"]) {
        return;
    }
    let n = names("vf");
    let net = Net::build(&n, 1);
    let site_ns = &net.sites[0];
    let mut gw = net.gateway(&n);
    let conf = gw.add_peer("site1");
    gw.start();
    let _site = Site::up(site_ns, &n.name("w1"), &conf);
    assert!(
        site_ns.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE),
        "site cannot ping {GATEWAY_TUNNEL_ADDR}; gateway log:\n{}",
        gw.log_tail(40)
    );
    let before = status_peer(&gw, "site1");
    assert!(
        before.get("internet_seen_at").is_some_and(Value::is_null),
        "internet_seen_at set before any internet-bound traffic: {before}"
    );

    // Capture the site's underlay during the fetch.
    let capture = gw.dir.path.join("site-underlay.pcap");
    let cap_log = gw.dir.path.join("tcpdump.log");
    let underlay_if = n.name("s1");
    let mut tcpdump = Bg::spawn(
        site_ns,
        &[
            "tcpdump",
            "-i",
            &underlay_if,
            "-n",
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            "-w",
            capture.to_str().unwrap(),
        ],
        &cap_log,
    );
    assert!(
        poll_until(Duration::from_secs(10), || fs::read_to_string(&cap_log)
            .unwrap_or_default()
            .contains("listening on")),
        "tcpdump did not start: {}",
        fs::read_to_string(&cap_log).unwrap_or_default()
    );

    let started = now_unix();
    let listener = listen(&net.inet, &format!("{INET_HOST}:8080"));
    let server = in_netns(&net.inet.name, move || {
        serve_one_http(
            listener,
            "hello from the internet\n",
            Duration::from_secs(20),
        )
    });
    let out = run(&mut site_ns.cmd(&[
        "curl",
        "-sS",
        "--max-time",
        "15",
        &format!("http://{INET_HOST}:8080/hello"),
    ]));
    let client = server.join().expect("http server thread");
    assert!(
        out.status.success(),
        "curl through the tunnel failed: {}; gateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log_tail(30)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the internet\n"
    );
    let client = client.expect("the internet host saw no connection");
    assert_eq!(
        client.ip().to_string(),
        EGRESS_ADDR,
        "the internet host must see the gateway's egress address (NAT)"
    );

    // The fetch took a handful of datagrams each way; once the capture holds
    // them, what else it holds is the verdict.
    let tunnel_filter = format!(
        "udp and dst host {} and dst port {GATEWAY_PORT}",
        Underlay::GATEWAY_ADDR
    );
    let mut tunnel = 0;
    poll_until(Duration::from_secs(5), || {
        tunnel = capture_lines(site_ns, &capture, &tunnel_filter).len();
        tunnel >= 4
    });
    assert!(tcpdump.stop(libc::SIGINT), "tcpdump did not stop");
    assert!(
        tunnel >= 4,
        "the capture shows too little tunnel traffic ({tunnel} datagrams): is it the right interface?\n{}",
        fs::read_to_string(&cap_log).unwrap_or_default()
    );
    let clear = capture_lines(
        site_ns,
        &capture,
        &format!(
            "ip and not (udp and host {} and port {GATEWAY_PORT})",
            Underlay::GATEWAY_ADDR
        ),
    );
    assert!(
        clear.is_empty(),
        "IPv4 packets on the site's underlay other than the tunnel:\n{}",
        clear.join("\n")
    );
    let inet_clear = capture_lines(site_ns, &capture, &format!("host {INET_HOST} or tcp"));
    assert!(
        inet_clear.is_empty(),
        "TCP or the internet host's address in clear on the underlay:\n{}",
        inet_clear.join("\n")
    );

    let mut seen = Value::Null;
    poll_until(Duration::from_secs(5), || {
        seen = status_peer(&gw, "site1")["internet_seen_at"].clone();
        !seen.is_null()
    });
    let at = seen
        .as_u64()
        .unwrap_or_else(|| panic!("internet_seen_at not Unix seconds after the fetch: {seen}"));
    assert!(
        at as f64 >= started.floor() - 1.0 && at as f64 <= now_unix() + 1.0,
        "internet_seen_at {at} is not the time of the fetch (from {started})"
    );
    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));
}

/// A throwaway account for the SFTP test, `sftp-*` so that the snippet's
/// `Match User` applies; removed on drop.
struct TestUser {
    name: String,
}

impl TestUser {
    fn create(name: &str, home: &str) -> TestUser {
        let _ = Command::new("userdel").arg(name).output();
        // `*`: no password, yet not locked (sshd without PAM refuses locked accounts).
        run_ok(Command::new("useradd").args([
            "--no-create-home",
            "--home-dir",
            home,
            "--shell",
            "/usr/sbin/nologin",
            "--password",
            "*",
            name,
        ]));
        TestUser {
            name: name.to_string(),
        }
    }

    fn ids(&self) -> (u32, u32) {
        let out = run_ok(Command::new("id").arg(&self.name));
        let num = |key: &str| -> u32 {
            let rest = out.split(key).nth(1).expect("id output");
            rest.split('(').next().unwrap().parse().expect("numeric id")
        };
        (num("uid="), num("gid="))
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

/// A directory tree sshd accepts for chroot and key files: under /run (/tmp is
/// world-writable, which sshd refuses on every chroot path component), root
/// owned, mode 0755; removed on drop.
struct RunDir {
    path: PathBuf,
}

impl RunDir {
    fn new(tag: &str) -> RunDir {
        let path = PathBuf::from(format!("/run/sitegate-test-{tag}"));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create run dir");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        RunDir { path }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn sha256_file(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    recv_stream(&mut f).1
}

/// SFTP: sshd configured from `deploy/sshd-sftp.conf` on the tunnel address;
/// a site uploads and downloads a file through the tunnel with `sftp -b` and
/// the SHA-256 sums match at every hop; from the underlay, an attacker that
/// routes the tunnel subnet via the gateway gets no answer on 10.8.0.1:22 nor
/// on the API port 10.8.0.1:8443, though it reaches the gateway's underlay.
#[test]
fn sftp_through_the_tunnel_only() {
    if !rig_ready("sftp")
        || !tools_ready(
            "sftp",
            &["nft", "sshd", "sftp", "ssh-keygen", "useradd", "userdel"],
        )
    {
        return;
    }
    ensure_sshd_privsep_dir();
    let n = names("vs");
    let net = Net::build(&n, 1);
    let site_ns = &net.sites[0];
    let mut gw = net.gateway(&n);
    let conf = gw.add_peer("site1"); // default grants: sftp
    gw.start();
    let _site = Site::up(site_ns, &n.name("w1"), &conf);
    assert!(
        site_ns.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE),
        "site cannot ping {GATEWAY_TUNNEL_ADDR}; gateway log:\n{}",
        gw.log_tail(40)
    );

    // The account, its chroot (root-owned) with a writable upload directory,
    // and its key.
    let user = TestUser::create(&format!("sftp-{}", n.name("")), "/upload");
    let (uid, gid) = user.ids();
    let root = RunDir::new(&format!("sftp-{}", n.name("")));
    let chroot_base = root.path.join("chroot");
    let chroot = chroot_base.join(&user.name);
    let upload = chroot.join("upload");
    let keys = root.path.join("keys");
    for d in [&chroot_base, &chroot, &upload, &keys] {
        fs::create_dir_all(d).expect("create dir");
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::os::unix::fs::chown(&upload, Some(uid), Some(gid)).expect("chown upload");
    let client_key = gw.dir.path.join("site_ed25519");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&client_key),
    );
    let pubkey = fs::read_to_string(client_key.with_extension("pub")).expect("public key");
    let authorized = keys.join(&user.name);
    fs::write(&authorized, pubkey).expect("authorized_keys");
    fs::set_permissions(&authorized, fs::Permissions::from_mode(0o644)).expect("chmod");

    // sshd_config: host key and key file paths, then the shipped snippet with
    // the chroot base moved here.
    let snippet = include_str!("../deploy/sshd-sftp.conf");
    assert!(
        snippet.contains(&format!("ListenAddress {GATEWAY_TUNNEL_ADDR}:22")),
        "the snippet does not listen on {GATEWAY_TUNNEL_ADDR}:22"
    );
    assert!(snippet.contains("/srv/sftp/%u"), "snippet chroot path");
    let snippet = snippet.replace("/srv/sftp/%u", &format!("{}/%u", chroot_base.display()));
    let host_key = gw.dir.path.join("host_ed25519");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key),
    );
    let sshd_config = gw.dir.path.join("sshd_config");
    fs::write(
        &sshd_config,
        format!(
            "HostKey {}\nPidFile none\nStrictModes no\nUsePAM no\nLogLevel VERBOSE\n\
             AuthorizedKeysFile {}/%u\nSubsystem sftp /usr/lib/openssh/sftp-server\n{snippet}",
            host_key.display(),
            keys.display()
        ),
    )
    .expect("write sshd_config");
    let sshd_bin = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("sshd"))
                .find(|p| p.is_file())
        })
        .expect("sshd on PATH");
    let sshd_log = gw.dir.path.join("sshd.log");
    // sshd re-executes itself, so it needs its absolute path.
    let mut sshd = Bg::spawn(
        &net.gw,
        &[
            sshd_bin.to_str().unwrap(),
            "-D",
            "-e",
            "-f",
            sshd_config.to_str().unwrap(),
        ],
        &sshd_log,
    );
    let listening = poll_until(Duration::from_secs(10), || {
        !sshd.is_running()
            || net
                .gw
                .run_ok(&["ss", "-ltnH", "sport = :22"])
                .contains(&format!("{GATEWAY_TUNNEL_ADDR}:22"))
    });
    assert!(
        listening && sshd.is_running(),
        "sshd is not listening on {GATEWAY_TUNNEL_ADDR}:22:\n{}",
        fs::read_to_string(&sshd_log).unwrap_or_default()
    );
    // A stand-in for the admin API (issue 9) on its port, unless the daemon
    // already listens there itself.
    let _api = in_netns(&net.gw.name, || TcpListener::bind("10.8.0.1:8443").ok())
        .join()
        .expect("api listener thread");

    // Upload and download 1 MiB through the tunnel.
    let local = gw.dir.path.join("payload.bin");
    let back = gw.dir.path.join("payload.back");
    let mut f = fs::File::create(&local).expect("payload");
    let sent = send_stream(&mut f, 0x5f7e_5eed, 1 << 20);
    drop(f);
    let batch = gw.dir.path.join("sftp.batch");
    fs::write(
        &batch,
        format!(
            "put {} /upload/payload.bin\nget /upload/payload.bin {}\n",
            local.display(),
            back.display()
        ),
    )
    .expect("batch file");
    let target = format!("{}@{GATEWAY_TUNNEL_ADDR}", user.name);
    let out = run(&mut site_ns.cmd(&[
        "sftp",
        "-F",
        "/dev/null",
        "-b",
        batch.to_str().unwrap(),
        "-i",
        client_key.to_str().unwrap(),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=10",
        &target,
    ]));
    assert!(
        out.status.success(),
        "sftp through the tunnel failed ({}):\n{}{}\nsshd log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        fs::read_to_string(&sshd_log).unwrap_or_default()
    );
    assert_eq!(
        sha256_file(&upload.join("payload.bin")),
        sent,
        "uploaded file differs"
    );
    assert_eq!(sha256_file(&back), sent, "downloaded file differs");

    // The attacker reaches the gateway's underlay address (a listener there
    // answers) but neither service on the tunnel address.
    let control = format!("192.168.{ATTACKER_LINK}.1:2222");
    let _control = listen(&net.gw, &control);
    if let Err(kind) = tcp_connect_from(&net.attacker.name, &control, CONNECT_WITHIN) {
        panic!(
            "the attacker cannot reach the gateway's underlay ({kind:?}): this test proves nothing"
        );
    }
    for port in [22, 8443] {
        assert_unanswered(
            &net.attacker,
            "the attacker on the underlay",
            &format!("{GATEWAY_TUNNEL_ADDR}:{port}"),
        );
    }
    assert!(sshd.is_running(), "sshd died");
    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));
}

/// Per-service ACL: an internal service declared as a `[[service]]` answers
/// only the peer granted it (the other's attempt is logged as
/// `packet_denied reason=acl`); an internal port that is not a service answers
/// neither; the API port answers only the peer granted `api`; both may ping
/// the gateway.
#[test]
fn services_answer_only_granted_peers() {
    if !rig_ready("acl") || !tools_ready("acl", &["nft"]) {
        return;
    }
    let n = names("va");
    let net = Net::build(&n, 2);
    let mut gw = net.gateway(&n);
    gw.add_service("db", &format!("{LAN_HOST}:5432"), false);
    let conf_a = gw.add_peer_with("granted", &["--service", "db", "--service", "api"]);
    let conf_b = gw.add_peer("plain"); // default grants only: sftp
    gw.start();
    let _db = listen(&net.lan, &format!("{LAN_HOST}:5432"));
    let _other = listen(&net.lan, &format!("{LAN_HOST}:6000"));
    let _api = in_netns(&net.gw.name, || TcpListener::bind("10.8.0.1:8443").ok())
        .join()
        .expect("api listener thread");
    // The listeners are up and routed: the gateway itself reaches them.
    for dst in [format!("{LAN_HOST}:5432"), format!("{LAN_HOST}:6000")] {
        assert_reaches(&net.gw, "the gateway host", &dst, &gw);
    }

    let (ns_a, ns_b) = (&net.sites[0], &net.sites[1]);
    let _site_a = Site::up(ns_a, &n.name("w1"), &conf_a);
    let _site_b = Site::up(ns_b, &n.name("w2"), &conf_b);
    for (ns, who) in [(ns_a, "granted"), (ns_b, "plain")] {
        assert!(
            ns.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE),
            "{who} cannot ping {GATEWAY_TUNNEL_ADDR} (echo is allowed for every peer); gateway log:\n{}",
            gw.log_tail(40)
        );
    }

    let db = format!("{LAN_HOST}:5432");
    let other = format!("{LAN_HOST}:6000");
    let api = format!("{GATEWAY_TUNNEL_ADDR}:8443");
    assert_reaches(ns_a, "granted", &db, &gw);
    assert_unanswered(ns_b, "plain (not granted db)", &db);
    let ev = gw.wait_event("packet_denied acl for plain", Duration::from_secs(5), |e| {
        denied(e, "acl", "plain")
    });
    assert!(
        field_u64(&ev, "count").unwrap_or(0) >= 1,
        "packet_denied without a count: {ev}"
    );
    for (ns, who) in [(ns_a, "granted"), (ns_b, "plain")] {
        assert_unanswered(ns, who, &other);
    }
    // A grant covers its service only: the granted peer's attempt on the other
    // port is an ACL drop too.
    gw.wait_event(
        "packet_denied acl for granted",
        Duration::from_secs(5),
        |e| denied(e, "acl", "granted"),
    );
    assert_reaches(ns_a, "granted (api)", &api, &gw);
    assert_unanswered(ns_b, "plain (not granted api)", &api);
    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));
}

/// Peer isolation: with `peer_to_peer = false` (what `init` writes) site A
/// cannot reach site B and `packet_denied reason=peer_isolation` is logged;
/// with `peer_to_peer = true` and a restart, A pings B and opens TCP to it.
#[test]
fn sites_isolated_unless_peer_to_peer() {
    if !rig_ready("isolation") || !tools_ready("isolation", &["nft"]) {
        return;
    }
    let n = names("vi");
    let net = Net::build(&n, 2);
    let mut gw = net.gateway(&n);
    let conf_a = gw.add_peer("site-a");
    let conf_b = gw.add_peer("site-b");
    gw.start();
    let (ns_a, ns_b) = (&net.sites[0], &net.sites[1]);
    let site_a = Site::up(ns_a, &n.name("w1"), &conf_a);
    let site_b = Site::up(ns_b, &n.name("w2"), &conf_b);
    let addr_b = site_b.address();
    // B listens on its tunnel address.
    let tcp_b = format!("{addr_b}:7000");
    let listener_b = listen(ns_b, &tcp_b);
    let both_up = |gw: &Gateway| {
        for (ns, who) in [(ns_a, "site-a"), (ns_b, "site-b")] {
            assert!(
                ns.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE),
                "{who} cannot ping {GATEWAY_TUNNEL_ADDR}; gateway log:\n{}",
                gw.log_tail(40)
            );
        }
    };
    both_up(&gw);

    assert!(!ns_a.ping_once(&addr_b, None), "site-a pinged site-b");
    assert_unanswered(ns_a, "site-a", &tcp_b);
    gw.wait_event(
        "packet_denied peer_isolation for site-a",
        Duration::from_secs(5),
        |e| denied(e, "peer_isolation", "site-a"),
    );

    let st = gw
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
        .expect("gateway stops on SIGTERM");
    assert!(st.success(), "clean stop: {st}");
    gw.edit_config("peer_to_peer = false", "peer_to_peer = true");
    gw.restart();
    // Fresh sessions at once instead of waiting ~15 s for wireguard-go to
    // notice the restart (TESTING.md); B's address comes back with its interface.
    drop(listener_b);
    drop(site_a);
    drop(site_b);
    let _site_a = Site::up(ns_a, &n.name("w1"), &conf_a);
    let _site_b = Site::up(ns_b, &n.name("w2"), &conf_b);
    let _listener_b = listen(ns_b, &tcp_b);
    both_up(&gw);
    assert!(
        ns_a.ping_until(&addr_b, Duration::from_secs(5)),
        "with peer_to_peer = true site-a cannot ping site-b; gateway log:\n{}",
        gw.log_tail(30)
    );
    assert_reaches(ns_a, "site-a", &tcp_b, &gw);
    assert!(
        !gw.events()
            .iter()
            .any(|e| denied(e, "peer_isolation", "site-a")),
        "peer_isolation logged with peer_to_peer = true:\n{}",
        gw.log_tail(30)
    );
    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));
}
