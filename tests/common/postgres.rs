//! Throwaway PostgreSQL clusters for integration tests, built from Debian's
//! server binaries (`/usr/lib/postgresql/<version>/bin`).
//!
//! Each [`Postgres`] is its own cluster in `/tmp/sgpg-<tag>-<pid>/`, listening
//! only on a unix socket in that directory (no TCP), so a `sitegate` in any
//! network namespace reaches it through the filesystem. It is stopped and its
//! directory deleted on `Drop`, also when a test panics (`SITEGATE_TEST_KEEP`
//! keeps the directory, as for [`super::TempDir`]).
//!
//! Tests run as root and initdb refuses to, so the server tools run as the
//! `postgres` system user; `psql` runs as root and logs in as the superuser
//! `postgres` (trusted on the socket). Every other role needs its password
//! (scram-sha-256), so wrong credentials are refused as in production.
//!
//! Layout (paths stay short: a unix socket path has at most 107 bytes):
//! `/tmp/sgpg-<tag>-<pid>/` (postgres, 0755: the socket and `server.log`) and
//! its `data/` (postgres, 0700: the cluster).

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use rand::distributions::Alphanumeric;
use rand::Rng;

use super::{ready_or_skip, run};

/// The login role and database that [`Postgres::start`] creates.
const ROLE: &str = "sitegate";
/// How long `pg_ctl` may wait for the server to start or stop.
const PG_CTL_DEADLINE: Duration = Duration::from_secs(60);

/// Tags of the clusters alive in this process: tests of one binary share a
/// pid, so two clusters with one tag would share (and delete) one directory.
static LIVE_TAGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Where [`Postgres::enable_tls`] serves TLS.
pub struct TlsEndpoint {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// The CA that signed the server certificate (PEM).
    pub ca: PathBuf,
    /// A CA that signed nothing the server shows (PEM).
    pub other_ca: PathBuf,
}

/// One throwaway cluster with role and database `sitegate`; stopped and deleted on drop.
pub struct Postgres {
    tag: String,
    dir: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    password: String,
    /// The server's port: it names the socket file, and the TCP listener
    /// of [`Postgres::enable_tls`] uses it too.
    port: u16,
}

impl Postgres {
    /// Creates and starts a cluster for the test `tag` (lowercase letters,
    /// digits, `_`, `-`; unique among the clusters alive in this process).
    ///
    /// It listens only on a unix socket in [`Self::socket_dir`]
    /// (`listen_addresses = ''`), runs with `fsync = off`, and holds role
    /// `sitegate` with a random password and database `sitegate` owned by it.
    /// Authentication: the superuser `postgres` is trusted on the socket,
    /// everyone else needs a password (scram-sha-256).
    pub fn start(tag: &str) -> Postgres {
        assert!(
            !tag.is_empty()
                && tag.len() <= 32
                && tag
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'),
            "postgres tag `{tag}`: use 1–32 of [a-z0-9_-] (it is part of a socket path)"
        );
        let bin = bin_dir().unwrap_or_else(|| {
            panic!("no /usr/lib/postgresql/*/bin/initdb (check postgres_ready first)")
        });
        {
            let mut live = LIVE_TAGS.lock().unwrap_or_else(|e| e.into_inner());
            assert!(
                !live.iter().any(|t| t == tag),
                "postgres tag `{tag}` is already used by another cluster of this process"
            );
            live.push(tag.to_string());
        }
        let dir = PathBuf::from(format!("/tmp/sgpg-{tag}-{}", std::process::id()));
        // From here on `pg` exists, so a panic below still stops and deletes it.
        let pg = Postgres {
            tag: tag.to_string(),
            data: dir.join("data"),
            dir,
            bin,
            password: rand::thread_rng()
                .sample_iter(&Alphanumeric)
                .take(24)
                .map(char::from)
                .collect(),
            // Free on 127.0.0.1 now, so that enable_tls can listen there too.
            port: std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free TCP port")
                .port(),
        };
        sweep_stale(&pg.bin);
        pg.make_dir();
        pg.initdb();
        pg.configure();
        pg.start_again();
        pg.psql(
            "postgres",
            &format!(
                "CREATE ROLE {ROLE} LOGIN PASSWORD '{}';\n\
                 CREATE DATABASE {ROLE} OWNER {ROLE};\n",
                pg.password
            ),
        );
        pg
    }

    /// The URL of database `sitegate` as role `sitegate` with its password.
    ///
    /// The socket directory is the percent-encoded host, as libpq (`psql`) and
    /// the `postgres` crate's `Config::from_str` both read it:
    /// `postgres://sitegate:PW@%2Ftmp%2Fsgpg-TAG-PID:PORT/sitegate`.
    pub fn url(&self) -> String {
        self.url_for(ROLE, &self.password)
    }

    /// The URL of database `db` as role `sitegate` with `password` (right or wrong).
    pub fn url_for(&self, db: &str, password: &str) -> String {
        format!(
            "postgres://{ROLE}:{}@{}:{}/{}",
            percent_encode(password),
            percent_encode(&self.dir.to_string_lossy()),
            self.port,
            percent_encode(db)
        )
    }

    /// The password of role `sitegate` (random per cluster).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Runs `sql` (one or more statements) as the superuser in database `db`
    /// with `psql -v ON_ERROR_STOP=1 -At` and returns its stdout; panics with
    /// psql's stderr if any statement fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let mut cmd = Command::new("psql");
        cmd.args(["-X", "-w", "-v", "ON_ERROR_STOP=1", "-At", "-f", "-"])
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db]);
        without_pg_env(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start psql: {e}"));
        // psql reads all of stdin before it exits, so writing cannot deadlock
        // on a full stdout pipe for the small scripts tests pass here.
        let write = child
            .stdin
            .take()
            .expect("psql stdin")
            .write_all(sql.as_bytes());
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("psql did not finish: {e}"));
        if let Err(e) = write {
            panic!(
                "cannot send SQL to psql ({e}); psql said: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if !out.status.success() {
            panic!(
                "psql in database `{db}` failed ({}):\n{}\nSQL:\n{sql}\nserver log (tail):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end(),
                self.log_tail()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the server (`pg_ctl stop -m fast`, waiting until it is down).
    pub fn stop(&self) {
        let out = self.pg_ctl(&["stop", "-m", "fast"]);
        if !out.status.success() {
            panic!(
                "pg_ctl stop failed ({}): {}\nserver log (tail):\n{}",
                out.status,
                output_text(&out),
                self.log_tail()
            );
        }
    }

    /// Starts the server again on the same directory and socket; returns once
    /// it accepts connections (`pg_ctl start -w`).
    pub fn start_again(&self) {
        let out = self.pg_ctl(&["start", "-l", &self.log_path().to_string_lossy()]);
        if !out.status.success() {
            panic!(
                "pg_ctl start in {} failed ({}): {}\nserver log (tail):\n{}",
                self.data.display(),
                out.status,
                output_text(&out),
                self.log_tail()
            );
        }
    }

    /// Adds a TLS listener on `127.0.0.1` (the cluster's port, free when it
    /// started) with a server
    /// certificate for `IP:127.0.0.1` signed by a fresh test CA, accepting
    /// password logins there only over TLS (`hostssl`), and restarts the
    /// server. Also makes a second, unrelated CA for refusal tests.
    pub fn enable_tls(&self) -> TlsEndpoint {
        let tls = self.dir.join("tls");
        fs::create_dir_all(&tls).expect("create tls dir");
        let openssl = |args: &[&str]| {
            let out = run(Command::new("openssl").args(args).current_dir(&tls));
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                output_text(&out)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let mut args = vec!["req", "-x509", "-days", "2", "-subj"];
            let subject = format!("/CN=sitegate test {ca}");
            args.push(&subject);
            args.extend_from_slice(&ec);
            let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
            args.extend_from_slice(&["-keyout", &key, "-out", &pem]);
            openssl(&args);
        }
        let mut args = vec!["req", "-subj", "/CN=127.0.0.1"];
        args.extend_from_slice(&ec);
        args.extend_from_slice(&["-keyout", "server.key", "-out", "server.csr"]);
        openssl(&args);
        fs::write(
            tls.join("ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .expect("write ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext",
            "-out",
            "server.crt",
        ]);
        let (uid, gid) = postgres_ids().expect("system user `postgres`");
        for f in ["server.key", "server.crt"] {
            std::os::unix::fs::chown(tls.join(f), Some(uid), Some(gid)).expect("chown");
        }
        fs::set_permissions(tls.join("server.key"), fs::Permissions::from_mode(0o600))
            .expect("chmod server.key");
        let conf = format!(
            "\n# sitegate test harness: TLS\n\
             listen_addresses = '127.0.0.1'\n\
             ssl = on\n\
             ssl_cert_file = '{}'\n\
             ssl_key_file = '{}'\n",
            tls.join("server.crt").display(),
            tls.join("server.key").display()
        );
        let path = self.data.join("postgresql.conf");
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .unwrap_or_else(|e| panic!("cannot append to {}: {e}", path.display()));
        let hba = self.data.join("pg_hba.conf");
        let mut rules = fs::read_to_string(&hba).expect("read pg_hba.conf");
        rules.push_str("hostssl all all 127.0.0.1/32 scram-sha-256\n");
        fs::write(&hba, rules).expect("write pg_hba.conf");
        self.stop();
        self.start_again();
        TlsEndpoint {
            port: self.port,
            ca: tls.join("ca.pem"),
            other_ca: tls.join("other-ca.pem"),
        }
    }

    /// The directory holding the server's unix socket (`.s.PGSQL.PORT`).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The whole server log (pg_ctl's `-l` file), for failure messages.
    pub fn server_log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_else(|e| format!("(no server log: {e})"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The last lines of [`Self::server_log`].
    fn log_tail(&self) -> String {
        let log = self.server_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Creates the cluster's directory (replacing a leftover), owned by postgres.
    fn make_dir(&self) {
        if self.dir.exists() {
            // A leftover of an earlier process with the same pid.
            let _ = self.pg_ctl(&["stop", "-m", "immediate"]);
            fs::remove_dir_all(&self.dir)
                .unwrap_or_else(|e| panic!("cannot remove leftover {}: {e}", self.dir.display()));
        }
        fs::create_dir(&self.dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", self.dir.display()));
        let (uid, gid) = postgres_ids().expect("system user `postgres`");
        std::os::unix::fs::chown(&self.dir, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("cannot chown {} to postgres: {e}", self.dir.display()));
        // 0755: a sitegate that dropped CAP_DAC_OVERRIDE must still reach the socket.
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", self.dir.display()));
    }

    fn initdb(&self) {
        let out = run(self
            .as_postgres(&self.bin.join("initdb"))
            .arg("-D")
            .arg(&self.data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]));
        if !out.status.success() {
            panic!(
                "initdb in {} failed ({}): {}",
                self.data.display(),
                out.status,
                output_text(&out)
            );
        }
    }

    /// Socket-only listener, test-speed durability, and the pg_hba rules.
    fn configure(&self) {
        let conf = format!(
            "\n# sitegate test harness\n\
             listen_addresses = ''\n\
             port = {}\n\
             unix_socket_directories = '{}'\n\
             unix_socket_permissions = 0777\n\
             password_encryption = 'scram-sha-256'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 16MB\n\
             max_connections = 50\n",
            self.port,
            self.dir.display()
        );
        let path = self.data.join("postgresql.conf");
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .unwrap_or_else(|e| panic!("cannot append to {}: {e}", path.display()));
        let hba = "# sitegate test harness: socket only\n\
                   local all postgres trust\n\
                   local all all scram-sha-256\n";
        let path = self.data.join("pg_hba.conf");
        // Truncating keeps initdb's owner (postgres) and mode.
        fs::write(&path, hba).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// `pg_ctl -D data -w -t DEADLINE <args>` as the postgres user.
    fn pg_ctl(&self, args: &[&str]) -> Output {
        pg_ctl_as_postgres(&self.bin, &self.dir, &self.data, args)
    }

    fn as_postgres(&self, program: &Path) -> Command {
        as_postgres(program, &self.dir)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = self.pg_ctl(&["stop", "-m", "immediate"]);
        }
        if std::env::var_os("SITEGATE_TEST_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("SITEGATE_TEST_KEEP: kept cluster {}", self.dir.display());
        }
        let mut live = LIVE_TAGS.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|t| t != &self.tag);
    }
}

/// Whether PostgreSQL's server binaries, `psql`, the `postgres` user and root
/// are there; like `rig_ready`: outside CI a skip note and false, with
/// `CI=true` a panic naming what is missing.
pub fn postgres_ready(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    match bin_dir() {
        None => missing.push("/usr/lib/postgresql/*/bin (postgresql)".to_string()),
        Some(bin) => {
            for tool in ["initdb", "pg_ctl", "postgres"] {
                if !bin.join(tool).is_file() {
                    missing.push(bin.join(tool).display().to_string());
                }
            }
        }
    }
    let psql_found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("psql").is_file()))
        .unwrap_or(false);
    if !psql_found {
        missing.push("psql (postgresql-client)".to_string());
    }
    if postgres_ids().is_none() {
        missing.push("the system user `postgres`".to_string());
    }
    ready_or_skip(test, &missing)
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb`.
fn bin_dir() -> Option<PathBuf> {
    fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
}

/// Uid and gid of the `postgres` system user.
fn postgres_ids() -> Option<(u32, u32)> {
    // SAFETY: the name is a NUL-terminated literal; getpwnam returns null or a
    // pointer to a static record that is read before any other passwd call.
    let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null, see above.
    let pw = unsafe { &*pw };
    Some((pw.pw_uid, pw.pw_gid))
}

/// A command run as the postgres user (no supplementary groups) in `cwd`,
/// with a minimal environment.
fn as_postgres(program: &Path, cwd: &Path) -> Command {
    let (uid, gid) = postgres_ids().expect("system user `postgres`");
    let mut cmd = Command::new(program);
    cmd.uid(uid)
        .gid(gid)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    cmd
}

fn pg_ctl_as_postgres(bin: &Path, dir: &Path, data: &Path, args: &[&str]) -> Output {
    run(as_postgres(&bin.join("pg_ctl"), dir)
        .arg("-D")
        .arg(data)
        .args(["-w", "-t", &PG_CTL_DEADLINE.as_secs().to_string()])
        .args(args))
}

/// Stops and deletes clusters left by test processes that are gone (killed
/// before their `Drop` ran); their servers would otherwise run forever.
fn sweep_stale(bin: &Path) {
    let Ok(entries) = fs::read_dir("/tmp") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("sgpg-") {
            continue;
        }
        let Some(Ok(pid)) = name.rsplit('-').next().map(str::parse::<u32>) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = e.path();
        let data = dir.join("data");
        if data.join("postmaster.pid").exists() {
            let _ = pg_ctl_as_postgres(bin, &dir, &data, &["stop", "-m", "immediate"]);
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Removes libpq's environment (PGHOST, PGPASSWORD, ...) and ~/.pgpass from
/// a client command, so only its arguments decide where it connects.
pub fn without_pg_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("PGPASSFILE", "/nonexistent/.pgpass")
        .env("PGCONNECT_TIMEOUT", "10")
}

/// Percent-encodes everything but unreserved URL characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim_end()
    .to_string()
}
