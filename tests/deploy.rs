//! The files in `deploy/` against the real tools: the OpenSSH snippet loads into
//! a full sshd_config (`sshd -t`) and confines exactly the users it matches
//! (`sshd -T -C user=...`), the logrotate config parses cleanly and rotates the
//! audit log by copy and truncate, and the systemd unit passes
//! `systemd-analyze verify` with a syscall filter and capability bounding set
//! that let the daemon's own privilege drop through. A deliberately broken copy
//! of each is refused, so these checks can fail.
//!
//! Needs root (sshd reads its host key and insists on `/run/sshd`), `sshd`,
//! `ssh-keygen`, `logrotate` and `systemd-analyze`; without them a test prints a
//! skip note, except under `CI=true`, where it fails. No network namespace is
//! needed.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The snippet as shipped.
const SSHD_SNIPPET: &str = include_str!("../deploy/sshd-sftp.conf");
/// The logrotate config as shipped.
const LOGROTATE: &str = include_str!("../deploy/logrotate.sitegate");
/// The systemd unit as shipped.
const UNIT: &str = include_str!("../deploy/sitegate.service");
/// logrotate works as the daemon's user; the tests run it as root, since the
/// host need not have that user.
const LOGROTATE_SU: &str = "su sitegate sitegate";
/// The chroot base the snippet names; tests point it at their own directory.
const SNIPPET_CHROOT: &str = "/srv/sftp/%u";
/// The audit log path the logrotate config names.
const AUDIT_PATH: &str = "/var/log/sitegate/audit.jsonl";

/// Writes a host key, the snippet (chroot under `dir`) and a main sshd_config
/// that ends by including the snippet, as Debian's does with sshd_config.d;
/// returns the main config's path.
fn render_sshd_config(dir: &Path, snippet: &str) -> PathBuf {
    let key = dir.join("host_ed25519");
    if !key.exists() {
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&key),
        );
    }
    let snippet_path = dir.join("sitegate-sftp.conf");
    fs::write(&snippet_path, snippet).expect("write snippet");
    let main = dir.join("sshd_config");
    fs::write(
        &main,
        format!(
            "HostKey {key}\nPidFile none\nStrictModes no\nUsePAM no\n\
             AuthorizedKeysFile {dir}/authorized_keys/%u\n\
             Subsystem sftp /usr/lib/openssh/sftp-server\n\
             Include {snippet}\n",
            key = key.display(),
            dir = dir.display(),
            snippet = snippet_path.display()
        ),
    )
    .expect("write sshd_config");
    main
}

/// The shipped snippet with its chroot base moved under `dir`.
fn snippet_for(dir: &Path) -> String {
    assert!(
        SSHD_SNIPPET.contains(SNIPPET_CHROOT),
        "the snippet no longer names {SNIPPET_CHROOT}; update this test"
    );
    SSHD_SNIPPET.replace(SNIPPET_CHROOT, &format!("{}/%u", dir.display()))
}

/// `sshd -t -f CONFIG`: whether sshd accepts it, and its complaint.
fn sshd_accepts(config: &Path) -> (bool, String) {
    let out = run(Command::new("sshd").arg("-t").arg("-f").arg(config));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The effective settings (`sshd -T`) for a connection by `user` to the
/// tunnel address, keyword → value (repeated keywords joined by `,`).
fn effective(config: &Path, user: &str) -> HashMap<String, String> {
    let spec = format!("user={user},host=site.test,addr=10.8.0.2,laddr=10.8.0.1,lport=22");
    let text = run_ok(
        Command::new("sshd")
            .arg("-T")
            .arg("-f")
            .arg(config)
            .args(["-C", &spec]),
    );
    let mut map: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        let (k, v) = line.split_once(' ').unwrap_or((line, ""));
        map.entry(k.to_string())
            .and_modify(|old| {
                old.push(',');
                old.push_str(v);
            })
            .or_insert_with(|| v.to_string());
    }
    map
}

fn setting<'a>(map: &'a HashMap<String, String>, key: &str) -> &'a str {
    map.get(key)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("sshd -T printed no `{key}`"))
}

/// The snippet loads into a full sshd_config; for a site account it forces
/// internal-sftp in a chroot, keys only, no forwarding of any kind, on the
/// tunnel address alone; an account it does not match gets no ForceCommand.
/// A copy with `ListenAddress` moved into the Match block is refused.
#[test]
fn sshd_snippet_validates_and_confines_site_accounts() {
    if !tools_ready("sshd_snippet", &["sshd", "ssh-keygen"]) {
        return;
    }
    ensure_sshd_privsep_dir();
    for needed in [
        "ListenAddress 10.8.0.1:22",
        "\nMatch User ",
        "ForceCommand internal-sftp",
        "ChrootDirectory ",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
    ] {
        assert!(
            SSHD_SNIPPET.contains(needed),
            "deploy/sshd-sftp.conf lacks `{}`",
            needed.trim()
        );
    }
    assert!(
        !SSHD_SNIPPET.contains("\nMatch Group"),
        "the SPEC says `Match User`"
    );
    let dir = TempDir::new(&format!("deploy-sshd-{}", std::process::id()));
    let config = render_sshd_config(&dir.path, &snippet_for(&dir.path));
    let (ok, err) = sshd_accepts(&config);
    assert!(ok, "sshd -t refuses the shipped snippet: {err}");

    let site = effective(&config, "sftp-clinic-a");
    let chroot = format!("{}/%u", dir.path.display());
    for (key, want) in [
        ("listenaddress", "10.8.0.1:22"),
        ("chrootdirectory", chroot.as_str()),
        ("authenticationmethods", "publickey"),
        ("pubkeyauthentication", "yes"),
        ("passwordauthentication", "no"),
        ("kbdinteractiveauthentication", "no"),
        ("permitemptypasswords", "no"),
        ("permitrootlogin", "no"),
        ("disableforwarding", "yes"),
        ("allowtcpforwarding", "no"),
        ("allowstreamlocalforwarding", "no"),
        ("allowagentforwarding", "no"),
        ("x11forwarding", "no"),
        ("permittunnel", "no"),
        ("permittty", "no"),
    ] {
        assert_eq!(setting(&site, key), want, "`{key}` for a site account");
    }
    let forced = setting(&site, "forcecommand");
    assert!(
        forced.split_whitespace().next() == Some("internal-sftp"),
        "forcecommand for a site account: {forced}"
    );

    // The Match is by user name: another account keeps the host's defaults
    // (but still keys only: those lines are global).
    let other = effective(&config, "admin");
    assert_eq!(setting(&other, "forcecommand"), "none");
    assert_eq!(setting(&other, "chrootdirectory"), "none");
    assert_eq!(setting(&other, "passwordauthentication"), "no");
    assert_eq!(setting(&other, "listenaddress"), "10.8.0.1:22");

    // Broken copies are refused: a global directive placed after `Match`
    // (inside its block), and a misspelt keyword.
    let moved: String = snippet_for(&dir.path)
        .lines()
        .filter(|l| !l.starts_with("ListenAddress"))
        .chain(["    ListenAddress 10.8.0.1:22"])
        .map(|l| format!("{l}\n"))
        .collect();
    let config = render_sshd_config(&dir.path, &moved);
    let (ok, err) = sshd_accepts(&config);
    assert!(!ok, "sshd -t accepted ListenAddress inside the Match block");
    assert!(err.contains("ListenAddress"), "complaint: {err}");
    let typo = snippet_for(&dir.path).replace("ForceCommand", "ForcedCommand");
    let config = render_sshd_config(&dir.path, &typo);
    let (ok, err) = sshd_accepts(&config);
    assert!(!ok, "sshd -t accepted a misspelt ForceCommand");
    assert!(err.contains("ForcedCommand"), "complaint: {err}");
}

/// `logrotate -d` output lines that report a problem with the config.
fn logrotate_errors(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|l| l.trim_start().starts_with("error:"))
        .collect()
}

/// Runs logrotate with `args`, the state file and the config; returns
/// (exit 0, stdout + stderr).
fn logrotate(dir: &Path, args: &[&str], config: &Path) -> (bool, String) {
    let out = run(Command::new("logrotate")
        .args(args)
        .arg("-s")
        .arg(dir.join("logrotate.state"))
        .arg(config));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The logrotate config, pointed at a temp file, parses without an error in
/// debug mode and, run for real, keeps a copy and truncates the live file in
/// place (copytruncate: the daemon's open descriptor stays valid). A copy with
/// a misspelt option is reported as an error (logrotate still exits 0 for
/// that, so the check reads its output).
#[test]
fn logrotate_config_validates_and_rotates_a_copy() {
    if !tools_ready("logrotate_config", &["logrotate"]) {
        return;
    }
    assert!(
        LOGROTATE.contains(AUDIT_PATH),
        "deploy/logrotate.sitegate no longer names {AUDIT_PATH}; update this test"
    );
    assert!(
        LOGROTATE.contains(&format!("\n    {LOGROTATE_SU}\n")),
        "deploy/logrotate.sitegate should rotate as the daemon's user (`{LOGROTATE_SU}`)"
    );
    let shipped = LOGROTATE.replace(LOGROTATE_SU, "su root root");
    let dir = TempDir::new(&format!("deploy-logrotate-{}", std::process::id()));
    let audit = dir.path.join("audit.jsonl");
    let line = "{\"ts\":1,\"seq\":1,\"event\":\"test\"}\n";
    fs::write(&audit, line).expect("write audit file");
    let config = dir.path.join("logrotate.conf");
    // logrotate ignores a config that group or others may write.
    let write_config = |text: &str| {
        fs::write(&config, text).expect("write logrotate config");
        fs::set_permissions(&config, fs::Permissions::from_mode(0o644))
            .expect("chmod logrotate config");
    };
    write_config(&shipped.replace(AUDIT_PATH, &audit.display().to_string()));

    let (ok, out) = logrotate(&dir.path, &["-d"], &config);
    assert!(ok, "logrotate -d failed:\n{out}");
    assert!(
        logrotate_errors(&out).is_empty(),
        "logrotate -d reports errors:\n{out}"
    );
    assert!(
        out.contains(&format!("rotating pattern: {}", audit.display())),
        "logrotate -d did not consider the audit file:\n{out}"
    );

    let (ok, out) = logrotate(&dir.path, &["-f"], &config);
    assert!(ok, "logrotate -f failed:\n{out}");
    assert_eq!(
        fs::read_to_string(&audit).expect("live file kept"),
        "",
        "copytruncate leaves the live file in place, empty"
    );
    assert_eq!(
        fs::read_to_string(dir.path.join("audit.jsonl.1")).expect("rotated copy audit.jsonl.1"),
        line,
        "the rotated copy holds the old lines"
    );

    write_config(
        &shipped
            .replace(AUDIT_PATH, &audit.display().to_string())
            .replace("copytruncate", "copytrunacte"),
    );
    let (_, out) = logrotate(&dir.path, &["-d"], &config);
    let errors = logrotate_errors(&out);
    assert!(
        errors.iter().any(|l| l.contains("copytrunacte")),
        "logrotate -d did not report the misspelt option:\n{out}"
    );
}

/// What the daemon's startup needs before it drops to `[daemon] user`, and no
/// more: TUN/routes/nftables, low ports, the uid/gid switch, handing files over,
/// reducing the bounding set.
const BOUNDING_SET: [&str; 8] = [
    "CAP_NET_ADMIN",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_CHOWN",
    "CAP_FOWNER",
    "CAP_DAC_OVERRIDE",
    "CAP_SETPCAP",
];

/// The values of every `KEY=` line of the unit, in order.
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// The system calls one `SystemCallFilter=` entry names: a call, or a
/// `@group` expanded (recursively) by `systemd-analyze syscall-filter`.
fn syscalls(entry: &str, cache: &mut HashMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    if !entry.starts_with('@') {
        return BTreeSet::from([entry.to_string()]);
    }
    if let Some(known) = cache.get(entry) {
        return known.clone();
    }
    let text = run_ok(Command::new("systemd-analyze").args(["syscall-filter", entry]));
    let mut set = BTreeSet::new();
    // The group's name, then its members indented; `#` lines are comments.
    for member in text.lines().filter(|l| l.starts_with(' ')).map(str::trim) {
        if !member.is_empty() && !member.starts_with('#') {
            set.extend(syscalls(member, cache));
        }
    }
    assert!(!set.is_empty(), "systemd-analyze knows no group {entry}");
    cache.insert(entry.to_string(), set.clone());
    set
}

/// The calls the unit's `SystemCallFilter=` lines allow, applied in order as
/// systemd does: the first (not `~`) starts an allow list from `@default`,
/// later plain entries add, `~` entries remove.
fn allowed_syscalls(unit: &str) -> BTreeSet<String> {
    let lines = unit_values(unit, "SystemCallFilter");
    assert!(
        lines.first().is_some_and(|l| !l.starts_with('~')),
        "the unit's syscall filter should be an allow list: {lines:?}"
    );
    let mut cache = HashMap::new();
    let mut allowed = syscalls("@default", &mut cache);
    for line in lines {
        let (deny, entries) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        for entry in entries.split_whitespace() {
            let calls = syscalls(entry, &mut cache);
            if deny {
                allowed.retain(|c| !calls.contains(c));
            } else {
                allowed.extend(calls);
            }
        }
    }
    allowed
}

/// `systemd-analyze verify --man=no` on `unit` (written under `dir`); returns
/// (exit 0, everything it printed). A clean unit prints nothing.
fn verify_unit(dir: &Path, unit: &str) -> (bool, String) {
    let path = dir.join("sitegate.service");
    fs::write(&path, unit).expect("write unit");
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The unit starts `/usr/bin/sitegate ... run` as root (no `User=`, no ambient
/// capabilities) with exactly the bounding set the privilege drop needs; its
/// syscall filter, applied as systemd applies it, keeps set*id, setgroups,
/// capset, chown and prctl but not the rest of `@privileged` nor `@resources`;
/// it writes only the state, log and socket directories; it leaves directory
/// ownership to tmpfiles.d (no StateDirectory=/LogsDirectory=, which would hand
/// the store back to root); `systemd-analyze verify` prints nothing for it
/// (pointed at the built binary), and its offline exposure stays at 4.0 or
/// below. A copy with a misspelt key is reported.
#[test]
fn systemd_unit_verifies_and_lets_the_privilege_drop_through() {
    if !tools_ready("systemd_unit", &["systemd-analyze"]) {
        return;
    }
    assert_eq!(
        unit_values(UNIT, "ExecStart"),
        ["/usr/bin/sitegate --config /etc/sitegate/sitegate.toml run"]
    );
    for absent in ["User", "Group", "DynamicUser", "AmbientCapabilities"] {
        assert!(
            unit_values(UNIT, absent).is_empty(),
            "{absent}= in the unit: the daemon starts as root and drops privileges itself"
        );
    }
    for absent in ["StateDirectory", "LogsDirectory"] {
        assert!(
            unit_values(UNIT, absent).is_empty(),
            "{absent}= without User= chowns the directory to root at every start"
        );
    }
    assert_eq!(unit_values(UNIT, "NoNewPrivileges"), ["yes"]);
    assert_eq!(unit_values(UNIT, "ProtectSystem"), ["strict"]);
    let bounding: BTreeSet<&str> = unit_values(UNIT, "CapabilityBoundingSet")
        .iter()
        .flat_map(|l| l.split_whitespace())
        .collect();
    assert_eq!(bounding, BTreeSet::from(BOUNDING_SET));
    let writable: BTreeSet<&str> = unit_values(UNIT, "ReadWritePaths")
        .iter()
        .flat_map(|l| l.split_whitespace())
        .map(|p| p.trim_start_matches('-'))
        .collect();
    assert_eq!(
        writable,
        BTreeSet::from([
            "/var/lib/sitegate",
            "/var/log/sitegate",
            "/run/sitegate",
            "/run/wireguard"
        ])
    );

    let allowed = allowed_syscalls(UNIT);
    for needed in [
        "setresuid",
        "setresgid",
        "setgroups",
        "capset",
        "capget",
        "prctl",
        "fchown",
        "chown",
        "fchownat",
        "clone",
        "execve",
        "ioctl",
        "socket",
        "bind",
        "sendmmsg",
        "recvmmsg",
        "epoll_wait",
    ] {
        assert!(
            allowed.contains(needed),
            "the unit's syscall filter denies {needed}"
        );
    }
    let mut cache = HashMap::new();
    let mut kept = syscalls("@setuid", &mut cache);
    kept.extend(syscalls("@chown", &mut cache));
    kept.insert("capset".to_string());
    for call in syscalls("@privileged", &mut cache).difference(&kept) {
        assert!(
            !allowed.contains(call),
            "the unit's syscall filter allows {call}"
        );
    }
    for call in syscalls("@resources", &mut cache)
        .iter()
        .chain(&syscalls("@mount", &mut cache))
    {
        assert!(
            !allowed.contains(call),
            "the unit's syscall filter allows {call}"
        );
    }

    let dir = TempDir::new(&format!("deploy-unit-{}", std::process::id()));
    // verify insists that ExecStart's binary exists: point it at the built one.
    let unit = UNIT.replace(
        "ExecStart=/usr/bin/sitegate ",
        &format!("ExecStart={} ", sitegate_bin()),
    );
    let (ok, out) = verify_unit(&dir.path, &unit);
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=40"])
        .arg(dir.path.join("sitegate.service")));
    assert!(
        out.status.success(),
        "exposure above 4.0:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let (_, out) = verify_unit(
        &dir.path,
        &unit.replace("NoNewPrivileges=", "NoNewPrivilege="),
    );
    assert!(
        out.contains("NoNewPrivilege"),
        "a misspelt key went unreported:\n{out}"
    );
    let (_, out) = verify_unit(&dir.path, &unit.replace("@setuid", "@setuids"));
    assert!(
        out.contains("@setuids"),
        "an unknown syscall group went unreported:\n{out}"
    );
}
