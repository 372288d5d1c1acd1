//! The peer registry: the pure model (names, peers, address allocation) and the
//! SQLite store that persists it.

pub mod alloc;
pub mod model;
pub mod store;

pub use alloc::AllocError;
pub use model::{Lifecycle, NameError, Peer, PeerName};
pub use store::{NewPeer, RevokedKey, SecretCounts, Store, StoreError};
