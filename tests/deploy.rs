//! The files in `deploy/` against the real tools: the OpenSSH snippet loads into
//! a full sshd_config (`sshd -t`) and confines exactly the users it matches
//! (`sshd -T -C user=...`), and the logrotate config parses cleanly and
//! rotates the audit log by copy and truncate. A deliberately broken copy of
//! each is refused, so these checks can fail.
//!
//! Needs root (sshd reads its host key and insists on `/run/sshd`), `sshd`,
//! `ssh-keygen` and `logrotate`; without them a test prints a skip note, except
//! under `CI=true`, where it fails. No network namespace is needed.

mod common;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The snippet as shipped.
const SSHD_SNIPPET: &str = include_str!("../deploy/sshd-sftp.conf");
/// The logrotate config as shipped.
const LOGROTATE: &str = include_str!("../deploy/logrotate.sitegate");
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
    write_config(&LOGROTATE.replace(AUDIT_PATH, &audit.display().to_string()));

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
        &LOGROTATE
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
