//! Secrets at rest and fail-closed start: with `[daemon] seal_key_file` the
//! peer store (and its WAL and shm files) holds no preshared key in any
//! encoding, a sealed peer still connects, a store from before sealing is
//! migrated, a wrong or missing seal key is refused with a clear error that
//! changes nothing, and `run` refuses every config key it cannot honour.
//!
//! Needs root, `/dev/net/tun`, wireguard-go and wireguard-tools; without them a
//! test prints a skip note, except under `CI=true`, where it fails.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use base64::Engine;
use common::*;

/// The store and the files SQLite keeps beside it.
fn store_files(gw: &Gateway) -> Vec<PathBuf> {
    ["sitegate.db", "sitegate.db-wal", "sitegate.db-shm"]
        .iter()
        .map(|f| gw.dir.path.join(f))
        .filter(|p| p.exists())
        .collect()
}

/// Every form a preshared key could leak in: raw bytes, base64, hex (both cases).
fn encodings(psk_b64: &str) -> Vec<Vec<u8>> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(psk_b64)
        .expect("PresharedKey is base64");
    assert_eq!(raw.len(), 32);
    vec![
        raw.clone(),
        psk_b64.as_bytes().to_vec(),
        hex::encode(&raw).into_bytes(),
        hex::encode_upper(&raw).into_bytes(),
    ]
}

/// Which of `psks` appear, in any encoding, in any of `files`.
fn leaks(files: &[PathBuf], psks: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for f in files {
        let bytes = fs::read(f).expect("read store file");
        for psk in psks {
            for enc in encodings(psk) {
                if bytes.windows(enc.len()).any(|w| w == enc.as_slice()) {
                    found.push(format!(
                        "{} holds a PSK ({} bytes form)",
                        f.display(),
                        enc.len()
                    ));
                }
            }
        }
    }
    found
}

/// The raw `preshared_key` column of every peer, as stored.
fn stored_psks(gw: &Gateway) -> Vec<Option<String>> {
    let conn = rusqlite::Connection::open(gw.dir.path.join("sitegate.db")).expect("open store");
    let mut stmt = conn
        .prepare("SELECT preshared_key FROM peers ORDER BY id")
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| r.get::<_, Option<String>>(0))
        .expect("query");
    rows.map(|r| r.expect("row")).collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn write_key(path: &Path, key: &str) {
    let _ = fs::remove_file(path);
    fs::write(path, format!("{key}\n")).expect("write key");
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod key");
}

/// With the seal key `init` writes, no issued PSK is in the store, its WAL or
/// its shm file in raw, base64 or hex form (with the daemon running, so the WAL
/// is live), and a sealed peer connects and passes traffic.
#[test]
fn sealed_store_hides_psks_and_peer_connects() {
    if !rig_ready("secrets_sealed_store") {
        return;
    }
    let n = names("ss");
    let gw_ns = Netns::new(&n.netns("gw"));
    let site_ns = Netns::new(&n.netns("s1"));
    Underlay::attach(&n, &gw_ns, &site_ns, 1);
    let mut gw = Gateway::init(&gw_ns, &n.name("g"));
    assert!(fs::read_to_string(&gw.config)
        .expect("config")
        .contains("seal_key_file"));
    gw.start();
    let mut psks = Vec::new();
    let mut confs = Vec::new();
    for i in 0..3 {
        let conf = gw.add_peer(&format!("site{i}"));
        psks.push(conf_value(&conf, "PresharedKey").expect("PresharedKey in config"));
        confs.push(conf);
    }
    for v in stored_psks(&gw) {
        let v = v.expect("a PSK was issued");
        assert!(v.starts_with("sealed:v1:"), "stored in clear: {v}");
    }
    let files = store_files(&gw);
    assert!(
        files.iter().any(|f| f.ends_with("sitegate.db-wal")),
        "expected a live WAL beside the store: {files:?}"
    );
    assert_eq!(leaks(&files, &psks), Vec::<String>::new());
    // The negative control: the scan does find a key that is in the file.
    let probe = gw.dir.path.join("probe.bin");
    fs::write(&probe, format!("xx{}yy", psks[0])).expect("write probe");
    assert_eq!(leaks(&[probe], &psks[..1]).len(), 1);

    let site = Site::up(&site_ns, &n.name("w"), &confs[1]);
    assert!(
        site_ns.ping_until("10.8.0.1", Duration::from_secs(20)),
        "sealed peer cannot reach the gateway; log:\n{}",
        gw.log_tail(30)
    );
    assert!(!gw.events_named("handshake").is_empty());
    drop(site);
}

/// A store written without a seal key (clear PSKs) is sealed the first time it
/// is opened with one, with no clear copy left in the files; `check` reports
/// the clear PSKs first (WARN without a key, FAIL with one) and passes after.
#[test]
fn clear_store_is_migrated() {
    if !rig_ready("secrets_migration") {
        return;
    }
    let n = names("sm");
    let ns = Netns::new(&n.netns("gw"));
    let gw = Gateway::init(&ns, &n.name("g"));
    let text = fs::read_to_string(&gw.config).expect("config");
    let seal_line = text
        .lines()
        .find(|l| l.starts_with("seal_key_file"))
        .expect("init writes seal_key_file")
        .to_string();
    gw.edit_config(&seal_line, "");
    let psks: Vec<String> = (0..2)
        .map(|i| {
            conf_value(&gw.add_peer(&format!("old{i}")), "PresharedKey").expect("PresharedKey")
        })
        .collect();
    assert_eq!(
        stored_psks(&gw),
        psks.iter().cloned().map(Some).collect::<Vec<_>>(),
        "without a seal key PSKs are stored as base64"
    );
    let out = run(&mut gw.cli(&["check"]));
    assert!(
        stdout(&out).contains("WARN sealing: no [daemon] seal_key_file")
            && stdout(&out).contains("2 preshared keys in clear"),
        "{}",
        stdout(&out)
    );

    let text = fs::read_to_string(&gw.config).expect("config");
    fs::write(
        &gw.config,
        text.replace("[daemon]\n", &format!("[daemon]\n{seal_line}\n")),
    )
    .expect("write config");
    let out = run(&mut gw.cli(&["peer", "list", "--json"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for v in stored_psks(&gw) {
        assert!(v.expect("psk").starts_with("sealed:v1:"));
    }
    assert_eq!(leaks(&store_files(&gw), &psks), Vec::<String>::new());
    let out = run(&mut gw.cli(&["check"]));
    assert!(
        stdout(&out).contains("PASS sealing: 2 preshared keys sealed"),
        "{}",
        stdout(&out)
    );
    // The sealed PSK still reaches the client config of a rotation's peer: a
    // rotation re-seals a fresh PSK under the row's id.
    let rotated = gw.cli_ok(&["peer", "rotate", "old1"]);
    let fresh = conf_value(&rotated, "PresharedKey").expect("PresharedKey");
    assert_eq!(leaks(&store_files(&gw), &[fresh]), Vec::<String>::new());
}

/// A sealed store opened with another key, or with none, is refused by admin
/// commands, `check` and `run` with one clear sentence, and nothing changes: the
/// right key opens it again with the same sealed values.
#[test]
fn wrong_or_missing_seal_key_refused() {
    if !rig_ready("secrets_wrong_key") {
        return;
    }
    let n = names("sw");
    let ns = Netns::new(&n.netns("gw"));
    let mut gw = Gateway::init(&ns, &n.name("g"));
    gw.add_peer("alpha");
    let before = stored_psks(&gw);
    let seal = gw.dir.path.join("seal.key");
    let right = fs::read_to_string(&seal).expect("seal key");

    write_key(&seal, run_ok(&mut gw.cli(&["genkey"])).trim());
    for args in [&["peer", "list"][..], &["peer", "add", "beta"]] {
        let out = run(&mut gw.cli(args));
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stdout(&out));
        assert!(
            stderr(&out).contains("different seal key")
                && stderr(&out).contains("daemon.seal_key_file"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let out = run(&mut gw.cli(&["check"]));
    assert!(
        stdout(&out).contains("FAIL sealing:") && stdout(&out).contains("different seal key"),
        "{}",
        stdout(&out)
    );
    gw.start_expect_failure(&["different seal key", "daemon.seal_key_file"]);
    assert_eq!(stored_psks(&gw), before, "a refused open changed the store");

    // No key configured at all: refused too, never read as an empty store.
    write_key(&seal, right.trim());
    let seal_line = fs::read_to_string(&gw.config)
        .expect("config")
        .lines()
        .find(|l| l.starts_with("seal_key_file"))
        .expect("seal line")
        .to_string();
    gw.edit_config(&seal_line, "");
    let out = run(&mut gw.cli(&["peer", "list"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("holds secrets sealed")
            && stderr(&out).contains("no `daemon.seal_key_file`"),
        "{}",
        stderr(&out)
    );
    let text = fs::read_to_string(&gw.config).expect("config");
    fs::write(
        &gw.config,
        text.replace("[daemon]\n", &format!("[daemon]\n{seal_line}\n")),
    )
    .expect("write config");
    let listed = gw.cli_ok(&["peer", "list", "--json"]);
    assert!(listed.contains("\"alpha\""), "{listed}");
    assert_eq!(stored_psks(&gw), before);
}

/// `run` refuses to start, naming the key, on each kind of key it cannot
/// honour: a PostgreSQL store it cannot reach, and a seal key that cannot be
/// read (missing, or readable by others). Nothing is created: no TUN device.
#[test]
fn run_refuses_keys_it_cannot_honour() {
    if !rig_ready("secrets_fail_closed") {
        return;
    }
    let n = names("sf");
    let ns = Netns::new(&n.netns("gw"));
    let mut gw = Gateway::init(&ns, &n.name("g"));
    let sound = fs::read_to_string(&gw.config).expect("config");
    let url_line = sound
        .lines()
        .find(|l| l.starts_with("url = \"sqlite://"))
        .expect("store url line")
        .to_string();

    // A PostgreSQL store that cannot be reached stops the start, named.
    fs::write(
        &gw.config,
        sound.replace(
            &url_line,
            "url = \"postgres://sg@db.invalid/sitegate\"\npool = \"10.8.0.0/25\"",
        ),
    )
    .expect("write");
    gw.start_expect_failure(&["cannot connect to peer store postgres://sg@db.invalid/sitegate"]);

    fs::write(&gw.config, &sound).expect("write");
    let seal = gw.dir.path.join("seal.key");
    let key = fs::read_to_string(&seal).expect("seal key");
    fs::remove_file(&seal).expect("remove seal key");
    gw.start_expect_failure(&["daemon.seal_key_file", &seal.display().to_string()]);

    write_key(&seal, key.trim());
    fs::set_permissions(&seal, fs::Permissions::from_mode(0o644)).expect("chmod");
    gw.start_expect_failure(&["daemon.seal_key_file", "readable by group or others"]);

    fs::write(&seal, "not a key\n").expect("write");
    fs::set_permissions(&seal, fs::Permissions::from_mode(0o600)).expect("chmod");
    gw.start_expect_failure(&["daemon.seal_key_file"]);

    // The same config with the key restored starts.
    write_key(&seal, key.trim());
    gw.start();
    assert!(gw.is_running());
}
