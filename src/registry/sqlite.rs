//! The SQLite peer store (WAL), one gateway's embedded default: one `BEGIN IMMEDIATE` transaction per admin action, so
//! concurrent `sitegate peer add` processes queue on the write lock (up to
//! [`BUSY_TIMEOUT_MS`]) instead of failing, and allocation + insert is atomic.
//!
//! Schema changes are numbered migrations recorded in `PRAGMA user_version`.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::audit::chain::{Head, Sealed};
use crate::audit::writer::HeadStore;
use crate::config::{InterfaceConfig, StoreConfig};
use crate::keys::{PresharedKey, PublicKey};
use crate::registry::alloc;
use crate::registry::store::{
    check_seal, corrupt, parse_former, psk_text, reseal_psk, revoked_key, NewPeer, PeerRow,
    PeerRows, RevokedKey, SecretCounts, Snapshot, StoreError, SEAL_CHECK_AD, SEAL_CHECK_VALUE,
};
use crate::registry::{Peer, PeerName};
use crate::seal::SealKey;

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

/// An open SQLite peer store.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    /// `path` as text, for messages.
    at: String,
    /// Seals preshared keys on write and opens them on read; `None` only for a
    /// store that has never been sealed.
    seal: Option<Arc<SealKey>>,
}

impl SqliteStore {
    /// Opens an existing store, applying pending migrations.
    ///
    /// # Errors
    /// [`StoreError::Missing`] when there is no database file; PostgreSQL is not
    /// supported yet; database errors.
    pub fn open(cfg: &StoreConfig) -> Result<SqliteStore, StoreError> {
        Self::open_sealed(cfg, None)
    }

    /// See [`crate::registry::Store::open_sealed`].
    pub fn open_sealed(
        cfg: &StoreConfig,
        seal: Option<Arc<SealKey>>,
    ) -> Result<SqliteStore, StoreError> {
        let mut store = Self::open_locked(cfg)?;
        store.adopt_seal(seal)?;
        Ok(store)
    }

    /// See [`crate::registry::Store::create_sealed`].
    pub fn create_sealed(
        cfg: &StoreConfig,
        seal: Option<Arc<SealKey>>,
    ) -> Result<SqliteStore, StoreError> {
        let mut store = Self::create(cfg)?;
        store.adopt_seal(seal)?;
        Ok(store)
    }

    /// See [`crate::registry::Store::inspect_secrets`].
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
    fn open_locked(cfg: &StoreConfig) -> Result<SqliteStore, StoreError> {
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

    /// See [`crate::registry::Store::secret_counts`].
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
                    at: self.at.clone(),
                });
            }
            return Ok(());
        };
        if let Some(value) = &check {
            check_seal(&key, value, &self.at)?;
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
                Some(v) => check_seal(&key, &v, &self.at)?,
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
            for (id, text) in clear {
                tx.execute(
                    "UPDATE peers SET preshared_key = ?1 WHERE id = ?2",
                    params![reseal_psk(&key, id, text)?, id],
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
    pub fn create(cfg: &StoreConfig) -> Result<SqliteStore, StoreError> {
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

    fn setup(mut conn: Connection, path: PathBuf) -> Result<SqliteStore, StoreError> {
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
            Ok(()) => Ok(SqliteStore {
                conn,
                at: path.display().to_string(),
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

    fn seal(&self) -> Option<(&SealKey, &str)> {
        self.seal.as_deref().map(|k| (k, self.at.as_str()))
    }

    /// See [`crate::registry::Store::registry_version`].
    pub fn registry_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT v FROM registry_version WHERE id = 1", [], |r| {
                r.get(0)
            })?)
    }

    /// See [`crate::registry::Store::peers`].
    pub fn peers(&self) -> Result<Vec<Peer>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let peers = read_peers(&tx, None, self.seal())?;
        tx.commit()?;
        Ok(peers)
    }

    /// See [`crate::registry::Store::snapshot`].
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

    /// See [`crate::registry::Store::add_peer`].
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
        let addresses = alloc::assign(
            IpNet::V4(iface.address_v4),
            iface.address_v6.map(IpNet::V6),
            None,
            new.address,
            &used,
        )?;

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
        let services = new.granted();
        for s in &services {
            tx.execute(
                "INSERT INTO peer_services (peer_id, service) VALUES (?1, ?2)",
                params![id, s],
            )?;
        }
        tx.commit()?;
        Ok(new.issued(id, addresses, services))
    }

    /// See [`crate::registry::Store::peer`].
    pub fn peer(&self, name: &PeerName) -> Result<Option<Peer>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let peer = match peer_row(&tx, name)? {
            Some(row) => read_peers(&tx, Some(row.id), self.seal())?.pop(),
            None => None,
        };
        tx.commit()?;
        Ok(peer)
    }

    /// See [`crate::registry::Store::former_addresses`].
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
        parse_former(id, text.as_deref())
    }

    /// See [`crate::registry::Store::revoke_peer`].
    pub fn revoke_peer(
        &mut self,
        name: &PeerName,
        reason: Option<&str>,
        now: i64,
    ) -> Result<Peer, StoreError> {
        let (seal, at) = (self.seal.clone(), self.at.clone());
        let sealed = seal.as_deref().map(|k| (k, at.as_str()));
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

    /// See [`crate::registry::Store::rotate_peer`].
    pub fn rotate_peer(
        &mut self,
        name: &PeerName,
        new_key: PublicKey,
        new_psk: Option<PresharedKey>,
        now: i64,
    ) -> Result<(Peer, PublicKey), StoreError> {
        let (seal, at) = (self.seal.clone(), self.at.clone());
        let sealed = seal.as_deref().map(|k| (k, at.as_str()));
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

    /// See [`crate::registry::Store::revoked_keys`].
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
            out.push(revoked_key(key, peer, reason, revoked_at)?);
        }
        Ok(out)
    }
}

impl HeadStore for SqliteStore {
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

    fn set_audit_head(&self, head: &Head, _: &[Sealed]) -> Result<(), String> {
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
struct RowHead {
    id: i64,
    public_key: String,
    revoked: bool,
}

fn peer_row(
    tx: &rusqlite::Transaction<'_>,
    name: &PeerName,
) -> Result<Option<RowHead>, StoreError> {
    Ok(tx
        .query_row(
            "SELECT id, public_key, revoked_at IS NOT NULL FROM peers WHERE name = ?1",
            [name.as_str()],
            |r| {
                Ok(RowHead {
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
    seal: Option<(&SealKey, &str)>,
) -> Result<Vec<Peer>, StoreError> {
    let mut rows = PeerRows::default();
    let mut stmt =
        tx.prepare("SELECT peer_id, address FROM peer_addresses WHERE ?1 IS NULL OR peer_id = ?1")?;
    for row in stmt.query_map([only], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
    })? {
        let (id, text) = row?;
        rows.address(id, &text)?;
    }
    let mut stmt = tx.prepare(
        "SELECT peer_id, service FROM peer_services WHERE ?1 IS NULL OR peer_id = ?1
         ORDER BY service",
    )?;
    for row in stmt.query_map([only], |r| Ok((r.get(0)?, r.get(1)?)))? {
        let (id, svc) = row?;
        rows.service(id, svc);
    }
    let mut stmt = tx.prepare(
        "SELECT id, name, public_key, preshared_key, created_at, expires_at,
                    revoked_at, revoked_reason, admin
             FROM peers WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
    )?;
    for row in stmt.query_map([only], |r| {
        Ok(PeerRow {
            id: r.get(0)?,
            name: r.get(1)?,
            public_key: r.get(2)?,
            preshared_key: r.get(3)?,
            created_at: r.get(4)?,
            expires_at: r.get(5)?,
            revoked_at: r.get(6)?,
            revoked_reason: r.get(7)?,
            admin: r.get(8)?,
        })
    })? {
        rows.peer(row?);
    }
    rows.finish(seal)
}

fn sqlite_path(cfg: &StoreConfig) -> Result<PathBuf, StoreError> {
    match cfg {
        StoreConfig::Sqlite { path } => Ok(path.clone()),
        StoreConfig::Postgres { .. } => Err(StoreError::Connect {
            url: cfg.location(),
            reason: "a postgres:// store is not a SQLite file".into(),
        }),
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
                at: path.display().to_string(),
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
    use crate::seal;

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
        let e = SqliteStore::open(&cfg).err().unwrap().to_string();
        assert!(
            e.starts_with("no peer store at ") && e.ends_with("; run `sitegate init`"),
            "{e}"
        );
        let mut s = SqliteStore::create(&cfg).unwrap();
        let i = iface("'10.8.0.1/24'");
        let a = s.add_peer(&i, new_peer("alice")).unwrap();
        let b = s.add_peer(&i, new_peer("bob")).unwrap();
        assert_eq!(a.addresses, vec!["10.8.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(b.addresses, vec!["10.8.0.3".parse::<IpAddr>().unwrap()]);
        drop(s);
        assert!(matches!(
            SqliteStore::create(&cfg),
            Err(StoreError::Exists { .. })
        ));
        let s = SqliteStore::open(&cfg).unwrap();
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
        let mut s = SqliteStore::create(&cfg).unwrap();
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

    /// A file that is not a database is refused at open, naming its path.
    #[test]
    fn open_refusals() {
        let (cfg, dir) = temp_store("garbage");
        std::fs::write(dir.join("s.db"), vec![7u8; 4096]).unwrap();
        let e = SqliteStore::open(&cfg).err().unwrap().to_string();
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
        let mut s = SqliteStore::create(&cfg).unwrap();
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
        let mut writer = SqliteStore::create(&cfg).unwrap();
        let reader = SqliteStore::open(&cfg).unwrap();
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
        let mut admin = SqliteStore::create(&cfg).unwrap();
        let a = admin
            .add_peer(&iface("'10.8.0.1/24'"), new_peer("alice"))
            .unwrap();
        let daemon = SqliteStore::open(&cfg).unwrap();
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
        drop(SqliteStore::create(&cfg).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|n| {
                let cfg = cfg.clone();
                std::thread::spawn(move || {
                    let mut s = SqliteStore::open(&cfg).unwrap();
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
        let mut s = SqliteStore::create(&cfg).unwrap();
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
        let mut s = SqliteStore::create(&cfg).unwrap();
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
        let s = SqliteStore::create(&cfg).unwrap();
        assert_eq!(s.audit_head().unwrap(), None);
        for seq in [1, 2] {
            let h = Head {
                seq,
                hash: format!("{seq:064}"),
            };
            s.set_audit_head(&h, &[]).unwrap();
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
        let store = SqliteStore::create(&cfg).unwrap();
        let v0 = store.registry_version().unwrap();
        store
            .set_audit_head(&crate::audit::chain::Head::genesis(), &[])
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
        let s = SqliteStore::open(&cfg).unwrap();
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

    fn raw_psks(s: &SqliteStore) -> Vec<Option<String>> {
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
        let mut s = SqliteStore::create_sealed(&cfg, seal_key(1)).unwrap();
        let a = s.add_peer(&iface("'10.8.0.1/24'"), new_peer("a")).unwrap();
        let b = s.add_peer(&iface("'10.8.0.1/24'"), new_peer("b")).unwrap();
        for raw in raw_psks(&s) {
            assert!(seal::is_sealed(&raw.unwrap()));
        }
        drop(s);
        let mut s = SqliteStore::open_sealed(&cfg, seal_key(1)).unwrap();
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
        let mut s = SqliteStore::create_sealed(&cfg, seal_key(1)).unwrap();
        s.add_peer(&iface("'10.8.0.1/24'"), new_peer("a")).unwrap();
        let before = raw_psks(&s);
        drop(s);
        let e = SqliteStore::open_sealed(&cfg, seal_key(2)).err().unwrap();
        assert!(matches!(e, StoreError::WrongSealKey { .. }), "{e}");
        assert!(e.to_string().contains("daemon.seal_key_file"), "{e}");
        let e = SqliteStore::open(&cfg).err().unwrap();
        assert!(matches!(e, StoreError::SealKeyMissing { .. }), "{e}");
        let s = SqliteStore::open_sealed(&cfg, seal_key(1)).unwrap();
        assert_eq!(raw_psks(&s), before);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A clear store is sealed on its first keyed open; a sealed value copied
    /// onto another row does not open there (the row id is associated data).
    #[test]
    fn clear_store_migrates_and_rows_are_bound() {
        let (cfg, dir) = temp_store("migrate");
        let mut s = SqliteStore::create(&cfg).unwrap();
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
        assert_eq!(SqliteStore::inspect_secrets(&cfg).unwrap().clear, 2);
        drop(s);
        let s = SqliteStore::open_sealed(&cfg, seal_key(3)).unwrap();
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
