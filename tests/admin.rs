//! The admin side of the peer lifecycle through the real binary, with no daemon:
//! revoke, rotate, show/list/status, `--qr`, the audit chain and its verifier,
//! and the store under concurrency and `kill -9`. No root needed: each test has
//! its own directory and its own interface name, so its control socket
//! (`/run/sitegate/NAME.sock`) is one no daemon serves.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_sitegate");

/// A temporary directory with an initialized gateway config, removed on drop.
struct Env {
    dir: PathBuf,
    config: PathBuf,
    audit: PathBuf,
    ifname: String,
}

impl Env {
    fn new(tag: &str) -> Env {
        Self::with_config(tag, |_| {})
    }

    /// `init`, then `edit` the config text.
    fn with_config(tag: &str, edit: impl FnOnce(&mut String)) -> Env {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("sitegate-admin-{tag}-{pid}-{n}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // A name no daemon uses: admin commands find no control socket.
        let ifname = format!("sa{}x{n}", pid % 100_000);
        let env = Env {
            config: dir.join("sitegate.toml"),
            audit: dir.join("audit.jsonl"),
            dir,
            ifname: ifname.clone(),
        };
        ok(&env.sg(&[
            "init",
            "--endpoint",
            "vpn.example.org:51820",
            "--egress",
            "eth0",
            "--interface",
            &ifname,
        ]));
        let mut text = fs::read_to_string(&env.config).unwrap();
        edit(&mut text);
        fs::write(&env.config, text).unwrap();
        env
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("SITEGATE_CONFIG")
            .env_remove("SUDO_USER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn sg(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn peers(&self) -> Vec<Value> {
        let out = self.sg(&["peer", "list", "--json"]);
        ok(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn show(&self, name: &str) -> Value {
        let out = self.sg(&["peer", "show", name, "--json"]);
        ok(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn audit_lines(&self) -> Vec<Value> {
        fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Everything an admin command may change: the registry and the audit log.
    fn snapshot(&self) -> (Vec<Value>, String) {
        (
            self.peers(),
            fs::read_to_string(&self.audit).unwrap_or_default(),
        )
    }

    /// `args` exits 1 with one `error:` line containing every needle and
    /// changes neither the store nor the audit log.
    fn refused(&self, args: &[&str], needles: &[&str]) {
        let before = self.snapshot();
        let out = self.sg(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.trim_end().lines().count() == 1,
            "{args:?}: {err}"
        );
        for n in needles {
            assert!(err.contains(n), "{args:?}: {err:?} lacks {n:?}");
        }
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
        assert_eq!(
            self.snapshot(),
            before,
            "{args:?} changed the store or audit log"
        );
    }

    /// `audit verify [file]`: exit code and the stdout/stderr text.
    fn verify(&self, file: Option<&Path>) -> (i32, String) {
        let mut args = vec!["audit", "verify"];
        let f;
        if let Some(p) = file {
            f = p.to_str().unwrap().to_string();
            args.push(&f);
        }
        let out = self.sg(&args);
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        (out.status.code().unwrap_or(-1), all)
    }

    fn public_key_of(&self, name: &str) -> String {
        self.show(name)["public_key"].as_str().unwrap().to_string()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        text(&o.stderr)
    );
}

fn conf_value(conf: &str, key: &str) -> Option<String> {
    conf.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = ")))
        .map(str::to_string)
}

fn events(lines: &[Value], name: &str) -> usize {
    lines.iter().filter(|l| l["event"] == name).count()
}

fn new_public_key() -> String {
    let out = Command::new(BIN).arg("genkey").output().unwrap();
    ok(&out);
    let mut c = Command::new(BIN)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let o = c.wait_with_output().unwrap();
    ok(&o);
    text(&o.stdout).trim().to_string()
}

/// 24 `peer add` processes at once: all exit 0, 24 peers with 24 distinct
/// addresses, and one intact audit chain with 24 `peer_added` lines.
#[test]
fn parallel_adds_all_recorded_and_audited() {
    let env = Env::new("par24");
    let children: Vec<_> = (0..24)
        .map(|i| {
            env.cmd(&["peer", "add", &format!("site-{i}")])
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        ok(&c.wait_with_output().unwrap());
    }
    let peers = env.peers();
    assert_eq!(peers.len(), 24);
    let mut addrs: Vec<String> = peers
        .iter()
        .map(|p| p["addresses"][0].as_str().unwrap().to_string())
        .collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 24);
    let (code, out) = env.verify(None);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("audit log intact: 24 lines, seq 1..24"),
        "{out}"
    );
    assert_eq!(events(&env.audit_lines(), "peer_added"), 24);
}

/// `kill -9` of a loop of `peer add` at a random moment, 10 rounds: the store
/// still opens and takes writes, every add that exited 0 is present, no address
/// is issued twice, and the audit chain verifies. A process killed after its
/// store commit but before its audit append leaves a peer without a `peer_added`
/// line (the store commits first, by design); the chain itself is never broken,
/// so the audited adds number at most the peers and at least the adds that
/// exited 0.
#[test]
fn kill_9_during_adds_loses_nothing_committed() {
    use rand::Rng;
    let env = Env::new("kill9");
    let mut rng = rand::thread_rng();
    let mut succeeded: Vec<String> = Vec::new();
    let mut killed = 0;
    for round in 0..10 {
        // Adds back to back (one takes a few ms) until the random kill instant,
        // which lands on whichever add is in flight then.
        let kill_at = Instant::now() + Duration::from_millis(rng.gen_range(0..=50));
        'round: for i in 0.. {
            let name = format!("k{round}-{i}");
            let mut child = env.cmd(&["peer", "add", &name]).spawn().unwrap();
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    if status.success() {
                        succeeded.push(name);
                    }
                    break;
                }
                if Instant::now() >= kill_at {
                    child.kill().unwrap(); // SIGKILL
                    if child.wait().unwrap().success() {
                        succeeded.push(name); // it finished just before the signal
                    } else {
                        killed += 1;
                    }
                    break 'round;
                }
                std::thread::sleep(Duration::from_micros(300));
            }
        }
    }
    let peers = env.peers();
    let names: Vec<&str> = peers.iter().map(|p| p["name"].as_str().unwrap()).collect();
    for s in &succeeded {
        assert!(names.contains(&s.as_str()), "{s} exited 0 but is missing");
    }
    let mut addrs: Vec<&str> = peers
        .iter()
        .map(|p| p["addresses"][0].as_str().unwrap())
        .collect();
    addrs.sort_unstable();
    let n = addrs.len();
    addrs.dedup();
    assert_eq!(addrs.len(), n, "an address was issued twice");
    let (code, out) = env.verify(None);
    assert_eq!(code, 0, "{out}");
    let audited = events(&env.audit_lines(), "peer_added");
    assert!(
        (succeeded.len()..=peers.len()).contains(&audited),
        "{audited} audited, {} succeeded, {} stored",
        succeeded.len(),
        peers.len()
    );
    eprintln!(
        "kill -9 rounds: {killed} killed, {} adds exited 0, {} stored, {audited} audited",
        succeeded.len(),
        peers.len()
    );
    // The store and the log still take writes after the kills.
    ok(&env.sg(&["peer", "add", "after"]));
    assert_eq!(env.verify(None).0, 0);
}

/// Add, revoke and rotate each append one record (peer, public_key, actor and
/// their own fields, never a secret) and the chain verifies with and without FILE.
#[test]
fn admin_actions_audited() {
    let env = Env::new("audited");
    let out = env.sg(&["peer", "add", "alice", "--expires", "30d"]);
    ok(&out);
    let conf = text(&out.stdout);
    ok(&env.sg(&["peer", "add", "bob"]));
    let alice_key = env.public_key_of("alice");
    let bob_old = env.public_key_of("bob");
    ok(&env.sg(&["peer", "revoke", "alice", "--reason", "laptop lost"]));
    let out = env.sg(&["peer", "rotate", "bob"]);
    ok(&out);
    let rotated_conf = text(&out.stdout);
    let lines = env.audit_lines();
    let kinds: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["peer_added", "peer_added", "peer_revoked", "peer_rotated"]
    );
    let who = text(&Command::new("id").arg("-un").output().unwrap().stdout);
    for l in &lines {
        assert_eq!(l["actor"], who.trim(), "{l}");
    }
    assert_eq!(lines[0]["peer"], "alice");
    assert_eq!(lines[0]["public_key"], alice_key.as_str());
    assert_eq!(lines[0]["addresses"], "10.8.0.2");
    assert!(lines[0]["expires_at"].is_i64());
    assert_eq!(lines[2]["reason"], "laptop lost");
    assert_eq!(lines[2]["addresses"], "10.8.0.2");
    assert_eq!(lines[3]["old_public_key"], bob_old.as_str());
    assert_eq!(lines[3]["public_key"], env.public_key_of("bob").as_str());
    let log = fs::read_to_string(&env.audit).unwrap();
    for c in [&conf, &rotated_conf] {
        for key in ["PrivateKey", "PresharedKey"] {
            let secret = conf_value(c, key).unwrap();
            assert!(!log.contains(&secret), "{key} leaked into the audit log");
        }
    }
    let (code, out) = env.verify(None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 lines, seq 1..4"), "{out}");
    let (code, out) = env.verify(Some(&env.audit));
    assert_eq!(code, 0, "{out}");
}

/// The actor is the real user; `SUDO_USER` (anyone can set it) is only an
/// extra field, `sudo_user`.
#[test]
fn actor_names_sudo_caller() {
    let env = Env::new("sudo");
    ok(&env
        .cmd(&["peer", "add", "alice"])
        .env("SUDO_USER", "carol")
        .output()
        .unwrap());
    let who = text(&Command::new("id").arg("-un").output().unwrap().stdout);
    let line = &env.audit_lines()[0];
    assert_eq!(line["actor"], who.trim());
    assert_eq!(line["sudo_user"], "carol");
}

/// A log with five records and the pristine text, for tampering.
fn tamper_env(tag: &str) -> (Env, Vec<String>) {
    tamper_env_with(tag, |_| {})
}

fn tamper_env_with(tag: &str, edit: impl FnOnce(&mut String)) -> (Env, Vec<String>) {
    let env = Env::with_config(tag, edit);
    for n in ["a1", "a2", "a3", "a4"] {
        ok(&env.sg(&["peer", "add", n]));
    }
    ok(&env.sg(&["peer", "revoke", "a2"]));
    let lines: Vec<String> = fs::read_to_string(&env.audit)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 5);
    (env, lines)
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

/// Editing a value, deleting, reordering or inserting lines is each caught by
/// `audit verify` (with and without FILE) with exit 1 and one line naming the
/// line and what is wrong with it.
#[test]
fn audit_verify_detects_tampering() {
    let (env, pristine) = tamper_env("tamper");
    const EDITED: &str = "HMAC does not match its contents";
    const LINK: &str = "`prev` does not link to the line before it";
    let mut cases: Vec<(&str, Vec<String>, usize, &str)> = Vec::new();
    let mut edited = pristine.clone();
    edited[2] = edited[2].replace("\"peer\":\"a3\"", "\"peer\":\"zz\"");
    assert_ne!(edited[2], pristine[2]);
    cases.push(("edit", edited, 3, EDITED));
    let mut deleted = pristine.clone();
    deleted.remove(1);
    cases.push(("delete", deleted, 2, LINK));
    let mut reordered = pristine.clone();
    reordered.swap(2, 3);
    cases.push(("reorder", reordered, 3, LINK));
    let mut inserted = pristine.clone();
    inserted.insert(3, pristine[0].clone());
    cases.push(("insert", inserted, 4, LINK));
    let mut not_json = pristine.clone();
    not_json.insert(2, "{\"ts\":".into());
    cases.push(("not JSON", not_json, 3, "not a JSON audit record"));
    let mut first_gone = pristine.clone();
    first_gone.remove(0);
    cases.push(("delete first", first_gone, 1, "no older file is kept"));
    for (what, lines, bad, why) in cases {
        write_lines(&env.audit, &lines);
        let (code, out) = env.verify(None);
        assert_eq!(code, 1, "{what}: {out}");
        assert!(
            out.contains(&format!("audit.jsonl: line {bad}: ")) && out.contains(why),
            "{what}: {out}"
        );
        assert_eq!(out.trim_end().lines().count(), 1, "{what}: {out}");
        if what != "delete first" {
            // Alone, a file may start anywhere; the damage inside is still found.
            let (code, out) = env.verify(Some(&env.audit));
            assert_eq!(code, 1, "{what} (FILE): {out}");
            assert!(
                out.contains(&format!("line {bad}: ")) && out.contains(why),
                "{what} (FILE): {out}"
            );
            assert_eq!(out.trim_end().lines().count(), 1, "{what}: {out}");
        }
    }
    write_lines(&env.audit, &pristine);
    assert_eq!(env.verify(None).0, 0);
}

/// A cut tail (last line removed, or cut mid-line) verifies as a chain on its
/// own but is caught against the head in the store, naming the missing line.
#[test]
fn audit_verify_detects_cut_tail() {
    let (env, pristine) = tamper_env("tail");
    write_lines(&env.audit, &pristine[..4]);
    let (code, out) = env.verify(None);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("audit.jsonl: line 5: missing: the store records seq 5")
            && out.contains("the log ends at seq 4"),
        "{out}"
    );
    // FILE alone cannot know: that is what the store head is for.
    assert_eq!(env.verify(Some(&env.audit)).0, 0);
    let mut cut = pristine.clone();
    let half = cut[4].len() / 2;
    cut[4].truncate(half);
    write_lines(&env.audit, &cut);
    let (code, out) = env.verify(None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("audit.jsonl: line 5:"), "{out}");
}

/// A log rewritten from some line on (a valid chain of its own, re-sealed) is
/// caught. Keyed (as `init` configures), on its first line: another gateway's
/// HMACs are not under this seal key. Unkeyed (no seal key), where it disagrees
/// with the head recorded in the store.
#[test]
fn audit_verify_detects_rewritten_log() {
    for keyed in [true, false] {
        let edit = |t: &mut String| {
            if !keyed {
                *t = unkeyed(t);
            }
        };
        let tag = if keyed { "rewrite" } else { "rewrite-plain" };
        let (env, pristine) = tamper_env_with(tag, edit);
        // Re-seal other records into a fresh chain in a second gateway dir.
        let other = Env::with_config(&format!("{tag}-other"), edit);
        for n in ["b1", "b2", "b3", "b4", "b5"] {
            ok(&other.sg(&["peer", "add", n]));
        }
        fs::copy(&other.audit, &env.audit).unwrap();
        let (code, out) = env.verify(None);
        assert_eq!(code, 1, "{out}");
        if keyed {
            assert!(
                out.contains("audit.jsonl: line 1:") && out.contains("HMAC does not match"),
                "{out}"
            );
        } else {
            assert!(
                out.contains("audit.jsonl: line 5:") && out.contains("rewritten"),
                "{out}"
            );
        }
        write_lines(&env.audit, &pristine);
        assert_eq!(env.verify(None).0, 0);
    }
}

/// The config text without `[daemon] seal_key_file`: an unkeyed audit chain.
fn unkeyed(config: &str) -> String {
    config
        .lines()
        .filter(|l| !l.starts_with("seal_key_file"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// With a small `audit_rotate_bytes` the log spans several files that verify as
/// one chain; each file alone verifies too, a later one naming where it continues.
#[test]
fn rotated_audit_files_verify_as_one_chain() {
    let env = Env::with_config("rotate", |t| {
        *t = t.replacen("[log]\n", "[log]\naudit_rotate_bytes = 4096\n", 1);
    });
    for i in 0..30 {
        ok(&env.sg(&["peer", "add", &format!("r{i}")]));
    }
    let rotated: Vec<PathBuf> = (1..=9)
        .map(|n| env.dir.join(format!("audit.jsonl.{n}")))
        .filter(|p| p.exists())
        .collect();
    assert!(rotated.len() >= 2, "expected rotation, got {rotated:?}");
    let (code, out) = env.verify(None);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "30 lines in {} files, seq 1..30",
            rotated.len() + 1
        )),
        "{out}"
    );
    for f in rotated.iter().chain([&env.audit]) {
        let (code, out) = env.verify(Some(f));
        assert_eq!(code, 0, "{}: {out}", f.display());
    }
    // The newest rotated file continues the one before it.
    let (_, out) = env.verify(Some(&rotated[0]));
    assert!(out.contains("continues an earlier file from seq"), "{out}");
    // Breaking the link between files is caught on the later file's first line.
    let oldest = rotated.last().unwrap();
    let text = fs::read_to_string(oldest).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.pop();
    write_lines(oldest, &lines);
    let (code, out) = env.verify(None);
    assert_eq!(code, 1, "{out}");
    let next = rotated[rotated.len() - 2]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(out.contains(&format!("{next}: line 1:")), "{out}");
}

/// A revoked peer shows `revoked` with its reason and former address; its key
/// cannot be issued again; its address can.
#[test]
fn revoke_shows_and_retires_key() {
    let env = Env::new("revoke");
    ok(&env.sg(&["peer", "add", "alice"]));
    let key = env.public_key_of("alice");
    let out = env.sg(&["peer", "revoke", "alice", "--reason", "left the clinic"]);
    ok(&out);
    assert!(
        text(&out.stderr).contains("no daemon running"),
        "{}",
        text(&out.stderr)
    );
    let p = env.show("alice");
    assert_eq!(p["state"], "revoked");
    assert_eq!(p["revoked_reason"], "left the clinic");
    assert!(p["revoked_at"].is_i64());
    assert_eq!(p["addresses"], serde_json::json!([]));
    assert_eq!(p["former_addresses"], serde_json::json!(["10.8.0.2"]));
    assert!(p["live"].is_null());
    let human = text(&env.sg(&["peer", "show", "alice"]).stdout);
    assert!(
        human.contains("state: revoked") && human.contains("left the clinic"),
        "{human}"
    );
    env.refused(
        &["peer", "add", "mallory", "--public-key", &key],
        &[&key, "revoked"],
    );
    let out = env.sg(&["peer", "add", "bob"]);
    ok(&out);
    assert!(text(&out.stdout).contains("Address = 10.8.0.2/32"));
}

/// Rotate prints a config with a new key pair; name, address and grants stay;
/// the old key is revoked and cannot be issued again.
#[test]
fn rotate_keeps_identity_and_revokes_old_key() {
    let env = Env::new("rotate-key");
    ok(&env.sg(&["peer", "add", "alice", "--service", "api", "--admin"]));
    let before = env.show("alice");
    let file = env.dir.join("alice-new.conf");
    let out = env.sg(&[
        "peer",
        "rotate",
        "alice",
        "--output",
        file.to_str().unwrap(),
    ]);
    ok(&out);
    assert!(out.stdout.is_empty());
    let conf = fs::read_to_string(&file).unwrap();
    let after = env.show("alice");
    assert_ne!(after["public_key"], before["public_key"]);
    for k in [
        "name",
        "addresses",
        "services",
        "admin",
        "created_at",
        "expires_at",
    ] {
        assert_eq!(after[k], before[k], "{k}");
    }
    assert!(conf.contains("Address = 10.8.0.2/32"), "{conf}");
    let private = conf_value(&conf, "PrivateKey").unwrap();
    let mut c = Command::new(BIN)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin
        .take()
        .unwrap()
        .write_all(private.as_bytes())
        .unwrap();
    let derived = c.wait_with_output().unwrap();
    assert_eq!(
        text(&derived.stdout).trim(),
        after["public_key"].as_str().unwrap()
    );
    let old = before["public_key"].as_str().unwrap();
    env.refused(
        &["peer", "add", "eve", "--public-key", old],
        &[old, "revoked"],
    );
    env.refused(
        &["peer", "rotate", "alice", "--public-key", old],
        &[old, "revoked"],
    );
    // With the site's own key: no PrivateKey line, and the key is stored.
    let own = new_public_key();
    let out = env.sg(&["peer", "rotate", "alice", "--public-key", &own]);
    ok(&out);
    assert!(!text(&out.stdout).contains("PrivateKey"));
    assert_eq!(env.public_key_of("alice"), own);
}

/// Bad input to revoke, rotate and show exits 1 naming the value and changes
/// neither the store, the audit log nor any output file.
#[test]
fn bad_admin_input_changes_nothing() {
    let env = Env::new("bad");
    ok(&env.sg(&["peer", "add", "alice"]));
    ok(&env.sg(&["peer", "add", "bob"]));
    ok(&env.sg(&["peer", "add", "gone"]));
    ok(&env.sg(&["peer", "revoke", "gone"]));
    let bob = env.public_key_of("bob");
    let out_file = env.dir.join("never.conf");
    let out_path = out_file.to_str().unwrap();
    env.refused(&["peer", "revoke", "ghost"], &["no peer named `ghost`"]);
    env.refused(&["peer", "revoke", "gone"], &["`gone` is already revoked"]);
    env.refused(
        &["peer", "revoke", "Bad_Name"],
        &["invalid peer name `Bad_Name`"],
    );
    env.refused(
        &["peer", "revoke", "alice", "--reason", "two\nlines"],
        &["--reason"],
    );
    env.refused(
        &["peer", "rotate", "ghost", "--output", out_path],
        &["no peer named `ghost`"],
    );
    env.refused(
        &["peer", "rotate", "gone", "--output", out_path],
        &["`gone` is revoked"],
    );
    env.refused(
        &["peer", "rotate", "alice", "--public-key", "not-a-key"],
        &["--public-key", "`not-a-key`"],
    );
    env.refused(
        &[
            "peer",
            "rotate",
            "alice",
            "--public-key",
            &bob,
            "--output",
            out_path,
        ],
        &[&bob, "`bob`"],
    );
    assert!(!out_file.exists(), "a refused rotate left its output file");
    fs::write(&out_file, "keep me").unwrap();
    env.refused(
        &["peer", "rotate", "alice", "--output", out_path],
        &[out_path, "already exists"],
    );
    assert_eq!(fs::read_to_string(&out_file).unwrap(), "keep me");
    env.refused(&["peer", "show", "ghost"], &["no peer named `ghost`"]);
}

/// `peer add --qr` prints only a QR code of half blocks (no config text, no
/// private key) and exits 0; with `--output` the file still gets the text.
#[test]
fn qr_code_output() {
    let env = Env::new("qr");
    let out = env.sg(&["peer", "add", "alice", "--qr"]);
    ok(&out);
    let qr = text(&out.stdout);
    assert!(qr.lines().count() > 10, "{qr}");
    assert!(
        qr.chars()
            .all(|c| matches!(c, ' ' | '\u{2580}' | '\u{2584}' | '\u{2588}' | '\n')),
        "{qr}"
    );
    assert!(qr.contains('\u{2588}'));
    let file = env.dir.join("bob.conf");
    let out = env.sg(&[
        "peer",
        "add",
        "bob",
        "--qr",
        "--output",
        file.to_str().unwrap(),
    ]);
    ok(&out);
    assert!(text(&out.stdout).contains('\u{2588}'));
    assert!(fs::read_to_string(&file).unwrap().contains("PrivateKey = "));
}

/// With no daemon, admin commands succeed with a note on stderr; listings
/// carry `live: null`; `status` exits 1 (its `--json` says `running: false`).
#[test]
fn no_daemon_paths() {
    let env = Env::new("nodaemon");
    for args in [
        &["peer", "add", "alice"][..],
        &["peer", "rotate", "alice"],
        &["peer", "revoke", "alice"],
    ] {
        let out = env.sg(args);
        ok(&out);
        let err = text(&out.stderr);
        assert!(
            err.contains("no daemon running on /run/sitegate/")
                && err.contains("takes effect at next start"),
            "{args:?}: {err}"
        );
    }
    let list = env.peers();
    assert_eq!(list.len(), 1);
    for k in [
        "name",
        "public_key",
        "addresses",
        "former_addresses",
        "services",
        "admin",
        "preshared_key",
        "created_at",
        "expires_at",
        "revoked_at",
        "revoked_reason",
        "state",
        "live",
    ] {
        assert!(list[0].get(k).is_some(), "peer list --json lacks {k}");
    }
    assert!(list[0]["live"].is_null());
    let out = env.sg(&["peer", "list"]);
    ok(&out);
    assert!(text(&out.stdout).starts_with("NAME "));
    let out = env.sg(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("error: no daemon running on /run/sitegate/"));
    let out = env.sg(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["running"], false);
}

/// Without `[log] audit_file` admin commands still work, and `audit verify`
/// without FILE says what is missing.
#[test]
fn no_audit_file_configured() {
    let env = Env::with_config("noaudit", |t| {
        let line = t
            .lines()
            .find(|l| l.starts_with("audit_file"))
            .unwrap()
            .to_string();
        *t = t.replacen(&format!("{line}\n"), "", 1);
    });
    ok(&env.sg(&["peer", "add", "alice"]));
    assert!(!env.audit.exists());
    let (code, out) = env.verify(None);
    assert_eq!(code, 1);
    assert!(out.contains("sets no [log] audit_file"), "{out}");
}

/// A stand-in for the daemon's side of `/run/sitegate/NAME.sock`: answers
/// `status` with a fixed view and `reload` with `reply`, recording every request.
struct FakeDaemon {
    path: PathBuf,
    requests: std::sync::Arc<std::sync::Mutex<Vec<Request>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

use sitegate::control::protocol::{control_socket_path, PeerLive, Request, Response, StatusView};

impl FakeDaemon {
    /// `None` (after a note) where /run/sitegate cannot be created (not root).
    fn start(ifname: &str, view: StatusView, reply: Response) -> Option<FakeDaemon> {
        use std::io::{BufRead, BufReader, Write};
        use std::os::unix::fs::DirBuilderExt;
        let path = control_socket_path(ifname);
        let dir = path.parent().unwrap();
        if let Err(e) = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            eprintln!("skip: cannot create {}: {e}", dir.display());
            return None;
        }
        let _ = fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (reqs, halt) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                stream.set_nonblocking(false).unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                let req: Request = serde_json::from_str(&line).unwrap();
                let resp = match &req {
                    Request::Status {} => Response::Status(view.clone()),
                    Request::Reload { .. } => reply.clone(),
                };
                reqs.lock().unwrap().push(req);
                let mut out = serde_json::to_string(&resp).unwrap();
                out.push('\n');
                (&stream).write_all(out.as_bytes()).unwrap();
            }
        });
        Some(FakeDaemon {
            path,
            requests,
            stop,
            thread: Some(thread),
        })
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

fn live_view(env: &Env, key: &str) -> StatusView {
    StatusView {
        interface: env.ifname.clone(),
        public_key: "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=".into(),
        listen_port: 51820,
        started_at: 1_800_000_000,
        udp_send_errors: 0,
        tun_write_errors: 0,
        peers: vec![PeerLive {
            name: "alice".into(),
            public_key: key.into(),
            addresses: vec!["10.8.0.2".into()],
            endpoint: Some("198.51.100.7:40001".into()),
            latest_handshake: Some(1_800_000_100),
            rx_bytes: 1234,
            tx_bytes: 5 << 20,
            session: true,
            expires_at: None,
            denied: [("acl".to_string(), 3u64)].into(),
            noise_dropped: 0,
            ipv6_dropped: 0,
            internet_seen_at: Some(1_800_000_090),
        }],
    }
}

/// With a daemon on the control socket, listings merge its live state (JSON
/// and tables) and `status` reports it with `running: true`.
#[test]
fn listings_merge_live_state() {
    let env = Env::new("live");
    ok(&env.sg(&["peer", "add", "alice"]));
    ok(&env.sg(&["peer", "add", "bob"]));
    let key = env.public_key_of("alice");
    let reply = Response::Reloaded { active_peers: 2 };
    let Some(fake) = FakeDaemon::start(&env.ifname, live_view(&env, &key), reply) else {
        return;
    };
    let peers = env.peers();
    let live = &peers[0]["live"];
    assert_eq!(live["endpoint"], "198.51.100.7:40001");
    assert_eq!(live["latest_handshake"], 1_800_000_100);
    assert_eq!(live["rx_bytes"], 1234);
    assert_eq!(live["session"], true);
    assert_eq!(live["denied"]["acl"], 3);
    assert_eq!(live["internet_seen_at"], 1_800_000_090);
    assert!(peers[1]["live"].is_null(), "bob has no live state");
    assert_eq!(env.show("alice")["live"]["tx_bytes"], 5 << 20);
    let table = text(&env.sg(&["peer", "list"]).stdout);
    assert!(
        table.contains("ENDPOINT") && table.contains("198.51.100.7:40001"),
        "{table}"
    );
    assert!(
        table.contains("INTERNET SEEN") && table.contains("yes, last 2027-01-15T08:01:30Z"),
        "{table}"
    );
    let human = text(&env.sg(&["peer", "show", "alice"]).stdout);
    assert!(
        human.contains("latest handshake: 2027-01-15T08:01:40Z")
            && human.contains("transfer: 1.21 KiB received, 5.00 MiB sent")
            && human.contains("internet seen: yes, last 2027-01-15T08:01:30Z"),
        "{human}"
    );
    let out = env.sg(&["status", "--json"]);
    ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["running"], true);
    assert_eq!(v["interface"], env.ifname.as_str());
    assert_eq!(v["peers"][0]["name"], "alice");
    assert_eq!(v["peers"][0]["internet_seen_at"], 1_800_000_090);
    let out = env.sg(&["status"]);
    ok(&out);
    let human = text(&out.stdout);
    assert!(
        human.contains(&format!("interface: {}", env.ifname))
            && human.contains("internet seen: yes, last 2027-01-15T08:01:30Z"),
        "{human}"
    );
    assert!(fake
        .requests()
        .iter()
        .all(|r| matches!(r, Request::Status {})));
}

/// Admin commands tell the daemon what they did (event, actor, fields) after
/// committing; a daemon that refuses is a warning, not a failure.
#[test]
fn admin_actions_notify_daemon() {
    let env = Env::new("notify");
    ok(&env.sg(&["peer", "add", "alice"]));
    let key = env.public_key_of("alice");
    let reply = Response::Reloaded { active_peers: 1 };
    let Some(fake) = FakeDaemon::start(&env.ifname, live_view(&env, &key), reply) else {
        return;
    };
    let out = env.sg(&["peer", "revoke", "alice", "--reason", "stolen"]);
    ok(&out);
    assert!(
        text(&out.stderr).contains("applied the change"),
        "{}",
        text(&out.stderr)
    );
    let who = text(&Command::new("id").arg("-un").output().unwrap().stdout);
    let reqs = fake.requests();
    let Some(Request::Reload { event: Some(ev) }) = reqs.last() else {
        panic!("no reload request: {reqs:?}");
    };
    assert_eq!(ev.event, "peer_revoked");
    assert_eq!(ev.actor, who.trim());
    assert_eq!(ev.fields.get("peer").map(String::as_str), Some("alice"));
    assert_eq!(ev.fields.get("public_key"), Some(&key));
    assert_eq!(ev.fields.get("reason").map(String::as_str), Some("stolen"));
    drop(fake);

    let reply = Response::Error {
        message: "busy".into(),
    };
    let Some(_fake) = FakeDaemon::start(&env.ifname, live_view(&env, &key), reply) else {
        return;
    };
    let out = env.sg(&["peer", "add", "bob"]);
    ok(&out);
    let err = text(&out.stderr);
    assert!(
        err.contains("warning: the change is committed") && err.contains("busy"),
        "{err}"
    );
    assert_eq!(env.show("bob")["state"], "active");
}
