//! The seal key (`[daemon] seal_key_file`): encryption at rest for the secrets the
//! store keeps, and the key of the audit chain's MAC.
//!
//! One 32-byte master key on disk; every use gets its own subkey
//! (HMAC-SHA256(master, label)), so a key recovered from one use opens nothing
//! else. Sealed values are ChaCha20-Poly1305 with a random 96-bit nonce and the
//! owner's identity (the peer id) as associated data, so a sealed value copied onto
//! another row does not open.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::keys::{PrivateKey, KEY_LEN};

/// Prefix that marks a sealed value in the store (`sealed:v1:` + base64 of
/// nonce ‖ ciphertext ‖ tag); a clear base64 key can never start with it.
pub const SEALED_PREFIX: &str = "sealed:v1:";

const NONCE_LEN: usize = 12;

/// Why a seal key or a sealed value could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read the seal key ({key} = {path}): {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: crate::keys::KeyError,
    },
    #[error("a sealed secret in the store does not open with this seal key ({what}): wrong `daemon.seal_key_file`, or the store was tampered with")]
    WrongKey { what: String },
    #[error("a sealed secret in the store is malformed ({what})")]
    Malformed { what: String },
}

/// The master seal key; zeroized on drop, never printed.
pub struct SealKey {
    master: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(<redacted>)")
    }
}

impl SealKey {
    /// Loads the key file with the same rules as a private key file (base64 of 32
    /// bytes, mode 0600 or tighter).
    ///
    /// # Errors
    /// [`SealError::Read`] naming `daemon.seal_key_file` and the path.
    pub fn from_file(path: &Path) -> Result<Self, SealError> {
        let k = PrivateKey::from_file(path).map_err(|source| SealError::Read {
            key: "daemon.seal_key_file",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::from_bytes(*k.as_bytes()))
    }

    pub fn from_bytes(mut bytes: [u8; KEY_LEN]) -> Self {
        let master = Zeroizing::new(bytes);
        bytes.zeroize();
        Self { master }
    }

    /// A subkey for one purpose; `label` must be unique per purpose.
    pub fn derive(&self, label: &str) -> Zeroizing<[u8; KEY_LEN]> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.master.as_ref())
            .expect("HMAC accepts any key length");
        mac.update(b"sitegate seal v1: ");
        mac.update(label.as_bytes());
        let out = mac.finalize().into_bytes();
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(&out);
        key
    }

    /// The key of the audit chain's HMAC-SHA256.
    pub fn audit_key(&self) -> Zeroizing<[u8; KEY_LEN]> {
        self.derive("audit chain hmac-sha256")
    }

    fn store_cipher(&self) -> ChaCha20Poly1305 {
        let k = self.derive("store secrets chacha20poly1305");
        ChaCha20Poly1305::new(Key::from_slice(k.as_ref()))
    }

    /// Seals `secret` for the owner `ad` (e.g. `peer:17:psk`) into store text.
    pub fn seal(&self, ad: &[u8], secret: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let ct = self
            .store_cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret,
                    aad: ad,
                },
            )
            .expect("ChaCha20-Poly1305 encryption of a short buffer cannot fail");
        let mut blob = Vec::with_capacity(NONCE_LEN + ct.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        format!("{SEALED_PREFIX}{}", STANDARD.encode(blob))
    }

    /// Opens store text made by [`SealKey::seal`] for the same `ad`.
    ///
    /// # Errors
    /// [`SealError::Malformed`] when `text` is not sealed text;
    /// [`SealError::WrongKey`] when it does not authenticate (wrong key, other owner,
    /// edited bytes). `what` names the value in the message.
    pub fn open(&self, ad: &[u8], text: &str, what: &str) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let malformed = || SealError::Malformed {
            what: what.to_string(),
        };
        let b64 = text.strip_prefix(SEALED_PREFIX).ok_or_else(malformed)?;
        let blob = STANDARD.decode(b64).map_err(|_| malformed())?;
        if blob.len() < NONCE_LEN + 16 {
            return Err(malformed());
        }
        let (nonce, ct) = blob.split_at(NONCE_LEN);
        self.store_cipher()
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: ad })
            .map(Zeroizing::new)
            .map_err(|_| SealError::WrongKey {
                what: what.to_string(),
            })
    }
}

/// True when `text` (a store value) is sealed.
pub fn is_sealed(text: &str) -> bool {
    text.starts_with(SEALED_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SealKey {
        SealKey::from_bytes([b; KEY_LEN])
    }

    /// A sealed value opens with the same key and owner, and hides the secret.
    #[test]
    fn seal_roundtrip() {
        let k = key(1);
        let s = k.seal(b"peer:1:psk", b"0123456789abcdef0123456789abcdef");
        assert!(is_sealed(&s));
        assert!(!s.contains(&STANDARD.encode(b"0123456789abcdef0123456789abcdef")));
        let p = k.open(b"peer:1:psk", &s, "psk").unwrap();
        assert_eq!(&p[..], b"0123456789abcdef0123456789abcdef");
        // Fresh nonce per seal.
        assert_ne!(
            s,
            k.seal(b"peer:1:psk", b"0123456789abcdef0123456789abcdef")
        );
    }

    /// Wrong key, another owner, or an edited byte: refused, never garbage.
    #[test]
    fn open_refuses_wrong_key_owner_or_edit() {
        let k = key(1);
        let s = k.seal(b"peer:1:psk", b"secret");
        assert!(matches!(
            key(2).open(b"peer:1:psk", &s, "psk"),
            Err(SealError::WrongKey { .. })
        ));
        assert!(matches!(
            k.open(b"peer:2:psk", &s, "psk"),
            Err(SealError::WrongKey { .. })
        ));
        let mut blob = STANDARD.decode(&s[SEALED_PREFIX.len()..]).unwrap();
        blob[20] ^= 1;
        let edited = format!("{SEALED_PREFIX}{}", STANDARD.encode(blob));
        assert!(matches!(
            k.open(b"peer:1:psk", &edited, "psk"),
            Err(SealError::WrongKey { .. })
        ));
        for bad in ["", "abc", "sealed:v1:", "sealed:v1:!!!", "sealed:v1:AAAA"] {
            assert!(
                matches!(k.open(b"a", bad, "psk"), Err(SealError::Malformed { .. })),
                "{bad}"
            );
        }
    }

    /// Subkeys differ by label and from the master.
    #[test]
    fn derived_keys_are_separate() {
        let k = key(7);
        assert_ne!(*k.audit_key(), [7u8; KEY_LEN]);
        assert_ne!(*k.audit_key(), *k.derive("store secrets chacha20poly1305"));
        assert_eq!(*k.audit_key(), *key(7).audit_key());
        assert!(!format!("{k:?}").contains('7'));
    }
}
