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
    #[error("cannot turn on forwarding ({path}): {error}")]
    Forwarding {
        path: &'static str,
        error: std::io::Error,
    },
}

const IPV4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// Turns on IPv4 forwarding, and IPv6 forwarding when `v6` (the gateway has
/// an IPv6 tunnel address), in the daemon's network namespace. Left on at
/// stop, as wg-quick and container runtimes do: something else on the host
/// may rely on it by then, and with the table gone nothing of sitegate's is
/// forwarded anyway. Returns the sysctls it changed from 0.
///
/// # Errors
/// A sysctl cannot be written (not root, or a read-only /proc/sys).
pub fn enable_forwarding(v6: bool) -> Result<Vec<&'static str>, FirewallError> {
    let mut changed = Vec::new();
    let paths: &[&'static str] = if v6 {
        &[IPV4_FORWARD, IPV6_FORWARD]
    } else {
        &[IPV4_FORWARD]
    };
    for &path in paths {
        let was = std::fs::read_to_string(path).unwrap_or_default();
        if was.trim() == "1" {
            continue;
        }
        std::fs::write(path, "1\n").map_err(|error| FirewallError::Forwarding { path, error })?;
        changed.push(path);
    }
    Ok(changed)
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
    /// As root through `nft`; after the privilege drop through netlink with
    /// the kept `CAP_NET_ADMIN` (an `nft` child would have no capability).
    fn drop(&mut self) {
        let removed = if nix::unistd::geteuid().is_root() {
            load(&render::removal(), "removal of table inet sitegate")
        } else {
            super::netlink::delete_table(render::TABLE).map_err(|e| FirewallError::Refused {
                what: "removal of table inet sitegate (netlink)",
                stderr: e.to_string(),
            })
        };
        match removed {
            Ok(()) => tracing::info!(event = "firewall_removed", table = "inet sitegate"),
            Err(e) => tracing::error!(event = "firewall_error", error = %e),
        }
    }
}
