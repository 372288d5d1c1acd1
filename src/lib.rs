//! sitegate: a userspace WireGuard gateway for remote sites.
//!
//! # Layout
//!
//! Pure core (no sockets, no clock reads; unit-tested without root):
//! - [`config`]: `sitegate.toml` → validated [`config::Config`].
//! - [`keys`]: WireGuard key codec, redacted secrets, key-file loading.
//! - [`seal`]: the seal key: secrets sealed at rest, the audit chain's MAC key.
//! - [`registry`]: peer names, records, address allocation (pure), and the
//!   store behind one interface ([`registry::Store`]): SQLite for one gateway,
//!   PostgreSQL for several ([`registry::postgres`]), with the daemon's
//!   `LISTEN` follower ([`registry::follow`]).
//! - [`clientconf`]: the wg-quick client config an issued peer receives.
//! - [`routing`]: allowed-IPs table, longest prefix → peer slot.
//! - [`policy`]: the verdict on each decrypted packet (anti-spoof first).
//! - [`control::uapi`]: the WireGuard UAPI `get=1` reply as text.
//! - [`events`]: event names and rate-limited summaries of repeated failures.
//! - [`firewall::render`]: the nftables table `inet sitegate` as nft JSON.
//! - [`metrics`]: `/metrics` text from a snapshot of counters ([`metrics::render`]);
//!   [`metrics::snapshot`] reads them from the data plane.
//!
//! I/O shell:
//! - [`dataplane`]: TUN and UDP loops around boringtun's `noise::Tunn` (batched
//!   I/O: recvmmsg, TUN GRO/GSO offload, UDP GSO), timers, and the rules against
//!   abuse (one handshake limiter, authenticated roaming, random indices,
//!   per-source backoff in the pure [`dataplane::sources`]).
//! - [`audit`]: the hash-chained audit log, keyed (HMAC) under the seal key: chain and verify (pure), writer, sink.
//! - [`control`]: UAPI socket so stock `wg show` works.
//! - [`daemon`]: wires it together; signals and clean shutdown.
//! - [`privilege`]: the drop to `[daemon] user` (only `CAP_NET_ADMIN` kept)
//!   and the cleanup helper that removes the socket files at stop.
//! - [`check`]: `sitegate check`, the security self-check: verdicts over
//!   gathered facts are pure (`check::decide`, `check::procnet`); the gathering
//!   (files, `/proc/net`, `nft`, store, control socket) is a thin shell.
//! - [`cli`]: the clap command tree.

pub mod api;
pub mod audit;
pub mod check;
pub mod cli;
pub mod clientconf;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod events;
pub mod firewall;
pub mod keys;
pub mod metrics;
pub mod policy;
pub mod privilege;
pub mod registry;
pub mod routing;
pub mod seal;
