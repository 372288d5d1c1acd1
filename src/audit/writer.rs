//! Appending to the audit log: one chain however many processes write (the
//! daemon and admin commands run while it is down), crash-safe ordering, and
//! size-based rotation whose new file links to the old file's last hash.
//!
//! Each append takes an exclusive `flock` on `FILE.lock` (never rotated, so
//! every writer locks the same inode), finds the chain head, writes one line with
//! a single `write(2)` on an `O_APPEND` descriptor (flushed: no user-space buffer),
//! then records the head with the caller's [`HeadStore`].
//!
//! logrotate `copytruncate` is also safe: after a truncation the file is empty,
//! so the head comes from the store and the next line links across the cut.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::chain::{seal, Head};

/// Rotate when the live file grows past this many bytes.
pub const ROTATE_BYTES: u64 = 32 << 20;
/// Rotated files kept (`FILE.1` newest … `FILE.N` oldest).
pub const KEEP_ROTATED: usize = 9;

/// Where the chain head is recorded besides the file (the peer store), so a cut
/// tail is detectable.
pub trait HeadStore {
    /// # Errors
    /// The store cannot be read.
    fn audit_head(&self) -> Result<Option<Head>, String>;
    /// # Errors
    /// The store cannot be written.
    fn set_audit_head(&self, head: &Head) -> Result<(), String>;
}

/// No store: the file alone carries the chain (tests, `verify FILE`).
pub struct NoStore;

impl HeadStore for NoStore {
    fn audit_head(&self) -> Result<Option<Head>, String> {
        Ok(None)
    }
    fn set_audit_head(&self, _: &Head) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit log head in the peer store: {0}")]
    Store(String),
}

/// Appends sealed records to one audit file.
#[derive(Debug, Clone)]
pub struct AuditWriter {
    path: PathBuf,
    rotate_bytes: u64,
}

impl AuditWriter {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            rotate_bytes: ROTATE_BYTES,
        }
    }

    /// Overrides the rotation size (tests).
    pub fn with_rotate_bytes(mut self, bytes: u64) -> Self {
        self.rotate_bytes = bytes;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> AuditError {
        AuditError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Seals and appends one record now.
    ///
    /// # Errors
    /// The file cannot be locked, read or written, or the store head not updated.
    pub fn append(
        &self,
        heads: &dyn HeadStore,
        event: &str,
        fields: &Map<String, Value>,
    ) -> Result<Head, AuditError> {
        let ts = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
        self.append_at(heads, &ts, event, fields)
    }

    /// [`Self::append`] with the timestamp given (the record's own event time).
    ///
    /// # Errors
    /// As [`Self::append`].
    pub fn append_at(
        &self,
        heads: &dyn HeadStore,
        ts: &str,
        event: &str,
        fields: &Map<String, Value>,
    ) -> Result<Head, AuditError> {
        self.append_batch(heads, &[(ts, event, fields)])
    }

    /// Appends several records as one group commit: one lock, one look at the
    /// head, the lines chained in order and written with a single `write(2)`,
    /// then one head update in the store. A burst of events (a thousand sites
    /// renewing their sessions) costs one store transaction, not one each.
    /// The store's head may trail the file by the batch after a crash between
    /// the write and its update, which the next append already handles (the
    /// longer record wins).
    ///
    /// # Errors
    /// As [`Self::append`]. Nothing is written when the head cannot be found.
    pub fn append_batch(
        &self,
        heads: &dyn HeadStore,
        records: &[(&str, &str, &Map<String, Value>)],
    ) -> Result<Head, AuditError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        }
        let lock = open_private(&lock_path(&self.path), false).map_err(|e| self.io(e))?;
        // Held until this function returns: the guard unlocks on drop.
        let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| self.io(e.into()))?;
        let mut file = open_private(&self.path, true).map_err(|e| self.io(e))?;
        let from_file = tail_head(&mut file).map_err(|e| self.io(e))?;
        let from_store = heads.audit_head().map_err(AuditError::Store)?;
        // The longer record wins: the file may be ahead after a crash between
        // write and store update; a file cut short must not hide the cut, so its
        // next line chains onto the store's head and fails verification there.
        let mut head = match (from_file, from_store) {
            (Some(f), Some(s)) if f.seq > s.seq => f,
            (_, Some(s)) => s,
            (Some(f), None) => f,
            (None, None) => Head::genesis(),
        };
        let mut lines = String::new();
        for (ts, event, fields) in records {
            let sealed = seal(&head, ts, event, fields);
            lines.push_str(&sealed.line);
            lines.push('\n');
            head = sealed.head;
        }
        file.write_all(lines.as_bytes()).map_err(|e| self.io(e))?;
        heads.set_audit_head(&head).map_err(AuditError::Store)?;
        let size = file.metadata().map_err(|e| self.io(e))?.len();
        if size >= self.rotate_bytes {
            rotate(&self.path).map_err(|e| self.io(e))?;
        }
        Ok(head)
    }
}

pub fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// `FILE.N` for a rotated generation.
pub fn rotated_path(path: &Path, n: usize) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

/// The files of the chain, oldest first, that exist now.
pub fn chain_files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..=KEEP_ROTATED)
        .rev()
        .map(|n| rotated_path(path, n))
        .filter(|p| p.exists())
        .collect();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    files
}

/// Opens (creating 0600 if missing) an audit file. A file that root creates
/// (an admin command's append, or its rotation) takes its directory's owner,
/// as SQLite does for `-wal` files: when the daemon runs as `[daemon] user`,
/// that directory is the user's, and the daemon must go on appending.
fn open_private(path: &Path, append: bool) -> std::io::Result<File> {
    let open = |create_new: bool| {
        OpenOptions::new()
            .read(true)
            .write(!append)
            .append(append)
            .create(!create_new)
            .create_new(create_new)
            .truncate(false)
            .mode(0o600)
            .open(path)
    };
    match open(true) {
        Ok(file) => {
            give_to_directory_owner(path, &file)?;
            Ok(file)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => open(false),
        Err(e) => Err(e),
    }
}

/// See [`open_private`]; nothing to do unless running as root in a directory
/// owned by someone else.
fn give_to_directory_owner(path: &Path, file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let meta = std::fs::metadata(dir)?;
    if meta.uid() == 0 {
        return Ok(());
    }
    nix::unistd::fchown(
        file.as_raw_fd(),
        Some(nix::unistd::Uid::from_raw(meta.uid())),
        Some(nix::unistd::Gid::from_raw(meta.gid())),
    )
    .map_err(std::io::Error::from)
}

fn rotate(path: &Path) -> std::io::Result<()> {
    for n in (1..KEEP_ROTATED).rev() {
        let from = rotated_path(path, n);
        if from.exists() {
            std::fs::rename(&from, rotated_path(path, n + 1))?;
        }
    }
    std::fs::rename(path, rotated_path(path, 1))
}

/// The head claimed by the file's last complete line, if any.
fn tail_head(file: &mut File) -> std::io::Result<Option<Head>> {
    const TAIL: u64 = 64 * 1024;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
    let mut buf = Vec::with_capacity(TAIL as usize);
    file.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let last = text.lines().rev().find(|l| !l.trim().is_empty());
    Ok(last.and_then(|l| {
        let v: Value = serde_json::from_str(l).ok()?;
        Some(Head {
            seq: v.get("seq")?.as_u64()?,
            hash: v.get("hash")?.as_str()?.to_string(),
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::super::verify::verify;
    use super::*;
    use std::cell::RefCell;

    struct MemStore(RefCell<Option<Head>>);
    impl HeadStore for MemStore {
        fn audit_head(&self) -> Result<Option<Head>, String> {
            Ok(self.0.borrow().clone())
        }
        fn set_audit_head(&self, head: &Head) -> Result<(), String> {
            *self.0.borrow_mut() = Some(head.clone());
            Ok(())
        }
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sg-audit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn read_chain(path: &Path) -> Vec<String> {
        chain_files(path)
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Appends chain; rotated files continue the chain; the store holds the head.
    #[test]
    fn append_rotate_verify() {
        let d = tmpdir("rot");
        let path = d.join("audit.jsonl");
        let store = MemStore(RefCell::new(None));
        let w = AuditWriter::new(&path).with_rotate_bytes(600);
        let mut head = Head::genesis();
        for i in 0..20 {
            let mut f = Map::new();
            f.insert("i".into(), i.into());
            head = w.append(&store, "peer_added", &f).unwrap();
        }
        assert!(rotated_path(&path, 1).exists(), "rotation happened");
        let lines = read_chain(&path);
        let v = verify(lines.iter().map(String::as_str), Some(&Head::genesis()), 1).unwrap();
        assert_eq!(v.end, head);
        assert_eq!(store.0.borrow().clone(), Some(head));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// After a copytruncate the next line links to the store's head.
    #[test]
    fn copytruncate_links_via_store() {
        let d = tmpdir("ct");
        let path = d.join("audit.jsonl");
        let store = MemStore(RefCell::new(None));
        let w = AuditWriter::new(&path);
        for _ in 0..3 {
            w.append(&store, "x", &Map::new()).unwrap();
        }
        let old = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, "").unwrap();
        w.append(&store, "y", &Map::new()).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        let all: Vec<&str> = old.lines().chain(new.lines()).collect();
        let v = verify(all, Some(&Head::genesis()), 1).unwrap();
        assert_eq!(v.end.seq, 4);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A batch chains its records in order and leaves the store at its last head.
    #[test]
    fn batch_is_one_chain() {
        let d = tmpdir("batch");
        let path = d.join("audit.jsonl");
        let store = MemStore(RefCell::new(None));
        let w = AuditWriter::new(&path);
        w.append(&store, "first", &Map::new()).unwrap();
        let fields: Vec<Map<String, Value>> = (0..50)
            .map(|i| {
                let mut f = Map::new();
                f.insert("i".into(), i.into());
                f
            })
            .collect();
        let records: Vec<(&str, &str, &Map<String, Value>)> = fields
            .iter()
            .map(|f| ("2026-11-27T00:00:00Z", "handshake", f))
            .collect();
        let head = w.append_batch(&store, &records).unwrap();
        w.append(&store, "last", &Map::new()).unwrap();
        let lines = read_chain(&path);
        assert_eq!(lines.len(), 52);
        assert!(lines[1].contains(r#""i":0"#) && lines[50].contains(r#""i":49"#));
        let v = verify(lines.iter().map(String::as_str), Some(&Head::genesis()), 1).unwrap();
        assert_eq!(v.lines, 52);
        assert_eq!(head.seq, 51);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Concurrent writers in threads never fork the chain.
    #[test]
    fn concurrent_writers_one_chain() {
        let d = tmpdir("conc");
        let path = d.join("audit.jsonl");
        std::thread::scope(|s| {
            for t in 0..4 {
                let path = path.clone();
                s.spawn(move || {
                    let w = AuditWriter::new(&path);
                    for i in 0..25 {
                        let mut f = Map::new();
                        f.insert("t".into(), t.into());
                        f.insert("i".into(), i.into());
                        w.append(&NoStore, "x", &f).unwrap();
                    }
                });
            }
        });
        let lines = read_chain(&path);
        let v = verify(lines.iter().map(String::as_str), Some(&Head::genesis()), 1).unwrap();
        assert_eq!(v.lines, 100);
        let _ = std::fs::remove_dir_all(&d);
    }
}
