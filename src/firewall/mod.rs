//! The host firewall sitegate manages: the nftables table `inet sitegate`.
//!
//! [`render`] builds the ruleset as nftables JSON (pure); [`apply`] loads it
//! with `nft` at start and removes it at stop when `[firewall] manage = true`
//! (after the privilege drop, over [`netlink`]).
//! Forwarding (`ip_forward`) is left as the host has it until the full packet
//! policy enforces egress and private ranges (issue 8).

pub mod apply;
pub mod netlink;
pub mod render;
