//! Loading the rendered table into the kernel: `nft -j -f -`, one transaction
//! per document, so the table is either wholly in place or unchanged.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use super::render::{self, FirewallSpec};

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error(
        "cannot run nft (install the nftables package, or set [firewall] manage = false): {0}"
    )]
    Spawn(std::io::Error),
    #[error("nft refused the {what}: {stderr}")]
    Refused { what: &'static str, stderr: String },
    #[error("nft: {0}")]
    Io(std::io::Error),
}

/// Feeds `doc` to `nft -j -f -`.
///
/// # Errors
/// nft cannot be started, or refuses the document (its message included).
pub fn load(doc: &Value, what: &'static str) -> Result<(), FirewallError> {
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(FirewallError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(doc.to_string().as_bytes())
            .map_err(FirewallError::Io)?;
    }
    let out = child.wait_with_output().map_err(FirewallError::Io)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(FirewallError::Refused {
            what,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The installed table: removed when dropped (a clean stop, a failed start or
/// a panic). A `kill -9` leaves it, and the next install replaces it.
#[derive(Debug)]
pub struct Installed(());

impl Installed {
    /// Installs (or replaces) the table for `spec`.
    ///
    /// # Errors
    /// As [`load`].
    pub fn install(spec: &FirewallSpec) -> Result<Installed, FirewallError> {
        load(&render::ruleset(spec), "ruleset of table inet sitegate")?;
        Ok(Installed(()))
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        match load(&render::removal(), "removal of table inet sitegate") {
            Ok(()) => tracing::info!(event = "firewall_removed", table = "inet sitegate"),
            Err(e) => tracing::error!(event = "firewall_error", error = %e),
        }
    }
}
