//! The PostgreSQL peer store: one registry for several gateways (SPEC, Scale-out).
//!
//! The admin creates the database; the schema is sitegate's, created and
//! migrated on open under an advisory lock so that gateways and admin commands
//! starting together apply each migration once. Every admin write takes
//! another advisory lock for its transaction, so allocation over the shared
//! address table is serialised across hosts by the database, not by luck; the
//! `UNIQUE` constraint on addresses stays as the backstop.
//!
//! Triggers give every changed row the next `registry_version`, log its peer
//! or revoked key in `registry_changes`, and `NOTIFY` [`CHANNEL`] in the
//! writing transaction: a gateway hears of a change when it commits and reads
//! only what changed since its version ([`PgStore::changes_since`]); a gateway
//! that missed the notification (it was reconnecting) sees the version moved
//! at its next check.
//!
//! Connections are plain (a unix socket or a private network): `sslmode=require`
//! in the URL is refused at connect, never silently downgraded.

use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fallible_iterator::FallibleIterator;
use ipnet::{IpNet, Ipv4Net};
use postgres::{Client, IsolationLevel, NoTls, Transaction};

use crate::audit::chain::{Head, Sealed};
use crate::audit::writer::HeadStore;
use crate::config::{InterfaceConfig, StoreConfig};
use crate::keys::{PresharedKey, PublicKey};
use crate::registry::alloc;
use crate::registry::store::{
    check_seal, parse_former, psk_text, reseal_psk, revoked_key, NewPeer, PeerRow, PeerRows,
    RevokedKey, SecretCounts, Snapshot, StoreError, SEAL_CHECK_AD, SEAL_CHECK_VALUE,
};
use crate::registry::{Peer, PeerName};
use crate::seal::SealKey;

/// The channel every registry change is announced on.
pub const CHANNEL: &str = "sitegate_registry";
/// Advisory lock keys (one namespace, arbitrary constants): schema migrations,
/// and admin writes.
const SCHEMA_LOCK: i64 = 0x7369_7465_6761_0001;
const WRITE_LOCK: i64 = 0x7369_7465_6761_0002;
/// A connect that takes longer fails (unless the URL sets `connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A statement or lock wait that takes longer fails: an admin command never
/// hangs on a stuck database, and a gateway notices one.
const STATEMENT_TIMEOUT_MS: u32 = 10_000;

/// Migration `i` brings the schema from version `i` to `i + 1`
/// (`sitegate_schema.version`).
const MIGRATIONS: &[&str] = &[
    // 1: the registry and its change log, the shared server key, and the audit table.
    r#"
    -- One row per issued peer; as in the SQLite store, rows are never deleted.
    CREATE TABLE peers (
        id               BIGSERIAL PRIMARY KEY,
        name             TEXT NOT NULL UNIQUE,    -- PeerName
        public_key       TEXT NOT NULL UNIQUE,    -- base64
        preshared_key    TEXT,                    -- base64, or sealed:v1:... under the seal key
        created_at       BIGINT NOT NULL,         -- Unix seconds
        expires_at       BIGINT,
        revoked_at       BIGINT,
        revoked_reason   TEXT,
        admin            BOOLEAN NOT NULL DEFAULT false,
        former_addresses TEXT                     -- comma-separated, set at revocation
    );
    -- Tunnel host addresses, unique across all peers of all gateways.
    CREATE TABLE peer_addresses (
        peer_id  BIGINT NOT NULL REFERENCES peers(id) ON DELETE CASCADE,
        address  TEXT NOT NULL UNIQUE,
        PRIMARY KEY (peer_id, address)
    );
    CREATE TABLE peer_services (
        peer_id  BIGINT NOT NULL REFERENCES peers(id) ON DELETE CASCADE,
        service  TEXT NOT NULL,
        PRIMARY KEY (peer_id, service)
    );
    -- Keys never accepted again (revoked, or rotated out).
    CREATE TABLE revoked_keys (
        public_key  TEXT PRIMARY KEY,
        peer_name   TEXT NOT NULL,
        revoked_at  BIGINT NOT NULL,
        reason      TEXT
    );
    CREATE TABLE registry_version (
        id  INT PRIMARY KEY CHECK (id = 1),
        v   BIGINT NOT NULL
    );
    INSERT INTO registry_version (id, v) VALUES (1, 0);
    -- Which seal key sealed the secrets (a known value sealed under it).
    CREATE TABLE seal_check (
        id     INT PRIMARY KEY CHECK (id = 1),
        value  TEXT NOT NULL
    );
    -- The server public key every gateway of this registry answers with.
    CREATE TABLE server_key (
        id          INT PRIMARY KEY CHECK (id = 1),
        public_key  TEXT NOT NULL
    );
    -- Every gateway's audit lines, the same hash chain as its audit file.
    CREATE TABLE audit_events (
        gateway  TEXT NOT NULL,                   -- [store] gateway
        seq      BIGINT NOT NULL,
        hash     TEXT NOT NULL,
        line     TEXT NOT NULL,                   -- the JSON line as in the file
        PRIMARY KEY (gateway, seq)
    );
    -- The change log, so that a gateway reads what changed since its version
    -- instead of the whole registry. Every changed row takes the next version
    -- (the UPDATE of the one version row also orders concurrent writers, even
    -- hand-made ones) and names its peer or revoked key; the statement
    -- triggers notify every listening gateway once per statement.
    CREATE TABLE registry_changes (
        version     BIGINT PRIMARY KEY,           -- registry_version.v after this row's change
        peer_id     BIGINT,                       -- a peer whose row, addresses or services changed
        public_key  TEXT                          -- a revocation-list entry that changed
    );
    CREATE FUNCTION sitegate_row_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        nv BIGINT;
    BEGIN
        UPDATE registry_version SET v = v + 1 WHERE id = 1 RETURNING v INTO nv;
        IF TG_TABLE_NAME = 'revoked_keys' THEN
            INSERT INTO registry_changes (version, public_key)
                VALUES (nv, CASE WHEN TG_OP = 'DELETE' THEN OLD.public_key ELSE NEW.public_key END);
            IF TG_OP = 'UPDATE' AND OLD.public_key <> NEW.public_key THEN
                UPDATE registry_version SET v = v + 1 WHERE id = 1 RETURNING v INTO nv;
                INSERT INTO registry_changes (version, public_key) VALUES (nv, OLD.public_key);
            END IF;
        ELSIF TG_TABLE_NAME = 'peers' THEN
            INSERT INTO registry_changes (version, peer_id)
                VALUES (nv, CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
        ELSE
            INSERT INTO registry_changes (version, peer_id)
                VALUES (nv, CASE WHEN TG_OP = 'DELETE' THEN OLD.peer_id ELSE NEW.peer_id END);
            IF TG_OP = 'UPDATE' AND OLD.peer_id <> NEW.peer_id THEN
                UPDATE registry_version SET v = v + 1 WHERE id = 1 RETURNING v INTO nv;
                INSERT INTO registry_changes (version, peer_id) VALUES (nv, OLD.peer_id);
            END IF;
        END IF;
        RETURN NULL;
    END $$;
    CREATE FUNCTION sitegate_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('sitegate_registry', '');
        RETURN NULL;
    END $$;
    CREATE TRIGGER peers_row_changed AFTER INSERT OR UPDATE OR DELETE ON peers
        FOR EACH ROW EXECUTE FUNCTION sitegate_row_changed();
    CREATE TRIGGER addresses_row_changed AFTER INSERT OR UPDATE OR DELETE ON peer_addresses
        FOR EACH ROW EXECUTE FUNCTION sitegate_row_changed();
    CREATE TRIGGER services_row_changed AFTER INSERT OR UPDATE OR DELETE ON peer_services
        FOR EACH ROW EXECUTE FUNCTION sitegate_row_changed();
    CREATE TRIGGER revoked_row_changed AFTER INSERT OR UPDATE OR DELETE ON revoked_keys
        FOR EACH ROW EXECUTE FUNCTION sitegate_row_changed();
    CREATE TRIGGER peers_changed AFTER INSERT OR UPDATE OR DELETE ON peers
        FOR EACH STATEMENT EXECUTE FUNCTION sitegate_notify();
    CREATE TRIGGER addresses_changed AFTER INSERT OR UPDATE OR DELETE ON peer_addresses
        FOR EACH STATEMENT EXECUTE FUNCTION sitegate_notify();
    CREATE TRIGGER services_changed AFTER INSERT OR UPDATE OR DELETE ON peer_services
        FOR EACH STATEMENT EXECUTE FUNCTION sitegate_notify();
    CREATE TRIGGER revoked_changed AFTER INSERT OR UPDATE OR DELETE ON revoked_keys
        FOR EACH STATEMENT EXECUTE FUNCTION sitegate_notify();
    "#,
];

/// Change-log rows kept behind the newest version; a gateway further behind
/// reads the whole registry instead.
const CHANGES_KEPT: i64 = 100_000;

/// What changed in the registry after a version: see [`PgStore::changes_since`].
#[derive(Debug, Default)]
pub struct Delta {
    /// The version this delta brings a reader to.
    pub version: i64,
    /// Peers whose row, addresses or services changed, as they are now.
    pub peers: Vec<Peer>,
    /// Ids of changed peers that no longer exist (rows deleted by hand).
    pub gone: Vec<i64>,
    /// Revocation-list entries that changed, as they are now.
    pub revoked: Vec<RevokedKey>,
    /// Changed keys (base64) that are no longer on the list.
    pub unrevoked: Vec<String>,
}

/// An open PostgreSQL peer store: one connection.
pub struct PgStore {
    /// `RefCell`: the driver needs `&mut` for every query, the store's
    /// interface reads through `&self`; a store is used by one thread at a time.
    client: RefCell<Client>,
    /// The URL without its password, for messages.
    url: String,
    /// `[store] gateway`: this host's audit chain in the shared table.
    gateway: String,
    /// `[store] pool`: this gateway's IPv4 allocation slice.
    pool: Option<Ipv4Net>,
    seal: Option<Arc<SealKey>>,
}

/// Connects to the database `url` names (logging in with `password` from
/// `[store] password_file` when given), with the timeouts above. With `ca`
/// (the PEM roots of `[store] ca_file`) TLS is required and the server's
/// certificate must chain to them and name the host; without, the
/// connection is plain (a unix socket or a private network).
///
/// # Errors
/// [`StoreError::Connect`] naming the URL without its password.
fn connect(url: &str, password: Option<&str>, ca: Option<&[u8]>) -> Result<Client, StoreError> {
    let redacted = crate::config::validate::redact_url(url);
    let fail = |reason: String| StoreError::Connect {
        url: redacted.clone(),
        reason,
    };
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e| fail(format!("the URL does not parse: {e}")))?;
    if let Some(p) = password {
        config.password(p);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    // A server that vanishes without a FIN (a partition) is noticed within
    // about half a minute instead of the kernel's two hours. Defaults only:
    // what the URL sets itself is kept.
    let given = |key: &str| url_sets(url, key);
    if !given("keepalives") && !given("keepalives_idle") {
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
    }
    if !given("tcp_user_timeout") {
        config.tcp_user_timeout(Duration::from_secs(30));
    }
    if !given("application_name") {
        config.application_name("sitegate");
    }
    // Notices (`relation already exists`) are not for the operator.
    config.notice_callback(|_| {});
    let connected = match ca {
        None => config.connect(NoTls),
        Some(pem) => {
            let tls = tls_connector(pem).map_err(|e| fail(format!("store.ca_file: {e}")))?;
            // Never `prefer`: a server (or a man in the middle) that declines
            // TLS must not get a plain session.
            config.ssl_mode(postgres::config::SslMode::Require);
            config.connect(tls)
        }
    };
    let mut client = connected.map_err(|e| fail(error_text(&e)))?;
    client
        .batch_execute(&format!(
            "SET statement_timeout = {STATEMENT_TIMEOUT_MS}; SET lock_timeout = {STATEMENT_TIMEOUT_MS}"
        ))
        .map_err(|e| fail(error_text(&e)))?;
    Ok(client)
}

/// Whether the URL's query sets `key` (`...?key=value&...`).
fn url_sets(url: &str, key: &str) -> bool {
    url.split_once('?').is_some_and(|(_, q)| {
        q.split('&')
            .any(|p| p.split_once('=').map_or(p, |(k, _)| k) == key)
    })
}

/// A TLS connector that trusts only the roots in `pem`.
fn tls_connector(pem: &[u8]) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| format!("not PEM certificates: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("a certificate does not parse: {e}"))?;
    }
    if roots.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The driver's error with its cause (the server's message, or the OS error).
fn error_text(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    // The driver's own text names the step ("error performing TLS
    // handshake"); the why is in its sources.
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

impl PgStore {
    /// Connects and migrates, adopting no seal key: for reads of what is not
    /// secret (`check`, `audit verify`).
    ///
    /// # Errors
    /// [`StoreError::Connect`], [`StoreError::TooNew`]; database errors.
    pub(crate) fn open_unsealed(cfg: &StoreConfig) -> Result<PgStore, StoreError> {
        let StoreConfig::Postgres {
            url,
            pool,
            gateway,
            password_file,
            password,
            ca_file,
            ca_pem,
        } = cfg
        else {
            return Err(StoreError::Connect {
                url: cfg.location(),
                reason: "not a postgres:// store".into(),
            });
        };
        // A config from `Config::parse` has not read the file yet.
        let from_file = match (password, password_file) {
            (None, Some(f)) => Some(zeroize::Zeroizing::new(
                crate::keys::read_secret_file(f)
                    .map_err(|e| StoreError::Connect {
                        url: crate::config::validate::redact_url(url),
                        reason: e.to_string(),
                    })?
                    .trim_end()
                    .to_string(),
            )),
            _ => None,
        };
        let password = password
            .as_ref()
            .map(|p| p.0.as_str())
            .or(from_file.as_ref().map(|p| p.as_str()));
        let ca_read = match (ca_pem, ca_file) {
            (None, Some(f)) => Some(std::fs::read(f).map_err(|e| StoreError::Connect {
                url: crate::config::validate::redact_url(url),
                reason: format!("cannot read store.ca_file {}: {e}", f.display()),
            })?),
            _ => None,
        };
        let ca = ca_pem.as_deref().map(Vec::as_slice).or(ca_read.as_deref());
        let mut client = connect(url, password, ca)?;
        let redacted = crate::config::validate::redact_url(url);
        migrate(&mut client, &redacted)?;
        Ok(PgStore {
            client: RefCell::new(client),
            url: redacted,
            gateway: gateway.clone(),
            pool: *pool,
            seal: None,
        })
    }

    /// Connects, migrates, and checks `seal` against the registry's seal check
    /// value (recording one, and sealing clear secrets, when there is none).
    ///
    /// # Errors
    /// As [`PgStore::open_unsealed`], plus [`StoreError::WrongSealKey`] and
    /// [`StoreError::SealKeyMissing`].
    pub fn open_sealed(
        cfg: &StoreConfig,
        seal: Option<Arc<SealKey>>,
    ) -> Result<PgStore, StoreError> {
        let mut store = Self::open_unsealed(cfg)?;
        store.adopt_seal(seal)?;
        Ok(store)
    }

    /// The URL without its password.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn db(&self) -> impl Fn(postgres::Error) -> StoreError + '_ {
        |e| StoreError::Postgres {
            url: self.url.clone(),
            reason: error_text(&e),
        }
    }

    fn sealed(&self) -> Option<(&SealKey, &str)> {
        self.seal.as_deref().map(|k| (k, self.url.as_str()))
    }

    fn adopt_seal(&mut self, seal: Option<Arc<SealKey>>) -> Result<(), StoreError> {
        let db = |e| StoreError::Postgres {
            url: self.url.clone(),
            reason: error_text(&e),
        };
        let mut client = self.client.borrow_mut();
        let check: Option<String> = client
            .query_opt("SELECT value FROM seal_check WHERE id = 1", &[])
            .map_err(db)?
            .map(|r| r.get(0));
        let Some(key) = seal else {
            if check.is_some() {
                return Err(StoreError::SealKeyMissing {
                    at: self.url.clone(),
                });
            }
            return Ok(());
        };
        if let Some(value) = &check {
            check_seal(&key, value, &self.url)?;
        }
        let clear_left: i64 = client
            .query_one(
                "SELECT COUNT(*) FROM peers
                 WHERE preshared_key IS NOT NULL AND preshared_key NOT LIKE 'sealed:%'",
                &[],
            )
            .map_err(db)?
            .get(0);
        if check.is_none() || clear_left > 0 {
            let mut tx = client.transaction().map_err(db)?;
            write_lock(&mut tx).map_err(db)?;
            let recorded: Option<String> = tx
                .query_opt("SELECT value FROM seal_check WHERE id = 1", &[])
                .map_err(db)?
                .map(|r| r.get(0));
            match recorded {
                Some(v) => check_seal(&key, &v, &self.url)?,
                None => {
                    tx.execute(
                        "INSERT INTO seal_check (id, value) VALUES (1, $1)",
                        &[&key.seal(SEAL_CHECK_AD, SEAL_CHECK_VALUE)],
                    )
                    .map_err(db)?;
                }
            }
            let clear = tx
                .query(
                    "SELECT id, preshared_key FROM peers
                     WHERE preshared_key IS NOT NULL AND preshared_key NOT LIKE 'sealed:%'",
                    &[],
                )
                .map_err(db)?;
            for row in clear {
                let id: i64 = row.get(0);
                let sealed = reseal_psk(&key, id, row.get(1))?;
                tx.execute(
                    "UPDATE peers SET preshared_key = $1 WHERE id = $2",
                    &[&sealed, &id],
                )
                .map_err(db)?;
            }
            tx.commit().map_err(db)?;
        }
        drop(client);
        self.seal = Some(key);
        Ok(())
    }

    /// Counts sealed and clear preshared keys without opening any.
    ///
    /// # Errors
    /// Database errors.
    pub fn secret_counts(&self) -> Result<SecretCounts, StoreError> {
        let mut client = self.client.borrow_mut();
        let row = client
            .query_one(
                "SELECT COUNT(*) FILTER (WHERE preshared_key LIKE 'sealed:%'),
                        COUNT(*) FILTER (WHERE preshared_key NOT LIKE 'sealed:%'),
                        EXISTS (SELECT 1 FROM seal_check WHERE id = 1)
                 FROM peers WHERE preshared_key IS NOT NULL",
                &[],
            )
            .map_err(self.db())?;
        Ok(SecretCounts {
            sealed: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
            clear: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
            sealed_store: row.get(2),
        })
    }

    /// See [`crate::registry::Store::registry_version`].
    ///
    /// # Errors
    /// Database errors.
    pub fn registry_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .client
            .borrow_mut()
            .query_one("SELECT v FROM registry_version WHERE id = 1", &[])
            .map_err(self.db())?
            .get(0))
    }

    /// See [`crate::registry::Store::peers`].
    ///
    /// # Errors
    /// Database errors; [`StoreError::Corrupt`].
    pub fn peers(&self) -> Result<Vec<Peer>, StoreError> {
        Ok(self.snapshot(|| {})?.peers)
    }

    /// See [`crate::registry::Store::snapshot`]: one `REPEATABLE READ`
    /// transaction, so the peers, the revocation list and the version agree.
    ///
    /// # Errors
    /// Database errors; [`StoreError::Corrupt`], [`StoreError::CorruptRevoked`].
    pub fn snapshot(&self, mid: impl FnOnce()) -> Result<Snapshot, StoreError> {
        let db = self.db();
        let mut client = self.client.borrow_mut();
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(&db)?;
        let peers = read_peers(&mut tx, None, self.sealed()).map_err(|e| e.into_store(&db))?;
        mid();
        let revoked = read_revoked(&mut tx, None).map_err(|e| e.into_store(&db))?;
        let version: i64 = tx
            .query_one("SELECT v FROM registry_version WHERE id = 1", &[])
            .map_err(&db)?
            .get(0);
        tx.commit().map_err(&db)?;
        Ok(Snapshot {
            peers,
            revoked,
            version,
        })
    }

    /// See [`crate::registry::Store::add_peer`]; IPv4 comes from `[store] pool`
    /// when this gateway has one.
    ///
    /// # Errors
    /// As there. On error nothing is written.
    pub fn add_peer(&mut self, iface: &InterfaceConfig, new: NewPeer) -> Result<Peer, StoreError> {
        let db = self.db();
        let mut client = self.client.borrow_mut();
        let mut tx = client.transaction().map_err(&db)?;
        write_lock(&mut tx).map_err(&db)?;
        let name = new.name.as_str();
        if let Some((_, _, revoked)) = row_head(&mut tx, &new.name).map_err(&db)? {
            return Err(if revoked {
                StoreError::NameRetired(name.to_string())
            } else {
                StoreError::NameTaken(name.to_string())
            });
        }
        let key = check_key_unused(&mut tx, &new.public_key).map_err(|e| e.into_store(&db))?;
        let used: BTreeSet<IpAddr> = tx
            .query("SELECT address FROM peer_addresses", &[])
            .map_err(&db)?
            .iter()
            // A row that does not parse cannot collide with a valid address.
            .filter_map(|r| r.get::<_, String>(0).parse().ok())
            .collect();
        let addresses = alloc::assign(
            IpNet::V4(iface.address_v4),
            iface.address_v6.map(IpNet::V6),
            self.pool,
            new.address,
            &used,
        )?;
        let id: i64 = tx
            .query_one(
                "INSERT INTO peers (name, public_key, created_at, expires_at, admin)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
                &[&name, &key, &new.created_at, &new.expires_at, &new.admin],
            )
            .map_err(&db)?
            .get(0);
        if let Some(text) = psk_text(self.seal.as_deref(), id, new.preshared_key.as_ref()) {
            tx.execute(
                "UPDATE peers SET preshared_key = $1 WHERE id = $2",
                &[&text, &id],
            )
            .map_err(&db)?;
        }
        for a in &addresses {
            tx.execute(
                "INSERT INTO peer_addresses (peer_id, address) VALUES ($1, $2)",
                &[&id, &a.to_string()],
            )
            .map_err(&db)?;
        }
        let services = new.granted();
        for s in &services {
            tx.execute(
                "INSERT INTO peer_services (peer_id, service) VALUES ($1, $2)",
                &[&id, s],
            )
            .map_err(&db)?;
        }
        tx.commit().map_err(&db)?;
        Ok(new.issued(id, addresses, services))
    }

    /// See [`crate::registry::Store::peer`].
    ///
    /// # Errors
    /// Database errors; [`StoreError::Corrupt`].
    pub fn peer(&self, name: &PeerName) -> Result<Option<Peer>, StoreError> {
        let db = self.db();
        let mut client = self.client.borrow_mut();
        let mut tx = client.transaction().map_err(&db)?;
        let peer = match row_head(&mut tx, name).map_err(&db)? {
            Some((id, _, _)) => read_peers(&mut tx, Some(&[id]), self.sealed())
                .map_err(|e| e.into_store(&db))?
                .pop(),
            None => None,
        };
        tx.commit().map_err(&db)?;
        Ok(peer)
    }

    /// See [`crate::registry::Store::former_addresses`].
    ///
    /// # Errors
    /// [`StoreError::UnknownPeer`]; database errors; [`StoreError::Corrupt`].
    pub fn former_addresses(&self, name: &PeerName) -> Result<Vec<IpAddr>, StoreError> {
        let row = self
            .client
            .borrow_mut()
            .query_opt(
                "SELECT id, former_addresses FROM peers WHERE name = $1",
                &[&name.as_str()],
            )
            .map_err(self.db())?
            .ok_or_else(|| StoreError::UnknownPeer(name.to_string()))?;
        parse_former(row.get(0), row.get::<_, Option<&str>>(1))
    }

    /// See [`crate::registry::Store::revoke_peer`].
    ///
    /// # Errors
    /// As there. On error nothing is written.
    pub fn revoke_peer(
        &mut self,
        name: &PeerName,
        reason: Option<&str>,
        now: i64,
    ) -> Result<Peer, StoreError> {
        let db = self.db();
        let mut client = self.client.borrow_mut();
        let mut tx = client.transaction().map_err(&db)?;
        write_lock(&mut tx).map_err(&db)?;
        let (id, public_key, revoked) = row_head(&mut tx, name)
            .map_err(&db)?
            .ok_or_else(|| StoreError::UnknownPeer(name.to_string()))?;
        if revoked {
            return Err(StoreError::AlreadyRevoked(name.to_string()));
        }
        let freed: Vec<String> = tx
            .query(
                "SELECT address FROM peer_addresses WHERE peer_id = $1",
                &[&id],
            )
            .map_err(&db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.execute(
            "UPDATE peers SET revoked_at = $1, revoked_reason = $2, former_addresses = $3
             WHERE id = $4",
            &[&now, &reason, &freed.join(","), &id],
        )
        .map_err(&db)?;
        tx.execute("DELETE FROM peer_addresses WHERE peer_id = $1", &[&id])
            .map_err(&db)?;
        tx.execute(
            "INSERT INTO revoked_keys (public_key, peer_name, revoked_at, reason)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[&public_key, &name.as_str(), &now, &reason],
        )
        .map_err(&db)?;
        let peer = read_peers(&mut tx, Some(&[id]), self.sealed())
            .map_err(|e| e.into_store(&db))?
            .pop()
            .ok_or_else(|| StoreError::UnknownPeer(name.to_string()))?;
        tx.commit().map_err(&db)?;
        Ok(peer)
    }

    /// See [`crate::registry::Store::rotate_peer`].
    ///
    /// # Errors
    /// As there. On error nothing is written.
    pub fn rotate_peer(
        &mut self,
        name: &PeerName,
        new_key: PublicKey,
        new_psk: Option<PresharedKey>,
        now: i64,
    ) -> Result<(Peer, PublicKey), StoreError> {
        let db = self.db();
        let mut client = self.client.borrow_mut();
        let mut tx = client.transaction().map_err(&db)?;
        write_lock(&mut tx).map_err(&db)?;
        let (id, old_text, revoked) = row_head(&mut tx, name)
            .map_err(&db)?
            .ok_or_else(|| StoreError::UnknownPeer(name.to_string()))?;
        if revoked {
            return Err(StoreError::RotateRevoked(name.to_string()));
        }
        let old = PublicKey::from_base64(&old_text).map_err(|_| StoreError::Corrupt {
            id,
            what: "public key",
            value: old_text.clone(),
        })?;
        let key = check_key_unused(&mut tx, &new_key).map_err(|e| e.into_store(&db))?;
        tx.execute(
            "UPDATE peers SET public_key = $1, preshared_key = $2 WHERE id = $3",
            &[
                &key,
                &psk_text(self.seal.as_deref(), id, new_psk.as_ref()),
                &id,
            ],
        )
        .map_err(&db)?;
        tx.execute(
            "INSERT INTO revoked_keys (public_key, peer_name, revoked_at, reason)
             VALUES ($1, $2, $3, 'rotated') ON CONFLICT DO NOTHING",
            &[&old_text, &name.as_str(), &now],
        )
        .map_err(&db)?;
        let peer = read_peers(&mut tx, Some(&[id]), self.sealed())
            .map_err(|e| e.into_store(&db))?
            .pop()
            .ok_or_else(|| StoreError::UnknownPeer(name.to_string()))?;
        tx.commit().map_err(&db)?;
        Ok((peer, old))
    }

    /// See [`crate::registry::Store::revoked_keys`].
    ///
    /// # Errors
    /// Database errors; [`StoreError::CorruptRevoked`].
    pub fn revoked_keys(&self) -> Result<Vec<RevokedKey>, StoreError> {
        let db = self.db();
        let mut client = self.client.borrow_mut();
        let mut tx = client.transaction().map_err(&db)?;
        let out = read_revoked(&mut tx, None).map_err(|e| e.into_store(&db))?;
        tx.commit().map_err(&db)?;
        Ok(out)
    }

    /// See [`crate::registry::Store::bind_server_key`].
    ///
    /// # Errors
    /// [`StoreError::ServerKeyMismatch`]; database errors.
    pub fn bind_server_key(&mut self, key: &PublicKey) -> Result<(), StoreError> {
        let db = self.db();
        let ours = key.to_base64();
        let mut client = self.client.borrow_mut();
        let mut tx = client.transaction().map_err(&db)?;
        write_lock(&mut tx).map_err(&db)?;
        tx.execute(
            "INSERT INTO server_key (id, public_key) VALUES (1, $1) ON CONFLICT DO NOTHING",
            &[&ours],
        )
        .map_err(&db)?;
        let recorded: String = tx
            .query_one("SELECT public_key FROM server_key WHERE id = 1", &[])
            .map_err(&db)?
            .get(0);
        tx.commit().map_err(&db)?;
        if recorded != ours {
            return Err(StoreError::ServerKeyMismatch {
                url: self.url.clone(),
                recorded,
                ours,
            });
        }
        Ok(())
    }

    /// What changed after `version`, read in one `REPEATABLE READ`
    /// transaction; `None` when the change log no longer reaches back that
    /// far (or never did: a registry changed by hand before the log existed),
    /// and the whole registry must be read instead.
    ///
    /// # Errors
    /// Database errors; [`StoreError::Corrupt`], [`StoreError::CorruptRevoked`].
    pub fn changes_since(&self, version: i64) -> Result<Option<Delta>, StoreError> {
        let db = self.db();
        let mut client = self.client.borrow_mut();
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(&db)?;
        let now: i64 = tx
            .query_one("SELECT v FROM registry_version WHERE id = 1", &[])
            .map_err(&db)?
            .get(0);
        if now == version {
            return Ok(Some(Delta {
                version,
                ..Delta::default()
            }));
        }
        // Every version after `version` must still be in the log: one row each.
        let row = tx
            .query_one(
                "SELECT count(*), COALESCE(min(version), 0) FROM registry_changes
                 WHERE version > $1",
                &[&version],
            )
            .map_err(&db)?;
        let (count, first): (i64, i64) = (row.get(0), row.get(1));
        if now < version || count != now - version || first != version + 1 {
            return Ok(None);
        }
        let mut ids: Vec<i64> = Vec::new();
        let mut keys: Vec<String> = Vec::new();
        for r in tx
            .query(
                "SELECT DISTINCT peer_id, public_key FROM registry_changes WHERE version > $1",
                &[&version],
            )
            .map_err(&db)?
        {
            if let Some(id) = r.get::<_, Option<i64>>(0) {
                ids.push(id);
            }
            if let Some(k) = r.get::<_, Option<String>>(1) {
                keys.push(k);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        keys.sort_unstable();
        keys.dedup();
        let peers =
            read_peers(&mut tx, Some(&ids), self.sealed()).map_err(|e| e.into_store(&db))?;
        let revoked = read_revoked(&mut tx, Some(&keys)).map_err(|e| e.into_store(&db))?;
        tx.commit().map_err(&db)?;
        let present: BTreeSet<i64> = peers.iter().map(|p| p.id).collect();
        let gone = ids.into_iter().filter(|id| !present.contains(id)).collect();
        let listed: BTreeSet<String> = revoked.iter().map(|r| r.public_key.to_base64()).collect();
        let unrevoked = keys.into_iter().filter(|k| !listed.contains(k)).collect();
        Ok(Some(Delta {
            version: now,
            peers,
            gone,
            revoked,
            unrevoked,
        }))
    }

    /// Subscribes this connection to registry changes ([`CHANNEL`]).
    ///
    /// # Errors
    /// Database errors.
    pub fn listen(&self) -> Result<(), StoreError> {
        self.client
            .borrow_mut()
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .map_err(self.db())
    }

    /// Waits up to `timeout` for a change notification; true when at least
    /// one arrived (all that arrived are taken).
    ///
    /// # Errors
    /// The connection broke.
    pub fn wait_changed(&self, timeout: Duration) -> Result<bool, StoreError> {
        let mut client = self.client.borrow_mut();
        let mut notes = client.notifications();
        let mut changed = false;
        if notes
            .timeout_iter(timeout)
            .next()
            .map_err(self.db())?
            .is_some()
        {
            changed = true;
        }
        // The rest of a burst, without waiting.
        while notes.iter().next().map_err(self.db())?.is_some() {
            changed = true;
        }
        drop(notes);
        if client.is_closed() {
            return Err(StoreError::Postgres {
                url: self.url.clone(),
                reason: "the connection closed".into(),
            });
        }
        Ok(changed)
    }

    /// This gateway's audit lines in the table, in order: `(seq, line)`.
    ///
    /// # Errors
    /// Database errors.
    pub fn audit_lines(&self) -> Result<Vec<(i64, String)>, StoreError> {
        Ok(self
            .client
            .borrow_mut()
            .query(
                "SELECT seq, line FROM audit_events WHERE gateway = $1 ORDER BY seq",
                &[&self.gateway],
            )
            .map_err(self.db())?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    /// `[store] gateway`.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// Inserts audit lines of this gateway in one transaction. A line already
    /// there with the same hash (a retry after an outage) is kept as it was;
    /// one with another hash means two gateways write under one name, which
    /// would interleave two chains: refused, naming `[store] gateway`.
    fn insert_audit(&self, lines: &[Sealed]) -> Result<(), String> {
        let mut client = self.client.borrow_mut();
        let run = |client: &mut Client| -> Result<Option<i64>, postgres::Error> {
            let mut tx = client.transaction()?;
            let insert = tx.prepare(
                "INSERT INTO audit_events (gateway, seq, hash, line) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (gateway, seq) DO NOTHING",
            )?;
            let existing =
                tx.prepare("SELECT hash FROM audit_events WHERE gateway = $1 AND seq = $2")?;
            for s in lines {
                let seq = i64::try_from(s.head.seq).unwrap_or(i64::MAX);
                if tx.execute(&insert, &[&self.gateway, &seq, &s.head.hash, &s.line])? == 0 {
                    let hash: String = tx.query_one(&existing, &[&self.gateway, &seq])?.get(0);
                    if hash != s.head.hash {
                        return Ok(Some(seq));
                    }
                }
            }
            tx.commit()?;
            Ok(None)
        };
        match run(&mut client) {
            Ok(None) => Ok(()),
            Ok(Some(seq)) => Err(format!(
                "{}: the audit table already holds seq {seq} of gateway `{}` with another hash: two gateways write under one name; give each its own `[store] gateway`",
                self.url, self.gateway
            )),
            Err(e) => Err(format!("{}: {}", self.url, error_text(&e))),
        }
    }
}

impl HeadStore for PgStore {
    fn audit_head(&self) -> Result<Option<Head>, String> {
        let row = self
            .client
            .borrow_mut()
            .query_opt(
                "SELECT seq, hash FROM audit_events WHERE gateway = $1 ORDER BY seq DESC LIMIT 1",
                &[&self.gateway],
            )
            .map_err(|e| format!("{}: {}", self.url, error_text(&e)))?;
        Ok(row.and_then(|r| {
            Some(Head {
                seq: u64::try_from(r.get::<_, i64>(0)).ok()?,
                hash: r.get(1),
            })
        }))
    }

    fn set_audit_head(&self, _: &Head, appended: &[Sealed]) -> Result<(), String> {
        self.insert_audit(appended)
    }
}

/// The daemon's audit table writer: the audit file must keep every event
/// while the database is away, so this never fails an append. Lines the table
/// has not taken yet wait in memory (up to [`AUDIT_BACKLOG`]) and go in with the
/// next append after the database is back; the head it reports meanwhile is
/// the last one it was given.
pub struct AuditTable {
    cfg: StoreConfig,
    store: RefCell<Option<PgStore>>,
    backlog: RefCell<VecDeque<Sealed>>,
    last: RefCell<Option<Head>>,
    /// No reconnect before this instant (backoff after a failure).
    retry_at: RefCell<Option<Instant>>,
    failures: RefCell<u32>,
}

/// Audit lines kept for the table during an outage; older ones are dropped
/// (they stay in the file; the table then shows a gap that `audit verify` names).
pub const AUDIT_BACKLOG: usize = 100_000;

impl AuditTable {
    /// A writer for `cfg`'s table; it connects on first use.
    pub fn new(cfg: &StoreConfig) -> AuditTable {
        AuditTable {
            cfg: cfg.clone(),
            store: RefCell::new(None),
            backlog: RefCell::new(VecDeque::new()),
            last: RefCell::new(None),
            retry_at: RefCell::new(None),
            failures: RefCell::new(0),
        }
    }

    /// Runs `f` on a connected store, connecting when due; on failure drops
    /// the connection and backs off (1 s doubling to 8 s).
    fn with_store<T>(&self, f: impl FnOnce(&PgStore) -> Result<T, String>) -> Option<T> {
        if self.store.borrow().is_none() {
            if self.retry_at.borrow().is_some_and(|t| Instant::now() < t) {
                return None;
            }
            match PgStore::open_unsealed(&self.cfg) {
                Ok(s) => *self.store.borrow_mut() = Some(s),
                Err(e) => {
                    self.backoff(&e.to_string());
                    return None;
                }
            }
        }
        let result = self.store.borrow().as_ref().map(f);
        match result {
            Some(Ok(v)) => {
                *self.failures.borrow_mut() = 0;
                Some(v)
            }
            Some(Err(e)) => {
                *self.store.borrow_mut() = None;
                self.backoff(&e);
                None
            }
            None => None,
        }
    }

    /// Inserts the backlog (in order, one transaction) when the table can be
    /// reached; it stays for a later try otherwise.
    fn flush(&self) {
        let pending: Vec<Sealed> = self.backlog.borrow().iter().cloned().collect();
        if self.with_store(|s| s.insert_audit(&pending)).is_some() {
            self.backlog.borrow_mut().clear();
        }
    }

    /// Backs off after a failure; the first of a run is logged (the audit
    /// layer does not re-audit `audit_error`), the rest are summarised by the
    /// outage events of the registry follower.
    fn backoff(&self, error: &str) {
        let mut n = self.failures.borrow_mut();
        if *n == 0 {
            tracing::error!(
                event = "audit_error",
                error = %error,
                pending = self.backlog.borrow().len() as u64,
                target_table = "audit_events",
            );
        }
        *n = n.saturating_add(1);
        let secs = 1u64 << (*n - 1).min(5);
        *self.retry_at.borrow_mut() = Some(Instant::now() + Duration::from_secs(secs.min(8)));
    }
}

impl HeadStore for AuditTable {
    fn audit_head(&self) -> Result<Option<Head>, String> {
        let from_table = self.with_store(HeadStore::audit_head).flatten();
        let last = self.last.borrow().clone();
        // The longer record wins, as the writer itself decides.
        Ok(match (from_table, last) {
            (Some(t), Some(l)) if l.seq > t.seq => Some(l),
            (Some(t), _) => Some(t),
            (None, l) => l,
        })
    }

    fn retry_pending(&self) {
        if !self.backlog.borrow().is_empty() {
            self.flush();
        }
    }

    fn set_audit_head(&self, head: &Head, appended: &[Sealed]) -> Result<(), String> {
        *self.last.borrow_mut() = Some(head.clone());
        let mut backlog = self.backlog.borrow_mut();
        backlog.extend(appended.iter().cloned());
        let over = backlog.len().saturating_sub(AUDIT_BACKLOG);
        if over > 0 {
            backlog.drain(..over);
        }
        drop(backlog);
        self.flush();
        Ok(())
    }
}

/// Takes the admin write lock for the rest of `tx`, and trims the change
/// log to its last [`CHANGES_KEPT`] rows.
fn write_lock(tx: &mut Transaction<'_>) -> Result<(), postgres::Error> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
    tx.execute(
        "DELETE FROM registry_changes
         WHERE version <= (SELECT v FROM registry_version WHERE id = 1) - $1",
        &[&CHANGES_KEPT],
    )
    .map(drop)
}

/// `(id, public_key, revoked)` of the peer named `name`.
fn row_head(
    tx: &mut Transaction<'_>,
    name: &PeerName,
) -> Result<Option<(i64, String, bool)>, postgres::Error> {
    Ok(tx
        .query_opt(
            "SELECT id, public_key, revoked_at IS NOT NULL FROM peers WHERE name = $1",
            &[&name.as_str()],
        )?
        .map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// A store error or a driver error, until the driver's gets the URL.
enum ReadError {
    Store(StoreError),
    Db(postgres::Error),
}

impl ReadError {
    fn into_store(self, db: impl Fn(postgres::Error) -> StoreError) -> StoreError {
        match self {
            ReadError::Store(e) => e,
            ReadError::Db(e) => db(e),
        }
    }
}

impl From<postgres::Error> for ReadError {
    fn from(e: postgres::Error) -> Self {
        ReadError::Db(e)
    }
}

impl From<StoreError> for ReadError {
    fn from(e: StoreError) -> Self {
        ReadError::Store(e)
    }
}

/// A key may be issued only when it is on no peer and not on the revocation
/// list. Returns its base64 form.
fn check_key_unused(tx: &mut Transaction<'_>, key: &PublicKey) -> Result<String, ReadError> {
    let key = key.to_base64();
    if tx
        .query_opt("SELECT 1 FROM revoked_keys WHERE public_key = $1", &[&key])?
        .is_some()
    {
        return Err(StoreError::KeyRevoked(key).into());
    }
    if let Some(row) = tx.query_opt("SELECT name FROM peers WHERE public_key = $1", &[&key])? {
        return Err(StoreError::KeyTaken {
            key,
            peer: row.get(0),
        }
        .into());
    }
    Ok(key)
}

/// Every peer, or only the peers `only` names (ids that are gone are
/// skipped), in one read.
fn read_peers(
    tx: &mut Transaction<'_>,
    only: Option<&[i64]>,
    seal: Option<(&SealKey, &str)>,
) -> Result<Vec<Peer>, ReadError> {
    let mut rows = PeerRows::default();
    for r in tx.query(
        "SELECT peer_id, address FROM peer_addresses
         WHERE $1::BIGINT[] IS NULL OR peer_id = ANY($1)",
        &[&only],
    )? {
        rows.address(r.get(0), r.get(1))?;
    }
    for r in tx.query(
        "SELECT peer_id, service FROM peer_services
         WHERE $1::BIGINT[] IS NULL OR peer_id = ANY($1) ORDER BY service",
        &[&only],
    )? {
        rows.service(r.get(0), r.get(1));
    }
    for r in tx.query(
        "SELECT id, name, public_key, preshared_key, created_at, expires_at,
                revoked_at, revoked_reason, admin
         FROM peers WHERE $1::BIGINT[] IS NULL OR id = ANY($1) ORDER BY id",
        &[&only],
    )? {
        rows.peer(PeerRow {
            id: r.get(0),
            name: r.get(1),
            public_key: r.get(2),
            preshared_key: r.get(3),
            created_at: r.get(4),
            expires_at: r.get(5),
            revoked_at: r.get(6),
            revoked_reason: r.get(7),
            admin: r.get(8),
        });
    }
    Ok(rows.finish(seal)?)
}

/// The revocation list, or only the keys `only` names.
fn read_revoked(
    tx: &mut Transaction<'_>,
    only: Option<&[String]>,
) -> Result<Vec<RevokedKey>, ReadError> {
    let mut out = Vec::new();
    for r in tx.query(
        "SELECT public_key, peer_name, reason, revoked_at FROM revoked_keys
         WHERE $1::TEXT[] IS NULL OR public_key = ANY($1)
         ORDER BY revoked_at, public_key",
        &[&only],
    )? {
        out.push(revoked_key(r.get(0), r.get(1), r.get(2), r.get(3))?);
    }
    Ok(out)
}
/// Applies pending migrations in one transaction under the schema lock. The
/// common case (schema current) reads one row and takes no lock.
fn migrate(client: &mut Client, url: &str) -> Result<(), StoreError> {
    let db = |e: postgres::Error| StoreError::Postgres {
        url: url.to_string(),
        reason: error_text(&e),
    };
    let supported = MIGRATIONS.len() as i64;
    let too_new = |found: i64| StoreError::TooNew {
        at: url.to_string(),
        found,
        supported,
    };
    let exists: bool = client
        .query_one("SELECT to_regclass('sitegate_schema') IS NOT NULL", &[])
        .map_err(db)?
        .get(0);
    if exists {
        let version: i64 = client
            .query_one("SELECT version FROM sitegate_schema WHERE id = 1", &[])
            .map_err(db)?
            .get(0);
        if version == supported {
            return Ok(());
        }
        if version > supported {
            return Err(too_new(version));
        }
    }
    let mut tx = client.transaction().map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .map_err(db)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS sitegate_schema (
             id       INT PRIMARY KEY CHECK (id = 1),
             version  BIGINT NOT NULL
         );
         INSERT INTO sitegate_schema (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING;",
    )
    .map_err(db)?;
    let version: i64 = tx
        .query_one("SELECT version FROM sitegate_schema WHERE id = 1", &[])
        .map_err(db)?
        .get(0);
    if version > supported {
        return Err(too_new(version));
    }
    for sql in MIGRATIONS
        .iter()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        tx.batch_execute(sql).map_err(db)?;
    }
    tx.execute(
        "UPDATE sitegate_schema SET version = $1 WHERE id = 1",
        &[&supported],
    )
    .map_err(db)?;
    tx.commit().map_err(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings the URL gives are recognised, so the defaults leave them be.
    #[test]
    fn url_settings_are_seen() {
        let url = "postgres://u@h/db?keepalives=0&application_name=gw&connect_timeout=3";
        assert!(url_sets(url, "keepalives") && url_sets(url, "application_name"));
        assert!(!url_sets(url, "keepalives_idle") && !url_sets(url, "tcp_user_timeout"));
        assert!(!url_sets("postgres://u@h/keepalives", "keepalives"));
    }
}
