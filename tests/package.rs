//! The Debian package as an admin gets it. `scripts/build-deb.sh --no-build`
//! packages the release binary this test run was built with: no second cargo
//! build, and no wait for cargo's build lock, which the test holds meanwhile.
//! `dpkg-deb -c`/`-I` show every shipped file and the control fields. dpkg
//! installs it into a throwaway root with its maintainer scripts
//! (`--force-script-chrootless`: they act on `$DPKG_ROOT`), where the `sitegate`
//! user, group and directories appear and the unit verifies against the
//! installed binary and man page, while the host gets nothing. The shipped man
//! pages render and the completions load.
//!
//! Needs root, cargo-deb, dpkg, systemd-sysusers, systemd-tmpfiles,
//! systemd-analyze and man (all installed by .ci/run); without them a test
//! prints a skip note, except under `CI=true`, where it fails.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;

const TOOLS: &[&str] = &[
    "cargo-deb",
    "dpkg",
    "dpkg-deb",
    "dpkg-query",
    "systemd-sysusers",
    "systemd-tmpfiles",
    "systemd-analyze",
    "man",
    "gzip",
    "bash",
    "timeout",
];
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// What the sysusers.d file writes in the GECOS field: only that file makes it.
const GECOS: &str = "sitegate WireGuard gateway";
/// Paths the package installs (without the man pages, listed by the binary).
const SHIPPED: &[(&str, &str)] = &[
    ("usr/bin/sitegate", "-rwxr-xr-x"),
    ("usr/lib/systemd/system/sitegate.service", "-rw-r--r--"),
    ("usr/lib/sysusers.d/sitegate.conf", "-rw-r--r--"),
    ("usr/lib/tmpfiles.d/sitegate.conf", "-rw-r--r--"),
    (
        "usr/share/doc/sitegate/examples/logrotate.sitegate",
        "-rw-r--r--",
    ),
    (
        "usr/share/doc/sitegate/examples/sshd-sftp.conf",
        "-rw-r--r--",
    ),
    (
        "usr/share/bash-completion/completions/sitegate",
        "-rw-r--r--",
    ),
    ("usr/share/zsh/vendor-completions/_sitegate", "-rw-r--r--"),
    (
        "usr/share/fish/vendor_completions.d/sitegate.fish",
        "-rw-r--r--",
    ),
];

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The .deb, built once per test binary.
fn deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(build_deb)
}

/// Runs `scripts/build-deb.sh --no-build` on the binary cargo built for this
/// run (its target directory passed on), holding cargo's build lock for that
/// profile all the while: packaging must never wait for it.
fn build_deb() -> PathBuf {
    let bin = Path::new(sitegate_bin());
    let profile_dir = bin.parent().expect("the binary's directory");
    assert_eq!(
        profile_dir.file_name().and_then(|n| n.to_str()),
        Some("release"),
        "the package holds the release binary: run `cargo test --release`"
    );
    let target_dir = profile_dir.parent().expect("the target directory");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(profile_dir.join(".cargo-lock"))
        .expect("open cargo's build lock");
    // Either this test takes it, or a cargo around us already holds it.
    match lock.try_lock() {
        Ok(()) => eprintln!("package: cargo's build lock held by this test while packaging"),
        Err(fs::TryLockError::WouldBlock) => {
            eprintln!("package: cargo's build lock held by cargo while packaging")
        }
        Err(fs::TryLockError::Error(e)) => panic!("cannot lock cargo's build lock: {e}"),
    }
    let out = run(Command::new("timeout")
        .arg("600")
        .arg(manifest_dir().join("scripts/build-deb.sh"))
        .arg("--no-build")
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(manifest_dir()));
    drop(lock);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/build-deb.sh --no-build failed ({}; 124 is the timeout, e.g. \
         waiting for a cargo lock):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    assert!(
        !stderr.contains("Blocking waiting for file lock"),
        "packaging waited for a cargo lock:\n{stderr}"
    );
    let arch = run_ok(Command::new("dpkg").arg("--print-architecture"));
    let last = stdout.lines().last().unwrap_or_default().trim();
    let path = manifest_dir().join(last);
    assert_eq!(
        path.file_name().and_then(|n| n.to_str()),
        Some(format!("sitegate_{VERSION}-1_{}.deb", arch.trim()).as_str()),
        "build-deb.sh should print the .deb's path last:\n{stdout}"
    );
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// The man pages the binary generates: sitegate.1 and one per subcommand.
fn man_page_names() -> Vec<String> {
    let dir = TempDir::new(&format!("package-man-{}", std::process::id()));
    let listed = run_ok(
        Command::new(sitegate_bin())
            .args(["generate", "man", "--out-dir"])
            .arg(&dir.path),
    );
    let names: Vec<String> = listed
        .lines()
        .filter_map(|l| Some(Path::new(l).file_name()?.to_str()?.to_string()))
        .collect();
    assert!(names.contains(&"sitegate.1".to_string()), "{listed}");
    assert!(
        names.contains(&"sitegate-peer-add.1".to_string()),
        "{listed}"
    );
    names
}

/// `dpkg-deb -c`: path (without the leading `./`) → (mode string, owner).
fn contents(deb: &Path) -> BTreeMap<String, (String, String)> {
    run_ok(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f.get(5)?.trim_start_matches("./").trim_end_matches('/');
            Some((path.to_string(), (f[0].to_string(), f[1].to_string())))
        })
        .collect()
}

/// The package lists every shipped file with its mode, owned by root: the
/// binary, the unit, sysusers.d and tmpfiles.d, the example configs, the
/// three completions and a man page for every page the binary generates.
/// `dpkg-deb -I` shows the name, version, architecture, maintainer, a libc
/// dependency and the three maintainer scripts, the postinst as shipped.
#[test]
fn deb_lists_every_shipped_file_and_its_control_fields() {
    if !tools_ready("deb_contents", TOOLS) {
        return;
    }
    let deb = deb();
    let files = contents(deb);
    let man: Vec<String> = man_page_names()
        .into_iter()
        .map(|n| format!("usr/share/man/man1/{n}.gz"))
        .collect();
    let expected = SHIPPED
        .iter()
        .map(|(p, m)| (p.to_string(), *m))
        .chain(man.iter().map(|p| (p.clone(), "-rw-r--r--")));
    for (path, mode) in expected {
        let (got_mode, owner) = files
            .get(&path)
            .unwrap_or_else(|| panic!("the .deb lacks /{path}; it has {files:#?}"));
        assert_eq!(got_mode, mode, "/{path}");
        assert_eq!(owner, "0/0", "/{path}");
    }
    assert!(
        !files.keys().any(|p| p.starts_with("etc/")),
        "nothing in /etc: `sitegate init` writes the config"
    );

    let arch = run_ok(Command::new("dpkg").arg("--print-architecture"));
    let field = |name: &str| {
        run_ok(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))
            .trim()
            .to_string()
    };
    assert_eq!(field("Package"), "sitegate");
    assert_eq!(field("Version"), format!("{VERSION}-1"));
    assert_eq!(field("Architecture"), arch.trim());
    assert!(field("Maintainer").contains('<'), "{}", field("Maintainer"));
    assert!(field("Depends").contains("libc6"), "{}", field("Depends"));
    let info = run_ok(Command::new("dpkg-deb").arg("-I").arg(deb));
    for needed in [
        "Package: sitegate",
        &format!("Version: {VERSION}-1"),
        "postinst",
        "prerm",
        "postrm",
    ] {
        assert!(info.contains(needed), "dpkg-deb -I lacks {needed}:\n{info}");
    }
    let postinst = run_ok(Command::new("dpkg-deb").arg("-I").arg(deb).arg("postinst"));
    assert_eq!(postinst, include_str!("../deploy/debian/postinst"));
}

/// What the host has of sitegate: its passwd and group lines, whether any
/// line carries the package's GECOS, the package's paths, dpkg's record.
#[derive(Debug, PartialEq)]
struct HostState {
    passwd: Vec<String>,
    group: Vec<String>,
    gecos_seen: bool,
    paths: Vec<(&'static str, bool)>,
    dpkg: String,
}

impl HostState {
    fn capture() -> HostState {
        let lines = |file: &str| -> Vec<String> {
            fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("sitegate:"))
                .map(String::from)
                .collect()
        };
        let paths = [
            "/usr/bin/sitegate",
            "/usr/lib/systemd/system/sitegate.service",
            "/usr/lib/sysusers.d/sitegate.conf",
            "/usr/lib/tmpfiles.d/sitegate.conf",
            "/usr/share/man/man1/sitegate.1.gz",
            "/usr/share/bash-completion/completions/sitegate",
        ];
        let dpkg =
            run(Command::new("dpkg-query").args(["-W", "-f", "${Status}", "sitegate"])).stdout;
        HostState {
            passwd: lines("/etc/passwd"),
            group: lines("/etc/group"),
            gecos_seen: fs::read_to_string("/etc/passwd")
                .unwrap_or_default()
                .contains(GECOS),
            paths: paths.iter().map(|p| (*p, Path::new(p).exists())).collect(),
            dpkg: String::from_utf8_lossy(&dpkg).into_owned(),
        }
    }
}

/// `dpkg --root=ROOT` with its log inside ROOT and sbin on PATH (dpkg looks
/// for ldconfig and friends there). DPKG_ROOT is not passed in: dpkg itself
/// must hand it to the maintainer scripts.
fn dpkg_in(root: &Path, args: &[&str]) -> String {
    let path = format!(
        "{}:/usr/local/sbin:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    );
    run_ok(
        Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .arg(format!("--log={}", root.join("var/log/dpkg.log").display()))
            .args(args)
            .env("PATH", path)
            .env_remove("DPKG_ROOT"),
    )
}

/// A `NAME:x:...` line of ROOT's passwd or group file, split at `:`.
fn account(root: &Path, file: &str, name: &str) -> Vec<String> {
    let text = fs::read_to_string(root.join(file)).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("{file} in the throwaway root has no {name}:\n{text}"))
        .split(':')
        .map(String::from)
        .collect()
}

fn owner_and_mode(path: &Path) -> (u32, u32, u32) {
    let m = fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

/// dpkg installs the package into an empty root (dependencies forced: the
/// root has no libc package) and runs its postinst there: sitegate becomes a
/// system user and group in that root's passwd and group files, the state
/// and log directories belong to it, the socket directories to root, and
/// `sitegate --version` runs from the root. The sysusers.d and tmpfiles.d
/// files parse there again with nothing left to do, while broken copies are
/// refused (an unknown owner, an invalid user name). The installed unit
/// verifies against the installed binary, its `man:sitegate(1)` found among
/// the installed pages. Purge removes the files and keeps the store and log
/// directories. The host gains no user, file or dpkg record throughout.
#[test]
fn deb_installs_into_a_throwaway_root_and_leaves_the_host_alone() {
    if !tools_ready("deb_install", TOOLS) {
        return;
    }
    let deb = deb();
    let host_before = HostState::capture();
    let dir = TempDir::new(&format!("package-root-{}", std::process::id()));
    let root = &dir.path;
    for d in [
        "etc",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/log",
    ] {
        fs::create_dir_all(root.join(d)).expect("create root skeleton");
    }
    fs::write(root.join("var/lib/dpkg/status"), "").expect("empty dpkg status");

    let out = dpkg_in(
        root,
        &[
            "--force-depends",
            "--force-script-chrootless",
            "--install",
            &deb.display().to_string(),
        ],
    );
    assert!(out.contains("Setting up sitegate"), "{out}");
    let status = run_ok(
        Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                root.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f", "${Status} ${Version}", "sitegate"]),
    );
    assert_eq!(status, format!("install ok installed {VERSION}-1"));
    let version = run_ok(Command::new(root.join("usr/bin/sitegate")).arg("--version"));
    assert_eq!(version.trim(), format!("sitegate {VERSION}"));

    let user = account(root, "etc/passwd", "sitegate");
    let (uid, gid): (u32, u32) = (user[2].parse().unwrap(), user[3].parse().unwrap());
    assert!(uid > 0 && uid < 1000, "a system uid: {user:?}");
    assert_eq!(user[4..], [GECOS, "/var/lib/sitegate", "/usr/sbin/nologin"]);
    let group = account(root, "etc/group", "sitegate");
    assert_eq!(group[2], gid.to_string(), "{group:?}");
    for (path, want) in [
        ("var/lib/sitegate", (uid, gid, 0o700)),
        ("var/log/sitegate", (uid, gid, 0o750)),
        ("run/sitegate", (0, 0, 0o700)),
        ("run/wireguard", (0, 0, 0o755)),
    ] {
        assert_eq!(owner_and_mode(&root.join(path)), want, "/{path}");
    }

    // Parsed again inside the root: nothing left to create, and idempotent.
    let rootarg = format!("--root={}", root.display());
    let dry = run_ok(Command::new("systemd-sysusers").args([&rootarg, "--dry-run"]));
    assert!(
        !dry.contains("Creating"),
        "sysusers would create more:\n{dry}"
    );
    run_ok(Command::new("systemd-tmpfiles").args([&rootarg, "--create", "sitegate.conf"]));
    assert_eq!(
        owner_and_mode(&root.join("var/lib/sitegate")),
        (uid, gid, 0o700)
    );
    // Broken copies are refused (in the admin's override directories).
    for (kind, tool, text, args) in [
        (
            "sysusers.d",
            "systemd-sysusers",
            "u sitegate! - \"bad name\" /var/lib/x /usr/sbin/nologin\n",
            vec!["--dry-run", "broken.conf"],
        ),
        (
            "tmpfiles.d",
            "systemd-tmpfiles",
            "d /var/lib/broken 0700 nosuchuser nosuchuser -\n",
            vec!["--create", "broken.conf"],
        ),
    ] {
        let conf_dir = root.join("etc").join(kind);
        fs::create_dir_all(&conf_dir).expect("override dir");
        fs::write(conf_dir.join("broken.conf"), text).expect("write broken copy");
        let out = run(Command::new(tool).arg(&rootarg).args(&args));
        assert!(
            !out.status.success(),
            "{tool} accepted {text}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::remove_dir_all(&conf_dir).expect("remove override dir");
    }
    assert!(!root.join("var/lib/broken").exists());

    // The unit as installed, on the installed binary, its man page found.
    let unit = fs::read_to_string(root.join("usr/lib/systemd/system/sitegate.service"))
        .expect("installed unit");
    let unit_dir = TempDir::new(&format!("package-unit-{}", std::process::id()));
    let unit_name = unit_dir.path.join("sitegate.service");
    fs::write(
        &unit_name,
        unit.replace(
            "ExecStart=/usr/bin/sitegate ",
            &format!("ExecStart={}/usr/bin/sitegate ", root.display()),
        ),
    )
    .expect("write unit copy");
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_name)
        .env("MANPATH", root.join("usr/share/man")));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify on the installed unit:\n{said}"
    );
    assert_eq!(
        HostState::capture(),
        host_before,
        "the install touched the host"
    );

    dpkg_in(root, &["--force-script-chrootless", "--purge", "sitegate"]);
    assert!(!root.join("usr/bin/sitegate").exists());
    assert!(!root
        .join("usr/lib/systemd/system/sitegate.service")
        .exists());
    assert!(
        root.join("var/lib/sitegate").is_dir(),
        "purge keeps the store"
    );
    assert!(
        root.join("var/log/sitegate").is_dir(),
        "purge keeps the audit log"
    );
    account(root, "etc/passwd", "sitegate");
    assert_eq!(
        HostState::capture(),
        host_before,
        "the purge touched the host"
    );
}

/// A completion script run the way bash runs it: the words so far, the
/// candidates it offers.
fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
    let words_q: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let cur = words.last().copied().unwrap_or_default();
    let prev = words
        .get(words.len().saturating_sub(2))
        .copied()
        .unwrap_or_default();
    let body = format!(
        "set -e; source '{}'; COMP_WORDS=({}); COMP_CWORD={}; \
         _sitegate sitegate '{cur}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        words_q.join(" "),
        words.len() - 1
    );
    run_ok(Command::new("bash").args(["--norc", "-c", &body]))
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The shipped man pages are roff with a `.TH` header that `man -l` renders
/// without a warning; sitegate(1) names every subcommand's page and not the
/// hidden `generate`. The bash completion sources and completes subcommands
/// (`pe` → peer; `peer r` → revoke, rotate; `ge` → genkey, never generate);
/// the zsh and fish files name the subcommands and declare themselves for
/// sitegate (and pass `zsh -n`/`fish -n` where those shells exist).
#[test]
fn shipped_man_pages_render_and_completions_load() {
    if !tools_ready("deb_docs", TOOLS) {
        return;
    }
    let dir = TempDir::new(&format!("package-docs-{}", std::process::id()));
    run_ok(Command::new("dpkg-deb").arg("-x").arg(deb()).arg(&dir.path));
    let man_dir = dir.path.join("usr/share/man/man1");
    for name in man_page_names() {
        let page = man_dir.join(format!("{name}.gz"));
        let roff = run_ok(Command::new("gzip").arg("-dc").arg(&page));
        let title = name.trim_end_matches(".1");
        assert!(
            roff.lines()
                .any(|l| l.starts_with(&format!(".TH {title} 1 "))),
            "{name} has no .TH header:\n{roff}"
        );
        let out = run(Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&page)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80"));
        let text = String::from_utf8_lossy(&out.stdout);
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && warnings.trim().is_empty(),
            "man -l {name}: {warnings}"
        );
        assert!(text.contains("NAME") && text.contains(title), "{text}");
    }
    let main = run_ok(
        Command::new("gzip")
            .arg("-dc")
            .arg(man_dir.join("sitegate.1.gz")),
    );
    for sub in [
        "init", "run", "peer", "status", "check", "audit", "genkey", "pubkey",
    ] {
        assert!(
            main.contains(&format!("sitegate\\-{sub}(1)")),
            "sitegate(1) lacks {sub}"
        );
    }
    assert!(
        !main.contains("generate"),
        "sitegate(1) shows the hidden command"
    );

    let bash = dir
        .path
        .join("usr/share/bash-completion/completions/sitegate");
    let top = bash_complete(&bash, &["sitegate", "pe"]);
    assert_eq!(top, ["peer"]);
    let mut peer = bash_complete(&bash, &["sitegate", "peer", "r"]);
    peer.sort();
    assert_eq!(peer, ["revoke", "rotate"]);
    assert_eq!(bash_complete(&bash, &["sitegate", "ge"]), ["genkey"]);

    let zsh = fs::read_to_string(dir.path.join("usr/share/zsh/vendor-completions/_sitegate"))
        .expect("zsh completion");
    assert!(zsh.starts_with("#compdef sitegate"), "{zsh}");
    let fish = fs::read_to_string(
        dir.path
            .join("usr/share/fish/vendor_completions.d/sitegate.fish"),
    )
    .expect("fish completion");
    assert!(fish.contains("complete -c sitegate"), "{fish}");
    for (shell, text) in [("zsh", &zsh), ("fish", &fish)] {
        for sub in [
            "init", "peer", "revoke", "rotate", "audit", "verify", "genkey",
        ] {
            assert!(text.contains(sub), "the {shell} completion lacks {sub}");
        }
        assert!(!text.contains("generate:"), "{shell} offers generate");
        assert!(!text.contains("-a \"generate\""), "{shell} offers generate");
    }
    for (shell, file) in [
        ("zsh", "usr/share/zsh/vendor-completions/_sitegate"),
        ("fish", "usr/share/fish/vendor_completions.d/sitegate.fish"),
    ] {
        if on_path(shell) {
            run_ok(Command::new(shell).arg("-n").arg(dir.path.join(file)));
        }
    }
}
