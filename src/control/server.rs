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

/// The actor name of a local uid: its user name, or `uid:N` when it has none.
pub fn uid_actor(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => u.name,
        _ => format!("uid:{uid}"),
    }
}

/// Puts the connecting process's identity on an admin event: the kernel's
/// `SO_PEERCRED` answer, not what the client claims (a `sudo_user` field, if
/// sent, stays as an extra).
pub fn attribute(request: Request, actor: &str) -> Request {
    match request {
        Request::Reload { event: Some(mut e) } => {
            e.actor = actor.to_string();
            Request::Reload { event: Some(e) }
        }
        other => other,
    }
}

/// Serves one client connection.
///
/// # Errors
/// I/O errors and timeouts on the connection; no peer credentials.
pub async fn serve_client(stream: UnixStream, to_loop: mpsc::Sender<Pending>) -> io::Result<()> {
    let actor = uid_actor(stream.peer_cred()?.uid());
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
            if to_loop.send((attribute(req, &actor), tx)).await.is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::AdminEvent;

    /// The actor a client claims is replaced by its peer credentials; other
    /// fields (an extra `sudo_user`) stay; requests without an event pass.
    #[test]
    fn actor_from_credentials() {
        let claimed = Request::Reload {
            event: Some(AdminEvent {
                event: "peer_revoked".into(),
                actor: "alice".into(),
                fields: [("sudo_user".to_string(), "bob".to_string())].into(),
            }),
        };
        let Request::Reload { event: Some(e) } = attribute(claimed, "mallory") else {
            panic!("not a reload");
        };
        assert_eq!(e.actor, "mallory");
        assert_eq!(e.fields["sudo_user"], "bob");
        assert_eq!(attribute(Request::Status {}, "x"), Request::Status {});
        assert_eq!(uid_actor(0), "root");
        assert_eq!(uid_actor(4_000_000_123), "uid:4000000123");
    }
}
