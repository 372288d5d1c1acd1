//! The peer registry: the pure model (names, peers, address allocation) and the
//! store that persists it, in SQLite (one gateway) or PostgreSQL (several).

pub mod alloc;
pub mod follow;
pub mod model;
pub mod postgres;
pub mod sqlite;
pub mod store;

pub use alloc::AllocError;
pub use model::{Lifecycle, NameError, Peer, PeerName};
pub use store::{NewPeer, RevokedKey, SecretCounts, Snapshot, Store, StoreError};
