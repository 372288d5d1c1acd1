//! SQLite peer store (WAL): one transaction per admin action.
//! STUB — to be implemented (owner: core/CLI helper).

use crate::config::StoreConfig;
use crate::registry::Peer;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

pub struct Store {
    #[allow(dead_code)]
    conn: rusqlite::Connection,
}

impl Store {
    /// Opens an existing store.
    pub fn open(_cfg: &StoreConfig) -> Result<Store, StoreError> {
        todo!()
    }
    /// Every peer, revoked and expired included, ordered by id.
    pub fn peers(&self) -> Result<Vec<Peer>, StoreError> {
        todo!()
    }
}
