//! The clap command tree (the `///` comments are the help) and the admin
//! commands behind it. Errors are `anyhow` here: each is one sentence naming the
//! file, flag or value at fault, printed by `main` as `error: ...`.

pub(crate) mod admin;
mod generate;
mod listing;
mod verify;

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;

pub use admin::{peer_revoke, peer_rotate};
pub use generate::{completions, man};
pub(crate) use listing::peer_values;
pub use listing::{peer_list, peer_show, status};
pub use verify::audit_verify;
pub(crate) use verify::verify_chain;

use crate::config::validate::{check_endpoint, check_ifname, first_host_v4};
use crate::config::{Config, StoreConfig, DEFAULT_CONFIG_PATH};
use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use crate::registry::{PeerName, Store};

/// Userspace WireGuard gateway: issued keys only, full tunnel, audited.
#[derive(Debug, Parser)]
#[command(name = "sitegate", version)]
pub struct Cli {
    /// Config file.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "SITEGATE_CONFIG",
        default_value = DEFAULT_CONFIG_PATH
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a commented config, the server private key (mode 0600) and an empty
    /// peer store. Refuses to overwrite any of them without --force.
    Init(InitArgs),
    /// Run the gateway in the foreground, logging to stderr. SIGHUP reloads the
    /// peer store; SIGTERM/SIGINT shut down cleanly.
    Run,
    /// Issue, revoke, rotate and list peers.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// The daemon's live view, like `wg show`. Exits 1 when no daemon runs
    /// (with --json after printing `{"running": false, ...}`).
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Security self-check; exits 0 only when every check passes.
    Check,
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print a new private key (base64) on stdout, like `wg genkey`.
    Genkey,
    /// Read a private key on stdin, print its public key, like `wg pubkey`.
    Pubkey,
    /// Files for packaging, generated from this binary's command tree.
    #[command(subcommand, hide = true)]
    Generate(GenerateCommand),
}

/// `sitegate generate`, hidden: what `scripts/build-deb.sh` ships beside the binary.
#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// A shell completion script on stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The man page sitegate(1) on stdout; with --out-dir, it and one page per
    /// subcommand written there.
    Man {
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// What issued client configs dial: HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub endpoint: String,
    /// Tunnel subnet; the gateway takes its first host address, or the address
    /// given (10.8.0.1/24 means gateway 10.8.0.1 in 10.8.0.0/24).
    #[arg(long, value_name = "CIDR", default_value = "10.8.0.0/24")]
    pub subnet: String,
    /// TUN device name.
    #[arg(long, value_name = "NAME", default_value = "sg0")]
    pub interface: String,
    /// UDP port to listen on.
    #[arg(long, value_name = "N", default_value_t = 51820)]
    pub listen_port: u16,
    /// Where full-tunnel traffic leaves (default: the interface of the default route).
    #[arg(long, value_name = "IFACE")]
    pub egress: Option<String>,
    /// Overwrite an existing config, key and store (all issued peers are lost).
    #[arg(long)]
    pub force: bool,
    /// The user the daemon drops to after start (`[daemon] user`); it must
    /// exist. The store and audit log go to directories it owns. Default:
    /// `sitegate` when that user exists.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Issue a peer: allocate a tunnel address, generate a preshared key and
    /// (without --public-key) a key pair, and print its client config.
    Add(PeerAddArgs),
    /// Revoke a peer; its key stays on the revocation list.
    Revoke {
        #[arg(allow_hyphen_values = true)]
        name: String,
        /// Why (recorded in the store and the audit log).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Replace a peer's key (and preshared key); the old key becomes revoked.
    /// Prints the new client config; name, addresses and grants stay.
    Rotate(PeerRotateArgs),
    /// List issued peers, with live state (endpoint, handshake, bytes) when the
    /// daemon runs. --json: an array of peers, each with `live` (null without a daemon).
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show one peer.
    Show {
        #[arg(allow_hyphen_values = true)]
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct PeerAddArgs {
    /// Peer name: 1 to 63 of a-z, 0-9, `_`, `.`, `-`, starting with a letter or digit.
    #[arg(allow_hyphen_values = true)]
    pub name: String,
    /// The peer's own public key; then the printed config has no PrivateKey line.
    #[arg(long, value_name = "KEY")]
    pub public_key: Option<String>,
    /// Tunnel address (default: the lowest free one).
    #[arg(long, value_name = "IP")]
    pub address: Option<String>,
    /// A `[[service]]` the peer may reach; repeatable (default: the services marked `default = true`).
    #[arg(long = "service", value_name = "NAME")]
    pub services: Vec<String>,
    /// Expiry: a duration (8s, 30m, 12h, 30d) from now, or a date YYYY-MM-DD (00:00 UTC).
    #[arg(long, value_name = "DURATION|DATE")]
    pub expires: Option<String>,
    /// Allow this peer to use the admin API.
    #[arg(long)]
    pub admin: bool,
    #[command(flatten)]
    pub delivery: DeliveryArgs,
}

/// How a newly issued key reaches the site; shared by `peer add` and `peer rotate`.
#[derive(Debug, Args)]
pub struct DeliveryArgs {
    /// Issue without a preshared key.
    #[arg(long)]
    pub no_psk: bool,
    /// Write the client config to FILE (created with mode 0600; must not exist).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Print the client config as a terminal QR code.
    #[arg(long)]
    pub qr: bool,
    /// Add wg-quick PostUp/PreDown rules rejecting traffic outside the tunnel (Linux sites).
    #[arg(long)]
    pub kill_switch: bool,
}

#[derive(Debug, Args)]
pub struct PeerRotateArgs {
    #[arg(allow_hyphen_values = true)]
    pub name: String,
    /// The peer's new public key (default: generate a key pair).
    #[arg(long, value_name = "KEY")]
    pub public_key: Option<String>,
    #[command(flatten)]
    pub delivery: DeliveryArgs,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the audit log's hash chain (a keyed chain with the seal key from the config);
    /// exit 0 when intact, 1 naming the first bad line and what is wrong with it.
    Verify {
        /// Audit file (default: `[log] audit_file`, checked against the head in the store).
        file: Option<PathBuf>,
    },
}

/// `sitegate check`: every verdict on stdout, then exit 1 when any failed
/// (warnings do not fail).
pub fn check(config: &Path) -> Result<()> {
    let report = crate::check::run(config);
    write_stdout(&report.render())?;
    match report.count(crate::check::Status::Fail) {
        0 => Ok(()),
        n => bail!("{n} check(s) failed"),
    }
}

/// `sitegate run`: load (refusing a bad config or loose key file before anything
/// is created), then hand over to the daemon.
pub fn run(config: &Path) -> Result<()> {
    let cfg = Config::load(config)?;
    // Fail closed (SPEC): a key this build cannot honour stops the start.
    let unenforced = cfg.unenforced_keys();
    if let Some(first) = unenforced.first() {
        let more: Vec<&str> = unenforced[1..].iter().map(|u| u.key).collect();
        bail!(
            "{}: `{}` is set but {}; sitegate run refuses to start rather than ignore it (remove the key){}",
            config.display(),
            first.key,
            first.missing,
            if more.is_empty() {
                String::new()
            } else {
                format!("; also not enforced: {}", more.join(", "))
            }
        );
    }
    crate::events::init_tracing(cfg.log.format);
    crate::daemon::run_until_signal(cfg)
}

/// `sitegate genkey`.
pub fn genkey() -> Result<()> {
    write_stdout(&format!("{}\n", PrivateKey::generate().to_base64()))
}

/// `sitegate pubkey`.
pub fn pubkey() -> Result<()> {
    let mut text = String::new();
    std::io::stdin()
        .take(1024)
        .read_to_string(&mut text)
        .context("cannot read a private key from stdin")?;
    // The input is a secret: never echo it in the error.
    let key = PrivateKey::from_base64(&text).map_err(|_| {
        anyhow!("stdin does not hold a WireGuard private key (44 characters of base64)")
    })?;
    zeroize::Zeroize::zeroize(&mut text);
    write_stdout(&format!("{}\n", key.public_key().to_base64()))
}

fn write_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// Where `init` puts things.
struct InitPaths {
    config: PathBuf,
    key: PathBuf,
    db: PathBuf,
    audit: PathBuf,
    token: PathBuf,
    seal: PathBuf,
}

impl InitPaths {
    /// FHS paths for the default config path; otherwise everything beside the
    /// config, with the store and audit log in `state/` when the daemon drops
    /// to a user (that directory is the user's; the config's, with the
    /// root-owned keys, is not).
    fn new(config: &Path, user: bool) -> Result<Self> {
        if config == Path::new(DEFAULT_CONFIG_PATH) {
            return Ok(Self {
                config: config.to_path_buf(),
                key: "/etc/sitegate/server.key".into(),
                db: "/var/lib/sitegate/sitegate.db".into(),
                audit: "/var/log/sitegate/audit.jsonl".into(),
                token: "/etc/sitegate/api.token".into(),
                seal: "/etc/sitegate/seal.key".into(),
            });
        }
        let config = std::path::absolute(config)
            .with_context(|| format!("cannot resolve --config {}", config.display()))?;
        let dir = config.parent().unwrap_or(Path::new("/")).to_path_buf();
        let state = if user { dir.join("state") } else { dir.clone() };
        Ok(Self {
            config,
            key: dir.join("server.key"),
            db: state.join("sitegate.db"),
            audit: state.join("audit.jsonl"),
            token: dir.join("api.token"),
            seal: dir.join("seal.key"),
        })
    }
}

/// `sitegate init`.
pub fn init(config: &Path, a: &InitArgs) -> Result<()> {
    check_endpoint(&a.endpoint).map_err(|why| anyhow!("--endpoint `{}` {why}", a.endpoint))?;
    check_ifname(&a.interface).map_err(|why| anyhow!("--interface `{}` {why}", a.interface))?;
    if let Some(e) = &a.egress {
        check_ifname(e).map_err(|why| anyhow!("--egress `{e}` {why}"))?;
    }
    if a.listen_port == 0 {
        bail!("--listen-port 0 is not a port from 1 to 65535");
    }
    let gateway = gateway_from_subnet(&a.subnet)?;
    let user = init_user(a.user.as_deref())?;
    let paths = InitPaths::new(config, user.is_some())?;
    let egress = a.egress.clone().or_else(default_route_interface);
    let text = render_init_config(a, gateway, &paths, egress.as_deref(), user.as_ref());
    // What we write must load; a failure here is a bug, not a user error.
    Config::parse(&paths.config, &text)
        .context("internal error: the generated config does not validate")?;

    let secrets = [&paths.key, &paths.token, &paths.seal];
    if !a.force {
        for p in [&paths.config, &paths.db].into_iter().chain(secrets) {
            if p.symlink_metadata().is_ok() {
                bail!(
                    "{} already exists; pass --force to overwrite it",
                    p.display()
                );
            }
        }
    }
    for p in [
        &paths.config,
        &paths.key,
        &paths.db,
        &paths.audit,
        &paths.token,
        &paths.seal,
    ] {
        if let Some(dir) = p.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
    }
    let server_key = PrivateKey::generate();
    write_new_file(
        &paths.key,
        &format!("{}\n", server_key.to_base64()),
        0o600,
        a.force,
    )?;
    write_new_file(
        &paths.token,
        &format!("{}\n", random_hex32()),
        0o600,
        a.force,
    )?;
    write_new_file(
        &paths.seal,
        &format!("{}\n", PresharedKey::generate().to_base64()),
        0o600,
        a.force,
    )?;
    if a.force {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = paths.db.clone().into_os_string();
            p.push(suffix);
            match fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e)
                        .with_context(|| format!("cannot remove {}", Path::new(&p).display()));
                }
                _ => {}
            }
        }
    }
    if let Some(u) = &user {
        hand_state_dirs(&paths, u)?;
    }
    // Unsealed until first opened with the seal key (by the first admin command
    // or the daemon, before any peer exists), so that a config edited to drop
    // `[daemon]` before first use still opens it.
    Store::create(&StoreConfig::Sqlite {
        path: paths.db.clone(),
    })?;
    if let Some(u) = &user {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = paths.db.clone().into_os_string();
            p.push(suffix);
            let p = PathBuf::from(p);
            if p.exists() {
                crate::privilege::chown_state_file(&p, u)?;
            }
        }
    }
    write_new_file(&paths.config, &text, 0o640, a.force)?;
    write_stdout(&format!(
        "wrote {}\nserver key {} (public key {})\npeer store {}\n",
        paths.config.display(),
        paths.key.display(),
        server_key.public_key(),
        paths.db.display()
    ))
}

/// The daemon's user: `--user NAME`, which must exist, or `sitegate` when
/// that user exists; none otherwise (the config gets a commented line).
fn init_user(name: Option<&str>) -> Result<Option<crate::privilege::Target>> {
    match name {
        Some(n) => match crate::privilege::Target::resolve(n) {
            Ok(t) => Ok(Some(t)),
            Err(crate::privilege::PrivilegeError::NoSuchUser(_)) => bail!(
                "--user {n}: no such user; create it first (`useradd --system --no-create-home {n}`)"
            ),
            Err(e) => Err(anyhow!("--user {n}: {e}")),
        },
        None => Ok(crate::privilege::Target::resolve("sitegate").ok()),
    }
}

/// Gives the store's and the audit log's directories to the daemon's user
/// (mode 0700), and lets it through the config's directory (search only,
/// `o+x`) when those lie beneath it: the daemon writes there after its drop.
fn hand_state_dirs(paths: &InitPaths, user: &crate::privilege::Target) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (uid, gid) = (
        nix::unistd::Uid::from_raw(user.uid),
        nix::unistd::Gid::from_raw(user.gid),
    );
    let mut dirs: Vec<&Path> = [&paths.db, &paths.audit]
        .iter()
        .filter_map(|p| p.parent())
        .collect();
    dirs.dedup();
    for dir in dirs {
        nix::unistd::chown(dir, Some(uid), Some(gid))
            .with_context(|| format!("cannot give {} to user {}", dir.display(), user.name))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot chmod {}", dir.display()))?;
        if let Some(parent) = dir.parent().filter(|p| paths.config.starts_with(p)) {
            let meta = fs::metadata(parent)
                .with_context(|| format!("cannot read {}", parent.display()))?;
            let mode = meta.mode() & 0o7777;
            let passes =
                crate::privilege::permits(mode, meta.uid(), meta.gid(), user.uid, user.gid, 0o1);
            if !passes {
                fs::set_permissions(parent, fs::Permissions::from_mode(mode | 0o011))
                    .with_context(|| format!("cannot chmod {}", parent.display()))?;
            }
        }
    }
    Ok(())
}

/// `--subnet`: a network (gateway = first host) or a host address with prefix.
fn gateway_from_subnet(s: &str) -> Result<Ipv4Net> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|_| anyhow!("--subnet `{s}` is not an IPv4 CIDR such as 10.8.0.0/24"))?;
    if net.prefix_len() > 30 {
        bail!("--subnet `{s}` leaves no room for peers; use a prefix of /30 or shorter");
    }
    let gw = if net.addr() == net.network() {
        first_host_v4(net)
    } else {
        net.addr()
    };
    if gw == net.broadcast() {
        bail!(
            "--subnet `{s}` names the broadcast address; give the network or the gateway's address"
        );
    }
    Ipv4Net::new(gw, net.prefix_len()).map_err(|_| anyhow!("--subnet `{s}` has a bad prefix"))
}

/// The interface of the IPv4 default route, from `/proc/net/route`.
fn default_route_interface() -> Option<String> {
    let table = fs::read_to_string("/proc/net/route").ok()?;
    table.lines().skip(1).find_map(|l| {
        let mut f = l.split_whitespace();
        let (iface, dest) = (f.next()?, f.next()?);
        (dest == "00000000" && check_ifname(iface).is_ok()).then(|| iface.to_string())
    })
}

fn random_hex32() -> String {
    use rand_core::{OsRng, RngCore};
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// A TOML string literal (quoted, escaped).
fn q(s: impl AsRef<str>) -> String {
    toml::Value::String(s.as_ref().to_string()).to_string()
}

fn qp(p: &Path) -> String {
    q(p.to_string_lossy())
}

fn render_init_config(
    a: &InitArgs,
    gw: Ipv4Net,
    p: &InitPaths,
    egress: Option<&str>,
    user: Option<&crate::privilege::Target>,
) -> String {
    let g = gw.addr();
    let egress_lines = match egress {
        Some(e) => format!(
            "interface = {}\nallow_internet = true             # full tunnel: peers reach the internet through NAT",
            q(e)
        ),
        None => "# interface = \"eth0\"          # no default route found: set the uplink,\n\
                 allow_internet = false            # then make this true (full tunnel to the internet, NAT'ed)"
            .to_string(),
    };
    let user_line = if let Some(u) = user {
        format!(
            "user = {}                 # after setup the daemon drops to this user, keeping only CAP_NET_ADMIN",
            q(&u.name)
        )
    } else {
        "# user = \"sitegate\"            # no such user yet: `useradd --system sitegate`, then uncomment".to_string()
    };
    format!(
        r#"# sitegate configuration, written by `sitegate init`. Unknown keys are refused.

[interface]
name = {name}
private_key_file = {key}   # mode 0600; `sitegate pubkey < FILE` prints the public key
listen_port = {port}
# Gateway address and tunnel subnet; add an IPv6 ULA as a list:
# address = ["{g}/{plen}", "fd00:8::1/64"]
address = "{g}/{plen}"
mtu = 1420
endpoint = {endpoint}   # what issued client configs dial
# dns = ["{g}"]                  # pushed in issued client configs

[egress]
{egress_lines}
peer_to_peer = false              # sites cannot reach each other unless true

# Endpoints peers may reach; nothing else on this host or internal networks is.
# An address is the gateway's tunnel address or an internal (private-range) host.
[[service]]
name = "sftp"
address = "{g}:22"
protocol = "tcp"
default = true                    # granted to every new peer unless `peer add --service` is given

[[service]]
name = "api"
address = "{g}:8443"
protocol = "tcp"
default = false                   # grant to admins: `peer add NAME --admin --service api`

[api]
listen = "{g}:8443"               # must be the gateway's tunnel address
token_file = {token}

[store]
url = {url}

[log]
format = "json"                   # or "text"
audit_file = {audit}

[firewall]
manage = true                     # install and remove the nftables table `inet sitegate`

[daemon]
{user_line}
seal_key_file = {seal}
"#,
        name = q(&a.interface),
        key = qp(&p.key),
        port = a.listen_port,
        plen = gw.prefix_len(),
        endpoint = q(&a.endpoint),
        token = qp(&p.token),
        url = q(format!("sqlite://{}", p.db.display())),
        audit = qp(&p.audit),
        seal = qp(&p.seal),
    )
}

/// Creates `path` with `mode` set at open (never widened by a later chmod). With
/// `replace`, an existing file is removed first; otherwise it must not exist.
fn write_new_file(path: &Path, text: &str, mode: u32, replace: bool) -> Result<()> {
    if replace {
        match fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", path.display()));
            }
            _ => {}
        }
    }
    let mut f = create_new_file(path, mode)?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn create_new_file(path: &Path, mode: u32) -> Result<fs::File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => anyhow!(
                "{} already exists; remove it or choose another path",
                path.display()
            ),
            _ => anyhow!("cannot create {}: {e}", path.display()),
        })
}

/// `sitegate peer add`.
pub fn peer_add(config: &Path, a: &PeerAddArgs) -> Result<()> {
    let name = PeerName::new(&a.name)?;
    let cfg = Config::load(config)?;
    let server_public = admin::server_public_key(&cfg)?;
    let public_key = match a.public_key.as_deref() {
        Some(k) => Some(PublicKey::from_base64(k).map_err(|e| anyhow!("--public-key {e}"))?),
        None => None,
    };
    let address = match &a.address {
        Some(s) => Some(
            s.parse::<IpAddr>()
                .map_err(|_| anyhow!("--address `{s}` is not an IP address"))?,
        ),
        None => None,
    };
    let services = resolve_services(&cfg, &a.services)?;
    let now = unix_now();
    let expires_at = match &a.expires {
        Some(s) => Some(parse_expires(s, now)?),
        None => None,
    };
    let mut store = Store::open_config(&cfg)?;
    let sink = admin::ConfigSink::new(a.delivery.output.as_deref(), a.delivery.qr)?;
    let request = admin::IssueRequest {
        name,
        public_key,
        address,
        services,
        created_at: now,
        expires_at,
        psk: !a.delivery.no_psk,
        admin: a.admin,
    };
    let issued = match admin::issue(&cfg, &mut store, &server_public, request, admin::actor()) {
        Ok(i) => i,
        Err(e) => {
            sink.discard();
            return Err(e);
        }
    };
    admin::notify(&cfg, &issued.action);
    let text = admin::client_config(
        &cfg,
        &server_public,
        &issued.peer,
        issued.private_key.as_ref(),
        a.delivery.kill_switch,
    );
    sink.deliver(&issued.peer, &text, "issued")?;
    admin::audit_failure(&format!("peer `{}`", issued.peer.name), issued.audit_error)
}

/// The services a new peer gets: those named (each must exist), or the defaults.
pub(crate) fn resolve_services(cfg: &Config, requested: &[String]) -> Result<Vec<String>> {
    if requested.is_empty() {
        return Ok(cfg
            .services
            .iter()
            .filter(|s| s.default)
            .map(|s| s.name.clone())
            .collect());
    }
    for r in requested {
        if !cfg.services.iter().any(|s| s.name == *r) {
            let known: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
            let known = if known.is_empty() {
                "no [[service]]".to_string()
            } else {
                format!("services {}", known.join(", "))
            };
            bail!(
                "unknown service `{r}`: {} defines {known}",
                cfg.path.display()
            );
        }
    }
    Ok(requested.to_vec())
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `--expires`: a whole number of `s`, `m`, `h` or `d` from `now` (read by
/// humantime), or `YYYY-MM-DD` (00:00 UTC), which must lie in the future.
/// Returns Unix seconds. humantime's other units are refused on purpose: `ms`
/// would make an instantly expired peer, and `M` (months) is one shift key
/// away from `m` (minutes).
pub(crate) fn parse_expires(s: &str, now: i64) -> Result<i64> {
    let bad = || {
        anyhow!("--expires `{s}` is neither a duration (8s, 30m, 12h, 30d) nor a future date (YYYY-MM-DD)")
    };
    let b = s.as_bytes();
    if b.len() == 10 && b[4] == b'-' && b[7] == b'-' {
        let t = humantime::parse_rfc3339(&format!("{s}T00:00:00Z")).map_err(|_| bad())?;
        let t = t
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_secs()).ok())
            .ok_or_else(bad)?;
        if t <= now {
            bail!("--expires `{s}` lies in the past");
        }
        return Ok(t);
    }
    let shape_ok = b.len() >= 2
        && b[..b.len() - 1].iter().all(u8::is_ascii_digit)
        && matches!(b[b.len() - 1], b's' | b'm' | b'h' | b'd');
    if !shape_ok {
        return Err(bad());
    }
    let d = humantime::parse_duration(s).map_err(|_| bad())?;
    i64::try_from(d.as_secs())
        .ok()
        .filter(|secs| *secs > 0)
        .and_then(|secs| now.checked_add(secs))
        .ok_or_else(bad)
}

/// Unix seconds as RFC 3339 UTC, `YYYY-MM-DDTHH:MM:SSZ`.
fn format_time(t: i64) -> String {
    let at = u64::try_from(t)
        .ok()
        .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .unwrap_or(UNIX_EPOCH);
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Durations count from now; dates are midnight UTC and must be in the future.
    #[test]
    fn expires_parsing() {
        let now = 1_764_000_000; // 2025-11-24T16:00:00Z
        assert_eq!(parse_expires("8s", now).unwrap(), now + 8);
        assert_eq!(parse_expires("30m", now).unwrap(), now + 1800);
        assert_eq!(parse_expires("12h", now).unwrap(), now + 43_200);
        assert_eq!(parse_expires("30d", now).unwrap(), now + 2_592_000);
        assert_eq!(parse_expires("2026-01-01", now).unwrap(), 1_767_225_600);
        for bad in [
            "",
            "s",
            "0d",
            "-5m",
            "5w",
            "5 d",
            "2026-13-01",
            "2026-02-30",
            "26-01-01",
            "tomorrow",
            "99999999999999999d",
            "5ms",
            "1M",
            "1h30m",
        ] {
            let e = parse_expires(bad, now).unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
        assert!(parse_expires("2020-01-01", now)
            .unwrap_err()
            .to_string()
            .contains("in the past"));
        assert_eq!(parse_expires("2028-02-29", now).unwrap(), 1_835_395_200);
    }

    /// Timestamps render as RFC 3339 UTC, inverse to the date parser.
    #[test]
    fn time_formatting() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_767_225_600 + 3661), "2026-01-01T01:01:01Z");
        assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
    }

    /// `--subnet` takes a network (gateway = first host) or the gateway's address.
    #[test]
    fn subnet_to_gateway() {
        assert_eq!(
            gateway_from_subnet("10.8.0.0/24").unwrap().to_string(),
            "10.8.0.1/24"
        );
        assert_eq!(
            gateway_from_subnet("10.8.0.1/24").unwrap().to_string(),
            "10.8.0.1/24"
        );
        assert_eq!(
            gateway_from_subnet("172.16.5.9/16").unwrap().to_string(),
            "172.16.5.9/16"
        );
        for bad in ["10.8.0.255/24", "10.8.0.0/31", "fd00::/64", "nope"] {
            assert!(gateway_from_subnet(bad)
                .unwrap_err()
                .to_string()
                .contains(bad));
        }
    }

    /// The config `init` writes loads, with FHS paths for the default config path.
    #[test]
    fn init_config_validates() {
        let a = InitArgs {
            endpoint: "vpn.example.org:51820".into(),
            subnet: "10.8.0.0/24".into(),
            interface: "sg0".into(),
            listen_port: 51820,
            egress: None,
            force: false,
            user: None,
        };
        let p = InitPaths::new(Path::new(DEFAULT_CONFIG_PATH), false).unwrap();
        let nobody = crate::privilege::Target {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        for (egress, user) in [(None, false), (Some("eth0"), true)] {
            let text = render_init_config(
                &a,
                gateway_from_subnet(&a.subnet).unwrap(),
                &p,
                egress,
                user.then_some(&nobody),
            );
            let c = Config::parse(&p.config, &text).unwrap();
            assert!(
                matches!(&c.store, StoreConfig::Sqlite { path } if path == Path::new("/var/lib/sitegate/sitegate.db"))
            );
            assert_eq!(
                c.interface.private_key_file,
                Path::new("/etc/sitegate/server.key")
            );
            assert_eq!(c.egress.interface.as_deref(), egress);
            assert_eq!(c.daemon.user.is_some(), user);
        }
        // Beside a custom config, a user's state goes to `state/`.
        let custom = InitPaths::new(Path::new("/srv/sg/sitegate.toml"), true).unwrap();
        assert_eq!(custom.db, Path::new("/srv/sg/state/sitegate.db"));
        assert_eq!(custom.audit, Path::new("/srv/sg/state/audit.jsonl"));
        assert_eq!(custom.key, Path::new("/srv/sg/server.key"));
    }

    /// The clap tree is consistent (no conflicting names or defaults).
    #[test]
    fn clap_tree() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
