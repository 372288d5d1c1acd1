//! Appending to the audit log: one chain however many processes write (the
//! daemon and admin commands run while it is down), crash-safe ordering, and
//! size-based rotation whose new file links to the old file's last hash.
//!
//! Each append takes an exclusive `flock` on `FILE.lock` (never rotated, so
//! every writer locks the same inode), finds the chain head, writes its lines
//! with a single `write(2)` on an `O_APPEND` descriptor, `fdatasync`s them, and
//! only then records the head with the caller's [`HeadStore`]: the store never
//! names a line that a crash could still take back.
//!
//! The head is adopted from the file only after the last line verifies (its
//! HMAC when keyed, see [`super::chain`]):
//! - bytes after the last newline are a torn append (a writer died mid-write,
//!   before its fsync and before the store moved): they are cut off, and the
//!   first record of this append, `audit_tail_repaired`, says how many bytes went;
//! - a complete last line that does not verify (edited, forged, not JSON, keyed
//!   while this writer has no key, or plain SHA-256 ahead of the store's head
//!   while this writer is keyed) is [`AuditError::Broken`]: the writer refuses
//!   to extend a chain it cannot vouch for, and the daemon logs it as
//!   `audit_chain_broken`. Moving the file aside (kept as evidence) lets the next
//!   line start a new file linked to the store's head.
//!
//! logrotate `copytruncate` is also safe: after a truncation the file is empty,
//! so the head comes from the store and the next line links across the cut.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::chain::{seal, AuditKey, Head, Sealed};
use super::verify::{check_line, Fault};

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
    /// Records `head`, the head after `appended` (the lines just made
    /// durable in the file, in order): a store that keeps the lines themselves
    /// (the shared registry's audit table) takes them from there.
    ///
    /// # Errors
    /// The store cannot be written.
    fn set_audit_head(&self, head: &Head, appended: &[Sealed]) -> Result<(), String>;
    /// Called when the writer has been idle a while: a store that holds back
    /// lines it could not take (the shared registry during an outage) tries
    /// them again, so they do not wait for the next event.
    fn retry_pending(&self) {}
}

/// No store: the file alone carries the chain (tests, `verify FILE`).
pub struct NoStore;

impl HeadStore for NoStore {
    fn audit_head(&self) -> Result<Option<Head>, String> {
        Ok(None)
    }
    fn set_audit_head(&self, _: &Head, _: &[Sealed]) -> Result<(), String> {
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
    /// The file's last line does not verify; nothing was appended.
    #[error("audit log {path}: audit_chain_broken: {reason}; refusing to extend it (move the file aside to start a new file linked to the store's head)")]
    Broken { path: PathBuf, reason: String },
    #[error(transparent)]
    Key(#[from] crate::seal::SealError),
}

/// Appends sealed records to one audit file.
#[derive(Debug, Clone)]
pub struct AuditWriter {
    path: PathBuf,
    rotate_bytes: u64,
    /// Keys the chain (HMAC-SHA256) when a seal key is configured.
    key: Option<Arc<AuditKey>>,
}

impl AuditWriter {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            rotate_bytes: ROTATE_BYTES,
            key: None,
        }
    }

    /// Keys the lines this writer seals (`None`: plain SHA-256).
    pub fn with_key(mut self, key: Option<AuditKey>) -> Self {
        self.key = key.map(Arc::new);
        self
    }

    /// Overrides the rotation size (tests).
    pub fn with_rotate_bytes(mut self, bytes: u64) -> Self {
        self.rotate_bytes = bytes;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn broken(&self, reason: String) -> AuditError {
        AuditError::Broken {
            path: self.path.clone(),
            reason,
        }
    }

    /// The head the file's last complete line claims, once it verifies and may
    /// be linked to by this writer (see the module doc for what is refused).
    fn adopt(&self, line: &[u8], store: Option<&Head>) -> Result<Head, AuditError> {
        let l = match check_line(line, self.key.as_deref()) {
            Ok(l) => l,
            Err(Fault::KeyNeeded) => {
                return Err(self.broken(
                    "its last line is keyed (hmac-sha256) but no [daemon] seal_key_file is configured, and a keyed chain takes only keyed lines".into(),
                ))
            }
            Err(fault) => return Err(self.broken(format!("its last line: {fault}"))),
        };
        if self.key.is_some() && !l.keyed {
            // Plain SHA-256 before the first keyed line is the switch-over from an
            // unkeyed deployment, but only at a head the store vouches for: a plain
            // line ahead of the store was written by someone without the key.
            if let Some(s) = store {
                if l.seq > s.seq {
                    return Err(self.broken(format!(
                        "its last line (seq {}) is plain SHA-256 and ahead of the head the store recorded (seq {}): appended without the seal key",
                        l.seq, s.seq
                    )));
                }
            }
        }
        Ok(l.head())
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
        self.append_at(heads, &now_rfc3339(), event, fields)
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
    /// one `fdatasync`, then one head update in the store. A burst of events (a
    /// thousand sites renewing their sessions) costs one fsync and one store
    /// transaction, not one each. The store's head may trail the file by the
    /// batch after a crash between the fsync and its update, which the next
    /// append already handles (the longer record wins).
    ///
    /// # Errors
    /// As [`Self::append`]; [`AuditError::Broken`] when the file's last line does
    /// not verify. Nothing is written when the head cannot be found.
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
        let tail = scan_tail(&mut file).map_err(|e| self.io(e))?;
        let from_store = heads.audit_head().map_err(AuditError::Store)?;
        let from_file = match &tail.last {
            Some(line) => Some(self.adopt(line, from_store.as_ref())?),
            None if tail.keep > 0 => {
                return Err(self.broken(format!(
                    "its last line is longer than {TAIL_BYTES} bytes, which no writer produces"
                )))
            }
            None => None,
        };
        // A torn append is cut off; the cut is the first record of this append.
        let repair = if tail.torn > 0 {
            file.set_len(tail.keep).map_err(|e| self.io(e))?;
            let mut f = Map::new();
            f.insert("discarded_bytes".into(), tail.torn.into());
            f.insert("reason".into(), "torn append (no newline)".into());
            Some((now_rfc3339(), f))
        } else {
            None
        };
        // The longer record wins: the file may be ahead after a crash between
        // fsync and store update; a file cut short must not hide the cut, so its
        // next line chains onto the store's head and fails verification there.
        let mut head = match (from_file, from_store) {
            (Some(f), Some(s)) if f.seq > s.seq => f,
            (_, Some(s)) => s,
            (Some(f), None) => f,
            (None, None) => Head::genesis(),
        };
        let key = self.key.as_deref();
        let mut lines = String::new();
        let mut appended = Vec::with_capacity(records.len() + 1);
        let repair = repair
            .as_ref()
            .map(|(ts, f)| (ts.as_str(), "audit_tail_repaired", f));
        for (ts, event, fields) in repair.into_iter().chain(records.iter().copied()) {
            let sealed = seal(&head, ts, event, fields, key);
            lines.push_str(&sealed.line);
            lines.push('\n');
            head = sealed.head.clone();
            appended.push(sealed);
        }
        file.write_all(lines.as_bytes()).map_err(|e| self.io(e))?;
        // Durable before the store names it: a head in the store is a promise
        // that the line is on disk.
        file.sync_data().map_err(|e| self.io(e))?;
        if tail.keep == 0 {
            // A new (or emptied) file: its directory entry must survive too.
            sync_parent(&self.path).map_err(|e| self.io(e))?;
        }
        heads
            .set_audit_head(&head, &appended)
            .map_err(AuditError::Store)?;
        let size = file.metadata().map_err(|e| self.io(e))?.len();
        if size >= self.rotate_bytes {
            rotate(&self.path).map_err(|e| self.io(e))?;
            sync_parent(&self.path).map_err(|e| self.io(e))?;
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

fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// Makes a new or renamed directory entry durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

/// How far back the tail is read: far more than any line.
const TAIL_BYTES: u64 = 64 * 1024;

/// The end of the file as the writer needs it.
#[derive(Debug, Default)]
struct Tail {
    /// The last newline-terminated line, without its newline.
    last: Option<Vec<u8>>,
    /// Bytes up to and including the last newline (what stays).
    keep: u64,
    /// Bytes after the last newline: a torn append.
    torn: u64,
}

fn scan_tail(file: &mut File) -> std::io::Result<Tail> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Tail::default());
    }
    let from = len.saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::with_capacity(usize::try_from(len - from).unwrap_or(0));
    file.read_to_end(&mut buf)?;
    let Some(nl) = buf.iter().rposition(|b| *b == b'\n') else {
        // No newline in reach: the whole file is torn, or one line is too long.
        return Ok(if from == 0 {
            Tail {
                last: None,
                keep: 0,
                torn: len,
            }
        } else {
            Tail {
                last: None,
                keep: len,
                torn: 0,
            }
        });
    };
    let keep = from + nl as u64 + 1;
    let line_start = match buf[..nl].iter().rposition(|b| *b == b'\n') {
        Some(p) => p + 1,
        // The line may begin before the window unless the window is the file.
        None if from > 0 => {
            return Ok(Tail {
                last: None,
                keep,
                torn: 0,
            })
        }
        None => 0,
    };
    Ok(Tail {
        last: Some(buf[line_start..nl].to_vec()),
        keep,
        torn: len - keep,
    })
}

#[cfg(test)]
mod tests {
    use super::super::verify::{verify, Verified};
    use super::*;
    use std::cell::RefCell;

    struct MemStore(RefCell<Option<Head>>);
    impl HeadStore for MemStore {
        fn audit_head(&self) -> Result<Option<Head>, String> {
            Ok(self.0.borrow().clone())
        }
        fn set_audit_head(&self, head: &Head, _: &[Sealed]) -> Result<(), String> {
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
        let v = verify(
            lines.iter().map(String::as_str),
            Some(&Head::genesis()),
            None,
            1,
        )
        .unwrap();
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
        let v = verify(all, Some(&Head::genesis()), None, 1).unwrap();
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
        let v = verify(
            lines.iter().map(String::as_str),
            Some(&Head::genesis()),
            None,
            1,
        )
        .unwrap();
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
        let v = verify(
            lines.iter().map(String::as_str),
            Some(&Head::genesis()),
            None,
            1,
        )
        .unwrap();
        assert_eq!(v.lines, 100);
        let _ = std::fs::remove_dir_all(&d);
    }

    fn key(b: u8) -> AuditKey {
        AuditKey::new(zeroize::Zeroizing::new([b; 32]))
    }

    fn store() -> MemStore {
        MemStore(RefCell::new(None))
    }

    fn append_n(w: &AuditWriter, s: &MemStore, n: usize) -> Head {
        let mut head = Head::genesis();
        for i in 0..n {
            let mut f = Map::new();
            f.insert("i".into(), i.into());
            head = w.append(s, "x", &f).unwrap();
        }
        head
    }

    fn verify_file(path: &Path, k: Option<&AuditKey>) -> Verified {
        let lines = read_chain(path);
        verify(
            lines.iter().map(String::as_str),
            Some(&Head::genesis()),
            k,
            1,
        )
        .unwrap()
    }

    fn push(path: &Path, bytes: &[u8]) {
        let mut f = OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    /// A keyed writer seals every line with the HMAC; the chain verifies only
    /// with that key.
    #[test]
    fn keyed_writer_chain() {
        let d = tmpdir("keyed");
        let path = d.join("audit.jsonl");
        let s = store();
        let w = AuditWriter::new(&path).with_key(Some(key(4)));
        let head = append_n(&w, &s, 5);
        let v = verify_file(&path, Some(&key(4)));
        assert_eq!((v.end.clone(), v.keyed_since), (head, Some(1)));
        let lines = read_chain(&path);
        assert!(verify(lines.iter().map(String::as_str), None, None, 1).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Bytes after the last newline (a writer killed mid-write) are cut off; the
    /// next line links to the last whole line and records the repair.
    #[test]
    fn torn_tail_is_cut_and_recorded() {
        let d = tmpdir("torn");
        let path = d.join("audit.jsonl");
        let s = store();
        let w = AuditWriter::new(&path).with_key(Some(key(4)));
        append_n(&w, &s, 3);
        let fragment = b"{\"ts\":\"2026-01-01T00:00:00Z\",\"seq\":4,\"ev";
        push(&path, fragment);
        let head = w.append(&s, "after", &Map::new()).unwrap();
        let v = verify_file(&path, Some(&key(4)));
        assert_eq!((v.lines, v.end.clone()), (5, head));
        let lines = read_chain(&path);
        assert!(
            lines[3].contains("\"event\":\"audit_tail_repaired\""),
            "{}",
            lines[3]
        );
        let discarded = format!("\"discarded_bytes\":{}", fragment.len());
        assert!(lines[3].contains(&discarded), "{}", lines[3]);
        // A file that is nothing but a torn first line starts over at genesis.
        std::fs::write(&path, b"{\"ts\"").unwrap();
        let fresh = AuditWriter::new(&path);
        fresh.append(&NoStore, "y", &Map::new()).unwrap();
        assert_eq!(verify_file(&path, None).lines, 2);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A complete last line that does not verify is never adopted: the writer
    /// refuses (`audit_chain_broken`) and leaves the file as it was.
    #[test]
    fn broken_tail_refused() {
        let d = tmpdir("broken");
        let path = d.join("audit.jsonl");
        let s = store();
        let w = AuditWriter::new(&path).with_key(Some(key(4)));
        let head = append_n(&w, &s, 3);
        let good = std::fs::read(&path).unwrap();
        let forged_hmac = seal(&head, "t", "forged", &Map::new(), Some(&key(5)));
        let forged_plain = seal(&head, "t", "forged", &Map::new(), None);
        let cases: [(&str, String, &str); 4] = [
            ("wrong key", forged_hmac.line, "HMAC does not match"),
            (
                "plain after keyed",
                forged_plain.line,
                "plain SHA-256 and ahead",
            ),
            ("not JSON", "garbage".into(), "not a JSON audit record"),
            (
                "edited",
                String::from_utf8(good.clone())
                    .unwrap()
                    .lines()
                    .last()
                    .unwrap()
                    .replace("\"i\":2", "\"i\":8"),
                "HMAC does not match",
            ),
        ];
        for (what, line, needle) in cases {
            std::fs::write(&path, &good).unwrap();
            push(&path, format!("{line}\n").as_bytes());
            let before = std::fs::read(&path).unwrap();
            let e = w.append(&s, "x", &Map::new()).unwrap_err();
            assert!(matches!(e, AuditError::Broken { .. }), "{what}: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains("audit_chain_broken") && msg.contains(needle),
                "{what}: {msg}"
            );
            assert_eq!(
                std::fs::read(&path).unwrap(),
                before,
                "{what}: file changed"
            );
            assert_eq!(
                s.0.borrow().clone(),
                Some(head.clone()),
                "{what}: store moved"
            );
        }
        // A writer without the key refuses a keyed chain rather than mix in plain lines.
        std::fs::write(&path, &good).unwrap();
        let e = AuditWriter::new(&path)
            .append(&s, "x", &Map::new())
            .unwrap_err();
        assert!(e.to_string().contains("no [daemon] seal_key_file"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Adding a seal key to a running deployment: the first keyed line links to
    /// the unkeyed head the store vouches for, and the chain is keyed from there.
    #[test]
    fn switch_over_links_to_unkeyed_head() {
        let d = tmpdir("switch");
        let path = d.join("audit.jsonl");
        let s = store();
        let plain = append_n(&AuditWriter::new(&path), &s, 3);
        let w = AuditWriter::new(&path).with_key(Some(key(6)));
        append_n(&w, &s, 2);
        let v = verify_file(&path, Some(&key(6)));
        assert_eq!((v.lines, v.keyed_since), (5, Some(4)));
        let lines = read_chain(&path);
        assert!(lines[3].contains(&format!("\"prev\":\"{}\"", plain.hash)));
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Each append is on disk before the store's head names it: a store whose
    /// update fails leaves a line the next append adopts (the file is ahead).
    #[test]
    fn file_ahead_of_failed_store_is_adopted() {
        struct Failing(RefCell<Option<Head>>, RefCell<bool>);
        impl HeadStore for Failing {
            fn audit_head(&self) -> Result<Option<Head>, String> {
                Ok(self.0.borrow().clone())
            }
            fn set_audit_head(&self, head: &Head, _: &[Sealed]) -> Result<(), String> {
                if *self.1.borrow() {
                    return Err("store down".into());
                }
                *self.0.borrow_mut() = Some(head.clone());
                Ok(())
            }
        }
        let d = tmpdir("ahead");
        let path = d.join("audit.jsonl");
        let s = Failing(RefCell::new(None), RefCell::new(false));
        let w = AuditWriter::new(&path).with_key(Some(key(2)));
        w.append(&s, "a", &Map::new()).unwrap();
        *s.1.borrow_mut() = true;
        assert!(matches!(
            w.append(&s, "b", &Map::new()),
            Err(AuditError::Store(_))
        ));
        *s.1.borrow_mut() = false;
        let head = w.append(&s, "c", &Map::new()).unwrap();
        assert_eq!(head.seq, 3);
        assert_eq!(verify_file(&path, Some(&key(2))).end, head);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A last line longer than any writer produces is refused, not guessed at.
    #[test]
    fn overlong_tail_refused() {
        let d = tmpdir("long");
        let path = d.join("audit.jsonl");
        let long = "x".repeat(usize::try_from(TAIL_BYTES).unwrap() + 10);
        for text in [format!("{long}\n"), long.clone()] {
            std::fs::write(&path, &text).unwrap();
            let e = AuditWriter::new(&path)
                .append(&NoStore, "x", &Map::new())
                .unwrap_err();
            assert!(e.to_string().contains("longer than"), "{e}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
