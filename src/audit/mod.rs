//! The tamper-evident audit log: security events and admin actions, one sealed
//! JSON line each, hash-chained ([`chain`]), keyed under the seal key when one is
//! configured, verifiable ([`verify`]).

pub mod chain;
pub mod sink;
pub mod verify;
pub mod writer;

use crate::config::Config;

/// The chain key of `cfg` (`[daemon] seal_key_file`), if it sets one.
///
/// # Errors
/// The seal key file cannot be read or is not a key.
pub fn chain_key(cfg: &Config) -> Result<Option<chain::AuditKey>, crate::seal::SealError> {
    cfg.daemon
        .seal_key_file
        .as_deref()
        .map(|p| crate::seal::SealKey::from_file(p).map(|k| chain::AuditKey::from_seal(&k)))
        .transpose()
}

/// The writer for `cfg`'s `[log] audit_file`, keyed when a seal key is set;
/// `None` without an audit file.
///
/// # Errors
/// The seal key cannot be read: the daemon must not fall back to an unkeyed chain.
pub fn writer_for(cfg: &Config) -> Result<Option<writer::AuditWriter>, writer::AuditError> {
    if cfg.log.audit_file.is_none() {
        return Ok(None);
    }
    let seal = crate::registry::store::seal_key(cfg)?;
    Ok(writer_sealed(cfg, seal.as_deref()))
}

/// [`writer_for`] with the seal key already read (the daemon reads it once,
/// before it drops privileges and can no longer open the key file).
pub fn writer_sealed(
    cfg: &Config,
    seal: Option<&crate::seal::SealKey>,
) -> Option<writer::AuditWriter> {
    cfg.log.audit_file.as_ref().map(|path| {
        writer::AuditWriter::new(path)
            .with_rotate_bytes(cfg.log.audit_rotate_bytes)
            .with_key(seal.map(chain::AuditKey::from_seal))
    })
}
