//! SQLite peer store (WAL): one `BEGIN IMMEDIATE` transaction per admin action, so
//! concurrent `sitegate peer add` processes queue on the write lock (up to
//! [`BUSY_TIMEOUT_MS`]) instead of failing, and allocation + insert is atomic.
//!
//! Schema changes are numbered migrations recorded in `PRAGMA user_version`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::audit::chain::Head;
use crate::audit::writer::HeadStore;
use crate::config::{InterfaceConfig, StoreConfig};
use crate::keys::{PresharedKey, PublicKey};
use crate::registry::alloc::{self, AllocError};
use crate::registry::{Peer, PeerName};
use crate::seal::{self, SealError, SealKey};

/// How long a writer waits for another process's transaction before failing.
pub const BUSY_TIMEOUT_MS: u64 = 10_000;

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: peers, their addresses and services, and the revocation list.
    r#"
    -- One row per issued peer. Rows are never deleted: revocation sets revoked_at,
    -- so names and keys stay unique over the store's whole life.
    CREATE TABLE peers (
        id             INTEGER PRIMARY KEY,
        name           TEXT NOT NULL UNIQUE,      -- PeerName: [a-z0-9][a-z0-9_.-]{0,62}
        public_key     TEXT NOT NULL UNIQUE,      -- base64, as `wg pubkey` prints it
        preshared_key  TEXT,                      -- base64, or `sealed:v1:...` under the seal key
                                                  -- (migration 4); NULL when issued with --no-psk
        created_at     INTEGER NOT NULL,          -- Unix seconds
        expires_at     INTEGER,                   -- Unix seconds; NULL = never
        revoked_at     INTEGER,                   -- Unix seconds; NULL = not revoked
        revoked_reason TEXT,
        admin          INTEGER NOT NULL DEFAULT 0 CHECK (admin IN (0, 1))
    );

    -- Tunnel host addresses (no prefix: 10.8.0.7, fd00:8::7), unique across all peers.
    CREATE TABLE peer_addresses (
        peer_id  INTEGER NOT NULL REFERENCES peers(id) ON DELETE CASCADE,
        address  TEXT NOT NULL UNIQUE,
        PRIMARY KEY (peer_id, address)
    );

    -- Services (config [[service]] names) a peer may reach.
    CREATE TABLE peer_services (
        peer_id  INTEGER NOT NULL REFERENCES peers(id) ON DELETE CASCADE,
        service  TEXT NOT NULL,
        PRIMARY KEY (peer_id, service)
    );

    -- Keys that must never be accepted again (revoked, or rotated out). Kept apart
    -- from peers so that a key stays refused whatever happens to its peer row.
    CREATE TABLE revoked_keys (
        public_key  TEXT PRIMARY KEY,             -- base64
        peer_name   TEXT NOT NULL,
        revoked_at  INTEGER NOT NULL,             -- Unix seconds
        reason      TEXT
    );
    "#,
    // 2: the audit chain head, and the addresses a revoked peer gave back.
    r#"
    -- The audit log's chain head as of the last append (one row, id = 1), so that
    -- `sitegate audit verify` notices a log whose tail was cut.
    CREATE TABLE audit_head (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        seq         INTEGER NOT NULL,             -- last line's sequence number
        hash        TEXT NOT NULL,                -- last line's SHA-256, hex
        updated_at  INTEGER NOT NULL              -- Unix seconds
    );

    -- Revocation frees a peer's tunnel addresses for reuse (peer_addresses rows are
    -- deleted); they stay visible here, comma-separated, for `peer show`.
    ALTER TABLE peers ADD COLUMN former_addresses TEXT;
    "#,
    // 3: a counter of registry changes, kept by triggers, so a running daemon can
    // tell a peer change from the audit head updates that every event writes.
    r#"
    CREATE TABLE registry_version (
        id  INTEGER PRIMARY KEY CHECK (id = 1),
        v   INTEGER NOT NULL
    );
    INSERT INTO registry_version (id, v) VALUES (1, 0);
    CREATE TRIGGER peers_ins AFTER INSERT ON peers BEGIN UPDATE registry_version SET v = v + 1; END;
    CREATE TRIGGER peers_upd AFTER UPDATE ON peers BEGIN UPDATE registry_version SET v = v + 1; END;
    CREATE TRIGGER peers_del AFTER DELETE ON peers BEGIN UPDATE registry_version SET v = v + 1; END;
    CREATE TRIGGER addr_ins AFTER INSERT ON peer_addresses BEGIN UPDATE registry_version SET v = v + 1; END;
    CREATE TRIGGER addr_del AFTER DELETE ON peer_addresses BEGIN UPDATE registry_version SET v = v + 1; END;
    CREATE TRIGGER svc_ins AFTER INSERT ON peer_services BEGIN UPDATE registry_version SET v = v + 1; END;
    CREATE TRIGGER svc_del AFTER DELETE ON peer_services BEGIN UPDATE registry_version SET v = v + 1; END;
    CREATE TRIGGER rk_ins AFTER INSERT ON revoked_keys BEGIN UPDATE registry_version SET v = v + 1; END;
    "#,
    // 4: which seal key sealed this store's secrets, so that opening it with
    // another key (or none) is a clear error and never a silent reset.
    r#"
    CREATE TABLE seal_check (
        id     INTEGER PRIMARY KEY CHECK (id = 1),
        value  TEXT NOT NULL                      -- a known value sealed under the key
    );
    "#,
];

/// Associated data of the seal check value.
const SEAL_CHECK_AD: &[u8] = b"sitegate store seal check";
const SEAL_CHECK_VALUE: &[u8] = b"sitegate";

/// Associated data of a peer's sealed preshared key: its row id, so a sealed
/// value moved onto another row does not open.
fn psk_ad(id: i64) -> Vec<u8> {
    format!("sitegate peer {id} preshared_key").into_bytes()
}

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
    /// `store.url = postgres://...` parses but this build has no PostgreSQL driver.
    #[error("PostgreSQL peer stores (`store.url` = postgres://...) are not supported by this build yet; use sqlite:///PATH")]
    PostgresUnsupported,
    /// The database was written by a newer sitegate.
    #[error("peer store {} has schema version {found}, newer than this sitegate supports ({supported})", .path.display())]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
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
    #[error("peer store {} holds secrets sealed with a seal key, but no `daemon.seal_key_file` is configured; set it to the key that sealed them", .path.display())]
    SealKeyMissing { path: PathBuf },
    /// The store's secrets were sealed with another key.
    #[error("peer store {} was sealed with a different seal key than `daemon.seal_key_file`; restore the right key file (the store is left unchanged)", .path.display())]
    WrongSealKey { path: PathBuf },
    /// A sealed value that does not open.
    #[error("peer store {}: {source}", .path.display())]
    Seal { path: PathBuf, source: SealError },
    /// The recorded audit chain head cannot be read.
    #[error("audit chain head in the peer store: {0}")]
    AuditHead(String),
    /// `daemon.seal_key_file` cannot be read.
    #[error("{0}")]
    SealKeyFile(#[from] SealError),
    /// Any other database error.
    #[error("peer store: {0}")]
    Sqlite(#[from] rusqlite::Error),
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

/// An open peer store.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Seals preshared keys on write and opens them on read; `None` only for a
    /// store that has never been sealed.
    seal: Option<Arc<SealKey>>,
}

impl Store {
    /// Opens an existing store, applying pending migrations.
    ///
    /// # Errors
    /// [`StoreError::Missing`] when there is no database file; PostgreSQL is not
    /// supported yet; database errors.
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
        let mut store = Self::open_locked(cfg)?;
        store.adopt_seal(seal)?;
        Ok(store)
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

    /// Creates a new, empty store sealed under `seal` (when given).
    ///
    /// # Errors
    /// As [`Store::create`].
    pub fn create_sealed(
        cfg: &StoreConfig,
        seal: Option<Arc<SealKey>>,
    ) -> Result<Store, StoreError> {
        let mut store = Self::create(cfg)?;
        store.adopt_seal(seal)?;
        Ok(store)
    }

    /// Counts sealed and clear preshared keys of the store `cfg` names, opening
    /// none and sealing none (what `sitegate check` reports).
    ///
    /// # Errors
    /// As [`Store::open`] without the seal checks.
    pub fn inspect_secrets(cfg: &StoreConfig) -> Result<SecretCounts, StoreError> {
        Self::open_locked(cfg)?.secret_counts()
    }

    /// The audit chain head recorded in the store `cfg` names. Needs no seal
    /// key (the head is no secret), so `audit verify` can say that a keyed chain
    /// needs the key instead of failing on the store.
    ///
    /// # Errors
    /// As [`Store::open`] without the seal checks.
    pub fn recorded_audit_head(cfg: &StoreConfig) -> Result<Option<Head>, StoreError> {
        Self::open_locked(cfg)?
            .audit_head()
            .map_err(StoreError::AuditHead)
    }

    /// Opens without adopting a seal key: private, because such a handle must
    /// only read what is not secret (it would write new secrets in clear).
    fn open_locked(cfg: &StoreConfig) -> Result<Store, StoreError> {
        let path = sqlite_path(cfg)?;
        if !path.exists() {
            return Err(StoreError::Missing { path });
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Self::setup(conn, path)
    }

    /// Counts sealed and clear preshared keys without opening any.
    ///
    /// # Errors
    /// Database errors.
    pub fn secret_counts(&self) -> Result<SecretCounts, StoreError> {
        let (sealed, clear): (i64, i64) = self.conn.query_row(
            "SELECT COALESCE(SUM(preshared_key LIKE 'sealed:%'), 0),
                    COALESCE(SUM(preshared_key NOT LIKE 'sealed:%'), 0)
             FROM peers WHERE preshared_key IS NOT NULL",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let sealed_store = self
            .conn
            .query_row("SELECT 1 FROM seal_check WHERE id = 1", [], |_| Ok(()))
            .optional()?
            .is_some();
        Ok(SecretCounts {
            sealed: u64::try_from(sealed).unwrap_or(0),
            clear: u64::try_from(clear).unwrap_or(0),
            sealed_store,
        })
    }

    /// Checks `seal` against the store's seal check value, or records one and
    /// seals every clear preshared key (one transaction; then the WAL is
    /// checkpointed and truncated, and `secure_delete` has zeroed the old
    /// cells, so no clear copy stays in the files).
    fn adopt_seal(&mut self, seal: Option<Arc<SealKey>>) -> Result<(), StoreError> {
        let check: Option<String> = self
            .conn
            .query_row("SELECT value FROM seal_check WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(key) = seal else {
            if check.is_some() {
                return Err(StoreError::SealKeyMissing {
                    path: self.path.clone(),
                });
            }
            return Ok(());
        };
        if let Some(value) = &check {
            match key.open(SEAL_CHECK_AD, value, "seal check") {
                Ok(v) if v.as_slice() == SEAL_CHECK_VALUE => {}
                Err(SealError::Malformed { .. }) => {
                    return Err(corrupt(0, "seal check value", value));
                }
                _ => {
                    return Err(StoreError::WrongSealKey {
                        path: self.path.clone(),
                    })
                }
            }
        }
        if check.is_none() || self.secret_counts()?.clear > 0 {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let recorded: Option<String> = tx
                .query_row("SELECT value FROM seal_check WHERE id = 1", [], |r| {
                    r.get(0)
                })
                .optional()?;
            match recorded {
                // Another process sealed it in the meantime: it must be our key.
                Some(v) => {
                    if !key
                        .open(SEAL_CHECK_AD, &v, "seal check")
                        .is_ok_and(|p| p.as_slice() == SEAL_CHECK_VALUE)
                    {
                        return Err(StoreError::WrongSealKey {
                            path: self.path.clone(),
                        });
                    }
                }
                None => {
                    tx.execute(
                        "INSERT INTO seal_check (id, value) VALUES (1, ?1)",
                        [key.seal(SEAL_CHECK_AD, SEAL_CHECK_VALUE)],
                    )?;
                }
            }
            let clear: Vec<(i64, String)> = {
                let mut stmt = tx.prepare(
                    "SELECT id, preshared_key FROM peers
                     WHERE preshared_key IS NOT NULL AND preshared_key NOT LIKE 'sealed:%'",
                )?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            let sealed_any = !clear.is_empty();
            for (id, mut text) in clear {
                let psk = PresharedKey::from_base64(&text)
                    .map_err(|_| corrupt(id, "preshared key", "<redacted>"));
                zeroize::Zeroize::zeroize(&mut text);
                let psk = psk?;
                tx.execute(
                    "UPDATE peers SET preshared_key = ?1 WHERE id = ?2",
                    params![key.seal(&psk_ad(id), psk.as_bytes()), id],
                )?;
            }
            tx.commit()?;
            if sealed_any {
                self.conn
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            }
        }
        self.seal = Some(key);
        Ok(())
    }

    /// Creates a new, empty store (file mode 0600, WAL mode).
    ///
    /// # Errors
    /// [`StoreError::Exists`] when the file exists; I/O and database errors.
    pub fn create(cfg: &StoreConfig) -> Result<Store, StoreError> {
        let path = sqlite_path(cfg)?;
        // Created here with mode 0600 (it holds PSKs); SQLite gives its -wal and
        // -shm files the same mode.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => StoreError::Exists { path: path.clone() },
                _ => StoreError::Create {
                    path: path.clone(),
                    source,
                },
            })?;
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
        Self::setup(conn, path)
    }

    fn setup(mut conn: Connection, path: PathBuf) -> Result<Store, StoreError> {
        let opened = conn
            .busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))
            // FULL: a commit survives power loss, not only a process crash.
            // secure_delete: a rewritten secret (sealing, rotation) leaves no old
            // copy in free pages.
            .and_then(|()| {
                conn.execute_batch(
                    "PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL; PRAGMA secure_delete = ON;",
                )
            });
        if let Err(source) = opened {
            return Err(StoreError::Open { path, source });
        }
        match migrate(&mut conn, &path) {
            Ok(()) => Ok(Store {
                conn,
                path,
                seal: None,
            }),
            Err(StoreError::Sqlite(source)) => Err(StoreError::Open { path, source }),
            Err(e) => Err(e),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn seal(&self) -> Option<(&SealKey, &Path)> {
        self.seal.as_deref().map(|k| (k, self.path.as_path()))
    }

    /// A number that changes with every change to peers, their addresses and
    /// services, or the revocation list (kept by triggers), and with nothing
    /// else: audit head updates do not move it.
    ///
    /// # Errors
    /// Database errors.
    pub fn registry_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT v FROM registry_version WHERE id = 1", [], |r| {
                r.get(0)
            })?)
    }

    /// Every peer, revoked and expired included, ordered by id; addresses sorted
    /// IPv4 first, services by name. Read in one snapshot.
    ///
    /// # Errors
    /// Database errors; [`StoreError::Corrupt`] for values that do not parse.
    pub fn peers(&self) -> Result<Vec<Peer>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let peers = read_peers(&tx, None, self.seal())?;
        tx.commit()?;
        Ok(peers)
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
        let tx = self.conn.unchecked_transaction()?;
        let peers = read_peers(&tx, None, self.seal())?;
        mid();
        let revoked = self.revoked_keys()?;
        let version = self.registry_version()?;
        tx.commit()?;
        Ok(Snapshot {
            peers,
            revoked,
            version,
        })
    }

    /// Issues a peer in one transaction: checks name and key are unused (and the
    /// key not revoked), allocates or checks its address(es) in the tunnel subnets
    /// of `iface`, inserts it with its services.
    ///
    /// # Errors
    /// [`StoreError::NameTaken`], [`StoreError::NameRetired`], [`StoreError::KeyTaken`], [`StoreError::KeyRevoked`],
    /// [`StoreError::Address`]; database errors. On error nothing is written.
    pub fn add_peer(&mut self, iface: &InterfaceConfig, new: NewPeer) -> Result<Peer, StoreError> {
        let seal = self.seal.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let name = new.name.as_str();
        if let Some(row) = peer_row(&tx, &new.name)? {
            return Err(if row.revoked {
                StoreError::NameRetired(name.to_string())
            } else {
                StoreError::NameTaken(name.to_string())
            });
        }
        // Revocation first: a revoked peer's row still holds its key, and "revoked"
        // is the answer the admin needs, not "issued to a revoked peer".
        let key = check_key_unused(&tx, &new.public_key)?;

        let mut used = BTreeSet::new();
        let mut stmt = tx.prepare("SELECT address FROM peer_addresses")?;
        for row in stmt.query_map([], |r| r.get::<_, String>(0))? {
            // A row that does not parse cannot collide with a valid address.
            if let Ok(ip) = row?.parse::<IpAddr>() {
                used.insert(ip);
            }
        }
        drop(stmt);
        let nets: Vec<IpNet> = std::iter::once(IpNet::V4(iface.address_v4))
            .chain(iface.address_v6.map(IpNet::V6))
            .collect();
        let mut addresses = Vec::new();
        if let Some(addr) = new.address {
            let net = nets
                .iter()
                .find(|n| n.addr().is_ipv4() == addr.is_ipv4())
                .copied()
                .unwrap_or(nets[0]);
            alloc::check_explicit(net, addr, &used)?;
            addresses.push(addr);
        }
        for net in &nets {
            if !addresses
                .iter()
                .any(|a| a.is_ipv4() == net.addr().is_ipv4())
            {
                addresses.push(alloc::next_free(*net, &used)?);
            }
        }
        addresses.sort();

        tx.execute(
            "INSERT INTO peers (name, public_key, created_at, expires_at, admin)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, key, new.created_at, new.expires_at, new.admin],
        )?;
        let id = tx.last_insert_rowid();
        // Sealed for this row's id, which exists only after the insert.
        if let Some(text) = psk_text(seal.as_deref(), id, new.preshared_key.as_ref()) {
            tx.execute(
                "UPDATE peers SET preshared_key = ?1 WHERE id = ?2",
                params![text, id],
            )?;
        }
        for a in &addresses {
            tx.execute(
                "INSERT INTO peer_addresses (peer_id, address) VALUES (?1, ?2)",
                params![id, a.to_string()],
            )?;
        }
        let mut services = new.services.clone();
        services.sort();
        services.dedup();
        for s in &services {
            tx.execute(
                "INSERT INTO peer_services (peer_id, service) VALUES (?1, ?2)",
                params![id, s],
            )?;
        }
        tx.commit()?;
        Ok(Peer {
            id,
            name: new.name,
            public_key: new.public_key,
            preshared_key: new.preshared_key,
            addresses,
            created_at: new.created_at,
            expires_at: new.expires_at,
            revoked_at: None,
            revoked_reason: None,
            admin: new.admin,
            services,
        })
    }

    /// One peer by name, revoked or not.
    ///
    /// # Errors
    /// Database errors; [`StoreError::Corrupt`].
    pub fn peer(&self, name: &PeerName) -> Result<Option<Peer>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let peer = match peer_row(&tx, name)? {
            Some(row) => read_peers(&tx, Some(row.id), self.seal())?.pop(),
            None => None,
        };
        tx.commit()?;
        Ok(peer)
    }

    /// The tunnel addresses a revoked peer held before revocation freed them
    /// (empty for a peer that is not revoked).
    ///
    /// # Errors
    /// [`StoreError::UnknownPeer`]; database errors; [`StoreError::Corrupt`].
    pub fn former_addresses(&self, name: &PeerName) -> Result<Vec<IpAddr>, StoreError> {
        let (id, text): (i64, Option<String>) = self
            .conn
            .query_row(
                "SELECT id, former_addresses FROM peers WHERE name = ?1",
                [name.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| StoreError::UnknownPeer(name.to_string()))?;
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
        let (seal, path) = (self.seal.clone(), self.path.clone());
        let sealed = seal.as_deref().map(|k| (k, path.as_path()));
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = peer_row(&tx, name)?.ok_or_else(|| StoreError::UnknownPeer(name.to_string()))?;
        if row.revoked {
            return Err(StoreError::AlreadyRevoked(name.to_string()));
        }
        let freed = read_peers(&tx, Some(row.id), sealed)?
            .pop()
            .map(|p| p.addresses)
            .unwrap_or_default();
        let freed: Vec<String> = freed.iter().map(IpAddr::to_string).collect();
        tx.execute(
            "UPDATE peers SET revoked_at = ?1, revoked_reason = ?2, former_addresses = ?3
             WHERE id = ?4",
            params![now, reason, freed.join(","), row.id],
        )?;
        tx.execute("DELETE FROM peer_addresses WHERE peer_id = ?1", [row.id])?;
        // OR IGNORE: an entry already there (a hand-repaired store) keeps its
        // original time and reason.
        tx.execute(
            "INSERT OR IGNORE INTO revoked_keys (public_key, peer_name, revoked_at, reason)
             VALUES (?1, ?2, ?3, ?4)",
            params![row.public_key, name.as_str(), now, reason],
        )?;
        let peer = read_peers(&tx, Some(row.id), sealed)?
            .pop()
            .ok_or_else(|| StoreError::UnknownPeer(name.to_string()))?;
        tx.commit()?;
        Ok(peer)
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
        let (seal, path) = (self.seal.clone(), self.path.clone());
        let sealed = seal.as_deref().map(|k| (k, path.as_path()));
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = peer_row(&tx, name)?.ok_or_else(|| StoreError::UnknownPeer(name.to_string()))?;
        if row.revoked {
            return Err(StoreError::RotateRevoked(name.to_string()));
        }
        let old = PublicKey::from_base64(&row.public_key)
            .map_err(|_| corrupt(row.id, "public key", &row.public_key))?;
        let key = check_key_unused(&tx, &new_key)?;
        tx.execute(
            "UPDATE peers SET public_key = ?1, preshared_key = ?2 WHERE id = ?3",
            params![
                key,
                psk_text(seal.as_deref(), row.id, new_psk.as_ref()),
                row.id
            ],
        )?;
        tx.execute(
            "INSERT OR IGNORE INTO revoked_keys (public_key, peer_name, revoked_at, reason)
             VALUES (?1, ?2, ?3, 'rotated')",
            params![row.public_key, name.as_str(), now],
        )?;
        let peer = read_peers(&tx, Some(row.id), sealed)?
            .pop()
            .ok_or_else(|| StoreError::UnknownPeer(name.to_string()))?;
        tx.commit()?;
        Ok((peer, old))
    }

    /// The revocation list, oldest first: keys the daemon must refuse
    /// (`handshake_failed reason=revoked`) and `peer add` must not issue.
    ///
    /// # Errors
    /// Database errors; [`StoreError::CorruptRevoked`] for a key that does not parse.
    pub fn revoked_keys(&self) -> Result<Vec<RevokedKey>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT public_key, peer_name, reason, revoked_at FROM revoked_keys
             ORDER BY revoked_at, public_key",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (key, peer, reason, revoked_at) = row?;
            out.push(RevokedKey {
                public_key: PublicKey::from_base64(&key)
                    .map_err(|_| StoreError::CorruptRevoked(key.clone()))?,
                peer,
                reason,
                revoked_at,
            });
        }
        Ok(out)
    }
}

impl HeadStore for Store {
    fn audit_head(&self) -> Result<Option<Head>, String> {
        let row: Option<(i64, String)> = self
            .conn
            .query_row("SELECT seq, hash FROM audit_head WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        match row {
            None => Ok(None),
            Some((seq, hash)) => match u64::try_from(seq) {
                Ok(seq) => Ok(Some(Head { seq, hash })),
                Err(_) => Err(format!(
                    "{}: audit_head holds a negative seq {seq}",
                    self.path.display()
                )),
            },
        }
    }

    fn set_audit_head(&self, head: &Head) -> Result<(), String> {
        let seq = i64::try_from(head.seq).map_err(|_| format!("seq {} too large", head.seq))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.conn
            .execute(
                "INSERT INTO audit_head (id, seq, hash, updated_at) VALUES (1, ?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE
                 SET seq = excluded.seq, hash = excluded.hash, updated_at = excluded.updated_at",
                params![seq, head.hash, now],
            )
            .map(drop)
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

/// The columns of a peer row that admin actions check first.
struct PeerRow {
    id: i64,
    public_key: String,
    revoked: bool,
}

fn peer_row(
    tx: &rusqlite::Transaction<'_>,
    name: &PeerName,
) -> Result<Option<PeerRow>, StoreError> {
    Ok(tx
        .query_row(
            "SELECT id, public_key, revoked_at IS NOT NULL FROM peers WHERE name = ?1",
            [name.as_str()],
            |r| {
                Ok(PeerRow {
                    id: r.get(0)?,
                    public_key: r.get(1)?,
                    revoked: r.get(2)?,
                })
            },
        )
        .optional()?)
}

/// A key may be issued only when it is on no peer and not on the revocation list.
/// Returns its base64 form.
fn check_key_unused(tx: &rusqlite::Transaction<'_>, key: &PublicKey) -> Result<String, StoreError> {
    let key = key.to_base64();
    if tx
        .query_row(
            "SELECT 1 FROM revoked_keys WHERE public_key = ?1",
            [&key],
            |_| Ok(()),
        )
        .optional()?
        .is_some()
    {
        return Err(StoreError::KeyRevoked(key));
    }
    if let Some(peer) = tx
        .query_row(
            "SELECT name FROM peers WHERE public_key = ?1",
            [&key],
            |r| r.get::<_, String>(0),
        )
        .optional()?
    {
        return Err(StoreError::KeyTaken { key, peer });
    }
    Ok(key)
}

/// Every peer, or only peer `only`, in one read.
fn read_peers(
    tx: &rusqlite::Transaction<'_>,
    only: Option<i64>,
    seal: Option<(&SealKey, &Path)>,
) -> Result<Vec<Peer>, StoreError> {
    let mut addresses: BTreeMap<i64, Vec<IpAddr>> = BTreeMap::new();
    let mut stmt =
        tx.prepare("SELECT peer_id, address FROM peer_addresses WHERE ?1 IS NULL OR peer_id = ?1")?;
    for row in stmt.query_map([only], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
    })? {
        let (id, text) = row?;
        let ip = text.parse().map_err(|_| corrupt(id, "address", &text))?;
        addresses.entry(id).or_default().push(ip);
    }
    let mut services: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    let mut stmt = tx.prepare(
        "SELECT peer_id, service FROM peer_services WHERE ?1 IS NULL OR peer_id = ?1
         ORDER BY service",
    )?;
    for row in stmt.query_map([only], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
    })? {
        let (id, svc) = row?;
        services.entry(id).or_default().push(svc);
    }
    let mut stmt = tx.prepare(
        "SELECT id, name, public_key, preshared_key, created_at, expires_at,
                    revoked_at, revoked_reason, admin
             FROM peers WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([only], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, Option<i64>>(5)?,
            r.get::<_, Option<i64>>(6)?,
            r.get::<_, Option<String>>(7)?,
            r.get::<_, bool>(8)?,
        ))
    })?;
    let mut peers = Vec::new();
    for row in rows {
        let (id, name, pk, psk, created_at, expires_at, revoked_at, revoked_reason, admin) = row?;
        let mut addrs = addresses.remove(&id).unwrap_or_default();
        addrs.sort();
        peers.push(Peer {
            id,
            name: PeerName::new(&name).map_err(|_| corrupt(id, "name", &name))?,
            public_key: PublicKey::from_base64(&pk).map_err(|_| corrupt(id, "public key", &pk))?,
            preshared_key: match psk {
                Some(s) => Some(open_psk(id, s, seal)?),
                None => None,
            },
            addresses: addrs,
            created_at,
            expires_at,
            revoked_at,
            revoked_reason,
            admin,
            services: services.remove(&id).unwrap_or_default(),
        });
    }
    Ok(peers)
}

/// A stored preshared key: sealed text opened under the store's key, or (in a
/// store never sealed) clear base64.
fn open_psk(
    id: i64,
    mut text: String,
    seal: Option<(&SealKey, &Path)>,
) -> Result<PresharedKey, StoreError> {
    let out = match (seal::is_sealed(&text), seal) {
        (true, Some((key, path))) => key
            .open(
                &psk_ad(id),
                &text,
                &format!("preshared key of peer id {id}"),
            )
            .map_err(|source| StoreError::Seal {
                path: path.to_path_buf(),
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
fn psk_text(seal: Option<&SealKey>, id: i64, psk: Option<&PresharedKey>) -> Option<String> {
    psk.map(|k| match seal {
        Some(key) => key.seal(&psk_ad(id), k.as_bytes()),
        None => k.to_base64(),
    })
}

fn sqlite_path(cfg: &StoreConfig) -> Result<PathBuf, StoreError> {
    match cfg {
        StoreConfig::Sqlite { path } => Ok(path.clone()),
        StoreConfig::Postgres { .. } => Err(StoreError::PostgresUnsupported),
    }
}

fn corrupt(id: i64, what: &'static str, value: &str) -> StoreError {
    StoreError::Corrupt {
        id,
        what,
        value: value.to_string(),
    }
}

/// Applies pending migrations, each with its version bump in one transaction.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let supported = MIGRATIONS.len() as i64;
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current == supported {
        return Ok(()); // the common case takes no write lock
    }
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > supported {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: version,
                supported,
            });
        }
        let Some(sql) = usize::try_from(version)
            .ok()
            .and_then(|v| MIGRATIONS.get(v))
        else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", version + 1))?;
        tx.commit()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn iface(addr: &str) -> InterfaceConfig {
        let text = format!(
            "[interface]\nname='sg0'\nprivate_key_file='/k'\naddress={addr}\nendpoint='h:1'\n[store]\nurl='sqlite:///d.db'\n"
        );
        Config::parse(Path::new("/x/s.toml"), &text)
            .unwrap()
            .interface
    }

    fn temp_store(tag: &str) -> (StoreConfig, PathBuf) {
        let dir = std::env::temp_dir().join(format!("sitegate-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (
            StoreConfig::Sqlite {
                path: dir.join("s.db"),
            },
            dir,
        )
    }

    fn new_peer(name: &str) -> NewPeer {
        NewPeer {
            name: PeerName::new(name).unwrap(),
            public_key: crate::keys::PrivateKey::generate().public_key(),
            preshared_key: Some(PresharedKey::generate()),
            address: None,
            services: vec!["sftp".into()],
            created_at: 1_700_000_000,
            expires_at: None,
            admin: false,
        }
    }

    /// Create → add → reopen round-trips peers; open refuses a missing store and create an existing one.
    #[test]
    fn create_add_reopen() {
        let (cfg, dir) = temp_store("roundtrip");
        let e = Store::open(&cfg).err().unwrap().to_string();
        assert!(
            e.starts_with("no peer store at ") && e.ends_with("; run `sitegate init`"),
            "{e}"
        );
        let mut s = Store::create(&cfg).unwrap();
        let i = iface("'10.8.0.1/24'");
        let a = s.add_peer(&i, new_peer("alice")).unwrap();
        let b = s.add_peer(&i, new_peer("bob")).unwrap();
        assert_eq!(a.addresses, vec!["10.8.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(b.addresses, vec!["10.8.0.3".parse::<IpAddr>().unwrap()]);
        drop(s);
        assert!(matches!(
            Store::create(&cfg),
            Err(StoreError::Exists { .. })
        ));
        let s = Store::open(&cfg).unwrap();
        let peers = s.peers().unwrap();
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].name.as_str(), "alice");
        assert_eq!(peers[0].public_key, a.public_key);
        assert_eq!(peers[0].preshared_key, a.preshared_key);
        assert_eq!(peers[1].services, vec!["sftp".to_string()]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Duplicate names, reused keys and bad explicit addresses are refused and nothing is written.
    #[test]
    fn conflicts_leave_store_unchanged() {
        let (cfg, dir) = temp_store("conflicts");
        let mut s = Store::create(&cfg).unwrap();
        let i = iface("'10.8.0.1/24'");
        let a = s.add_peer(&i, new_peer("alice")).unwrap();
        let e = s.add_peer(&i, new_peer("alice")).unwrap_err();
        assert_eq!(e.to_string(), "a peer named `alice` already exists");
        let mut same_key = new_peer("carol");
        same_key.public_key = a.public_key;
        assert!(matches!(
            s.add_peer(&i, same_key),
            Err(StoreError::KeyTaken { .. })
        ));
        let mut taken = new_peer("dave");
        taken.address = Some("10.8.0.2".parse().unwrap());
        let e = s.add_peer(&i, taken).unwrap_err();
        assert_eq!(
            e.to_string(),
            "address 10.8.0.2 is already assigned to another peer"
        );
        assert_eq!(s.peers().unwrap().len(), 1);
        let mut explicit = new_peer("erin");
        explicit.address = Some("10.8.0.77".parse().unwrap());
        assert_eq!(
            s.add_peer(&i, explicit).unwrap().addresses[0].to_string(),
            "10.8.0.77"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A postgres:// store is refused at open with a clear message; a non-database file names its path.
    #[test]
    fn open_refusals() {
        let pg = StoreConfig::Postgres {
            url: "postgres://u@db/reg".into(),
            pool: None,
        };
        let e = Store::open(&pg).err().unwrap().to_string();
        assert!(
            e.starts_with("PostgreSQL peer stores") && e.contains("not supported"),
            "{e}"
        );
        let (cfg, dir) = temp_store("garbage");
        std::fs::write(dir.join("s.db"), vec![7u8; 4096]).unwrap();
        let e = Store::open(&cfg).err().unwrap().to_string();
        assert!(
            e.starts_with(&format!(
                "cannot open peer store {}",
                dir.join("s.db").display()
            )),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// With an IPv6 tunnel address each peer gets one address per family.
    #[test]
    fn dual_stack() {
        let (cfg, dir) = temp_store("dual");
        let mut s = Store::create(&cfg).unwrap();
        let i = iface("['10.8.0.1/24', 'fd00:8::1/64']");
        let p = s.add_peer(&i, new_peer("alice")).unwrap();
        let shown: Vec<String> = p.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(shown, ["10.8.0.2", "fd00:8::2"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The registry version a reader sees moves when another connection adds a peer.
    #[test]
    fn registry_version_sees_other_writers() {
        let (cfg, dir) = temp_store("dv");
        let mut writer = Store::create(&cfg).unwrap();
        let reader = Store::open(&cfg).unwrap();
        let before = reader.registry_version().unwrap();
        writer
            .add_peer(&iface("'10.8.0.1/24'"), new_peer("alice"))
            .unwrap();
        assert_ne!(reader.registry_version().unwrap(), before);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A revoke that commits while a snapshot is being read is either wholly in
    /// it or shows as a newer version afterwards: never half seen and lost.
    #[test]
    fn snapshot_is_consistent_under_a_concurrent_revoke() {
        let (cfg, dir) = temp_store("snapshot");
        let mut admin = Store::create(&cfg).unwrap();
        let a = admin
            .add_peer(&iface("'10.8.0.1/24'"), new_peer("alice"))
            .unwrap();
        let daemon = Store::open(&cfg).unwrap();
        let snap = daemon
            .snapshot(|| {
                admin.revoke_peer(&a.name, None, 1_700_000_500).unwrap();
            })
            .unwrap();
        assert_eq!(snap.peers.len(), 1);
        assert_eq!(snap.peers[0].revoked_at, None, "taken before the revoke");
        assert!(snap.revoked.is_empty(), "revocations from the same moment");
        assert_ne!(
            daemon.registry_version().unwrap(),
            snap.version,
            "the next poll sees the revoke"
        );
        let after = daemon.snapshot(|| {}).unwrap();
        assert!(after.peers[0].revoked_at.is_some());
        assert_eq!(after.revoked.len(), 1);
        assert_eq!(after.version, daemon.registry_version().unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Parallel writers on separate connections all succeed with distinct addresses.
    #[test]
    fn concurrent_adds() {
        let (cfg, dir) = temp_store("concurrent");
        drop(Store::create(&cfg).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|n| {
                let cfg = cfg.clone();
                std::thread::spawn(move || {
                    let mut s = Store::open(&cfg).unwrap();
                    s.add_peer(&iface("'10.8.0.1/24'"), new_peer(&format!("p{n}")))
                        .unwrap()
                })
            })
            .collect();
        let mut addrs: Vec<IpAddr> = handles
            .into_iter()
            .map(|h| h.join().unwrap().addresses[0])
            .collect();
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), 8);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Revoke frees the addresses (kept as history), lists the key, refuses twice and unknown names.
    #[test]
    fn revoke() {
        let (cfg, dir) = temp_store("revoke");
        let mut s = Store::create(&cfg).unwrap();
        let i = iface("'10.8.0.1/24'");
        let a = s.add_peer(&i, new_peer("alice")).unwrap();
        let name = a.name.clone();
        let r = s
            .revoke_peer(&name, Some("laptop lost"), 1_700_000_100)
            .unwrap();
        assert_eq!(r.revoked_at, Some(1_700_000_100));
        assert_eq!(r.revoked_reason.as_deref(), Some("laptop lost"));
        assert!(r.addresses.is_empty());
        assert_eq!(s.former_addresses(&name).unwrap(), a.addresses);
        assert_eq!(
            s.revoked_keys().unwrap(),
            vec![RevokedKey {
                public_key: a.public_key,
                peer: "alice".into(),
                reason: Some("laptop lost".into()),
                revoked_at: 1_700_000_100,
            }]
        );
        let e = s.revoke_peer(&name, None, 1).unwrap_err().to_string();
        assert_eq!(e, "peer `alice` is already revoked");
        let ghost = PeerName::new("ghost").unwrap();
        let e = s.revoke_peer(&ghost, None, 1).unwrap_err().to_string();
        assert_eq!(e, "no peer named `ghost`");
        // The freed address is issued again; the revoked key never is.
        let b = s.add_peer(&i, new_peer("bob")).unwrap();
        assert_eq!(b.addresses, a.addresses);
        let mut reuse = new_peer("carol");
        reuse.public_key = a.public_key;
        assert!(matches!(
            s.add_peer(&i, reuse),
            Err(StoreError::KeyRevoked(_))
        ));
        assert_eq!(
            s.peer(&name).unwrap().unwrap().revoked_at,
            Some(1_700_000_100)
        );
        assert!(s.peer(&ghost).unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Rotate keeps name, address and grants; the old key is revoked; revoked peers and used keys are refused.
    #[test]
    fn rotate() {
        let (cfg, dir) = temp_store("rotate");
        let mut s = Store::create(&cfg).unwrap();
        let i = iface("'10.8.0.1/24'");
        let a = s.add_peer(&i, new_peer("alice")).unwrap();
        let b = s.add_peer(&i, new_peer("bob")).unwrap();
        let fresh = crate::keys::PrivateKey::generate().public_key();
        let psk = PresharedKey::generate();
        let (p, old) = s.rotate_peer(&a.name, fresh, Some(psk.clone()), 5).unwrap();
        assert_eq!(old, a.public_key);
        assert_eq!(p.public_key, fresh);
        assert_eq!(p.preshared_key, Some(psk));
        assert_eq!(
            (p.id, &p.addresses, &p.services),
            (a.id, &a.addresses, &a.services)
        );
        let rk = s.revoked_keys().unwrap();
        assert_eq!(rk.len(), 1);
        assert_eq!(rk[0].reason.as_deref(), Some("rotated"));
        // Back to the old key, or to bob's: refused, nothing written.
        assert!(matches!(
            s.rotate_peer(&a.name, a.public_key, None, 6),
            Err(StoreError::KeyRevoked(_))
        ));
        assert!(matches!(
            s.rotate_peer(&a.name, b.public_key, None, 6),
            Err(StoreError::KeyTaken { .. })
        ));
        assert_eq!(s.peer(&a.name).unwrap().unwrap().public_key, fresh);
        s.revoke_peer(&b.name, None, 7).unwrap();
        let e = s
            .rotate_peer(
                &b.name,
                crate::keys::PrivateKey::generate().public_key(),
                None,
                8,
            )
            .unwrap_err();
        assert!(matches!(e, StoreError::RotateRevoked(_)), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The audit head round-trips and is replaced, never duplicated.
    #[test]
    fn audit_head() {
        let (cfg, dir) = temp_store("head");
        let s = Store::create(&cfg).unwrap();
        assert_eq!(s.audit_head().unwrap(), None);
        for seq in [1, 2] {
            let h = Head {
                seq,
                hash: format!("{seq:064}"),
            };
            s.set_audit_head(&h).unwrap();
            assert_eq!(s.audit_head().unwrap(), Some(h));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Peer changes move the registry version; audit head updates do not.
    #[test]
    fn registry_version_ignores_audit_head() {
        let dir = std::env::temp_dir().join(format!("sg-regver-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = StoreConfig::Sqlite {
            path: dir.join("s.db"),
        };
        let store = Store::create(&cfg).unwrap();
        let v0 = store.registry_version().unwrap();
        store
            .set_audit_head(&crate::audit::chain::Head::genesis())
            .unwrap();
        assert_eq!(
            store.registry_version().unwrap(),
            v0,
            "audit head is not a registry change"
        );
        store
            .conn
            .execute(
                "INSERT INTO revoked_keys (public_key, peer_name, revoked_at) VALUES ('k', 'p', 1)",
                [],
            )
            .unwrap();
        assert!(store.registry_version().unwrap() > v0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A version-1 store (issue 3) is migrated on open and keeps its peers.
    #[test]
    fn migrates_v1() {
        let (cfg, dir) = temp_store("v1");
        let path = dir.join("s.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(
                "PRAGMA user_version = 1;
                 INSERT INTO peers (name, public_key, created_at)
                 VALUES ('old', 'hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=', 1);",
            )
            .unwrap();
        }
        let s = Store::open(&cfg).unwrap();
        let v: i64 = s
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        assert_eq!(s.peers().unwrap()[0].name.as_str(), "old");
        assert_eq!(s.audit_head().unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn seal_key(b: u8) -> Option<Arc<SealKey>> {
        Some(Arc::new(SealKey::from_bytes([b; crate::keys::KEY_LEN])))
    }

    fn raw_psks(s: &Store) -> Vec<Option<String>> {
        let mut stmt = s
            .conn
            .prepare("SELECT preshared_key FROM peers ORDER BY id")
            .unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    }

    /// With a key, PSKs are stored sealed and read back; rotation reseals.
    #[test]
    fn sealed_roundtrip() {
        let (cfg, dir) = temp_store("sealed");
        let mut s = Store::create_sealed(&cfg, seal_key(1)).unwrap();
        let a = s.add_peer(&iface("'10.8.0.1/24'"), new_peer("a")).unwrap();
        let b = s.add_peer(&iface("'10.8.0.1/24'"), new_peer("b")).unwrap();
        for raw in raw_psks(&s) {
            assert!(seal::is_sealed(&raw.unwrap()));
        }
        drop(s);
        let mut s = Store::open_sealed(&cfg, seal_key(1)).unwrap();
        let peers = s.peers().unwrap();
        assert_eq!(peers[0].preshared_key, a.preshared_key);
        assert_eq!(peers[1].preshared_key, b.preshared_key);
        let psk = PresharedKey::generate();
        let fresh = crate::keys::PrivateKey::generate().public_key();
        let (p, _) = s.rotate_peer(&b.name, fresh, Some(psk.clone()), 5).unwrap();
        assert_eq!(p.preshared_key, Some(psk.clone()));
        assert_eq!(s.peers().unwrap()[1].preshared_key, Some(psk));
        assert_eq!(
            s.secret_counts().unwrap(),
            SecretCounts {
                sealed: 2,
                clear: 0,
                sealed_store: true
            }
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Another key, or none, is refused at open and writes nothing.
    #[test]
    fn wrong_or_missing_key_refused() {
        let (cfg, dir) = temp_store("wrongkey");
        let mut s = Store::create_sealed(&cfg, seal_key(1)).unwrap();
        s.add_peer(&iface("'10.8.0.1/24'"), new_peer("a")).unwrap();
        let before = raw_psks(&s);
        drop(s);
        let e = Store::open_sealed(&cfg, seal_key(2)).err().unwrap();
        assert!(matches!(e, StoreError::WrongSealKey { .. }), "{e}");
        assert!(e.to_string().contains("daemon.seal_key_file"), "{e}");
        let e = Store::open(&cfg).err().unwrap();
        assert!(matches!(e, StoreError::SealKeyMissing { .. }), "{e}");
        let s = Store::open_sealed(&cfg, seal_key(1)).unwrap();
        assert_eq!(raw_psks(&s), before);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A clear store is sealed on its first keyed open; a sealed value copied
    /// onto another row does not open there (the row id is associated data).
    #[test]
    fn clear_store_migrates_and_rows_are_bound() {
        let (cfg, dir) = temp_store("migrate");
        let mut s = Store::create(&cfg).unwrap();
        let a = s.add_peer(&iface("'10.8.0.1/24'"), new_peer("a")).unwrap();
        s.add_peer(&iface("'10.8.0.1/24'"), new_peer("b")).unwrap();
        let mut nopsk = new_peer("c");
        nopsk.preshared_key = None;
        s.add_peer(&iface("'10.8.0.1/24'"), nopsk).unwrap();
        assert_eq!(
            raw_psks(&s)[0].as_deref(),
            a.preshared_key
                .as_ref()
                .map(PresharedKey::to_base64)
                .as_deref()
        );
        assert_eq!(Store::inspect_secrets(&cfg).unwrap().clear, 2);
        drop(s);
        let s = Store::open_sealed(&cfg, seal_key(3)).unwrap();
        let raw = raw_psks(&s);
        assert!(raw[0].as_deref().is_some_and(seal::is_sealed));
        assert!(raw[1].as_deref().is_some_and(seal::is_sealed));
        assert_eq!(raw[2], None);
        assert_eq!(s.peers().unwrap()[0].preshared_key, a.preshared_key);
        s.conn
            .execute(
                "UPDATE peers SET preshared_key = ?1 WHERE name = 'b'",
                [raw[0].clone()],
            )
            .unwrap();
        let e = s.peers().err().unwrap();
        assert!(matches!(e, StoreError::Seal { .. }), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
