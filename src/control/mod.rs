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

use crate::dataplane::Shared;
use crate::keys::KEY_LEN;

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
/// # Errors
/// The directory cannot be made, another daemon serves the name, or bind fails.
pub fn bind_private_socket(path: &Path, dir_mode: u32) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))?;
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
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Builds the UAPI view of the live peers.
pub fn view(shared: &Shared, private_key: [u8; KEY_LEN], listen_port: u16) -> uapi::InterfaceView {
    let table = shared.table.load();
    let peers = table
        .peers
        .iter()
        .map(|p| {
            let live = p.live();
            uapi::PeerView {
                public_key: *p.public_key.as_bytes(),
                preshared_key: p.preshared_key.as_ref().map(|k| *k.as_bytes()),
                endpoint: live.endpoint,
                last_handshake: live.last_handshake,
                rx_bytes: live.rx_bytes,
                tx_bytes: live.tx_bytes,
                addresses: p.addresses.clone(),
            }
        })
        .collect();
    uapi::InterfaceView {
        private_key,
        listen_port,
        peers,
    }
}

/// Answers one UAPI client: `get=1` with the live view, `set=1` refused.
pub async fn serve_uapi_client(
    stream: UnixStream,
    shared: Arc<Shared>,
    private_key: [u8; KEY_LEN],
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
                uapi::render_get(&view(&shared, private_key, listen_port))
            }
            "set=1" => {
                let mut body = String::new();
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
                uapi::render_errno(uapi::SET_ERRNO)
            }
            "" => continue,
            _ => uapi::render_errno(libc::EINVAL),
        };
        write.write_all(reply.as_bytes()).await?;
    }
}
