//! Handshake load generator (issue 7, "Packet path under attack"): many
//! initiator keys, one boringtun `Tunn` each, sending handshake initiations to a
//! gateway over UDP at a fixed offered rate, round-robin over the keys.
//!
//! Replies are read on a dedicated thread: a handshake response (type 2) counts
//! as answered and goes into its `Tunn`, which then sends the keepalive that
//! confirms the session (as a real initiator does; `--no-confirm` skips it); a
//! cookie reply (type 3) goes into its `Tunn` too, so that key's later
//! initiations carry mac2. After `--warmup` seconds (the first pass over the
//! keys draws cookies from a gateway over its rate limit) it measures for
//! `--time` seconds or `--count` initiations, whichever comes first, waits
//! `--drain` seconds for late replies, and prints offered/s, answered/s,
//! cookie replies/s, reply latency, its own CPU time and, with
//! `--gateway-pid`, the gateway's CPU time spent on the window, per thread
//! name too, from /proc (`--json` for one JSON object). A reply counts for the
//! window when the initiation it answers was sent in the window, whenever it
//! arrives before the drain ends; the gateway's CPU time counts from the first
//! to the last such reply (a gateway with a backlog is still answering the
//! warm-up when the window opens).
//!
//! The generator is not free: each initiation costs it two X25519 operations (a
//! fresh ephemeral key and the ephemeral-static DH; nothing can be precomputed),
//! and each response two more. Its own CPU is measured and reported.
//!
//! `benches/handshake.sh` drives it against sitegate and boringtun-cli. Run by
//! hand:
//!
//! ```sh
//! handshake_load keygen --count 1000 --out keys.txt > keys.pub
//! handshake_load run --endpoint 172.31.251.1:51820 --gateway-key PUB \
//!     --keys keys.txt --rate 3000 --time 10 --warmup 2 [--gateway-pid PID] [--json]
//! ```
//!
//! With no subcommand (as `cargo bench` runs it) it prints a one-line note and
//! exits 0.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use clap::{Args, Parser, Subcommand};
use rand::{RngCore, SeedableRng};

const NOTE: &str = "handshake_load: handshake load generator, not a micro-benchmark; run \
`sudo benches/handshake.sh` (or `handshake_load run --help`)";

/// WireGuard message types (first byte, three zero bytes after it).
const MSG_RESPONSE: u8 = 2;
const MSG_COOKIE: u8 = 3;
const MSG_DATA: u8 = 4;
const RESPONSE_LEN: usize = 92;
const COOKIE_LEN: usize = 64;

/// Largest number of keys: a `Tunn` index is 24 bits (its handshake indices are
/// `index << 8 | counter`), which is how replies find their key.
const MAX_KEYS: usize = 1 << 24;

/// The sender stops catching up when it is this far behind its schedule, so a
/// generator short of CPU never bursts; the achieved rate is what it reports.
const MAX_LAG: Duration = Duration::from_millis(20);

#[derive(Debug, Parser)]
#[command(name = "handshake_load", about = "WireGuard handshake load generator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write COUNT initiator private keys (base64, one a line) to FILE and print
    /// their public keys on stdout, in the same order.
    Keygen {
        #[arg(long, value_name = "N")]
        count: usize,
        /// Private key file to create (mode 0600; must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Derive the keys from this seed (the same keys every time) instead of
        /// the OS random source.
        #[arg(long, value_name = "N")]
        seed: Option<u64>,
    },
    /// Send initiations to a gateway and count its replies.
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The gateway's UDP endpoint, IP:PORT.
    #[arg(long, value_name = "IP:PORT")]
    endpoint: SocketAddr,
    /// The gateway's public key (base64).
    #[arg(long, value_name = "KEY")]
    gateway_key: String,
    /// Initiator private keys, base64, one a line (see `keygen`).
    #[arg(long, value_name = "FILE")]
    keys: PathBuf,
    /// Preshared key (base64) used by every initiator.
    #[arg(long, value_name = "KEY")]
    psk: Option<String>,
    /// Offered initiations per second, round-robin over the keys.
    #[arg(long, value_name = "N", default_value_t = 3000.0)]
    rate: f64,
    /// Seconds of sending.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    time: f64,
    /// At most this many initiations (default: rate x time).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Seconds of sending before the measured window: the first pass over the
    /// keys draws the gateway's cookie replies; replies to these initiations
    /// are counted apart.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    warmup: f64,
    /// The gateway's process id: its CPU time (utime+stime, per thread name too)
    /// is read from /proc every 50 ms; reported: from the first to the last
    /// reply to an initiation sent in the window.
    #[arg(long, value_name = "PID")]
    gateway_pid: Option<u32>,
    /// Seconds to wait for replies after the last initiation.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    drain: f64,
    /// UDP sockets (source ports); key i uses socket i mod N. Default: one per
    /// key, like real sites (boringtun-cli connects one socket per peer
    /// endpoint, so keys sharing a source port confuse it).
    #[arg(long, value_name = "N")]
    sockets: Option<usize>,
    /// Local address to bind the sockets to.
    #[arg(long, value_name = "IP", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    bind: IpAddr,
    /// Do not send the keepalive that confirms a session after a response.
    #[arg(long)]
    no_confirm: bool,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` runs every bench target with `--bench` (and maybe a filter):
    // only an explicit subcommand or help request starts the generator.
    let wanted = matches!(
        args.get(1).map(String::as_str),
        Some("run" | "keygen" | "help" | "-h" | "--help")
    );
    if !wanted {
        println!("{NOTE}");
        return ExitCode::SUCCESS;
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Keygen { count, out, seed } => keygen(count, &out, seed),
        Command::Run(a) => run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handshake_load: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn keygen(count: usize, out: &PathBuf, seed: Option<u64>) -> Result<()> {
    if count == 0 || count > MAX_KEYS {
        bail!("--count {count} is not from 1 to {MAX_KEYS}");
    }
    let mut rng: Box<dyn RngCore> = match seed {
        Some(s) => Box::new(rand::rngs::StdRng::seed_from_u64(s)),
        None => Box::new(rand::rngs::OsRng),
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    let mut private = String::with_capacity(count * 45);
    let mut public = String::with_capacity(count * 45);
    for _ in 0..count {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        let secret = StaticSecret::from(bytes);
        private.push_str(&B64.encode(secret.to_bytes()));
        private.push('\n');
        public.push_str(&B64.encode(PublicKey::from(&secret).as_bytes()));
        public.push('\n');
    }
    file.write_all(private.as_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    std::io::stdout()
        .lock()
        .write_all(public.as_bytes())
        .context("cannot write public keys to stdout")
}

fn key32(text: &str, what: &str) -> Result<[u8; 32]> {
    let bytes = B64
        .decode(text.trim())
        .ok()
        .filter(|b| b.len() == 32)
        .with_context(|| format!("{what} is not a 32-byte base64 key"))?;
    let mut k = [0u8; 32];
    k.copy_from_slice(&bytes);
    Ok(k)
}

fn read_keys(path: &PathBuf) -> Result<Vec<StaticSecret>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut keys = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let what = format!("line {} of {}", n + 1, path.display());
        keys.push(StaticSecret::from(key32(&line, &what)?));
    }
    if keys.is_empty() || keys.len() > MAX_KEYS {
        bail!(
            "{} holds {} keys; 1 to {MAX_KEYS} needed",
            path.display(),
            keys.len()
        );
    }
    Ok(keys)
}

/// One initiator: its tunnel and, for each value of the low byte of its
/// handshake sender index (boringtun counts it up per initiation), when that
/// initiation was sent: µs since the generator started, plus one (0: never).
/// A reply names the initiation it answers, so it is attributed to the warm-up
/// or the measured window by when that initiation was sent, not when the reply
/// comes back (a gateway with a backlog answers warm-up initiations late).
struct Initiator {
    tunn: Tunn,
    sent_us: [u32; 256],
}

#[derive(Default)]
struct Counters {
    // Sender side, in the window.
    sent: AtomicU64,
    with_mac2: AtomicU64,
    send_errors: AtomicU64,
    // Replies to initiations sent in the window.
    responses: AtomicU64,
    responses_accepted: AtomicU64,
    cookies: AtomicU64,
    cookies_accepted: AtomicU64,
    // Replies to warm-up initiations.
    warm_responses: AtomicU64,
    warm_cookies: AtomicU64,
    // Anything else.
    keepalives_sent: AtomicU64,
    unmatched: AtomicU64,
    data: AtomicU64,
    other: AtomicU64,
    recv_errors: AtomicU64,
}

fn add(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Shared {
    initiators: Vec<Mutex<Initiator>>,
    counters: Counters,
    /// The generator's clock.
    t0: Instant,
    /// Start of the measured window, µs on `t0`'s clock plus one; u64::MAX
    /// during the warm-up.
    window_us: AtomicU64,
    /// When the first and the last reply to a window initiation arrived (µs on
    /// `t0`'s clock): the gateway's work for the window lies between them.
    first_reply_us: AtomicU64,
    last_reply_us: AtomicU64,
    /// Reply latency (µs) of responses to window initiations, accepted or not.
    latency_us: Mutex<Vec<u32>>,
    confirm: bool,
}

impl Shared {
    /// Now on the generator's clock, µs plus one (never 0).
    fn now_us(&self) -> u32 {
        u32::try_from(self.t0.elapsed().as_micros())
            .unwrap_or(u32::MAX - 1)
            .saturating_add(1)
    }

    /// Starts the measured window: initiations sent from now on count. Returns
    /// the warm-up's initiations (the sender-side counters restart).
    fn start_window(&self) -> u64 {
        let c = &self.counters;
        let warm = c.sent.swap(0, Ordering::Relaxed);
        c.with_mac2.store(0, Ordering::Relaxed);
        c.send_errors.store(0, Ordering::Relaxed);
        self.window_us
            .store(u64::from(self.now_us()), Ordering::Relaxed);
        warm
    }

    /// Handles one datagram from the gateway; returns a datagram to send back.
    fn handle<'a>(&self, datagram: &[u8], from: IpAddr, out: &'a mut [u8]) -> Option<&'a [u8]> {
        let c = &self.counters;
        let (kind, idx_at) = match datagram {
            [MSG_RESPONSE, 0, 0, 0, ..] if datagram.len() == RESPONSE_LEN => (MSG_RESPONSE, 8),
            [MSG_COOKIE, 0, 0, 0, ..] if datagram.len() == COOKIE_LEN => (MSG_COOKIE, 4),
            [MSG_DATA, 0, 0, 0, ..] => {
                add(&c.data);
                return None;
            }
            _ => {
                add(&c.other);
                return None;
            }
        };
        let mut idx = [0u8; 4];
        idx.copy_from_slice(&datagram[idx_at..idx_at + 4]);
        let receiver_idx = u32::from_le_bytes(idx);
        let Some(initiator) = self.initiators.get((receiver_idx >> 8) as usize) else {
            add(&c.unmatched);
            return None;
        };
        let mut ini = initiator.lock().expect("initiator lock poisoned");
        let sent = ini.sent_us[(receiver_idx & 0xff) as usize];
        if sent == 0 {
            add(&c.unmatched);
            return None;
        }
        let in_window = u64::from(sent) >= self.window_us.load(Ordering::Relaxed);
        let response = kind == MSG_RESPONSE;
        add(match (in_window, response) {
            (true, true) => &c.responses,
            (true, false) => &c.cookies,
            (false, true) => &c.warm_responses,
            (false, false) => &c.warm_cookies,
        });
        if in_window {
            let now = self.now_us();
            self.first_reply_us
                .fetch_min(u64::from(now), Ordering::Relaxed);
            self.last_reply_us
                .fetch_max(u64::from(now), Ordering::Relaxed);
            if response {
                let us = now.saturating_sub(sent);
                self.latency_us.lock().expect("latency lock").push(us);
            }
        }
        match ini.tunn.decapsulate(Some(from), datagram, out) {
            TunnResult::WriteToNetwork(keepalive) if response => {
                if in_window {
                    add(&c.responses_accepted);
                }
                self.confirm.then_some(&*keepalive)
            }
            TunnResult::Done if !response => {
                if in_window {
                    add(&c.cookies_accepted);
                }
                None
            }
            // Stale (two newer initiations replaced the one answered) or bad.
            _ => None,
        }
    }
}

/// Process CPU time (user + system, all threads).
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time of another process from /proc: per thread (id, name, ticks).
struct ProcCpu {
    threads: Vec<(u32, String, u64)>,
}

/// A process's CPU time over an interval: total and per thread name.
struct GatewayCpu {
    /// From the first to the last reply to a window initiation.
    interval: Duration,
    total: Duration,
    by_thread: Vec<(String, Duration)>,
}

impl ProcCpu {
    fn read(pid: u32) -> Result<Self> {
        let dir = format!("/proc/{pid}/task");
        let mut threads = Vec::new();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot read {dir}"))? {
            let Ok(entry) = entry else { continue };
            let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            // A thread may end between the listing and these reads: skip it.
            let (Ok(comm), Ok(stat)) = (
                std::fs::read_to_string(entry.path().join("comm")),
                std::fs::read_to_string(entry.path().join("stat")),
            ) else {
                continue;
            };
            // After "pid (comm) ": state is field 0, utime 11, stime 12.
            let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
            let f: Vec<u64> = rest
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|x| x.parse().ok())
                .collect();
            threads.push((tid, comm.trim().to_string(), f.iter().sum()));
        }
        if threads.is_empty() {
            bail!("no threads under {dir}: is --gateway-pid {pid} running?");
        }
        Ok(Self { threads })
    }

    fn since(&self, before: &ProcCpu, interval: Duration) -> GatewayCpu {
        // SAFETY: sysconf has no preconditions.
        let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
            n if n > 0 => n as f64,
            _ => 100.0,
        };
        let mut by_name: Vec<(String, u64)> = Vec::new();
        for (tid, name, ticks) in &self.threads {
            let was = before
                .threads
                .iter()
                .find(|(t, ..)| t == tid)
                .map_or(0, |(.., x)| *x);
            let used = ticks.saturating_sub(was);
            match by_name.iter_mut().find(|(n, _)| n == name) {
                Some((_, x)) => *x += used,
                None => by_name.push((name.clone(), used)),
            }
        }
        by_name.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
        let secs = |t: u64| Duration::from_secs_f64(t as f64 / hz);
        GatewayCpu {
            interval,
            total: secs(by_name.iter().map(|(_, t)| t).sum()),
            by_thread: by_name.into_iter().map(|(n, t)| (n, secs(t))).collect(),
        }
    }
}

/// Reads the gateway's CPU time every `SAMPLE_EVERY` on a thread of its own,
/// so that the gateway's work for the window can be cut out afterwards: from
/// the first to the last reply to a window initiation. (A gateway with a
/// backlog is still answering the warm-up when the window opens, and answers
/// the window's last initiations in the drain.)
struct Sampler {
    pid: u32,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(u64, ProcCpu)>>,
}

const SAMPLE_EVERY: Duration = Duration::from_millis(50);

impl Sampler {
    fn start(pid: u32, shared: Arc<Shared>) -> Result<Self> {
        let first = ProcCpu::read(pid)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || {
                let mut samples = vec![(u64::from(shared.now_us()), first)];
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(SAMPLE_EVERY);
                    // The gateway is gone: keep what there is.
                    let Ok(p) = ProcCpu::read(pid) else { break };
                    samples.push((u64::from(shared.now_us()), p));
                }
                samples
            })
            .context("cannot start the sampler thread")?;
        Ok(Self { pid, stop, thread })
    }

    fn finish(self, shared: &Shared) -> Result<GatewayCpu> {
        self.stop.store(true, Ordering::Relaxed);
        let mut samples = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the sampler thread panicked"))?;
        if let Ok(p) = ProcCpu::read(self.pid) {
            samples.push((u64::from(shared.now_us()), p));
        }
        let mut from = shared.first_reply_us.load(Ordering::Relaxed);
        let mut to = shared.last_reply_us.load(Ordering::Relaxed);
        if from > to {
            // No reply in the window: the window and the drain.
            from = shared.window_us.load(Ordering::Relaxed);
            to = u64::MAX;
        }
        let last = samples.len() - 1;
        let i = samples.iter().rposition(|(t, _)| *t <= from).unwrap_or(0);
        let j = samples.iter().position(|(t, _)| *t >= to).unwrap_or(last);
        let (t0, start) = &samples[i.min(j)];
        let (t1, end) = &samples[j];
        Ok(end.since(start, Duration::from_micros(t1.saturating_sub(*t0))))
    }
}

/// What the run measured besides the counters.
struct Measured {
    nkeys: usize,
    nsockets: usize,
    elapsed: Duration,
    cpu: Duration,
    /// Since the process started: set-up and warm-up included.
    cpu_whole: Duration,
    lag_resets: u64,
    gateway: Option<GatewayCpu>,
    /// Initiations sent during the warm-up.
    warm_sent: u64,
}

fn run(a: &RunArgs) -> Result<()> {
    if !(a.rate > 0.0 && a.rate <= 1e6) {
        bail!("--rate {} is not from 1 to 1000000", a.rate);
    }
    if !(a.time > 0.0 && a.time <= 3600.0) {
        bail!("--time {} is not from 0 to 3600 seconds", a.time);
    }
    if !(0.0..=600.0).contains(&a.warmup) {
        bail!("--warmup {} is not from 0 to 600 seconds", a.warmup);
    }
    if !(0.0..=60.0).contains(&a.drain) {
        bail!("--drain {} is not from 0 to 60 seconds", a.drain);
    }
    let gateway = PublicKey::from(key32(&a.gateway_key, "--gateway-key")?);
    let psk = a.psk.as_deref().map(|p| key32(p, "--psk")).transpose()?;
    let keys = read_keys(&a.keys)?;
    let nkeys = keys.len();
    let nsockets = a.sockets.unwrap_or(nkeys);
    if nsockets == 0 || nsockets > nkeys {
        bail!("--sockets {nsockets} is not from 1 to the number of keys ({nkeys})");
    }
    let count = a.count.unwrap_or((a.rate * a.time).round() as u64);

    let initiators = keys
        .into_iter()
        .enumerate()
        .map(|(i, secret)| {
            let public = PublicKey::from(&secret);
            // An unlimited limiter of its own: boringtun's default (10 a second,
            // reset only by update_timers, which is never called here) would
            // soon demand mac2 on the gateway's responses.
            let limiter = Arc::new(RateLimiter::new(&public, u64::MAX));
            let index = u32::try_from(i).expect("fewer than 2^24 keys");
            let tunn = Tunn::new(secret, gateway, psk, None, index, Some(limiter));
            Mutex::new(Initiator {
                tunn,
                sent_us: [0; 256],
            })
        })
        .collect();
    let shared = Arc::new(Shared {
        initiators,
        counters: Counters::default(),
        t0: Instant::now(),
        window_us: AtomicU64::new(u64::MAX),
        first_reply_us: AtomicU64::new(u64::MAX),
        last_reply_us: AtomicU64::new(0),
        latency_us: Mutex::new(Vec::with_capacity(count.min(10_000_000) as usize)),
        confirm: !a.no_confirm,
    });

    let mut send_socks = Vec::with_capacity(nsockets);
    let mut recv_socks = Vec::with_capacity(nsockets);
    for _ in 0..nsockets {
        let s = UdpSocket::bind(SocketAddr::new(a.bind, 0)).with_context(|| {
            format!(
                "cannot bind UDP socket {} of {nsockets} on {} (raise `ulimit -n`?)",
                send_socks.len() + 1,
                a.bind
            )
        })?;
        s.connect(a.endpoint)
            .with_context(|| format!("cannot connect a UDP socket to {}", a.endpoint))?;
        s.set_nonblocking(true).context("cannot set O_NONBLOCK")?;
        recv_socks.push(s.try_clone().context("cannot duplicate a UDP socket")?);
        send_socks.push(s);
    }

    // Receiver: a current-thread tokio runtime, one task per socket.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let rx_shared = Arc::clone(&shared);
    let endpoint_ip = a.endpoint.ip();
    let receiver = std::thread::Builder::new()
        .name("receiver".into())
        .spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .context("cannot start the receiver runtime")?;
            rt.block_on(async move {
                let mut tasks = Vec::with_capacity(recv_socks.len());
                for s in recv_socks {
                    let sock = tokio::net::UdpSocket::from_std(s)
                        .context("cannot register a socket with the receiver")?;
                    let shared = Arc::clone(&rx_shared);
                    let mut stop = stop_rx.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut buf = [0u8; 2048];
                        let mut out = [0u8; 2048];
                        loop {
                            tokio::select! {
                                r = sock.recv(&mut buf) => match r {
                                    Ok(n) => {
                                        let reply = shared.handle(&buf[..n], endpoint_ip, &mut out);
                                        if let Some(reply) = reply {
                                            match sock.try_send(reply) {
                                                Ok(_) => add(&shared.counters.keepalives_sent),
                                                Err(_) => add(&shared.counters.send_errors),
                                            }
                                        }
                                    }
                                    // ICMP port unreachable before the gateway listens, etc.
                                    Err(_) => add(&shared.counters.recv_errors),
                                },
                                _ = stop.changed() => break,
                            }
                        }
                    }));
                }
                for t in tasks {
                    t.await.context("a receiver task panicked")?;
                }
                Ok(())
            })
        })
        .context("cannot start the receiver thread")?;

    let sampler = a
        .gateway_pid
        .map(|pid| Sampler::start(pid, Arc::clone(&shared)))
        .transpose()?;
    let interval = Duration::from_secs_f64(1.0 / a.rate);
    let warmup = Duration::from_secs_f64(a.warmup);
    let window = Duration::from_secs_f64(a.time);
    let c = &shared.counters;
    let mut buf = [0u8; 256];
    let mut lag_resets = 0u64;
    let start = Instant::now();
    let mut next = start;
    let mut n: u64 = 0;
    // The measured window starts after the warm-up; `None` until then.
    let mut window_start: Option<(Instant, Duration)> = None;
    let mut warm_sent = 0;
    loop {
        let now = Instant::now();
        match window_start {
            None if now >= start + warmup => {
                warm_sent = shared.start_window();
                lag_resets = 0;
                window_start = Some((now, cpu_time()));
            }
            Some((t0, ..)) if now >= t0 + window || c.sent.load(Ordering::Relaxed) >= count => {
                break
            }
            _ => {}
        }
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > MAX_LAG {
            lag_resets += 1;
            next = now;
        }
        let k = (n % nkeys as u64) as usize;
        let len = {
            let mut ini = shared.initiators[k]
                .lock()
                .expect("initiator lock poisoned");
            match ini.tunn.format_handshake_initiation(&mut buf, true) {
                TunnResult::WriteToNetwork(p) => {
                    let len = p.len();
                    let mut idx = [0u8; 4];
                    idx.copy_from_slice(&p[4..8]);
                    let slot = (u32::from_le_bytes(idx) & 0xff) as usize;
                    ini.sent_us[slot] = shared.now_us();
                    if p[len - 16..].iter().any(|&b| b != 0) {
                        add(&c.with_mac2);
                    }
                    len
                }
                _ => 0,
            }
        };
        if len == 0 || send_socks[k % nsockets].send(&buf[..len]).is_err() {
            add(&c.send_errors);
        } else {
            add(&c.sent);
        }
        n += 1;
        next += interval;
    }
    let (t0, cpu0) = window_start.expect("the loop ends only inside the window");
    let elapsed = t0.elapsed();
    std::thread::sleep(Duration::from_secs_f64(a.drain));
    let _ = stop_tx.send(true);
    let gateway = match sampler {
        Some(s) => Some(s.finish(&shared)?),
        None => None,
    };
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))??;
    let cpu_whole = cpu_time();
    let cpu = cpu_whole.saturating_sub(cpu0);

    let m = Measured {
        cpu_whole,
        nkeys,
        nsockets,
        elapsed,
        cpu,
        lag_resets,
        gateway,
        warm_sent,
    };
    report(a, &shared, &m)
}

fn percentile(sorted: &[u32], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    Some(f64::from(sorted[i]) / 1000.0)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn report(a: &RunArgs, shared: &Shared, m: &Measured) -> Result<()> {
    let c = &shared.counters;
    let get = |x: &AtomicU64| x.load(Ordering::Relaxed);
    let secs = m.elapsed.as_secs_f64();
    let sent = get(&c.sent);
    let responses = get(&c.responses);
    let cookies = get(&c.cookies);
    let mut lat = std::mem::take(&mut *shared.latency_us.lock().expect("latency lock"));
    lat.sort_unstable();
    let per_s = |x: u64| round2(x as f64 / secs);
    let cpu_s = m.cpu.as_secs_f64();
    // CPU over the window plus the drain, as a share of one core.
    let span = secs + a.drain;
    let gateway = m.gateway.as_ref().map(|g| {
        let total = g.total.as_secs_f64();
        let threads: serde_json::Map<String, serde_json::Value> = g
            .by_thread
            .iter()
            .map(|(n, t)| (n.clone(), round2(t.as_secs_f64()).into()))
            .collect();
        serde_json::json!({
            "cpu_s": round2(total),
            "interval_s": round2(g.interval.as_secs_f64()),
            "cpu_percent": round2(100.0 * total / g.interval.as_secs_f64().max(1e-3)),
            "cpu_us_per_answered": if responses > 0 {
                Some(round2(total * 1e6 / responses as f64))
            } else {
                None
            },
            "threads_cpu_s": threads,
        })
    });
    let out = serde_json::json!({
        "keys": m.nkeys,
        "sockets": m.nsockets,
        "endpoint": a.endpoint.to_string(),
        "target_rate": a.rate,
        "warmup_s": a.warmup,
        "warmup": {
            "initiations": m.warm_sent,
            "responses": get(&c.warm_responses),
            "cookie_replies": get(&c.warm_cookies),
        },
        "seconds": round2(secs),
        "drain_s": a.drain,
        "initiations": sent,
        "initiations_with_mac2": get(&c.with_mac2),
        "offered_per_s": per_s(sent),
        "responses": responses,
        "responses_accepted": get(&c.responses_accepted),
        "answered_per_s": per_s(responses),
        // Responses the initiator could still use: to its current or previous
        // initiation (it re-initiates every keys/rate seconds).
        "completed_per_s": per_s(get(&c.responses_accepted)),
        "cookie_replies": cookies,
        "cookie_replies_accepted": get(&c.cookies_accepted),
        "cookie_replies_per_s": per_s(cookies),
        "unanswered": sent.saturating_sub(responses + cookies),
        "keepalives_sent": get(&c.keepalives_sent),
        "unmatched_replies": get(&c.unmatched),
        "data_received": get(&c.data),
        "other_received": get(&c.other),
        "send_errors": get(&c.send_errors),
        "recv_errors": get(&c.recv_errors),
        "lag_resets": m.lag_resets,
        "latency_ms": {
            "p50": percentile(&lat, 0.5),
            "p90": percentile(&lat, 0.9),
            "p99": percentile(&lat, 0.99),
            "max": lat.last().map(|&x| f64::from(x) / 1000.0),
        },
        "generator_cpu_s": round2(cpu_s),
        "generator_cpu_s_whole_run": round2(m.cpu_whole.as_secs_f64()),
        "generator_cpu_percent": round2(100.0 * cpu_s / span),
        "generator_cpu_us_per_initiation":
            if sent > 0 { Some(round2(cpu_s * 1e6 / sent as f64)) } else { None },
        "gateway": gateway,
    });
    if a.json {
        println!("{out}");
        return Ok(());
    }
    let ms = |p: f64| percentile(&lat, p).map_or("-".to_string(), |v| format!("{v:.2}"));
    println!(
        "{} keys, {} sockets -> {}: {sent} initiations in {secs:.2} s after {} s warm-up \
         (target {}/s, {} with mac2, {} lag resets)",
        m.nkeys,
        m.nsockets,
        a.endpoint,
        a.warmup,
        a.rate,
        get(&c.with_mac2),
        m.lag_resets
    );
    if a.warmup > 0.0 {
        println!(
            "warm-up: {} initiations, {} responses, {} cookie replies",
            m.warm_sent,
            get(&c.warm_responses),
            get(&c.warm_cookies)
        );
    }
    println!(
        "offered {:.1}/s  answered {:.1}/s ({} accepted)  cookie replies {:.1}/s  unanswered {}",
        per_s(sent),
        per_s(responses),
        get(&c.responses_accepted),
        per_s(cookies),
        sent.saturating_sub(responses + cookies)
    );
    println!(
        "reply latency ms: p50 {}  p90 {}  p99 {}",
        ms(0.5),
        ms(0.9),
        ms(0.99)
    );
    println!(
        "generator CPU {cpu_s:.2} s ({:.0}% of one core, {:.1} us per initiation incl. responses)",
        100.0 * cpu_s / span,
        if sent > 0 {
            cpu_s * 1e6 / sent as f64
        } else {
            0.0
        }
    );
    if let Some(g) = &m.gateway {
        let total = g.total.as_secs_f64();
        let threads: Vec<String> = g
            .by_thread
            .iter()
            .map(|(n, t)| format!("{n} {:.2}", t.as_secs_f64()))
            .collect();
        println!(
            "gateway CPU {total:.2} s in {:.2} s ({:.0}% of one core, {:.1} us per answered \
             handshake; threads: {})",
            g.interval.as_secs_f64(),
            100.0 * total / g.interval.as_secs_f64().max(1e-3),
            if responses > 0 {
                total * 1e6 / responses as f64
            } else {
                0.0
            },
            threads.join(", ")
        );
    }
    Ok(())
}
