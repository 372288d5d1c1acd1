//! `sitegate audit verify [FILE]`.
//!
//! Without FILE: every file of the chain (`[log] audit_file` and its rotated
//! generations, oldest first) as one chain, each file's first line linked to the
//! previous file's last, and the end checked against the head the store recorded
//! at the last append, which catches a cut tail that the chain alone cannot.
//! The file may run one line past the store head (a writer killed between its
//! `write` and the store update); it may never fall short of it.
//!
//! With FILE: that file alone; its first line may continue an earlier file.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::write_stdout;
use crate::audit::chain::Head;
use crate::audit::verify::{verify, Verified};
use crate::audit::writer::{chain_files, rotated_path, HeadStore, KEEP_ROTATED};
use crate::config::Config;
use crate::registry::Store;

/// `sitegate audit verify [FILE]`.
pub fn audit_verify(config: &Path, file: Option<&Path>) -> Result<()> {
    match file {
        Some(f) => verify_one(f),
        None => verify_configured(config),
    }
}

fn read_lines(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn summary(v: &Verified, files: usize) -> String {
    let in_files = if files > 1 {
        format!(" in {files} files")
    } else {
        String::new()
    };
    format!(
        "audit log intact: {} lines{in_files}, seq {}..{}, head {}\n",
        v.lines,
        v.start.seq + 1,
        v.end.seq,
        v.end.hash
    )
}

fn verify_one(path: &Path) -> Result<()> {
    let text = read_lines(path)?;
    let v = verify(text.lines(), None, 1).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut out = String::new();
    if v.lines == 0 {
        return write_stdout(&format!("{}: no audit records\n", path.display()));
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
/// No `[log] audit_file`; an unreadable file or store; the first bad line,
/// named with its file and line number.
pub(crate) fn verify_chain(cfg: &Config) -> Result<String> {
    let Some(path) = cfg.log.audit_file.clone() else {
        bail!(
            "{} sets no [log] audit_file; give the audit FILE to verify",
            cfg.path.display()
        );
    };
    let store = Store::open_config(cfg)?;
    let recorded = store.audit_head().map_err(|e| anyhow!("{e}"))?;
    let files = chain_files(&path);
    let mut notes = String::new();

    let mut total: Option<Verified> = None;
    // The last file read and its line count, for naming where a cut tail begins.
    let mut last: (PathBuf, usize) = (path.clone(), 0);
    for f in &files {
        let text = read_lines(f)?;
        let lines: Vec<&str> = text.lines().collect();
        let after = total.as_ref().map(|t| t.end.clone());
        let v = verify(lines.iter().copied(), after.as_ref(), 1)
            .map_err(|e| anyhow!("{}: {e}", f.display()))?;
        if total.is_none() && v.lines > 0 && !v.starts_at_genesis() {
            // Only a full set of rotated generations explains a chain that starts
            // later: the oldest file was dropped. Otherwise its first lines are gone.
            if !rotated_path(&path, KEEP_ROTATED).exists() {
                bail!(
                    "{}: line 1: continues seq {} (hash {}) but no older file is kept (the first lines were deleted)",
                    f.display(),
                    v.start.seq,
                    v.start.hash
                );
            }
            notes.push_str(&format!(
                "{}: the oldest file kept continues seq {} (hash {}) of a dropped file\n",
                f.display(),
                v.start.seq,
                v.start.hash
            ));
        }
        if let Some(h) = &recorded {
            check_recorded(f, &lines, &v, h)?;
        }
        total = Some(match total {
            None => v,
            Some(t) => Verified {
                start: t.start,
                end: v.end,
                lines: t.lines + v.lines,
            },
        });
        last = (f.clone(), lines.len());
    }
    let total = total.unwrap_or(Verified {
        start: Head::genesis(),
        end: Head::genesis(),
        lines: 0,
    });
    if let Some(h) = &recorded {
        if h.seq > total.end.seq {
            bail!(
                "{}: line {}: missing: the store records seq {} (hash {}) but the log ends at seq {} — the tail was cut",
                last.0.display(),
                last.1 + 1,
                h.seq,
                h.hash,
                total.end.seq
            );
        }
    }
    if total.lines == 0 {
        return Ok(format!("{notes}{}: no audit records yet\n", path.display()));
    }
    Ok(format!("{notes}{}", summary(&total, files.len())))
}

/// The line carrying the store's recorded seq must carry its hash too: a log
/// rewritten from some point on (a valid chain of its own) differs there.
fn check_recorded(file: &Path, lines: &[&str], v: &Verified, h: &Head) -> Result<()> {
    if h.seq <= v.start.seq || h.seq > v.end.seq {
        return Ok(());
    }
    let idx = usize::try_from(h.seq - v.start.seq).unwrap_or(usize::MAX);
    let hash = lines
        .get(idx - 1)
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
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
