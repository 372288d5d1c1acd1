//! The peer store: one interface over two databases. SQLite ([`super::sqlite`])
//! is the embedded default for one gateway; PostgreSQL ([`super::postgres`])
//! carries one registry for several gateways (SPEC, Scale-out).
//!
//! Both keep the same rules: one transaction per admin action (concurrent
//! commands lose nothing and allocate distinct addresses), numbered schema
//! migrations applied on open, secrets sealed per row, and a registry version
//! that moves with every peer change and nothing else.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::audit::chain::{Head, Sealed};
use crate::audit::writer::HeadStore;
use crate::config::{InterfaceConfig, StoreConfig};
use crate::keys::{PresharedKey, PublicKey};
use crate::registry::alloc::AllocError;
use crate::registry::postgres::PgStore;
use crate::registry::sqlite::SqliteStore;
use crate::registry::{Peer, PeerName};
use crate::seal::{self, SealError, SealKey};

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `open` found no database file.
    #[error("no peer store at {}; run `sitegate init`", .path.display())]
    Missing { path: PathBuf },
    /// `create` found a file in the way.
    #[error("a peer store already exists at {}", .path.display())]
    Exists { path: PathBuf },
    /// The database file could not be created.
    #[error("cannot create peer store {}: {source}", .path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The database file exists but cannot be opened or migrated.
    #[error("cannot open peer store {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The PostgreSQL server cannot be reached or refused the login. `url`
    /// carries no password.
    #[error("cannot connect to peer store {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The database was written by a newer sitegate.
    #[error("peer store {at} has schema version {found}, newer than this sitegate supports ({supported}); upgrade sitegate")]
    TooNew {
        at: String,
        found: i64,
        supported: i64,
    },
    /// The shared registry was set up with another server key: an issued
    /// config would not work against this gateway.
    #[error("peer store {url} belongs to gateways with server public key {recorded}, but `interface.private_key_file` holds the key of {ours}; copy the shared server key to this gateway")]
    ServerKeyMismatch {
        url: String,
        recorded: String,
        ours: String,
    },
    /// An active or expired peer has that name.
    #[error("a peer named `{0}` already exists")]
    NameTaken(String),
    /// A revoked peer had that name: names stay with their history.
    #[error("a revoked peer was named `{0}`; names are never reused, choose another")]
    NameRetired(String),
    /// The public key is issued to another peer.
    #[error("public key {key} is already issued to peer `{peer}`")]
    KeyTaken { key: String, peer: String },
    /// The public key is on the revocation list.
    #[error("public key {0} was revoked and can never be issued again")]
    KeyRevoked(String),
    /// No address, or not the requested one.
    #[error("{0}")]
    Address(#[from] AllocError),
    /// No peer of that name.
    #[error("no peer named `{0}`")]
    UnknownPeer(String),
    /// `revoke` of a peer revoked before.
    #[error("peer `{0}` is already revoked")]
    AlreadyRevoked(String),
    /// `rotate` of a revoked peer: its name stays retired.
    #[error("peer `{0}` is revoked and cannot be rotated; issue a new peer instead")]
    RotateRevoked(String),
    /// A stored value that does not parse (edited by hand, or a bug).
    #[error("peer store holds a bad {what} for peer id {id}: `{value}`")]
    Corrupt {
        id: i64,
        what: &'static str,
        value: String,
    },
    /// A revocation-list key that does not parse.
    #[error("peer store holds a bad revoked key `{0}`")]
    CorruptRevoked(String),
    /// The store's secrets are sealed and no seal key was given.
    #[error("peer store {at} holds secrets sealed with a seal key, but no `daemon.seal_key_file` is configured; set it to the key that sealed them")]
    SealKeyMissing { at: String },
    /// The store's secrets were sealed with another key.
    #[error("peer store {at} was sealed with a different seal key than `daemon.seal_key_file`; restore the right key file (the store is left unchanged)")]
    WrongSealKey { at: String },
    /// A sealed value that does not open.
    #[error("peer store {at}: {source}")]
    Seal { at: String, source: SealError },
    /// The recorded audit chain head cannot be read.
    #[error("audit chain head in the peer store: {0}")]
    AuditHead(String),
    /// `daemon.seal_key_file` cannot be read.
    #[error("{0}")]
    SealKeyFile(#[from] SealError),
    /// Any other SQLite error.
    #[error("peer store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Any other PostgreSQL error, after the connection was made (the server
    /// went away, a statement timed out).
    #[error("peer store {url}: {reason}")]
    Postgres { url: String, reason: String },
}

/// How the store's preshared keys are kept, for `sitegate check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretCounts {
    pub sealed: u64,
    pub clear: u64,
    /// A seal check value is recorded: the store was sealed under some key.
    pub sealed_store: bool,
}

/// What `peer add` stores.
#[derive(Debug, Clone)]
pub struct NewPeer {
    pub name: PeerName,
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    /// Chosen with `--address` (either family); otherwise the lowest free address
    /// is allocated. The other family (if the tunnel has IPv6) is always allocated.
    pub address: Option<IpAddr>,
    pub services: Vec<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub admin: bool,
}

impl NewPeer {
    /// The services to store: sorted, each once.
    pub(super) fn granted(&self) -> Vec<String> {
        let mut services = self.services.clone();
        services.sort();
        services.dedup();
        services
    }

    /// The peer as stored under row `id`.
    pub(super) fn issued(self, id: i64, addresses: Vec<IpAddr>, services: Vec<String>) -> Peer {
        Peer {
            id,
            name: self.name,
            public_key: self.public_key,
            preshared_key: self.preshared_key,
            addresses,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: None,
            revoked_reason: None,
            admin: self.admin,
            services,
        }
    }
}

/// A key that must never be accepted again: revoked with its peer, or rotated out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedKey {
    pub public_key: PublicKey,
    /// The peer that held it.
    pub peer: String,
    /// `--reason` of the revocation, or `rotated`.
    pub reason: Option<String>,
    /// Unix seconds.
    pub revoked_at: i64,
}

/// One consistent view of the registry: see [`Store::snapshot`].
#[derive(Debug)]
pub struct Snapshot {
    /// Every peer, revoked and expired included.
    pub peers: Vec<Peer>,
    pub revoked: Vec<RevokedKey>,
    /// [`Store::registry_version`] as of this snapshot.
    pub version: i64,
}

/// An open peer store, whichever database holds it.
pub enum Store {
    Sqlite(SqliteStore),
    /// Boxed: a connection is several times the size of a SQLite handle.
    Postgres(Box<PgStore>),
}

/// Calls the same method on whichever backend `self` is.
macro_rules! each {
    ($self:expr, $s:ident => $call:expr) => {
        match $self {
            Store::Sqlite($s) => $call,
            Store::Postgres($s) => $call,
        }
    };
}

impl Store {
    /// Opens an existing store, applying pending migrations (a PostgreSQL
    /// database that the admin created gets its schema here).
    ///
    /// # Errors
    /// [`StoreError::Missing`] when there is no SQLite file;
    /// [`StoreError::Connect`] when PostgreSQL cannot be reached;
    /// [`StoreError::TooNew`]; database errors.
    pub fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        Self::open_sealed(cfg, None)
    }

    /// Opens an existing store with the seal key (`[daemon] seal_key_file`).
    /// With a key, a store sealed under another key is refused, and preshared
    /// keys still in clear are sealed in one transaction (the migration of a store
    /// from before sealing); without one, a sealed store is refused.
    ///
    /// # Errors
    /// As [`Store::open`], plus [`StoreError::WrongSealKey`] and
    /// [`StoreError::SealKeyMissing`]. Nothing is written on error.
    pub fn open_sealed(cfg: &StoreConfig, seal: Option<Arc<SealKey>>) -> Result<Store, StoreError> {
        Ok(match cfg {
            StoreConfig::Sqlite { .. } => Store::Sqlite(SqliteStore::open_sealed(cfg, seal)?),
            StoreConfig::Postgres { .. } => {
                Store::Postgres(Box::new(PgStore::open_sealed(cfg, seal)?))
            }
        })
    }

    /// Opens the store `cfg` names, with its seal key read from
    /// `[daemon] seal_key_file` (for processes that can read it: admin commands,
    /// `check`; the daemon reads the key once, before dropping privileges).
    ///
    /// # Errors
    /// As [`Store::open_sealed`], plus [`StoreError::SealKeyFile`].
    pub fn open_config(cfg: &crate::config::Config) -> Result<Store, StoreError> {
        Self::open_sealed(&cfg.store, seal_key(cfg)?)
    }

    /// Creates a new, empty store (SQLite: a new file, mode 0600, WAL mode;
    /// PostgreSQL: the schema in the database the admin created, which may
    /// already hold the registry of other gateways).
    ///
    /// # Errors
    /// [`StoreError::Exists`] when the SQLite file exists; as [`Store::open`].
    pub fn create(cfg: &StoreConfig) -> Result<Store, StoreError> {
        Self::create_sealed(cfg, None)
    }

    /// Creates a new, empty store sealed under `seal` (when given).
    ///
    /// # Errors
    /// As [`Store::create`] and [`Store::open_sealed`].
    pub fn create_sealed(
        cfg: &StoreConfig,
        seal: Option<Arc<SealKey>>,
    ) -> Result<Store, StoreError> {
        Ok(match cfg {
            StoreConfig::Sqlite { .. } => Store::Sqlite(SqliteStore::create_sealed(cfg, seal)?),
            StoreConfig::Postgres { .. } => {
                Store::Postgres(Box::new(PgStore::open_sealed(cfg, seal)?))
            }
        })
    }

    /// Counts sealed and clear preshared keys of the store `cfg` names, opening
    /// none and sealing none (what `sitegate check` reports).
    ///
    /// # Errors
    /// As [`Store::open`] without the seal checks.
    pub fn inspect_secrets(cfg: &StoreConfig) -> Result<SecretCounts, StoreError> {
        match cfg {
            StoreConfig::Sqlite { .. } => SqliteStore::inspect_secrets(cfg),
            StoreConfig::Postgres { .. } => PgStore::open_unsealed(cfg)?.secret_counts(),
        }
    }

    /// The audit chain head recorded in the store `cfg` names (for PostgreSQL,
    /// this gateway's last row in the audit table). Needs no seal key (the
    /// head is no secret), so `audit verify` can say that a keyed chain needs
    /// the key instead of failing on the store.
    ///
    /// # Errors
    /// As [`Store::open`] without the seal checks.
    pub fn recorded_audit_head(cfg: &StoreConfig) -> Result<Option<Head>, StoreError> {
        match cfg {
            StoreConfig::Sqlite { .. } => SqliteStore::recorded_audit_head(cfg),
            StoreConfig::Postgres { .. } => PgStore::open_unsealed(cfg)?
                .audit_head()
                .map_err(StoreError::AuditHead),
        }
    }

    /// Where the store is, for messages (a file, or a URL without password).
    pub fn location(&self) -> String {
        match self {
            Store::Sqlite(s) => s.path().display().to_string(),
            Store::Postgres(s) => s.url().to_string(),
        }
    }

    /// Counts sealed and clear preshared keys without opening any.
    ///
    /// # Errors
    /// Database errors.
    pub fn secret_counts(&self) -> Result<SecretCounts, StoreError> {
        each!(self, s => s.secret_counts())
    }

    /// A number that changes with every change to peers, their addresses and
    /// services, or the revocation list, and with nothing else: audit head
    /// updates do not move it.
    ///
    /// # Errors
    /// Database errors.
    pub fn registry_version(&self) -> Result<i64, StoreError> {
        each!(self, s => s.registry_version())
    }

    /// Every peer, revoked and expired included, ordered by id; addresses sorted
    /// IPv4 first, services by name. Read in one snapshot.
    ///
    /// # Errors
    /// Database errors; [`StoreError::Corrupt`] for values that do not parse.
    pub fn peers(&self) -> Result<Vec<Peer>, StoreError> {
        each!(self, s => s.peers())
    }

    /// The registry as the daemon needs it, read in one transaction so that the
    /// three parts agree: a change committed while this runs is either wholly
    /// in the snapshot or shows as a newer version at the next poll, never half
    /// seen and then forgotten. `mid` runs inside the transaction after the
    /// peers are read (the daemon's test hook pauses there).
    ///
    /// # Errors
    /// Database errors; [`StoreError::Corrupt`] and
    /// [`StoreError::CorruptRevoked`] for values that do not parse.
    pub fn snapshot(&self, mid: impl FnOnce()) -> Result<Snapshot, StoreError> {
        each!(self, s => s.snapshot(mid))
    }

    /// Issues a peer in one transaction: checks name and key are unused (and the
    /// key not revoked), allocates or checks its address(es) in the tunnel subnets
    /// of `iface` (IPv4 from `[store] pool` when set), inserts it with its services.
    ///
    /// # Errors
    /// [`StoreError::NameTaken`], [`StoreError::NameRetired`], [`StoreError::KeyTaken`], [`StoreError::KeyRevoked`],
    /// [`StoreError::Address`]; database errors. On error nothing is written.
    pub fn add_peer(&mut self, iface: &InterfaceConfig, new: NewPeer) -> Result<Peer, StoreError> {
        each!(self, s => s.add_peer(iface, new))
    }

    /// One peer by name, revoked or not.
    ///
    /// # Errors
    /// Database errors; [`StoreError::Corrupt`].
    pub fn peer(&self, name: &PeerName) -> Result<Option<Peer>, StoreError> {
        each!(self, s => s.peer(name))
    }

    /// The tunnel addresses a revoked peer held before revocation freed them
    /// (empty for a peer that is not revoked).
    ///
    /// # Errors
    /// [`StoreError::UnknownPeer`]; database errors; [`StoreError::Corrupt`].
    pub fn former_addresses(&self, name: &PeerName) -> Result<Vec<IpAddr>, StoreError> {
        each!(self, s => s.former_addresses(name))
    }

    /// Revokes a peer in one transaction: marks it revoked (`now`, `reason`), puts
    /// its key on the revocation list for good, and frees its tunnel addresses for
    /// reuse (kept in `former_addresses` for history). Returns the revoked peer,
    /// whose `addresses` are now empty.
    ///
    /// # Errors
    /// [`StoreError::UnknownPeer`], [`StoreError::AlreadyRevoked`]; database
    /// errors. On error nothing is written.
    pub fn revoke_peer(
        &mut self,
        name: &PeerName,
        reason: Option<&str>,
        now: i64,
    ) -> Result<Peer, StoreError> {
        each!(self, s => s.revoke_peer(name, reason, now))
    }

    /// Replaces a peer's key and preshared key in one transaction. The row keeps
    /// its name, addresses, services, admin flag and expiry; the old key goes on
    /// the revocation list with reason `rotated`. Returns the peer and its old key.
    ///
    /// # Errors
    /// [`StoreError::UnknownPeer`], [`StoreError::RotateRevoked`],
    /// [`StoreError::KeyRevoked`], [`StoreError::KeyTaken`] (also for the peer's
    /// current key); database errors. On error nothing is written.
    pub fn rotate_peer(
        &mut self,
        name: &PeerName,
        new_key: PublicKey,
        new_psk: Option<PresharedKey>,
        now: i64,
    ) -> Result<(Peer, PublicKey), StoreError> {
        each!(self, s => s.rotate_peer(name, new_key, new_psk, now))
    }

    /// The revocation list, oldest first: keys the daemon must refuse
    /// (`handshake_failed reason=revoked`) and `peer add` must not issue.
    ///
    /// # Errors
    /// Database errors; [`StoreError::CorruptRevoked`] for a key that does not parse.
    pub fn revoked_keys(&self) -> Result<Vec<RevokedKey>, StoreError> {
        each!(self, s => s.revoked_keys())
    }

    /// Records the gateways' shared server public key in a shared registry, or
    /// checks it against the one recorded: every gateway on one registry must
    /// answer with the key that issued configs name. A SQLite store belongs to
    /// one gateway and records nothing.
    ///
    /// # Errors
    /// [`StoreError::ServerKeyMismatch`]; database errors.
    pub fn bind_server_key(&mut self, key: &PublicKey) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(_) => Ok(()),
            Store::Postgres(s) => s.bind_server_key(key),
        }
    }
}

impl HeadStore for Store {
    fn audit_head(&self) -> Result<Option<Head>, String> {
        each!(self, s => s.audit_head())
    }

    fn set_audit_head(&self, head: &Head, appended: &[Sealed]) -> Result<(), String> {
        each!(self, s => s.set_audit_head(head, appended))
    }
}

/// Associated data of the seal check value.
pub(super) const SEAL_CHECK_AD: &[u8] = b"sitegate store seal check";
pub(super) const SEAL_CHECK_VALUE: &[u8] = b"sitegate";

/// Judges a recorded seal check value against `key`.
///
/// # Errors
/// [`StoreError::WrongSealKey`]; [`StoreError::Corrupt`] for a value that is
/// not a sealed value at all.
pub(super) fn check_seal(key: &SealKey, recorded: &str, at: &str) -> Result<(), StoreError> {
    match key.open(SEAL_CHECK_AD, recorded, "seal check") {
        Ok(v) if v.as_slice() == SEAL_CHECK_VALUE => Ok(()),
        Err(SealError::Malformed { .. }) => Err(corrupt(0, "seal check value", recorded)),
        _ => Err(StoreError::WrongSealKey { at: at.to_string() }),
    }
}

/// Associated data of a peer's sealed preshared key: its row id, so a sealed
/// value moved onto another row does not open.
pub(super) fn psk_ad(id: i64) -> Vec<u8> {
    format!("sitegate peer {id} preshared_key").into_bytes()
}

/// A peer row as both backends read it, before its values are parsed.
pub(super) struct PeerRow {
    pub id: i64,
    pub name: String,
    pub public_key: String,
    pub preshared_key: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub revoked_reason: Option<String>,
    pub admin: bool,
}

impl PeerRow {
    /// Parses the row into a [`Peer`] with its addresses (sorted here) and
    /// services, opening its sealed preshared key under `seal` (the key, and
    /// the store's location for messages).
    pub(super) fn into_peer(
        self,
        mut addresses: Vec<IpAddr>,
        services: Vec<String>,
        seal: Option<(&SealKey, &str)>,
    ) -> Result<Peer, StoreError> {
        let id = self.id;
        addresses.sort();
        Ok(Peer {
            id,
            name: PeerName::new(&self.name).map_err(|_| corrupt(id, "name", &self.name))?,
            public_key: PublicKey::from_base64(&self.public_key)
                .map_err(|_| corrupt(id, "public key", &self.public_key))?,
            preshared_key: match self.preshared_key {
                Some(s) => Some(open_psk(id, s, seal)?),
                None => None,
            },
            addresses,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            revoked_reason: self.revoked_reason,
            admin: self.admin,
            services,
        })
    }
}

/// The three reads of a peer listing (addresses, services, peer rows),
/// gathered by row id and parsed into peers once all are in.
#[derive(Default)]
pub(super) struct PeerRows {
    addresses: BTreeMap<i64, Vec<IpAddr>>,
    services: BTreeMap<i64, Vec<String>>,
    peers: Vec<PeerRow>,
}

impl PeerRows {
    pub(super) fn address(&mut self, id: i64, text: &str) -> Result<(), StoreError> {
        let ip = text.parse().map_err(|_| corrupt(id, "address", text))?;
        self.addresses.entry(id).or_default().push(ip);
        Ok(())
    }

    /// Services arrive sorted by name.
    pub(super) fn service(&mut self, id: i64, name: String) {
        self.services.entry(id).or_default().push(name);
    }

    /// Peer rows arrive ordered by id.
    pub(super) fn peer(&mut self, row: PeerRow) {
        self.peers.push(row);
    }

    pub(super) fn finish(
        mut self,
        seal: Option<(&SealKey, &str)>,
    ) -> Result<Vec<Peer>, StoreError> {
        let mut out = Vec::with_capacity(self.peers.len());
        for row in self.peers {
            let id = row.id;
            out.push(row.into_peer(
                self.addresses.remove(&id).unwrap_or_default(),
                self.services.remove(&id).unwrap_or_default(),
                seal,
            )?);
        }
        Ok(out)
    }
}

/// Parses `former_addresses` (comma-separated) of row `id`, sorted.
pub(super) fn parse_former(id: i64, text: Option<&str>) -> Result<Vec<IpAddr>, StoreError> {
    let mut out = Vec::new();
    for a in text
        .iter()
        .flat_map(|t| t.split(','))
        .filter(|a| !a.is_empty())
    {
        out.push(a.parse().map_err(|_| corrupt(id, "former address", a))?);
    }
    out.sort();
    Ok(out)
}

/// Parses a revocation-list row.
pub(super) fn revoked_key(
    key: String,
    peer: String,
    reason: Option<String>,
    revoked_at: i64,
) -> Result<RevokedKey, StoreError> {
    Ok(RevokedKey {
        public_key: PublicKey::from_base64(&key)
            .map_err(|_| StoreError::CorruptRevoked(key.clone()))?,
        peer,
        reason,
        revoked_at,
    })
}

/// A stored preshared key: sealed text opened under the store's key, or (in a
/// store never sealed) clear base64.
pub(super) fn open_psk(
    id: i64,
    mut text: String,
    seal: Option<(&SealKey, &str)>,
) -> Result<PresharedKey, StoreError> {
    let out = match (seal::is_sealed(&text), seal) {
        (true, Some((key, at))) => key
            .open(
                &psk_ad(id),
                &text,
                &format!("preshared key of peer id {id}"),
            )
            .map_err(|source| StoreError::Seal {
                at: at.to_string(),
                source,
            })
            .and_then(|bytes| {
                <[u8; crate::keys::KEY_LEN]>::try_from(bytes.as_slice())
                    .map(PresharedKey::from_bytes)
                    .map_err(|_| corrupt(id, "preshared key", "<redacted>"))
            }),
        (true, None) => Err(corrupt(id, "preshared key", "<sealed, and no seal key>")),
        (false, _) => {
            PresharedKey::from_base64(&text).map_err(|_| corrupt(id, "preshared key", "<redacted>"))
        }
    };
    zeroize::Zeroize::zeroize(&mut text);
    out
}

/// A clear preshared key of row `id` sealed under `key` (sealing a store
/// that was kept in clear).
pub(super) fn reseal_psk(key: &SealKey, id: i64, mut text: String) -> Result<String, StoreError> {
    let psk =
        PresharedKey::from_base64(&text).map_err(|_| corrupt(id, "preshared key", "<redacted>"));
    zeroize::Zeroize::zeroize(&mut text);
    Ok(key.seal(&psk_ad(id), psk?.as_bytes()))
}

/// The seal key `cfg` names, read from its file.
///
/// # Errors
/// [`SealError::Read`] naming `daemon.seal_key_file`.
pub fn seal_key(cfg: &crate::config::Config) -> Result<Option<Arc<SealKey>>, SealError> {
    cfg.daemon
        .seal_key_file
        .as_deref()
        .map(|p| SealKey::from_file(p).map(Arc::new))
        .transpose()
}

/// The stored form of a preshared key for row `id`.
pub(super) fn psk_text(
    seal: Option<&SealKey>,
    id: i64,
    psk: Option<&PresharedKey>,
) -> Option<String> {
    psk.map(|k| match seal {
        Some(key) => key.seal(&psk_ad(id), k.as_bytes()),
        None => k.to_base64(),
    })
}

pub(super) fn corrupt(id: i64, what: &'static str, value: &str) -> StoreError {
    StoreError::Corrupt {
        id,
        what,
        value: value.to_string(),
    }
}
