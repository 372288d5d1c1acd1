//! The soak of issue 10: 200 peers issued and revoked in a loop, several
//! rounds, while one stock wg-quick + wireguard-go site streams through the
//! tunnel the whole time. Real `sitegate run` in a network namespace.
//!
//! ```text
//!  stream site (wg-quick, wireguard-go) 192.168.1.2 ──┐
//!                                                     ├── gateway ns: sitegate run,
//!  churn ns (test threads, boringtun)   192.168.2.2 ──┘   stream sink/source on 10.8.0.1:5201
//! ```
//!
//! One round: `peer add` of [`PEERS`] fresh names with keys made here (the CLI,
//! [`WORKERS`] processes at a time, so commands race for the store as admins'
//! would), a WireGuard handshake from each of them (boringtun in a thread in
//! the churn namespace: initiation, response, keepalive, so the daemon holds a
//! live session per peer), then `peer revoke` of all of them. After every add
//! and every revoke phase the registry (`peer list --json`) and the daemon's
//! live view (`status --json`) must agree: each issued and unrevoked peer
//! present once with its key and its own address, each revoked one absent
//! from the daemon and `revoked` in the registry, nothing else.
//!
//! Rounds start [`ROUND_PERIOD`] apart, so the churn spans about two minutes.
//! Meanwhile the stream site keeps two TCP connections through the tunnel to a
//! service on the gateway's tunnel address, one each way, each paced at
//! [`STREAM_RATE`]; every byte is checked against [`Stream`]. The stream goes
//! on until wireguard-go has rekeyed its session (120 s after the first
//! handshake), so the rekey falls among the rounds. At the end: the daemon's
//! VmRSS has grown by at most [`RSS_TOLERANCE_PCT`] over its value after the
//! [`WARMUP_ROUNDS`] warm-up rounds, its open descriptors and threads did not
//! grow, no byte was lost or wrong, neither connection stalled longer than
//! [`MAX_STALL`] or broke, the stream peer's session never ended (no
//! `session_closed`, no `handshake_failed`, one handshake and its rekey), every
//! churn peer's session was logged open and closed once (`handshake`,
//! `session_closed reason=revoked`), and the audit chain verifies.
//!
//! Why a baseline after two rounds: the revocation list is kept in memory by
//! design (about 150 bytes per revoked key), and each reload reads the whole
//! registry, revoked rows included, so the allocator's high-water mark follows
//! the registry's size; the first rounds also size the allocator arenas, the
//! peer table's maps and the stream's buffers. Measured here: RSS ~11.5 MiB
//! before the churn, ~14.8 MiB after round 0, ~15.5 MiB after round 1, then
//! flat within ±1 MiB per round; glibc's in-use bytes grow ~175 bytes per
//! revoked peer (the revocation list), nothing per operation.
//!
//! Bounded: [`ROUNDS`] rounds of [`PEERS`] peers, and a hard deadline
//! ([`SOAK_DEADLINE`]) after which the test fails instead of going on. Needs
//! root, `/dev/net/tun`, wireguard-go and wireguard-tools; without them it
//! prints a skip note, except under `CI=true`, where it fails. All traffic
//! stays inside the test's namespaces. `--nocapture` shows the figures.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use common::*;
use serde_json::Value;

/// Peers issued and revoked per round.
const PEERS: usize = 200;
/// Rounds.
const ROUNDS: usize = 4;
/// Rounds of warm-up: the baseline RSS is taken after them (allocator arenas,
/// SQLite, the peer table's maps and the stream's buffers at their working size).
const WARMUP_ROUNDS: usize = 2;
/// Round `r` starts `r` periods after the first: the churn spans a couple of
/// minutes, not one burst (a round itself takes about 5 s here).
const ROUND_PERIOD: Duration = Duration::from_secs(35);
/// The stream goes on until its session has been rekeyed (wireguard-go rekeys
/// 120 s after a handshake), so that the rekey happens while peers come and go;
/// it must come within this many seconds of the first handshake.
const REKEY_WITHIN_SECS: f64 = 150.0;
/// CLI processes running at once.
const WORKERS: usize = 4;
/// The churn must be done by then (from the start of the first round), or the
/// test fails: it never runs on unbounded.
const SOAK_DEADLINE: Duration = Duration::from_secs(300);
/// End RSS against the baseline, in percent.
const RSS_TOLERANCE_PCT: u64 = 10;
/// The stream service, on the gateway's tunnel address.
const STREAM_SERVICE: &str = "10.8.0.1:5201";
/// Bytes per second each way.
const STREAM_RATE: u64 = 1 << 20;
/// Bytes per write (a multiple of 8, so both ends cut [`Stream`] alike).
const CHUNK: usize = 16 * 1024;
/// The longest a connection may go without receiving a byte. A session the
/// gateway dropped costs a wireguard-go site ~15 s before it dials again.
const MAX_STALL: Duration = Duration::from_secs(3);
/// A read or write that blocks this long ends the stream with an error.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Spacing of the churn peers' handshakes (the gateway asks for cookies above
/// 200 a second).
const HANDSHAKE_SPACING: Duration = Duration::from_millis(8);
/// The handshakes of one round must be done by then.
const HANDSHAKE_PHASE: Duration = Duration::from_secs(60);
/// How long the daemon's view may take to match the registry after a command
/// returned (the reload is synchronous, so this is only a margin).
const VIEW_DEADLINE: Duration = Duration::from_secs(10);
/// Seeds of the two directions.
const SEED_UP: u64 = 0x5eed_0001;
const SEED_DOWN: u64 = 0x5eed_0002;
/// The stream site's peer name.
const STREAM_PEER: &str = "streamer";

// ---------------------------------------------------------------------------
// The daemon's resources

/// VmRSS of `pid` in KiB.
fn vm_rss_kib(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Threads of `pid`.
fn threads(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads in /proc/PID/status")
}

/// Open file descriptors of `pid`.
fn open_fds(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("daemon fd directory")
        .count()
}

/// What the open descriptors of `pid` point to, for failure messages.
fn fd_targets(pid: i32) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| {
                    let target = fs::read_link(e.path()).unwrap_or_default();
                    format!(
                        "{} -> {}",
                        e.file_name().to_string_lossy(),
                        target.display()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

// ---------------------------------------------------------------------------
// Churn peers: keys made here, issued and revoked through the CLI

/// One churn peer as issued.
struct Churned {
    name: String,
    secret: StaticSecret,
    public_b64: String,
    psk: [u8; 32],
    address: String,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn key32(text: &str, what: &str) -> [u8; 32] {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .unwrap_or_else(|e| panic!("{what}: not base64 ({e}): {text}"))
        .try_into()
        .unwrap_or_else(|_| panic!("{what}: not 32 bytes: {text}"))
}

/// Runs `sitegate --config CONFIG ARGS` for every job, [`WORKERS`] at a time;
/// returns the stdouts in job order. Panics listing every failed command.
fn cli_parallel(config: &Path, jobs: &[Vec<String>]) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<String, String>>>> = Mutex::new(vec![None; jobs.len()]);
    thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(args) = jobs.get(i) else { break };
                let out = run(std::process::Command::new(sitegate_bin())
                    .arg("--config")
                    .arg(config)
                    .args(args));
                let r = if out.status.success() {
                    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
                } else {
                    Err(format!(
                        "`sitegate {}` failed ({}): {}",
                        args.join(" "),
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                };
                results.lock().unwrap()[i] = Some(r);
            });
        }
    });
    let results = results.into_inner().unwrap();
    let failed: Vec<&String> = results
        .iter()
        .filter_map(|r| r.as_ref().and_then(|r| r.as_ref().err()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} commands failed, e.g.:\n{}",
        failed.len(),
        jobs.len(),
        failed
            .iter()
            .take(5)
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    results
        .into_iter()
        .map(|r| r.expect("every job ran").expect("checked above"))
        .collect()
}

/// Issues [`PEERS`] peers named `r{round}p{i}` with fresh keys.
fn add_round(gw: &Gateway, round: usize) -> Vec<Churned> {
    let fresh: Vec<(String, StaticSecret)> = (0..PEERS)
        .map(|i| {
            (
                format!("r{round}p{i:03}"),
                StaticSecret::random_from_rng(rand::rngs::OsRng),
            )
        })
        .collect();
    let jobs: Vec<Vec<String>> = fresh
        .iter()
        .map(|(name, secret)| {
            vec![
                "peer".into(),
                "add".into(),
                name.clone(),
                "--public-key".into(),
                b64(PublicKey::from(secret).as_bytes()),
            ]
        })
        .collect();
    let confs = cli_parallel(&gw.config, &jobs);
    fresh
        .into_iter()
        .zip(confs)
        .map(|((name, secret), conf)| {
            assert!(
                !conf.contains("PrivateKey"),
                "`peer add {name} --public-key` printed a private key"
            );
            let psk = conf_value(&conf, "PresharedKey")
                .unwrap_or_else(|| panic!("no PresharedKey in the config of {name}:\n{conf}"));
            let address = conf_value(&conf, "Address")
                .unwrap_or_else(|| panic!("no Address in the config of {name}:\n{conf}"));
            Churned {
                public_b64: b64(PublicKey::from(&secret).as_bytes()),
                psk: key32(&psk, "PresharedKey"),
                address: address.split('/').next().unwrap().trim().to_string(),
                name,
                secret,
            }
        })
        .collect()
}

/// Revokes every peer of `peers`.
fn revoke_round(gw: &Gateway, peers: &[Churned]) {
    let jobs: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            vec![
                "peer".into(),
                "revoke".into(),
                p.name.clone(),
                "--reason".into(),
                "soak".into(),
            ]
        })
        .collect();
    cli_parallel(&gw.config, &jobs);
}

// ---------------------------------------------------------------------------
// Handshakes of the churn peers (boringtun, from the churn namespace)

/// Completes a handshake for each peer from its own UDP socket in namespace
/// `ns` (initiation, response, keepalive); returns the names that failed,
/// with why. Cookie replies and losses are retried, at most 6 times.
fn handshake_all(
    ns: &str,
    gw_key: [u8; 32],
    peers: Vec<(String, StaticSecret, [u8; 32])>,
) -> Vec<String> {
    in_netns(ns, move || {
        let gw_pub = PublicKey::from(gw_key);
        let dst: SocketAddr = Underlay::endpoint().parse().unwrap();
        let start = Instant::now();
        let mut failed = Vec::new();
        let (mut buf, mut out, mut rbuf) = (vec![0u8; 2048], vec![0u8; 2048], vec![0u8; 2048]);
        for (i, (name, secret, psk)) in peers.into_iter().enumerate() {
            let at = start + HANDSHAKE_SPACING * i as u32;
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                thread::sleep(wait); // pacing of generated traffic
            }
            assert!(
                start.elapsed() < HANDSHAKE_PHASE,
                "handshakes not done within {HANDSHAKE_PHASE:?} ({i} done, failed: {failed:?})"
            );
            // Not connected: the gateway answers from the address its route to
            // this namespace picks (192.168.2.1), not the one dialled.
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind handshake socket");
            sock.set_read_timeout(Some(Duration::from_millis(500)))
                .expect("read timeout");
            let mut tunn = Tunn::new(secret, gw_pub, Some(psk), None, i as u32 + 1, None);
            let mut why = String::from("no attempt");
            let mut done = false;
            for _ in 0..6 {
                match tunn.format_handshake_initiation(&mut buf, true) {
                    TunnResult::WriteToNetwork(p) => {
                        sock.send_to(p, dst).expect("send initiation");
                    }
                    _ => panic!("boringtun formatted no initiation"),
                }
                let (n, from) = match sock.recv_from(&mut rbuf) {
                    Ok(r) => r,
                    Err(e) => {
                        why = format!("no answer ({e})");
                        continue;
                    }
                };
                match tunn.decapsulate(None, &rbuf[..n], &mut out) {
                    TunnResult::WriteToNetwork(keepalive) => {
                        sock.send_to(keepalive, from).expect("send keepalive");
                        done = true;
                        break;
                    }
                    TunnResult::Done => why = "cookie reply".into(),
                    TunnResult::Err(e) => why = format!("{e:?}"),
                    _ => why = "unexpected packet".into(),
                }
            }
            if !done {
                failed.push(format!("{name}: {why}"));
            }
        }
        failed
    })
    .join()
    .expect("handshake thread")
}

// ---------------------------------------------------------------------------
// The registry and the daemon's view

/// The names of `status --json` peers (with repeats, if any).
fn status_names(gw: &Gateway) -> Vec<String> {
    gw.status_json()["peers"]
        .as_array()
        .expect("status --json: peers array")
        .iter()
        .map(|p| p["name"].as_str().expect("peer name").to_string())
        .collect()
}

/// Asserts that registry and daemon agree: `active` (and the stream peer) are
/// active, each once, with their keys and distinct addresses, in both; every
/// name in `revoked` is `revoked` in the registry and absent from the daemon;
/// nothing else exists. With `sessions`, each of `active` has a live session.
fn check_views(
    gw: &Gateway,
    stream_key: &str,
    active: &[Churned],
    revoked: &BTreeSet<String>,
    sessions: bool,
    when: &str,
) {
    let mut want: BTreeMap<&str, (&str, &str)> = active
        .iter()
        .map(|p| (p.name.as_str(), (p.public_b64.as_str(), p.address.as_str())))
        .collect();
    want.insert(STREAM_PEER, (stream_key, "10.8.0.2"));
    let want_names: Vec<String> = want.keys().map(|s| s.to_string()).collect();
    // The reload is synchronous with the command, so this is one poll in practice.
    let mut last = Vec::new();
    let agreed = poll_until(VIEW_DEADLINE, || {
        last = status_names(gw);
        last.sort();
        last == want_names
    });
    assert!(
        agreed,
        "{when}: the daemon lists {} peers, the registry says {} are active; \
         missing {:?}, extra {:?}",
        last.len(),
        want_names.len(),
        want_names
            .iter()
            .filter(|n| !last.contains(n))
            .take(10)
            .collect::<Vec<_>>(),
        last.iter()
            .filter(|n| !want_names.contains(n))
            .take(10)
            .collect::<Vec<_>>()
    );

    // The daemon's view, in detail.
    let status = gw.status_json();
    let live = status["peers"].as_array().expect("peers array");
    let mut addrs = BTreeSet::new();
    for p in live {
        let name = p["name"].as_str().unwrap();
        let (key, addr) = want[name];
        assert_eq!(p["public_key"], key, "{when}: status key of {name}: {p}");
        let a: Vec<&str> = p["addresses"]
            .as_array()
            .expect("addresses")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(a, [addr], "{when}: status addresses of {name}: {p}");
        assert!(addrs.insert(addr), "{when}: address {addr} twice in status");
        if sessions || name == STREAM_PEER {
            assert_eq!(
                p["session"], true,
                "{when}: {name} has no live session in status: {p}"
            );
        }
    }

    // The registry: every name once; the active set as above; revoked ones revoked.
    let out = gw.cli_ok(&["peer", "list", "--json"]);
    let list: Vec<Value> = serde_json::from_str(&out).expect("peer list --json");
    let mut seen = BTreeSet::new();
    let mut listed_active = 0;
    for p in &list {
        let name = p["name"].as_str().expect("name");
        assert!(seen.insert(name), "{when}: {name} listed twice");
        match p["state"].as_str() {
            Some("active") => {
                listed_active += 1;
                let (key, addr) = want
                    .get(name)
                    .unwrap_or_else(|| panic!("{when}: {name} active in the registry: {p}"));
                assert_eq!(p["public_key"], *key, "{when}: registry key of {name}");
                assert_eq!(p["addresses"], serde_json::json!([addr]), "{when}: {p}");
                assert!(
                    !p["live"].is_null(),
                    "{when}: {name} has no live state: {p}"
                );
            }
            Some("revoked") => {
                assert!(revoked.contains(name), "{when}: {name} revoked: {p}");
                assert_eq!(p["addresses"], serde_json::json!([]), "{when}: {p}");
                assert!(p["live"].is_null(), "{when}: revoked {name} is live: {p}");
            }
            other => panic!("{when}: {name} in state {other:?}: {p}"),
        }
    }
    assert_eq!(
        listed_active,
        want.len(),
        "{when}: active peers in the registry"
    );
    assert_eq!(
        list.len(),
        want.len() + revoked.len(),
        "{when}: peers in the registry"
    );
}

// ---------------------------------------------------------------------------
// The stream

/// What one sending end did.
#[derive(Debug, Default)]
struct Sent {
    bytes: u64,
    error: Option<String>,
}

/// What one receiving end saw.
#[derive(Debug, Default)]
struct Received {
    bytes: u64,
    /// The longest time between two reads that returned data.
    max_gap: Duration,
    /// Gaps longer than one second.
    long_gaps: usize,
    error: Option<String>,
}

/// Sets the flag on drop, so that the stream ends also when the test panics.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Writes [`Stream`] `seed` at [`STREAM_RATE`] until `stop` (or `hard_stop`),
/// then closes the write side.
fn send_paced(mut s: TcpStream, seed: u64, stop: &AtomicBool, hard_stop: Instant) -> Sent {
    let mut gen = Stream::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let step = Duration::from_secs_f64(CHUNK as f64 / STREAM_RATE as f64);
    let start = Instant::now();
    let mut sent = Sent::default();
    for i in 0u32.. {
        if stop.load(Ordering::SeqCst) || Instant::now() >= hard_stop {
            break;
        }
        if let Some(wait) = (start + step * i).checked_duration_since(Instant::now()) {
            thread::sleep(wait); // pacing of generated traffic
        }
        gen.fill(&mut buf);
        if let Err(e) = s.write_all(&buf) {
            sent.error = Some(format!("write after {} bytes: {e}", sent.bytes));
            return sent;
        }
        sent.bytes += CHUNK as u64;
    }
    if let Err(e) = s.shutdown(Shutdown::Write) {
        sent.error = Some(format!("shutdown after {} bytes: {e}", sent.bytes));
    }
    sent
}

/// Reads to the end, checking every byte against [`Stream`] `seed`; counts
/// into `progress` as it goes.
fn recv_verify(mut s: TcpStream, seed: u64, progress: &AtomicU64) -> Received {
    let mut gen = Stream::new(seed);
    let mut want = vec![0u8; CHUNK];
    let mut want_pos = CHUNK; // nothing generated yet
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = Received::default();
    let mut last: Option<Instant> = None;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                got.error = Some(format!("read after {} bytes: {e}", got.bytes));
                return got;
            }
        };
        let now = Instant::now();
        if let Some(prev) = last {
            let gap = now - prev;
            got.max_gap = got.max_gap.max(gap);
            if gap > Duration::from_secs(1) {
                got.long_gaps += 1;
            }
        }
        last = Some(now);
        for (k, &b) in buf[..n].iter().enumerate() {
            if want_pos == CHUNK {
                gen.fill(&mut want);
                want_pos = 0;
            }
            if b != want[want_pos] {
                got.error = Some(format!("byte {} differs", got.bytes + k as u64));
                return got;
            }
            want_pos += 1;
        }
        got.bytes += n as u64;
        progress.store(got.bytes, Ordering::SeqCst);
    }
}

/// The two connections of the stream, from both ends.
struct StreamRun {
    stop: Arc<AtomicBool>,
    up_progress: Arc<AtomicU64>,
    down_progress: Arc<AtomicU64>,
    gateway_end: thread::JoinHandle<(Received, Sent)>,
    site_end: thread::JoinHandle<(Sent, Received)>,
}

/// Starts the stream: a listener on [`STREAM_SERVICE`] in the gateway's
/// namespace, and the site's two connections (`U` up, `D` down) to it.
fn start_stream(gw_ns: &Netns, site_ns: &Netns, hard_stop: Instant) -> StreamRun {
    let stop = Arc::new(AtomicBool::new(false));
    let up_progress = Arc::new(AtomicU64::new(0));
    let down_progress = Arc::new(AtomicU64::new(0));
    let listener = in_netns(&gw_ns.name, || {
        let l = TcpListener::bind(STREAM_SERVICE).expect("bind the stream service");
        l.set_nonblocking(true).expect("nonblocking listener");
        l
    })
    .join()
    .expect("bind thread");

    let (g_stop, g_up) = (Arc::clone(&stop), Arc::clone(&up_progress));
    let gateway_end = thread::spawn(move || {
        let mut up = None;
        let mut down = None;
        let accepted = poll_until(Duration::from_secs(30), || {
            while let Ok((s, _)) = listener.accept() {
                s.set_nonblocking(false).expect("blocking stream");
                s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
                s.set_write_timeout(Some(IO_TIMEOUT))
                    .expect("write timeout");
                let mut role = [0u8; 1];
                (&s).read_exact(&mut role).expect("role byte");
                match &role {
                    b"U" => up = Some(s),
                    b"D" => down = Some(s),
                    r => panic!("unknown stream role {r:?}"),
                }
            }
            up.is_some() && down.is_some()
        });
        assert!(accepted, "the stream site did not connect within 30 s");
        let (up, down) = (up.unwrap(), down.unwrap());
        let sender = thread::spawn(move || send_paced(down, SEED_DOWN, &g_stop, hard_stop));
        let received = recv_verify(up, SEED_UP, &g_up);
        (received, sender.join().expect("down sender"))
    });

    let (s_stop, s_down) = (Arc::clone(&stop), Arc::clone(&down_progress));
    let site_end = in_netns(&site_ns.name, move || {
        let addr: SocketAddr = STREAM_SERVICE.parse().unwrap();
        let connect = |role: &[u8]| {
            let mut conn = None;
            poll_until(Duration::from_secs(20), || {
                conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok();
                conn.is_some()
            });
            let mut s = conn.expect("the site cannot connect to the stream service");
            s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
            s.set_write_timeout(Some(IO_TIMEOUT))
                .expect("write timeout");
            s.write_all(role).expect("role byte");
            s
        };
        let up = connect(b"U");
        let down = connect(b"D");
        let sender = thread::spawn(move || send_paced(up, SEED_UP, &s_stop, hard_stop));
        let received = recv_verify(down, SEED_DOWN, &s_down);
        (sender.join().expect("up sender"), received)
    });
    StreamRun {
        stop,
        up_progress,
        down_progress,
        gateway_end,
        site_end,
    }
}

// ---------------------------------------------------------------------------

/// 200 peers issued, handshaken and revoked per round for [`ROUNDS`] rounds
/// while a site streams both ways: RSS within 10 % of the warm-up baseline,
/// registry and daemon agree after every phase, the stream is intact.
#[test]
fn churn_200_peers_while_streaming() {
    if !rig_ready("soak") {
        return;
    }
    let n = names("sk");
    let gw_ns = Netns::new(&n.netns("gw"));
    let site_ns = Netns::new(&n.netns("s1"));
    let churn_ns = Netns::new(&n.netns("s2"));
    Underlay::attach(&n, &gw_ns, &site_ns, 1);
    Underlay::attach(&n, &gw_ns, &churn_ns, 2);
    let mut gw = Gateway::init(&gw_ns, &n.name("g"));
    gw.add_service("soak", STREAM_SERVICE, false);
    let conf = gw.add_peer_with(STREAM_PEER, &["--service", "soak"]);
    gw.start();
    let site = Site::up(&site_ns, &n.name("w1"), &conf);
    assert!(
        site_ns.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE),
        "the stream site cannot ping {GATEWAY_TUNNEL_ADDR}; gateway log:\n{}",
        gw.log_tail(40)
    );
    assert_eq!(site.address(), "10.8.0.2", "the stream peer's address");
    let stream_key = site.public_key();
    let gw_key = key32(
        &conf_value(conf.split("[Peer]").nth(1).unwrap(), "PublicKey").expect("gateway key"),
        "gateway PublicKey",
    );
    let pid = gw.pid();

    let soak_start = Instant::now();
    let hard_stop = soak_start + SOAK_DEADLINE + Duration::from_secs(30);
    let stream = start_stream(&gw_ns, &site_ns, hard_stop);
    let _stop_guard = StopOnDrop(Arc::clone(&stream.stop));
    assert!(
        poll_until(Duration::from_secs(20), || {
            stream.up_progress.load(Ordering::SeqCst) > 0
                && stream.down_progress.load(Ordering::SeqCst) > 0
        }),
        "the stream does not flow; gateway log:\n{}",
        gw.log_tail(30)
    );
    eprintln!(
        "soak: gateway pid {pid}, VmRSS {} KiB, {} fds, {} threads before the churn",
        vm_rss_kib(pid),
        open_fds(pid),
        threads(pid)
    );

    let mut revoked = BTreeSet::new();
    let mut baseline = None;
    let mut rss_peak = 0;
    let (mut added, mut revoked_count, mut handshakes) = (0, 0, 0);
    for round in 0..ROUNDS {
        assert!(
            soak_start.elapsed() < SOAK_DEADLINE,
            "round {round} not started within the soak deadline of {SOAK_DEADLINE:?}"
        );
        let at = soak_start + ROUND_PERIOD * round as u32;
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            thread::sleep(wait); // pacing of the churn
        }
        let t0 = Instant::now();
        let peers = add_round(&gw, round);
        added += peers.len();
        let t_add = t0.elapsed();
        check_views(
            &gw,
            &stream_key,
            &peers,
            &revoked,
            false,
            &format!("round {round} after add"),
        );

        let t1 = Instant::now();
        let failed = handshake_all(
            &churn_ns.name,
            gw_key,
            peers
                .iter()
                .map(|p| (p.name.clone(), p.secret.clone(), p.psk))
                .collect(),
        );
        assert!(
            failed.is_empty(),
            "round {round}: {} handshakes failed, e.g. {:?}; gateway log:\n{}",
            failed.len(),
            &failed[..failed.len().min(5)],
            gw.log_tail(20)
        );
        handshakes += peers.len();
        let t_hs = t1.elapsed();
        check_views(
            &gw,
            &stream_key,
            &peers,
            &revoked,
            true,
            &format!("round {round} after handshakes"),
        );
        rss_peak = rss_peak.max(vm_rss_kib(pid));

        let t2 = Instant::now();
        revoke_round(&gw, &peers);
        revoked_count += peers.len();
        revoked.extend(peers.iter().map(|p| p.name.clone()));
        let t_rev = t2.elapsed();
        check_views(
            &gw,
            &stream_key,
            &[],
            &revoked,
            false,
            &format!("round {round} after revoke"),
        );

        let rss = vm_rss_kib(pid);
        rss_peak = rss_peak.max(rss);
        let (fds, thr) = (open_fds(pid), threads(pid));
        eprintln!(
            "soak: round {round}: add {:.1} s, handshakes {:.1} s, revoke {:.1} s; \
             VmRSS {rss} KiB, {fds} fds, {thr} threads; stream {} KiB up, {} KiB down",
            t_add.as_secs_f64(),
            t_hs.as_secs_f64(),
            t_rev.as_secs_f64(),
            stream.up_progress.load(Ordering::SeqCst) / 1024,
            stream.down_progress.load(Ordering::SeqCst) / 1024,
        );
        if round + 1 == WARMUP_ROUNDS {
            baseline = Some((rss, fds, thr));
        }
    }
    let churn_secs = soak_start.elapsed().as_secs_f64();
    let (rss_start, fds_start, thr_start) = baseline.expect("more rounds than warm-up rounds");
    let (rss_end, thr_end) = (vm_rss_kib(pid), threads(pid));
    // A control connection the daemon has answered may take a moment to close.
    let mut fds_end = open_fds(pid);
    poll_until(Duration::from_secs(2), || {
        fds_end = open_fds(pid);
        fds_end <= fds_start
    });

    // The stream's session lives through its rekey before the stream ends.
    let session_start = event_time(&gw.wait_event(
        "handshake of the stream peer",
        Duration::from_secs(1),
        |e| field_str(e, "event") == "handshake" && field_str(e, "peer") == STREAM_PEER,
    ));
    let stream_handshakes_now = || {
        gw.events_named("handshake")
            .iter()
            .filter(|e| field_str(e, "peer") == STREAM_PEER)
            .count()
    };
    let rekey_deadline = (session_start + REKEY_WITHIN_SECS - now_unix()).max(1.0);
    assert!(
        poll_until(Duration::from_secs_f64(rekey_deadline), || {
            stream_handshakes_now() >= 2
        }),
        "the stream peer did not rekey within {REKEY_WITHIN_SECS} s of its first handshake; \
         gateway log:\n{}",
        gw.log_tail(20)
    );
    let rekeyed_at = now_unix() - session_start;
    // And the stream still flows after the rekey.
    let (up_then, down_then) = (
        stream.up_progress.load(Ordering::SeqCst),
        stream.down_progress.load(Ordering::SeqCst),
    );
    assert!(
        poll_until(Duration::from_secs(10), || {
            stream.up_progress.load(Ordering::SeqCst) >= up_then + STREAM_RATE
                && stream.down_progress.load(Ordering::SeqCst) >= down_then + STREAM_RATE
        }),
        "the stream did not move {STREAM_RATE} bytes each way within 10 s after the rekey"
    );
    stream.stop.store(true, Ordering::SeqCst);
    let (up_rx, down_tx) = stream
        .gateway_end
        .join()
        .expect("gateway end of the stream");
    let (up_tx, down_rx) = stream.site_end.join().expect("site end of the stream");
    let total_secs = soak_start.elapsed().as_secs_f64();

    let events = gw.events();
    let of_peer = |e: &&Value, name: &str| field_str(e, "peer") == name;
    let stream_closed: Vec<&Value> = events
        .iter()
        .filter(|e| field_str(e, "event") == "session_closed" && of_peer(e, STREAM_PEER))
        .collect();
    let stream_failed: Vec<&Value> = events
        .iter()
        .filter(|e| {
            field_str(e, "event") == "handshake_failed" && field_str(e, "public_key") == stream_key
        })
        .collect();
    let stream_handshakes = events
        .iter()
        .filter(|e| field_str(e, "event") == "handshake" && of_peer(e, STREAM_PEER))
        .count();
    let churn_handshakes = events
        .iter()
        .filter(|e| field_str(e, "event") == "handshake" && revoked.contains(field_str(e, "peer")))
        .count();
    let churn_closed = events
        .iter()
        .filter(|e| {
            is_event(e, "session_closed", "revoked") && revoked.contains(field_str(e, "peer"))
        })
        .count();

    eprintln!(
        "soak: {ROUNDS} rounds of {PEERS} peers: {added} added, {handshakes} handshaken, \
         {revoked_count} revoked in {churn_secs:.1} s ({total_secs:.1} s with the stream's end)"
    );
    eprintln!(
        "soak: gateway VmRSS {rss_start} KiB after round {} (baseline), {rss_end} KiB at \
         the end ({:+.1} %), peak {rss_peak} KiB; fds {fds_start} -> {fds_end}; \
         threads {thr_start} -> {thr_end}",
        WARMUP_ROUNDS - 1,
        (rss_end as f64 - rss_start as f64) * 100.0 / rss_start as f64
    );
    eprintln!(
        "soak: stream up: sent {} B, received {} B, longest gap {:.3} s ({} over 1 s); \
         down: sent {} B, received {} B, longest gap {:.3} s ({} over 1 s)",
        up_tx.bytes,
        up_rx.bytes,
        up_rx.max_gap.as_secs_f64(),
        up_rx.long_gaps,
        down_tx.bytes,
        down_rx.bytes,
        down_rx.max_gap.as_secs_f64(),
        down_rx.long_gaps
    );
    eprintln!(
        "soak: events: {churn_handshakes} handshake and {churn_closed} session_closed \
         (revoked) for churn peers; stream peer: {stream_handshakes} handshake, {} \
         session_closed, {} handshake_failed",
        stream_closed.len(),
        stream_failed.len()
    );

    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));
    for (what, err) in [
        ("up sender", &up_tx.error),
        ("up receiver", &up_rx.error),
        ("down sender", &down_tx.error),
        ("down receiver", &down_rx.error),
    ] {
        assert!(err.is_none(), "stream {what}: {}", err.as_deref().unwrap());
    }
    assert_eq!(up_rx.bytes, up_tx.bytes, "stream up: bytes received");
    assert_eq!(down_rx.bytes, down_tx.bytes, "stream down: bytes received");
    let min_bytes = (STREAM_RATE as f64 * churn_secs * 0.5) as u64;
    assert!(
        up_tx.bytes >= min_bytes && down_tx.bytes >= min_bytes,
        "the stream moved less than half its rate ({} / {} bytes in {churn_secs:.0} s)",
        up_tx.bytes,
        down_tx.bytes
    );
    assert!(
        up_rx.max_gap <= MAX_STALL && down_rx.max_gap <= MAX_STALL,
        "the stream stalled: {:.3} s up, {:.3} s down (bound {MAX_STALL:?})",
        up_rx.max_gap.as_secs_f64(),
        down_rx.max_gap.as_secs_f64()
    );
    assert!(
        stream_closed.is_empty() && stream_failed.is_empty(),
        "the stream peer's session was disturbed: {stream_closed:?} {stream_failed:?}"
    );
    // Its first handshake, and the rekey that the stream lived through; more
    // would mean it dialled again.
    assert!(
        (2..=3).contains(&stream_handshakes),
        "the stream peer made {stream_handshakes} handshakes in {:.0} s (1 and a rekey expected)",
        now_unix() - session_start
    );
    eprintln!("soak: the stream peer rekeyed {rekeyed_at:.1} s after its first handshake");
    assert_eq!(
        churn_handshakes, handshakes,
        "handshake events of churn peers"
    );
    assert_eq!(
        churn_closed, handshakes,
        "session_closed reason=revoked events of churn peers"
    );
    // Growth is what a leak shows; glibc may also hand memory back (a drop).
    assert!(
        rss_end * 100 <= rss_start * (100 + RSS_TOLERANCE_PCT),
        "gateway VmRSS {rss_end} KiB at the end, {rss_start} KiB after the warm-up rounds: \
         more than {RSS_TOLERANCE_PCT} % more"
    );
    assert!(
        fds_end <= fds_start && thr_end <= thr_start,
        "the daemon holds {fds_end} descriptors and {thr_end} threads at the end, \
         {fds_start} and {thr_start} after the warm-up; descriptors: {:?}",
        fd_targets(pid)
    );
    let (code, text) = audit_verify(&gw, None);
    assert_eq!(code, 0, "audit verify after the soak: {text}");
}
