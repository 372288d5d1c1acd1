//! The privilege drop (`[daemon] user`): the daemon creates everything that
//! needs root first (TUN, sockets, firewall table, sysctls, key reads), then
//! becomes the user, keeping only [`KEPT`] in its permitted and effective sets.
//!
//! Order matters, and [`drop_to`] refuses to run otherwise: Linux credentials
//! are per thread at the syscall level (glibc broadcasts `setresuid` to every
//! thread, but `capset` applies to the calling thread only), so the drop runs
//! while the process has exactly one thread, and every thread started later
//! inherits the reduced credentials.
//!
//! What the dropped daemon still needs, and who provides it:
//! - the store and the audit log: [`prepare_state`] (as root, before the drop)
//!   hands the files to the user and checks that their directories are
//!   writable by it (SQLite creates `-wal`/`-shm`, audit rotation renames);
//! - removing the nftables table at stop: `CAP_NET_ADMIN`, kept, over netlink
//!   (`firewall::apply`), since an `nft` child would not inherit it;
//! - removing the socket files at stop from root-owned directories: a
//!   [`Cleanup`] helper forked before the drop (uid 0, no capabilities).
//!
//! Nothing binds after the drop (UDP, UAPI, control and API sockets are all
//! bound before it), so `CAP_NET_BIND_SERVICE` is not kept.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Uid};

use crate::config::{Config, StoreConfig};

/// The capabilities the daemon keeps: removing its firewall table at stop.
pub const KEPT: &[Capability] = &[Capability::CAP_NET_ADMIN];

/// Errors of the privilege drop; each names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("daemon.user = \"{0}\": no such user (create it, e.g. `useradd --system --no-create-home {0}`, or remove the key)")]
    NoSuchUser(String),
    #[error("daemon.user = \"{user}\": cannot look the user up: {error}")]
    Lookup { user: String, error: nix::Error },
    #[error("daemon.user = \"{user}\": `sitegate run` was started as uid {uid}, not root, so it cannot switch to that user; start it as root or as {user}")]
    NotRoot { user: String, uid: u32 },
    #[error("daemon.user = \"{user}\": {dir} must be writable by {user} ({why}); fix: `chown {user} {dir}`")]
    DirNotWritable {
        user: String,
        dir: String,
        why: &'static str,
    },
    #[error("daemon.user = \"{user}\": {dir} is not reachable by {user}: {ancestor} is not searchable by it; fix: `chmod o+x {ancestor}`")]
    DirNotReachable {
        user: String,
        dir: String,
        ancestor: String,
    },
    #[error("daemon.user = \"{user}\": cannot hand {path} to the user: {why}")]
    Chown {
        user: String,
        path: String,
        why: String,
    },
    #[error("the privilege drop must run while the daemon has one thread, but it has {0}")]
    Threads(usize),
    #[error("privilege drop failed at {step}: {error}")]
    Step { step: &'static str, error: String },
}

fn step(step: &'static str) -> impl FnOnce(String) -> PrivilegeError {
    move |error| PrivilegeError::Step { step, error }
}

/// The account `[daemon] user` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl Target {
    /// Looks `user` up (its primary group becomes the daemon's only group).
    ///
    /// # Errors
    /// The user does not exist or the lookup fails, naming `daemon.user`.
    pub fn resolve(user: &str) -> Result<Target, PrivilegeError> {
        match nix::unistd::User::from_name(user) {
            Ok(Some(u)) => Ok(Target {
                name: u.name,
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
            }),
            Ok(None) => Err(PrivilegeError::NoSuchUser(user.to_string())),
            Err(error) => Err(PrivilegeError::Lookup {
                user: user.to_string(),
                error,
            }),
        }
    }

    /// What the daemon will do with this user, started as `euid`: switch
    /// (root), only shed capabilities (already that user), or refuse.
    ///
    /// # Errors
    /// [`PrivilegeError::NotRoot`]: started as another, unprivileged user.
    pub fn plan(&self, euid: u32) -> Result<Plan, PrivilegeError> {
        match euid {
            0 if self.uid != 0 => Ok(Plan::Switch),
            e if e == self.uid => Ok(Plan::Shed),
            uid => Err(PrivilegeError::NotRoot {
                user: self.name.clone(),
                uid,
            }),
        }
    }
}

/// How the drop goes for a given start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Started as root: become the user, with a cleanup helper for the sockets.
    Switch,
    /// Started as the user already (e.g. systemd `User=` with ambient
    /// capabilities): keep the uid, shed every capability but [`KEPT`].
    Shed,
}

/// [`KEPT`] as a bit mask, as `/proc/PID/status` prints `CapEff`.
pub fn kept_mask() -> u64 {
    KEPT.iter().fold(0, |m, c| m | c.bitmask())
}

/// The names of [`KEPT`], comma-separated, for the log.
pub fn kept_names() -> String {
    KEPT.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether a directory with `mode`, owned by `owner:group`, lets `uid:gid`
/// (with no other groups: the drop sets only the primary group) do `bits`
/// (`0o2` write, `0o1` search, as in the "other" triplet).
pub fn permits(mode: u32, owner: u32, group: u32, uid: u32, gid: u32, bits: u32) -> bool {
    let triplet = if uid == owner {
        mode >> 6
    } else if gid == group {
        mode >> 3
    } else {
        mode
    };
    triplet & bits == bits
}

/// The directories the dropped daemon writes into: the store's and the audit
/// log's (where it exists or will be created).
fn state_dirs(cfg: &Config) -> Vec<(PathBuf, &'static str)> {
    let mut dirs = Vec::new();
    if let StoreConfig::Sqlite { path } = &cfg.store {
        if let Some(d) = path.parent() {
            dirs.push((
                d.to_path_buf(),
                "SQLite creates the store's -wal and -shm files there",
            ));
        }
    }
    if let Some(path) = &cfg.log.audit_file {
        if let Some(d) = path.parent() {
            dirs.push((
                d.to_path_buf(),
                "the audit log is appended and rotated there",
            ));
        }
    }
    dirs
}

/// The files the dropped daemon writes: the store with its `-wal`/`-shm`,
/// the audit log with its lock and rotated generations (those that exist).
fn state_files(cfg: &Config) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let StoreConfig::Sqlite { path } = &cfg.store {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            files.push(PathBuf::from(p));
        }
    }
    if let Some(path) = &cfg.log.audit_file {
        files.push(crate::audit::writer::lock_path(path));
        files.extend(crate::audit::writer::chain_files(path));
    }
    files
        .into_iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .collect()
}

/// Checks, as root, that `target` can reach and write the state directories.
///
/// # Errors
/// The first directory that is not writable or not reachable, with the fix.
pub fn check_state_dirs(cfg: &Config, target: &Target) -> Result<(), PrivilegeError> {
    for (dir, why) in state_dirs(cfg) {
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let meta = std::fs::metadata(&dir).map_err(|e| PrivilegeError::DirNotWritable {
            user: target.name.clone(),
            dir: dir.display().to_string(),
            why: if e.kind() == std::io::ErrorKind::NotFound {
                "it does not exist"
            } else {
                why
            },
        })?;
        if !permits(
            meta.mode(),
            meta.uid(),
            meta.gid(),
            target.uid,
            target.gid,
            0o3,
        ) {
            return Err(PrivilegeError::DirNotWritable {
                user: target.name.clone(),
                dir: dir.display().to_string(),
                why,
            });
        }
        for ancestor in dir.ancestors().skip(1) {
            let Ok(m) = std::fs::metadata(ancestor) else {
                continue;
            };
            if !permits(m.mode(), m.uid(), m.gid(), target.uid, target.gid, 0o1) {
                return Err(PrivilegeError::DirNotReachable {
                    user: target.name.clone(),
                    dir: dir.display().to_string(),
                    ancestor: ancestor.display().to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Hands `path` to `target` unless it is not a plain file with one link: the
/// directory is the user's, so a symlink or hard link planted there must not
/// make root chown something else. Opened without following links, changed
/// through the descriptor.
///
/// # Errors
/// The file is not a plain single-link file, or cannot be opened or changed.
pub fn chown_state_file(path: &Path, target: &Target) -> Result<(), PrivilegeError> {
    let err = |why: String| PrivilegeError::Chown {
        user: target.name.clone(),
        path: path.display().to_string(),
        why,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(err(
            "it is not a plain file with a single link; move it away and restart".into(),
        ));
    }
    if meta.uid() == target.uid && meta.gid() == target.gid {
        return Ok(());
    }
    nix::unistd::fchown(
        file.as_raw_fd(),
        Some(Uid::from_raw(target.uid)),
        Some(Gid::from_raw(target.gid)),
    )
    .map_err(|e| err(e.to_string()))
}

/// Before the drop, as root: checks the state directories and hands every
/// existing state file to `target`, so that the daemon can still read the
/// store (it reopens it for every read) and append the audit log.
///
/// # Errors
/// As [`check_state_dirs`] and [`chown_state_file`].
pub fn prepare_state(cfg: &Config, target: &Target) -> Result<(), PrivilegeError> {
    check_state_dirs(cfg, target)?;
    for f in state_files(cfg) {
        chown_state_file(&f, target)?;
    }
    Ok(())
}

/// Threads of this process, from `/proc/self/task`.
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

/// Refuses unless this process has a single thread (see the module doc).
fn single_threaded() -> Result<(), PrivilegeError> {
    match thread_count() {
        1 => Ok(()),
        n => Err(PrivilegeError::Threads(n)),
    }
}

fn kept_set() -> CapsHashSet {
    KEPT.iter().copied().collect()
}

/// Empties the bounding set down to `keep` (needs `CAP_SETPCAP`).
fn shrink_bounding(keep: &CapsHashSet) -> Result<(), PrivilegeError> {
    for c in caps::all() {
        if !keep.contains(&c) && caps::has_cap(None, CapSet::Bounding, c).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, c)
                .map_err(|e| step("bounding set")(e.to_string()))?;
        }
    }
    Ok(())
}

/// What the drop did, for the `privileges_dropped` event.
#[derive(Debug, Clone)]
pub struct Dropped {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// Kept capabilities, comma-separated.
    pub caps: String,
}

/// Switches this (single-threaded) process to `target` per `plan`: one group,
/// permitted = effective = [`KEPT`] (what of it the process has), inheritable
/// and ambient empty, bounding set reduced, `no_new_privs`. Then verifies.
///
/// # Errors
/// More than one thread, or any step refused by the kernel; the process must
/// then exit (its credentials may be half changed).
pub fn drop_to(target: &Target, plan: Plan) -> Result<Dropped, PrivilegeError> {
    single_threaded()?;
    let kept: CapsHashSet = match plan {
        Plan::Switch => kept_set(),
        // Already the user: keep what of KEPT it was given, nothing more.
        Plan::Shed => caps::read(None, CapSet::Permitted)
            .map_err(|e| step("reading capabilities")(e.to_string()))?
            .intersection(&kept_set())
            .copied()
            .collect(),
    };
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        shrink_bounding(&kept)?;
    }
    if plan == Plan::Switch {
        let (uid, gid) = (Uid::from_raw(target.uid), Gid::from_raw(target.gid));
        caps::securebits::set_keepcaps(true).map_err(|e| step("PR_SET_KEEPCAPS")(e.to_string()))?;
        nix::unistd::setgroups(&[gid]).map_err(|e| step("setgroups")(e.to_string()))?;
        nix::unistd::setresgid(gid, gid, gid).map_err(|e| step("setresgid")(e.to_string()))?;
        nix::unistd::setresuid(uid, uid, uid).map_err(|e| step("setresuid")(e.to_string()))?;
        caps::securebits::set_keepcaps(false)
            .map_err(|e| step("PR_SET_KEEPCAPS")(e.to_string()))?;
    }
    // Effective first (it must stay within permitted at every capset).
    caps::set(None, CapSet::Effective, &kept).map_err(|e| step("capset")(e.to_string()))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(|e| step("capset")(e.to_string()))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| step("capset")(e.to_string()))?;
    caps::clear(None, CapSet::Ambient).map_err(|e| step("ambient set")(e.to_string()))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| step("PR_SET_NO_NEW_PRIVS")(e.to_string()))?;

    // Verify rather than trust: ids, sets, and that root cannot come back.
    let ids = nix::unistd::getresuid().map_err(|e| step("getresuid")(e.to_string()))?;
    let gids = nix::unistd::getresgid().map_err(|e| step("getresgid")(e.to_string()))?;
    let uid_ok = [ids.real, ids.effective, ids.saved]
        .iter()
        .all(|u| u.as_raw() == target.uid);
    let gid_ok = plan == Plan::Shed
        || [gids.real, gids.effective, gids.saved]
            .iter()
            .all(|g| g.as_raw() == target.gid);
    let eff = caps::read(None, CapSet::Effective).map_err(|e| step("capget")(e.to_string()))?;
    let prm = caps::read(None, CapSet::Permitted).map_err(|e| step("capget")(e.to_string()))?;
    if !uid_ok || !gid_ok || eff != kept || prm != kept {
        return Err(step("verification")(format!(
            "uid {ids:?}, gid {gids:?}, effective {eff:?}, permitted {prm:?}"
        )));
    }
    if plan == Plan::Switch && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(step("verification")("setuid(0) still succeeds".into()));
    }
    let mut names: Vec<String> = kept.iter().map(ToString::to_string).collect();
    names.sort();
    Ok(Dropped {
        user: target.name.clone(),
        uid: target.uid,
        gid: target.gid,
        caps: names.join(","),
    })
}

/// A socket file as created: removed later only if still that very inode.
#[derive(Debug, Clone)]
struct Created {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Created {
    fn of(path: &Path) -> std::io::Result<Created> {
        let m = std::fs::symlink_metadata(path)?;
        Ok(Created {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    fn remove_if_same(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The cleanup helper: a child forked before the drop that stays uid 0 but
/// holds no capability (uid 0 owns the root-owned socket directories, so it
/// may unlink in them without any), has `no_new_privs`, ignores the stop
/// signals (systemd signals the whole cgroup), closes every descriptor but
/// its end of a socket pair, and waits on it. On `remove` it removes the
/// daemon's socket files (only if they are still the inodes the daemon
/// bound) and acknowledges; when the daemon is gone (end of file), for
/// whatever reason, it removes them and exits. It never execs and never
/// reads anything but one command byte, so it offers a compromised daemon
/// nothing beyond removing those two files.
#[derive(Debug)]
pub struct Cleanup {
    stream: UnixStream,
}

/// Command byte: remove the socket files now and acknowledge.
const REMOVE: u8 = b'r';
/// Acknowledgement of [`REMOVE`].
const DONE: u8 = b'k';

impl Cleanup {
    /// Forks the helper for the socket files at `paths` (already bound).
    ///
    /// # Errors
    /// More than one thread (forking a threaded process is unsafe), a socket
    /// file that cannot be stat'ed, or fork fails.
    pub fn spawn(paths: &[PathBuf]) -> Result<Cleanup, PrivilegeError> {
        let created = paths
            .iter()
            .map(|p| Created::of(p))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| step("cleanup helper")(e.to_string()))?;
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| step("cleanup helper")(e.to_string()))?;
        single_threaded()?;
        // SAFETY: the process has one thread (checked just above), so the
        // child's copy of the address space has no lock held by a thread
        // that does not exist in it; the child only calls `helper_main`,
        // which ends in `_exit` and never returns into the parent's code.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                drop(ours);
                let code = helper_main(theirs, &created);
                // SAFETY: `_exit` ends the child without running the
                // parent's destructors or atexit handlers.
                unsafe { libc::_exit(code) }
            }
            Ok(nix::unistd::ForkResult::Parent { .. }) => Ok(Cleanup { stream: ours }),
            Err(e) => Err(step("fork of the cleanup helper")(e.to_string())),
        }
    }

    /// Asks the helper to remove the socket files now and waits (briefly) for
    /// it, so that they are gone before the daemon exits.
    pub fn remove_now(&mut self) {
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut ack = [0u8; 1];
        if self.stream.write_all(&[REMOVE]).is_ok() {
            let _ = self.stream.read_exact(&mut ack);
        }
    }
}

/// The helper's whole life; returns its exit code.
fn helper_main(mut stream: UnixStream, created: &[Created]) -> i32 {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGPIPE,
    ] {
        // SAFETY: SIG_IGN installs no handler code; single-threaded child.
        let _ = unsafe { signal(s, SigHandler::SigIgn) };
    }
    let keep = stream.as_raw_fd();
    close_all_but(keep);
    let _ = nix::sys::prctl::set_name(c"sg-cleanup");
    if nix::unistd::setgroups(&[]).is_err()
        || shrink_bounding(&CapsHashSet::new()).is_err()
        || caps::clear(None, CapSet::Ambient).is_err()
        || caps::clear(None, CapSet::Inheritable).is_err()
        || caps::clear(None, CapSet::Effective).is_err()
        || caps::clear(None, CapSet::Permitted).is_err()
        || nix::sys::prctl::set_no_new_privs().is_err()
    {
        // Cannot make itself harmless: do nothing rather than linger.
        return 1;
    }
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == REMOVE => {
                for c in created {
                    c.remove_if_same();
                }
                let _ = stream.write_all(&[DONE]);
            }
            Ok(1) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // End of file or an error: the daemon is gone.
            _ => {
                for c in created {
                    c.remove_if_same();
                }
                return 0;
            }
        }
    }
}

/// Closes every descriptor except `keep` (listed from `/proc/self/fd` first,
/// then closed, so the listing's own descriptor is not pulled from under it).
fn close_all_but(keep: i32) {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        if fd != keep {
            // SAFETY: closing descriptors this child will never use again;
            // nothing in the child holds an owned handle to them afterwards
            // (it only uses `stream`, which is `keep`).
            unsafe { libc::close(fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kept set is CAP_NET_ADMIN alone: bit 12, as `CapEff` shows it.
    #[test]
    fn kept_is_net_admin_only() {
        assert_eq!(kept_mask(), 0x1000);
        assert_eq!(kept_names(), "CAP_NET_ADMIN");
    }

    /// Owner, group and other triplets decide, in that order (the owner's
    /// triplet applies even when it is narrower than the others').
    #[test]
    fn permission_triplets() {
        assert!(permits(0o700, 10, 20, 10, 99, 0o3));
        assert!(!permits(0o700, 10, 20, 11, 20, 0o1));
        assert!(permits(0o770, 10, 20, 11, 20, 0o3));
        assert!(!permits(0o755, 10, 20, 11, 21, 0o2));
        assert!(permits(0o711, 0, 0, 65534, 65534, 0o1));
        assert!(!permits(0o077, 10, 20, 10, 20, 0o1), "owner triplet wins");
        assert!(permits(0o1777, 0, 0, 5, 5, 0o3));
    }

    /// Started as root: switch; as the user: shed only; as someone else: refused naming the key.
    #[test]
    fn plans() {
        let t = Target {
            name: "sg".into(),
            uid: 500,
            gid: 500,
        };
        assert_eq!(t.plan(0).unwrap(), Plan::Switch);
        assert_eq!(t.plan(500).unwrap(), Plan::Shed);
        let e = t.plan(501).unwrap_err().to_string();
        assert!(e.contains("daemon.user") && e.contains("uid 501"), "{e}");
        let root = Target {
            name: "root".into(),
            uid: 0,
            gid: 0,
        };
        assert_eq!(root.plan(0).unwrap(), Plan::Shed);
    }

    /// A user that does not exist is refused naming `daemon.user`.
    #[test]
    fn unknown_user_named() {
        let e = Target::resolve("sg-no-such-user-x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("daemon.user") && e.contains("no such user"),
            "{e}"
        );
    }
}
