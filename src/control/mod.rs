//! Control surfaces of a running gateway: the WireGuard UAPI socket at
//! `/var/run/wireguard/NAME.sock` (stock `wg show NAME`), and the admin control
//! socket at `/run/sitegate/NAME.sock` ([`protocol`], [`client`]).

pub mod client;
pub mod protocol;
pub mod server;
pub mod uapi;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::dataplane::Engine;
use crate::keys::PrivateKey;

/// Where wireguard-tools looks for userspace interfaces.
pub const UAPI_DIR: &str = "/var/run/wireguard";

/// Longest request line and most lines accepted from a UAPI client.
const MAX_LINE: usize = 4096;
const MAX_LINES: usize = 10_000;

pub fn uapi_socket_path(interface: &str) -> PathBuf {
    Path::new(UAPI_DIR).join(format!("{interface}.sock"))
}

/// Binds a root-only Unix socket (mode 0600) at `path`, creating its directory
/// with `dir_mode` if missing. A live socket of another process is an error; a
/// stale file left by a crash is replaced.
///
/// The socket is born 0600: the umask is narrowed around `bind` (the daemon
/// binds before its packet threads start; a file another thread created in
/// that instant would only come out narrower), so there is no moment in which
/// another user could connect before a chmod. An existing directory must
/// belong to this user and be writable by nobody else (or be sticky), or
/// someone else could swap the socket for their own.
///
/// # Errors
/// The directory cannot be made or is unsafe, another daemon serves the name,
/// or bind fails.
pub fn bind_private_socket(path: &Path, dir_mode: u32) -> io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(dir_mode)
                .create(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))?;
        }
        let meta = std::fs::metadata(dir)?;
        let me = nix::unistd::geteuid().as_raw();
        let open_to_others = meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0;
        if meta.uid() != me || open_to_others {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is owned by uid {} with mode {:04o}; it must belong to uid {me} and be writable by nobody else",
                    dir.display(),
                    meta.uid(),
                    meta.mode() & 0o7777
                ),
            ));
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another running process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    bound
}

/// Builds the UAPI view of the live peers.
pub fn view(engine: &Engine, private_key: &PrivateKey, listen_port: u16) -> uapi::InterfaceView {
    let table = engine.table.load();
    let peers = table
        .peers
        .iter()
        .map(|p| {
            let live = p.live();
            uapi::PeerView {
                public_key: *p.public_key.as_bytes(),
                preshared_key: p.preshared_key.clone(),
                endpoint: live.endpoint,
                last_handshake: live.last_handshake,
                rx_bytes: live.rx_bytes,
                tx_bytes: live.tx_bytes,
                addresses: p.addresses.clone(),
            }
        })
        .collect();
    uapi::InterfaceView {
        private_key: private_key.clone(),
        listen_port,
        peers,
    }
}

/// Answers one UAPI client: `get=1` with the live view, `set=1` refused.
pub async fn serve_uapi_client(
    stream: UnixStream,
    engine: Arc<Engine>,
    private_key: Arc<PrivateKey>,
    listen_port: u16,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take((MAX_LINE * MAX_LINES) as u64);
    let mut line = String::new();
    let io_deadline = Duration::from_secs(5);
    loop {
        line.clear();
        let n = tokio::time::timeout(io_deadline, reader.read_line(&mut line))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "uapi client too slow"))??;
        if n == 0 {
            return Ok(());
        }
        let reply = match line.trim_end() {
            "get=1" => {
                // The request ends with a blank line; read it before answering.
                let mut blank = String::new();
                let _ = tokio::time::timeout(io_deadline, reader.read_line(&mut blank)).await;
                uapi::render_get(&view(&engine, &private_key, listen_port))
            }
            "set=1" => {
                // `wg set` bodies carry keys: zeroized when dropped.
                let mut body = zeroize::Zeroizing::new(String::new());
                loop {
                    body.clear();
                    let n = tokio::time::timeout(io_deadline, reader.read_line(&mut body))
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "uapi client too slow")
                        })??;
                    if n == 0 || body.trim_end().is_empty() {
                        break;
                    }
                }
                zeroize::Zeroizing::new(uapi::render_errno(uapi::SET_ERRNO))
            }
            "" => continue,
            _ => zeroize::Zeroizing::new(uapi::render_errno(libc::EINVAL)),
        };
        write.write_all(reply.as_bytes()).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn in_runtime<T>(f: impl FnOnce() -> T) -> T {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        f()
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sg-sock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// The socket is born 0600 (under the usual umask 022 it would be born
    /// 0755) in a directory created with the given mode; a stale file is
    /// replaced. (The test leaves the process umask alone: other tests run
    /// in parallel.)
    #[test]
    fn socket_born_private() {
        let dir = temp_dir("ok");
        let path = dir.join("sub").join("x.sock");
        in_runtime(|| {
            let l = bind_private_socket(&path, 0o700).expect("bind");
            assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
            assert_eq!(
                std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
                0o700
            );
            drop(l);
            // The file left behind is stale (nobody serves it): replaced.
            assert!(bind_private_socket(&path, 0o700).is_ok());
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A directory others can write (without the sticky bit) is refused,
    /// naming it; a sticky one is accepted.
    #[test]
    fn open_directory_refused() {
        let dir = temp_dir("open");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = dir.join("x.sock");
        in_runtime(|| {
            let e = bind_private_socket(&path, 0o700).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
            assert!(e.to_string().contains("0777"), "{e}");
            assert!(!path.exists(), "nothing bound");
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
            assert!(bind_private_socket(&path, 0o700).is_ok());
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
