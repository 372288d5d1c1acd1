//! The host firewall sitegate manages: the nftables table `inet sitegate`.
//!
//! [`render`] builds the ruleset as nftables JSON (pure). Installing it at
//! start and removing it at stop (`[firewall] manage`) is the next step of the
//! policy work (issue 8) and is not wired into `run` yet.

pub mod render;
