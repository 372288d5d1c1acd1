//! `sitegate audit verify [FILE]`.
//!
//! Without FILE: every file of the chain (`[log] audit_file` and its rotated
//! generations, oldest first) as one chain, each file's first line linked to the
//! previous file's last, and the end checked against the head the store recorded
//! at the last append, which catches a cut tail that the chain alone cannot.
//! The file may run past the store head (a writer killed between its fsync and
//! the store update); it may never fall short of it.
//!
//! With FILE: that file alone; its first line may continue an earlier file.
//!
//! A keyed chain needs its key: it is loaded from the config's `[daemon]
//! seal_key_file` when the first keyed line is met (so an unkeyed chain verifies
//! without reading the key), and without it verification stops there saying so.
//! Every failure is one line: the file, the line number, what is wrong.
//! Bytes after the last newline of the live file are a torn append (a crash
//! mid-write, never committed): a note, not a failure; the next append cuts them.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::write_stdout;
use crate::audit::chain::{AuditKey, Head};
use crate::audit::verify::{split_records, ChainError, Fault, Verified, Verifier};
use crate::audit::writer::{chain_files, rotated_path, KEEP_ROTATED};
use crate::config::{Config, StoreConfig};
use crate::registry::postgres::PgStore;
use crate::registry::Store;

/// `sitegate audit verify [FILE]`.
pub fn audit_verify(config: &Path, file: Option<&Path>) -> Result<()> {
    match file {
        Some(f) => verify_one(config, f),
        None => verify_configured(config),
    }
}

/// Why a verification pass stopped.
enum Stop {
    /// A keyed line was met without the key: load it and run again.
    KeyNeeded {
        file: PathBuf,
        line: usize,
    },
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Self {
        Stop::Failed(e)
    }
}

/// Runs `pass` without a key; if it meets a keyed line, loads the key with
/// `load` (`None`: the config names none) and runs it again with the key.
fn with_chain_key<T>(
    load: impl FnOnce() -> Result<Option<AuditKey>>,
    config: &Path,
    pass: impl Fn(Option<&AuditKey>) -> Result<T, Stop>,
) -> Result<T> {
    let (file, line) = match pass(None) {
        Ok(t) => return Ok(t),
        Err(Stop::Failed(e)) => return Err(e),
        Err(Stop::KeyNeeded { file, line }) => (file, line),
    };
    let needed = |why: String| {
        anyhow!(
            "{}: line {line}: keyed line (hmac-sha256): the chain is keyed and verifying it needs the seal key, but {why}",
            file.display()
        )
    };
    let key = match load() {
        Ok(Some(k)) => k,
        Ok(None) => {
            return Err(needed(format!(
                "{} sets no [daemon] seal_key_file (give the config with --config)",
                config.display()
            )))
        }
        Err(e) => return Err(needed(format!("{e:#}"))),
    };
    match pass(Some(&key)) {
        Ok(t) => Ok(t),
        Err(Stop::Failed(e)) => Err(e),
        // Cannot happen with a key; reported rather than looped on.
        Err(Stop::KeyNeeded { file, line }) => Err(anyhow!(
            "{}: line {line}: keyed line not checked",
            file.display()
        )),
    }
}

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// A bad line as one error line, or the signal to load the key.
fn stop(file: &Path, e: ChainError) -> Stop {
    match e.fault {
        Fault::KeyNeeded => Stop::KeyNeeded {
            file: file.to_path_buf(),
            line: e.line,
        },
        _ => Stop::Failed(anyhow!("{}: {e}", file.display())),
    }
}

fn summary(v: &Verified, files: usize) -> String {
    let in_files = if files > 1 {
        format!(" in {files} files")
    } else {
        String::new()
    };
    let keyed = match v.keyed_since {
        Some(s) if s <= v.start.seq + 1 => ", keyed (hmac-sha256)".to_string(),
        Some(s) => format!(", keyed (hmac-sha256) from seq {s}"),
        None => ", unkeyed (sha-256)".to_string(),
    };
    format!(
        "audit log intact: {} lines{in_files}, seq {}..{}{keyed}, head {}\n",
        v.lines,
        v.start.seq + 1,
        v.end.seq,
        v.end.hash
    )
}

fn torn_note(file: &Path, line: usize, bytes: usize) -> String {
    format!(
        "{}: line {line}: torn: {bytes} bytes after the last newline (an append cut short by a crash, never committed; the next append cuts it off)\n",
        file.display()
    )
}

fn verify_one(config: &Path, path: &Path) -> Result<()> {
    let bytes = read_bytes(path)?;
    let records = split_records(&bytes);
    let load = || -> Result<Option<AuditKey>> {
        let cfg = Config::load(config)?;
        Ok(crate::audit::chain_key(&cfg)?)
    };
    let v = with_chain_key(load, config, |key| {
        let mut v = Verifier::new(key, None);
        for (i, l) in records.lines.iter().enumerate() {
            v.push(l, i + 1).map_err(|e| stop(path, e))?;
        }
        Ok(v.result())
    })?;
    let mut out = String::new();
    if let Some(t) = records.torn {
        out.push_str(&torn_note(path, records.lines.len() + 1, t.len()));
    }
    if v.lines == 0 {
        out.push_str(&format!("{}: no audit records\n", path.display()));
        return write_stdout(&out);
    }
    if !v.starts_at_genesis() {
        out.push_str(&format!(
            "{}: continues an earlier file from seq {} (hash {})\n",
            path.display(),
            v.start.seq,
            v.start.hash
        ));
    }
    out.push_str(&summary(&v, 1));
    write_stdout(&out)
}

fn verify_configured(config: &Path) -> Result<()> {
    let cfg = Config::load(config)?;
    write_stdout(&verify_chain(&cfg)?)
}

/// Verifies the configured chain (every file, then the store's head) and
/// returns the report text. Shared with `sitegate check`, which must judge a
/// config that `Config::load` refuses (a loose key file), so it takes `cfg`.
///
/// # Errors
/// No `[log] audit_file`; an unreadable file or store; a keyed chain without a
/// readable seal key; the first bad line, named with its file and line number.
pub(crate) fn verify_chain(cfg: &Config) -> Result<String> {
    let Some(path) = cfg.log.audit_file.clone() else {
        bail!(
            "{} sets no [log] audit_file; give the audit FILE to verify",
            cfg.path.display()
        );
    };
    let recorded = Store::recorded_audit_head(&cfg.store)?;
    // A shared registry also holds this gateway's lines: their chain is
    // checked on its own (the file may have rotated away its oldest lines).
    let table = match &cfg.store {
        StoreConfig::Postgres { gateway, .. } => Some((
            gateway.clone(),
            PgStore::open_unsealed(&cfg.store)?.audit_lines()?,
        )),
        StoreConfig::Sqlite { .. } => None,
    };
    let files = chain_files(&path);
    let load = || -> Result<Option<AuditKey>> { Ok(crate::audit::chain_key(cfg)?) };
    with_chain_key(load, &cfg.path, |key| {
        let mut report = verify_files(&path, &files, recorded.as_ref(), key)?;
        if let Some((gateway, rows)) = &table {
            report.push_str(&verify_table(gateway, rows, key)?);
        }
        Ok(report)
    })
}

/// The audit table's rows of one gateway, in seq order, as one chain: every
/// line's hash (or HMAC), and each `prev` and `seq` following the row before,
/// so a deleted, edited or inserted row is named by its seq.
fn verify_table(
    gateway: &str,
    rows: &[(i64, String)],
    key: Option<&AuditKey>,
) -> Result<String, Stop> {
    let place = PathBuf::from(format!("audit table, gateway {gateway}"));
    let mut ver = Verifier::new(key, None);
    for (i, (seq, line)) in rows.iter().enumerate() {
        ver.push(line.as_bytes(), i + 1)
            .map_err(|e| match e.fault {
                Fault::KeyNeeded => stop(&place, e),
                fault => Stop::Failed(anyhow!("{}: row seq {seq}: {fault}", place.display())),
            })?;
    }
    let v = ver.result();
    if v.lines == 0 {
        return Ok(format!("{}: no rows yet\n", place.display()));
    }
    Ok(format!(
        "{}: intact: {} rows, seq {}..{}, head {}\n",
        place.display(),
        v.lines,
        v.start.seq + 1,
        v.end.seq,
        v.end.hash
    ))
}

/// One pass over the chain's files, one file in memory at a time.
fn verify_files(
    path: &Path,
    files: &[PathBuf],
    recorded: Option<&Head>,
    key: Option<&AuditKey>,
) -> Result<String, Stop> {
    let mut notes = String::new();
    let mut ver = Verifier::new(key, None);
    // The last file read and its line count, for naming where a cut tail begins.
    let mut last: (PathBuf, usize) = (path.to_path_buf(), 0);
    for (n, f) in files.iter().enumerate() {
        let bytes = read_bytes(f)?;
        let records = split_records(&bytes);
        let before = ver.result();
        for (i, l) in records.lines.iter().enumerate() {
            ver.push(l, i + 1).map_err(|e| stop(f, e))?;
        }
        let after = ver.result();
        if let Some(t) = records.torn {
            let line = records.lines.len() + 1;
            if n + 1 < files.len() {
                // Rotation only ever renames a file after whole appends.
                return Err(Stop::Failed(anyhow!(
                    "{}: line {line}: torn line ({} bytes after the last newline) in a rotated file, which only whole appends reach",
                    f.display(),
                    t.len()
                )));
            }
            notes.push_str(&torn_note(f, line, t.len()));
        }
        if before.lines == 0 && after.lines > 0 && !after.starts_at_genesis() {
            // Only a full set of rotated generations explains a chain that starts
            // later: the oldest file was dropped. Otherwise its first lines are gone.
            if !rotated_path(path, KEEP_ROTATED).exists() {
                return Err(Stop::Failed(anyhow!(
                    "{}: line 1: continues seq {} (hash {}) but no older file is kept (the first lines were deleted)",
                    f.display(),
                    after.start.seq,
                    after.start.hash
                )));
            }
            notes.push_str(&format!(
                "{}: the oldest file kept continues seq {} (hash {}) of a dropped file\n",
                f.display(),
                after.start.seq,
                after.start.hash
            ));
        }
        if let Some(h) = recorded {
            let start = if before.lines == 0 {
                &after.start
            } else {
                &before.end
            };
            check_recorded(f, &records.lines, start.seq, after.end.seq, h)?;
        }
        last = (f.clone(), records.lines.len());
    }
    let total = ver.result();
    if let Some(h) = recorded {
        if h.seq > total.end.seq {
            return Err(Stop::Failed(anyhow!(
                "{}: line {}: missing: the store records seq {} (hash {}) but the log ends at seq {} — the tail was cut",
                last.0.display(),
                last.1 + 1,
                h.seq,
                h.hash,
                total.end.seq
            )));
        }
    }
    if total.lines == 0 {
        return Ok(format!("{notes}{}: no audit records yet\n", path.display()));
    }
    Ok(format!("{notes}{}", summary(&total, files.len())))
}

/// The line carrying the store's recorded seq must carry its hash too: a log
/// rewritten from some point on (a valid chain of its own) differs there.
/// `start` is the seq before the file's first line, `end` its last.
fn check_recorded(file: &Path, lines: &[&[u8]], start: u64, end: u64, h: &Head) -> Result<()> {
    if h.seq <= start || h.seq > end {
        return Ok(());
    }
    let idx = usize::try_from(h.seq - start).unwrap_or(usize::MAX);
    let hash = idx
        .checked_sub(1)
        .and_then(|i| lines.get(i))
        .and_then(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
        .and_then(|j| j.get("hash").and_then(|x| x.as_str()).map(str::to_string));
    if hash.as_deref() != Some(h.hash.as_str()) {
        bail!(
            "{}: line {idx}: the store records seq {} with hash {}, but this line's hash differs (the log was rewritten)",
            file.display(),
            h.seq,
            h.hash
        );
    }
    Ok(())
}
