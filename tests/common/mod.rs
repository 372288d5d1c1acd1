//! Harness for integration tests that run the real `sitegate` binary in network
//! namespaces against stock wg-quick + wireguard-go sites.
//!
//! Everything here cleans up on `Drop`, also when a test panics: declare a test's
//! [`Netns`]es first, then its [`Gateway`] and [`Site`]s, so that locals drop in
//! reverse order (sites down, gateway stopped, namespaces deleted).
//!
//! Names are unique per test and per process ([`names`]): namespace, veth and
//! WireGuard interface names carry a per-test code and the process id, because
//! `/var/run/wireguard/NAME.sock` is shared by every namespace on the machine.
//!
//! Nothing here sleeps for a fixed time to let something happen: every wait is a
//! [`poll_until`] with a deadline.

#![allow(dead_code)]

pub mod postgres;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The gateway's tunnel address, as `init --subnet 10.8.0.0/24` assigns it.
pub const GATEWAY_TUNNEL_ADDR: &str = "10.8.0.1";
/// The UDP port the gateway listens on (each test has its own namespaces).
pub const GATEWAY_PORT: u16 = 51820;
/// How long a site may take to handshake and pass its first packet.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(25);

/// Path of the binary under test, built by cargo for this test target.
pub fn sitegate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sitegate")
}

/// Whether this machine can run namespace tests: root, `/dev/net/tun`, and the
/// stock tools. Outside CI a missing piece prints a skip note and returns false;
/// with `CI=true` it panics instead, so CI never skips silently.
pub fn rig_ready(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun".to_string());
    }
    for tool in ["ip", "wg", "wg-quick", "wireguard-go", "ping"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            missing.push(tool.to_string());
        }
    }
    ready_or_skip(test, &missing)
}

/// The wall clock as Unix seconds with fractions (the clock `ping -D` prints).
pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// The `timestamp` of a JSON log event as Unix seconds.
pub fn event_time(ev: &Value) -> f64 {
    let ts = field_str(ev, "timestamp");
    humantime::parse_rfc3339_weak(ts)
        .unwrap_or_else(|e| panic!("event without a readable timestamp ({e}): {ev}"))
        .duration_since(UNIX_EPOCH)
        .expect("timestamp after 1970")
        .as_secs_f64()
}

/// Whether `ev` is event `name` with field `reason` = `reason`.
pub fn is_event(ev: &Value, name: &str, reason: &str) -> bool {
    field_str(ev, "event") == name && field_str(ev, "reason") == reason
}

/// Polls `cond` every 50 ms until it holds (true) or `deadline` passes (false).
pub fn poll_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Names for one test: `code` is 2–3 lowercase letters unique per test.
/// The process id keeps parallel runs and leftovers of killed runs apart.
pub struct Names {
    base: String,
}

/// Builds the names of one test (see [`Names`]).
pub fn names(code: &str) -> Names {
    assert!(
        code.len() <= 3,
        "test code `{code}` too long for interface names"
    );
    // The stale-namespace sweep reads the digits after the code as a pid.
    assert!(
        !code.ends_with(|c: char| c.is_ascii_digit()),
        "test code `{code}` must not end with a digit"
    );
    Names {
        base: format!("{code}{}", std::process::id()),
    }
}

impl Names {
    /// A name of at most 15 characters: `code` + pid + `role` (≤ 3 chars).
    pub fn name(&self, role: &str) -> String {
        let n = format!("{}{role}", self.base);
        assert!(n.len() <= 15, "interface name `{n}` longer than 15");
        n
    }
    /// A namespace name, prefixed so that [`sweep_stale`] recognizes it.
    pub fn netns(&self, role: &str) -> String {
        format!("sgt-{}-{role}", self.base)
    }
}

/// Runs a command and returns its output; panics if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Runs a command and panics with its stderr unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run_ok(Command::new("ip").args(args))
}

fn netns_pids(ns: &str) -> Vec<i32> {
    let out = run(Command::new("ip").args(["netns", "pids", ns]));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// SIGTERM to every process in `ns`, then SIGKILL to what is left after 3 s.
fn kill_netns_pids(ns: &str) {
    for pid in netns_pids(ns) {
        // SAFETY: kill(2) with a pid read from `ip netns pids`; no memory involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    if !poll_until(Duration::from_secs(3), || netns_pids(ns).is_empty()) {
        for pid in netns_pids(ns) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        poll_until(Duration::from_secs(2), || netns_pids(ns).is_empty());
    }
}

/// Deletes namespaces left by earlier test processes that died without cleanup
/// (their name carries a pid that no longer exists).
pub fn sweep_stale() {
    let out = run(Command::new("ip").args(["netns", "list"]));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix("sgt-") else {
            continue;
        };
        let digits: String = rest
            .split('-')
            .next()
            .unwrap_or("")
            .chars()
            .skip_while(|c| c.is_ascii_lowercase())
            .collect();
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            kill_netns_pids(name);
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// A network namespace, deleted on drop after its processes are ended.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates the namespace (replacing a leftover of the same name), with `lo` up.
    pub fn new(name: &str) -> Netns {
        sweep_stale();
        if Path::new("/var/run/netns").join(name).exists() {
            kill_netns_pids(name);
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
        ip(&["netns", "add", name]);
        let ns = Netns {
            name: name.to_string(),
        };
        ns.run_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `ip netns exec NAME args...`, not yet run.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Runs `args` in the namespace; panics unless it exits 0; returns stdout.
    pub fn run_ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.cmd(args))
    }

    /// Runs `args` in the namespace; returns whether it exited 0.
    pub fn succeeds(&self, args: &[&str]) -> bool {
        run(&mut self.cmd(args)).status.success()
    }

    /// One echo request with a 1 s deadline, optionally from `source`.
    pub fn ping_once(&self, dst: &str, source: Option<&str>) -> bool {
        let mut args = vec!["ping", "-n", "-c", "1", "-W", "1"];
        if let Some(src) = source {
            args.extend(["-I", src]);
        }
        args.push(dst);
        self.succeeds(&args)
    }

    /// Pings `dst` once a second until one reply arrives or `deadline` passes.
    pub fn ping_until(&self, dst: &str, deadline: Duration) -> bool {
        poll_until(deadline, || self.ping_once(dst, None))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_netns_pids(&self.name);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Connects `a` and `b` with a veth pair (`veth_a` in `a`, `veth_b` in `b`),
/// addresses `addr_a`/`addr_b` in CIDR form, both ends up.
pub fn veth(a: &Netns, veth_a: &str, addr_a: &str, b: &Netns, veth_b: &str, addr_b: &str) {
    ip(&[
        "link", "add", veth_a, "netns", &a.name, "type", "veth", "peer", "name", veth_b, "netns",
        &b.name,
    ]);
    a.run_ok(&["ip", "addr", "add", addr_a, "dev", veth_a]);
    a.run_ok(&["ip", "link", "set", veth_a, "up"]);
    b.run_ok(&["ip", "addr", "add", addr_b, "dev", veth_b]);
    b.run_ok(&["ip", "link", "set", veth_b, "up"]);
}

/// The underlay of one test: the gateway namespace holds `192.168.1.1` on the
/// link to the first attached namespace; namespace number `i` (1-based) sits on
/// its own link `192.168.i.0/24` with address `192.168.i.2` and a default route
/// to the gateway, so every attached namespace reaches [`Underlay::endpoint`].
pub struct Underlay;

impl Underlay {
    /// The gateway's underlay address (on link 1).
    pub const GATEWAY_ADDR: &'static str = "192.168.1.1";

    /// `192.168.1.1:51820`: what `init --endpoint` is given.
    pub fn endpoint() -> String {
        format!("{}:{GATEWAY_PORT}", Self::GATEWAY_ADDR)
    }

    /// The underlay address of attached namespace number `i`.
    pub fn site_addr(i: u8) -> String {
        format!("192.168.{i}.2")
    }

    /// Links `site` to `gw` as namespace number `i` (1..=250).
    pub fn attach(names: &Names, gw: &Netns, site: &Netns, i: u8) {
        let g = names.name(&format!("g{i}"));
        let s = names.name(&format!("s{i}"));
        veth(
            gw,
            &g,
            &format!("192.168.{i}.1/24"),
            site,
            &s,
            &format!("192.168.{i}.2/24"),
        );
        site.run_ok(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("192.168.{i}.1"),
        ]);
    }
}

/// A scratch directory under /tmp, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("sitegate-test-{tag}"));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).expect("chmod temp dir");
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("SITEGATE_TEST_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Reads `key = value` from the first section of a wg-quick config that has it.
pub fn conf_value(conf: &str, key: &str) -> Option<String> {
    conf.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim().eq_ignore_ascii_case(key)).then(|| v.trim().to_string())
    })
}

/// A field of a log event: top level (flattened) or under `fields`.
pub fn field<'a>(ev: &'a Value, name: &str) -> Option<&'a Value> {
    ev.get(name)
        .or_else(|| ev.get("fields").and_then(|f| f.get(name)))
}

/// A string field of a log event ("" when absent or not a string).
pub fn field_str<'a>(ev: &'a Value, name: &str) -> &'a str {
    field(ev, name).and_then(Value::as_str).unwrap_or("")
}

/// A numeric field of a log event (also accepted as a decimal string).
pub fn field_u64(ev: &Value, name: &str) -> Option<u64> {
    match field(ev, name)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A `sitegate run` in its namespace, with its own config directory; the
/// process gets SIGTERM on drop (SIGKILL if it has not exited within 5 s).
pub struct Gateway {
    pub ns: String,
    pub ifname: String,
    pub dir: TempDir,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Gateway {
    /// `sitegate --config DIR/sitegate.toml init --endpoint 192.168.1.1:51820
    /// --interface IFNAME --subnet 10.8.0.0/24`; does not start the daemon.
    pub fn init(ns: &Netns, ifname: &str) -> Gateway {
        Gateway::init_with(ns, ifname, &[])
    }

    /// `sitegate --config CONFIG ARGS...` (host namespace), not yet run.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(sitegate_bin());
        c.arg("--config").arg(&self.config).args(args);
        c
    }

    /// Runs a CLI command; panics unless it exits 0; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.cli(args))
    }

    /// Appends a `[[service]]` (TCP) to the config; with `default`, every peer
    /// issued afterwards without `--service` is granted it. Call before the
    /// daemon starts (the policy is read at start).
    pub fn add_service(&self, name: &str, address: &str, default: bool) {
        let mut text = fs::read_to_string(&self.config).expect("read config");
        text.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\naddress = \"{address}\"\nprotocol = \"tcp\"\ndefault = {default}\n"
        ));
        fs::write(&self.config, text).expect("write config");
    }

    /// Issues a peer and returns its wg-quick client config.
    pub fn add_peer(&self, name: &str) -> String {
        self.add_peer_with(name, &[])
    }

    /// Starts `ip netns exec NS sitegate --config CONFIG run`, stderr to
    /// [`Gateway::log`], and waits until the TUN device exists (or the process died).
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// [`Gateway::start`] with extra environment variables for the daemon
    /// (e.g. `SITEGATE_TEST_HOOKS`).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "gateway already started");
        let err = fs::File::create(&self.log).expect("create gateway log");
        let out = fs::File::create(self.dir.path.join("gateway.stdout")).expect("create stdout");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, sitegate_bin(), "--config"])
            .arg(&self.config)
            .arg("run")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn sitegate run");
        self.child = Some(child);
        let ns = self.ns.clone();
        let ifname = self.ifname.clone();
        let mut died = None;
        let up = poll_until(Duration::from_secs(15), || {
            if let Some(st) = self.try_exit() {
                died = Some(st);
                return true;
            }
            link_exists(&ns, &ifname)
                && Path::new(&format!("/var/run/wireguard/{ifname}.sock")).exists()
        });
        if let Some(st) = died {
            panic!(
                "sitegate run exited at start ({st}); log:\n{}",
                self.log_tail(40)
            );
        }
        assert!(
            up,
            "sitegate run did not create TUN {} and its UAPI socket within 15 s; log:\n{}",
            self.ifname,
            self.log_tail(40)
        );
    }

    /// Runs `sitegate run` in the namespace and asserts that it refuses to start:
    /// exit 1 within 15 s, stderr containing every one of `parts`, and no TUN
    /// device left behind.
    pub fn start_expect_failure(&mut self, parts: &[&str]) {
        assert!(self.child.is_none(), "gateway already started");
        let out = Command::new("timeout")
            .args([
                "15",
                "ip",
                "netns",
                "exec",
                &self.ns,
                sitegate_bin(),
                "--config",
            ])
            .arg(&self.config)
            .arg("run")
            .stdin(Stdio::null())
            .output()
            .expect("spawn sitegate run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "`sitegate run` was expected to refuse to start (exit 1); stderr:\n{err}"
        );
        for p in parts {
            assert!(err.contains(p), "refusal does not mention `{p}`:\n{err}");
        }
        assert!(
            !link_exists(&self.ns, &self.ifname),
            "a refused start left TUN {} behind",
            self.ifname
        );
    }

    /// The process id of `sitegate run` (`ip netns exec` execs into it).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("gateway not started").id() as i32
    }

    /// The exit status if the daemon has exited (reaping it), else None.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("wait for gateway"))
    }

    /// Whether the daemon process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_exit().is_none()
    }

    /// Sends `signal`, waits up to `deadline` for exit; None if still running.
    pub fn signal_and_wait(&mut self, signal: i32, deadline: Duration) -> Option<ExitStatus> {
        let pid = self.pid();
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, signal) };
        let mut status = None;
        poll_until(deadline, || {
            status = self.try_exit();
            status.is_some()
        });
        status
    }

    /// Every line of the gateway's stderr.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Every JSON event logged so far (non-JSON lines are ignored).
    pub fn events(&self) -> Vec<Value> {
        let Ok(f) = fs::File::open(&self.log) else {
            return Vec::new();
        };
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
            .filter(Value::is_object)
            .collect()
    }

    /// Events whose `event` field is `name`.
    pub fn events_named(&self, name: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| field_str(e, "event") == name)
            .collect()
    }

    /// Waits until an event satisfies `pred`; panics with the log tail otherwise.
    pub fn wait_event(
        &self,
        what: &str,
        deadline: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut found = None;
        poll_until(deadline, || {
            found = self.events().into_iter().find(|e| pred(e));
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no {what} event within {deadline:?}; gateway log tail:\n{}",
                self.log_tail(40)
            )
        })
    }

    /// `wg show IFNAME` run in the gateway's namespace (stock wireguard-tools).
    pub fn wg_show(&self) -> Output {
        run(Command::new("ip").args(["netns", "exec", &self.ns, "wg", "show", &self.ifname]))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.is_running()
            && self
                .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
                .is_none()
        {
            if let Some(c) = self.child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- gateway {} log tail ---\n{}\n---",
                self.ifname,
                self.log_tail(60)
            );
        }
        let _ = fs::remove_file(format!("/var/run/wireguard/{}.sock", self.ifname));
    }
}

/// Whether `ifname` exists in namespace `ns`.
pub fn link_exists(ns: &str, ifname: &str) -> bool {
    run(Command::new("ip").args(["-n", ns, "link", "show", ifname]))
        .status
        .success()
}

/// A site: a wg-quick config brought up with stock wg-quick and wireguard-go in
/// its namespace; `wg-quick down` on drop.
pub struct Site {
    pub ns: String,
    pub ifname: String,
    pub conf: PathBuf,
    pub config_text: String,
    _dir: TempDir,
}

impl Site {
    /// Writes `config` to `DIR/IFNAME.conf` without its `DNS =` line (there is no
    /// resolvconf here) and runs `wg-quick up` in `ns` with wireguard-go.
    pub fn up(ns: &Netns, ifname: &str, config: &str) -> Site {
        let dir = TempDir::new(ifname);
        let conf = dir.path.join(format!("{ifname}.conf"));
        let text: String = config
            .lines()
            .filter(|l| !l.trim_start().to_ascii_lowercase().starts_with("dns"))
            .map(|l| format!("{l}\n"))
            .collect();
        let mut f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&conf)
            .expect("write site config");
        f.write_all(text.as_bytes()).expect("write site config");
        drop(f);
        let _ = fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
        let site = Site {
            ns: ns.name.clone(),
            ifname: ifname.to_string(),
            conf,
            config_text: text,
            _dir: dir,
        };
        run_ok(&mut site.wg_quick("up"));
        site
    }

    fn wg_quick(&self, verb: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns])
            .args(["env", "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go"])
            .args([
                "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1",
                "wg-quick",
                verb,
            ])
            .arg(&self.conf);
        c
    }

    /// The tunnel address from the config (`Address = 10.8.0.2/32` → `10.8.0.2`).
    pub fn address(&self) -> String {
        let a = conf_value(&self.config_text, "Address").expect("Address in site config");
        a.split(',')
            .next()
            .unwrap()
            .trim()
            .split('/')
            .next()
            .unwrap()
            .to_string()
    }

    /// The site's own public key (from `wg show IF public-key`).
    pub fn public_key(&self) -> String {
        self.wg(&["public-key"]).trim().to_string()
    }

    /// The UDP port wireguard-go listens on.
    pub fn listen_port(&self) -> u16 {
        self.wg(&["listen-port"])
            .trim()
            .parse()
            .expect("listen port")
    }

    /// `wg show IF ARGS...` in the site's namespace.
    pub fn wg(&self, args: &[&str]) -> String {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.ns, "wg", "show", &self.ifname])
                .args(args),
        )
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.wg_quick("down").output();
        let _ = fs::remove_file(format!("/var/run/wireguard/{}.sock", self.ifname));
    }
}

/// Runs `f` on a new thread that first enters namespace `ns` (setns), so the
/// sockets it opens live there. Join the handle for the result.
pub fn in_netns<T, F>(ns: &str, f: F) -> JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns(2) on a valid namespace fd; it affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Deterministic pseudo-random bytes for bulk transfers (xorshift; fast and
/// std-only so both ends and the hash agree without buffering 50 MB).
pub struct Stream {
    state: u64,
}

impl Stream {
    pub fn new(seed: u64) -> Stream {
        Stream { state: seed | 1 }
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.state;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.state = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Writes `total` bytes of [`Stream`] `seed` to `w`; returns their SHA-256 (hex).
pub fn send_stream(w: &mut impl Write, seed: u64, total: usize) -> String {
    use sha2::{Digest, Sha256};
    let mut s = Stream::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len());
        s.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).expect("send bulk data");
        h.update(&buf[..n]);
        left -= n;
    }
    w.flush().expect("flush bulk data");
    hex(&h.finalize())
}

/// Reads `r` to its end; returns (bytes read, SHA-256 hex).
pub fn recv_stream(r: &mut impl Read) -> (usize, String) {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).expect("receive bulk data");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n;
    }
    (total, hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Gateway {
    /// Starts `run` again after the previous daemon exited, with the same config
    /// (see [`Gateway::start`]); the previous log is kept as `gateway.log.N`
    /// (N = 1, 2, ...) and [`Gateway::log`] starts empty.
    pub fn restart(&mut self) {
        assert!(
            !self.is_running(),
            "gateway {} still running: stop it before restart",
            self.ifname
        );
        let kept = (1..100)
            .map(|i| self.dir.path.join(format!("gateway.log.{i}")))
            .find(|p| !p.exists())
            .expect("fewer than 100 restarts");
        let _ = fs::rename(&self.log, kept);
        self.child = None;
        self.start();
    }
}

/// Whether `tool` is an executable file in a `PATH` directory.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Like [`rig_ready`] for tests that need root and further tools (sshd,
/// logrotate, tcpdump, ...) but not necessarily the WireGuard rig: outside CI a
/// missing piece prints a skip note and returns false; with `CI=true` it panics.
pub fn tools_ready(test: &str, tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    missing.extend(tools.iter().filter(|t| !on_path(t)).map(|t| t.to_string()));
    ready_or_skip(test, &missing)
}

/// `/run/sshd`, which sshd insists on (privilege separation), with mode 0755.
pub fn ensure_sshd_privsep_dir() {
    let dir = Path::new("/run/sshd");
    if !dir.is_dir() {
        fs::create_dir_all(dir).expect("create /run/sshd");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod /run/sshd");
    }
}

impl Gateway {
    /// [`Gateway::init`] with further `init` flags (e.g. `--egress IFACE`).
    pub fn init_with(ns: &Netns, ifname: &str, extra: &[&str]) -> Gateway {
        let dir = TempDir::new(ifname);
        let config = dir.path.join("sitegate.toml");
        let log = dir.path.join("gateway.log");
        let _ = fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
        let gw = Gateway {
            ns: ns.name.clone(),
            ifname: ifname.to_string(),
            dir,
            config,
            log,
            child: None,
        };
        let endpoint = Underlay::endpoint();
        let mut args = vec![
            "init",
            "--endpoint",
            &endpoint,
            "--interface",
            ifname,
            "--subnet",
            "10.8.0.0/24",
        ];
        args.extend_from_slice(extra);
        gw.cli_ok(&args);
        gw
    }

    /// [`Gateway::add_peer`] with further `peer add` flags (e.g. `--service db`).
    pub fn add_peer_with(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec!["peer", "add", name];
        args.extend_from_slice(extra);
        let conf = self.cli_ok(&args);
        assert!(
            conf.contains("[Peer]") && conf.contains("PrivateKey"),
            "`peer add {name} {}` printed no client config:\n{conf}",
            extra.join(" ")
        );
        conf
    }

    /// Replaces `from` (which must occur in the config, as `init` writes it)
    /// with `to` in the config file; the daemon sees it at its next start.
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = fs::read_to_string(&self.config).expect("read config");
        assert!(
            text.contains(from),
            "config {} has no `{from}` to replace:\n{text}",
            self.config.display()
        );
        fs::write(&self.config, text.replacen(from, to, 1)).expect("write config");
    }

    /// `sitegate status --json`, parsed.
    pub fn status_json(&self) -> Value {
        let out = self.cli_ok(&["status", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json ({e}):\n{out}"))
    }
}

/// A background process (a server, a capture) in a namespace: SIGTERM on
/// drop, SIGKILL if it has not exited within 3 s.
pub struct Bg {
    pub what: String,
    child: Child,
}

impl Bg {
    /// Spawns `args` in `ns` with stdin closed and stdout and stderr to `log`.
    pub fn spawn(ns: &Netns, args: &[&str], log: &Path) -> Bg {
        let out = fs::File::create(log).expect("create process log");
        let err = out.try_clone().expect("clone log handle");
        let child = ns
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?} in {}: {e}", ns.name));
        Bg {
            what: args.join(" "),
            child,
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` and waits up to 5 s for the exit; true if it exited.
    pub fn stop(&mut self, signal: i32) -> bool {
        if !self.is_running() {
            return true;
        }
        // SAFETY: kill(2) on our own child, not yet reaped (`ip netns exec`
        // execs into the command, so this is the command itself).
        unsafe { libc::kill(self.child.id() as i32, signal) };
        poll_until(Duration::from_secs(5), || !self.is_running())
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if !self.stop(libc::SIGTERM) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A TCP connection to `dst` from namespace `ns` within `timeout`: Ok, or the
/// error kind (`TimedOut` when nothing answered, `ConnectionRefused` on a reset).
pub fn tcp_connect_from(ns: &str, dst: &str, timeout: Duration) -> Result<(), std::io::ErrorKind> {
    let addr: std::net::SocketAddr = dst.parse().expect("IP:PORT");
    in_netns(ns, move || {
        std::net::TcpStream::connect_timeout(&addr, timeout)
            .map(drop)
            .map_err(|e| e.kind())
    })
    .join()
    .expect("connect thread")
}

/// Quiet time after which a continuous ping is taken to have stopped working.
pub const SILENCE_SECS: f64 = 2.0;

/// A request as one `ping -D` line reported it: sequence number and the
/// wall-clock time of the line.
#[derive(Clone, Copy, Debug)]
pub struct Reply {
    pub seq: u64,
    pub at: f64,
}

/// What one line of `ping -n -D -O` says about a request.
#[derive(Clone, Copy, Debug)]
pub enum PingLine {
    /// `[1795619031.121326] 64 bytes from 10.8.0.1: icmp_seq=1 ttl=64 time=0.03 ms`
    Reply(Reply),
    /// `[1795619031.171326] no answer yet for icmp_seq=2`, printed when the next
    /// request goes out (one interval after this one was sent).
    NoAnswerYet(Reply),
}

pub fn parse_ping_line(line: &str) -> Option<PingLine> {
    let rest = line.strip_prefix('[')?;
    let (ts, rest) = rest.split_once(']')?;
    let seq = rest
        .split_whitespace()
        .find_map(|w| w.strip_prefix("icmp_seq="))?
        .parse()
        .ok()?;
    let r = Reply {
        seq,
        at: ts.parse().ok()?,
    };
    if rest.contains("bytes from") {
        Some(PingLine::Reply(r))
    } else if rest.contains("no answer yet") {
        Some(PingLine::NoAnswerYet(r))
    } else {
        None
    }
}

/// A continuous `ping -n -D -O -i INTERVAL` in a namespace whose replies (and
/// requests reported unanswered) are collected as they arrive; ended (SIGINT)
/// by [`Pinger::stop`] or on drop.
pub struct Pinger {
    what: String,
    interval: f64,
    child: Child,
    replies: Arc<Mutex<Vec<Reply>>>,
    unanswered: Arc<Mutex<Vec<Reply>>>,
    reader: Option<JoinHandle<()>>,
}

impl Pinger {
    pub fn start(ns: &Netns, dst: &str, interval: &str, what: &str) -> Pinger {
        let mut child = ns
            .cmd(&["ping", "-n", "-D", "-O", "-W", "1", "-i", interval, dst])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ping");
        let out = child.stdout.take().expect("ping stdout");
        let replies = Arc::new(Mutex::new(Vec::new()));
        let unanswered = Arc::new(Mutex::new(Vec::new()));
        let (r_sink, u_sink) = (Arc::clone(&replies), Arc::clone(&unanswered));
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                match parse_ping_line(&line) {
                    Some(PingLine::Reply(r)) => r_sink.lock().unwrap().push(r),
                    Some(PingLine::NoAnswerYet(r)) => u_sink.lock().unwrap().push(r),
                    None => {}
                }
            }
        });
        Pinger {
            what: what.to_string(),
            interval: interval.parse().expect("ping interval in seconds"),
            child,
            replies,
            unanswered,
            reader: Some(reader),
        }
    }

    pub fn replies(&self) -> Vec<Reply> {
        self.replies.lock().unwrap().clone()
    }

    pub fn last(&self) -> Option<Reply> {
        self.replies.lock().unwrap().last().copied()
    }

    /// When the first request after `last` that never got a reply was sent
    /// (its "no answer yet" time less one interval), if one was reported.
    pub fn first_failed_sent(&self, last: &Reply) -> Option<f64> {
        self.unanswered
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.seq > last.seq)
            .map(|r| r.at - self.interval)
    }

    /// Waits until `n` replies arrived; panics naming the pinger otherwise.
    pub fn wait_replies(&self, n: usize, deadline: Duration) {
        assert!(
            poll_until(deadline, || self.replies.lock().unwrap().len() >= n),
            "{}: fewer than {n} replies within {deadline:?} ({} so far)",
            self.what,
            self.replies.lock().unwrap().len()
        );
    }

    /// Ends the ping (SIGINT, as ^C) and returns every reply.
    pub fn stop(&mut self) -> Vec<Reply> {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on our own unreaped child (`ip netns exec` execs ping).
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let pid = self.child.id();
            if !poll_until(Duration::from_secs(3), || {
                self.child.try_wait().ok().flatten().is_some()
            }) {
                let _ = self.child.kill();
                eprintln!("{}: ping {pid} ignored SIGINT, killed", self.what);
            }
            let _ = self.child.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.replies()
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sequence numbers missing among `replies`, from 1 to the highest answered
/// (requests after the last reply may still be in flight and are not counted).
pub fn missing_seqs(replies: &[Reply]) -> Vec<u64> {
    let max = replies.iter().map(|r| r.seq).max().unwrap_or(0);
    let mut seen = vec![false; max as usize + 1];
    for r in replies {
        seen[r.seq as usize] = true;
    }
    (1..=max).filter(|&s| !seen[s as usize]).collect()
}

/// Polls until `pinger` has had no reply for [`SILENCE_SECS`] (or never had
/// one); returns its last reply. Panics if replies keep coming for `deadline`.
pub fn wait_silence(p: &Pinger, deadline: Duration) -> Option<Reply> {
    let quiet = poll_until(deadline, || {
        p.last().is_none_or(|r| now_unix() - r.at > SILENCE_SECS)
    });
    assert!(
        quiet,
        "{}: still answered {deadline:?} on (last reply {:?})",
        p.what,
        p.last()
    );
    p.last()
}

/// The `[log] audit_file` of a gateway's config.
pub fn audit_path(gw: &Gateway) -> PathBuf {
    let text = fs::read_to_string(&gw.config).expect("read config");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("audit_file"))
        .unwrap_or_else(|| panic!("no audit_file in {}:\n{text}", gw.config.display()));
    let value = line.split_once('=').expect("audit_file = ...").1;
    let path = value.split('#').next().unwrap().trim().trim_matches('"');
    PathBuf::from(path)
}

/// Everything `sitegate audit verify [FILE]` printed, and its exit code.
pub fn audit_verify(gw: &Gateway, file: Option<&Path>) -> (i32, String) {
    let mut cmd = gw.cli(&["audit", "verify"]);
    if let Some(f) = file {
        cmd.arg(f);
    }
    let out = run(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// How long a connection attempt that must not be answered is given.
pub const REFUSED_WITHIN: Duration = Duration::from_millis(1_500);

/// Asserts that a TCP connection from `ns` to `dst` is not answered at all:
/// no SYN-ACK and no reset, the attempt times out.
pub fn assert_unanswered(ns: &Netns, who: &str, dst: &str) {
    match tcp_connect_from(&ns.name, dst, REFUSED_WITHIN) {
        Ok(()) => panic!("{who} connected to {dst}"),
        Err(kind) => assert_eq!(
            kind,
            std::io::ErrorKind::TimedOut,
            "{who} → {dst}: expected silence (a drop), got {kind:?}"
        ),
    }
}

/// True when nothing is `missing`; otherwise a skip note and false, or with
/// `CI=true` a panic (CI never skips).
fn ready_or_skip(test: &str, missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let note = format!(
        "{test}: needs {} (run as root on a machine with the packages of .ci/run)",
        missing.join(", ")
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{note}; CI=true never skips");
    }
    eprintln!("SKIPPED {note}");
    false
}
