//! Daemon side of the admin control socket: parse one request line, hand it to
//! the control loop (which owns the registry), write the reply line.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use super::protocol::{Request, Response};

/// Largest request accepted; a reload with its admin event is a few hundred bytes.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A request waiting for the control loop, with where to send the answer.
pub type Pending = (Request, oneshot::Sender<Response>);

/// Serves one client connection.
///
/// # Errors
/// I/O errors and timeouts on the connection.
pub async fn serve_client(stream: UnixStream, to_loop: mpsc::Sender<Pending>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    let mut line = String::new();
    tokio::time::timeout(IO_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "control client too slow"))??;
    let response = match serde_json::from_str::<Request>(line.trim_end()) {
        Err(e) => Response::Error {
            message: format!("bad request: {e}"),
        },
        Ok(req) => {
            let (tx, rx) = oneshot::channel();
            if to_loop.send((req, tx)).await.is_err() {
                Response::Error {
                    message: "daemon is shutting down".into(),
                }
            } else {
                rx.await.unwrap_or(Response::Error {
                    message: "daemon is shutting down".into(),
                })
            }
        }
    };
    let mut out = serde_json::to_string(&response)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    out.push('\n');
    tokio::time::timeout(IO_TIMEOUT, write.write_all(out.as_bytes()))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "control client too slow"))??;
    Ok(())
}
