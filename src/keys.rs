//! WireGuard keys: base64 codec identical to `wg genkey`/`wg pubkey`, redacted
//! `Debug`, zeroized on drop, and a key-file loader that refuses loose modes.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand_core::{OsRng, RngCore};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of every WireGuard key (private, public, preshared).
pub const KEY_LEN: usize = 32;

/// Why a key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "`{0}` is not a valid WireGuard key: expected 44 characters of base64 encoding 32 bytes"
    )]
    Malformed(String),
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    LoosePermissions { path: PathBuf, mode: u32 },
}

fn decode32(text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let trimmed = text.trim();
    let shown = if trimmed.len() > 60 {
        format!(
            "{}...",
            &trimmed[..trimmed
                .char_indices()
                .nth(56)
                .map_or(trimmed.len(), |(i, _)| i)]
        )
    } else {
        trimmed.to_string()
    };
    if trimmed.len() != 44 {
        return Err(KeyError::Malformed(shown));
    }
    let mut out = [0u8; KEY_LEN];
    match STANDARD.decode_slice(trimmed, &mut out) {
        Ok(KEY_LEN) => Ok(out),
        _ => Err(KeyError::Malformed(shown)),
    }
}

/// A Curve25519 public key; also the peer identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }
    /// # Errors
    /// [`KeyError::Malformed`] unless `text` is base64 of exactly 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode32(text).map(Self)
    }
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
    pub fn to_x25519(&self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.0)
    }
    /// Constant-time comparison, for places an attacker controls one side.
    pub fn ct_eq(&self, other: &Self) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// A Curve25519 private key, clamped like `wg genkey` does.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    /// A fresh key from the OS RNG, clamped (RFC 7748) as `wg genkey` emits it.
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        OsRng.fill_bytes(&mut bytes);
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Self(bytes)
    }
    /// # Errors
    /// [`KeyError::Malformed`] unless `text` is base64 of exactly 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode32(text).map(Self)
    }
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.to_x25519()).to_bytes())
    }
    pub fn to_x25519(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.0)
    }
    /// Reads a key file written by `sitegate init` or `wg genkey`.
    ///
    /// # Errors
    /// The file is unreadable, readable by group/others, or not a key.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let mut text = read_secret_file(path)?;
        let key = decode32(&text)
            .map_err(|_| KeyError::Malformed(format!("contents of {}", path.display())));
        text.zeroize();
        key.map(Self)
    }
}

/// Reads a file that holds a secret, refusing one that group or others may read.
///
/// # Errors
/// [`KeyError::Read`], [`KeyError::LoosePermissions`].
pub fn read_secret_file(path: &Path) -> Result<String, KeyError> {
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::LoosePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A WireGuard preshared key (post-quantum hedge), random 32 bytes.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PresharedKey([u8; KEY_LEN]);

/// Secrets compare in constant time (`subtle`), wherever they are compared.
impl PartialEq for PresharedKey {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}
impl Eq for PresharedKey {}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}
impl Eq for PrivateKey {}

impl PresharedKey {
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }
    /// # Errors
    /// [`KeyError::Malformed`] unless `text` is base64 of exactly 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode32(text).map(Self)
    }
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Public key derivation matches RFC 7748 / `wg pubkey` on a known vector.
    #[test]
    fn pubkey_known_vector() {
        // From wireguard-tools' documentation style: a fixed key and its public half,
        // computed with the RFC 7748 test vector (Alice).
        let sk = PrivateKey::from_base64("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=").unwrap();
        assert_eq!(
            sk.public_key().to_base64(),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
    }

    /// Malformed keys are refused, with the offending text in the message.
    #[test]
    fn malformed_keys_refused() {
        for bad in [
            "",
            "abc",
            "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LC=",
            "!!!!CnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=",
        ] {
            let err = PublicKey::from_base64(bad).unwrap_err();
            assert!(err.to_string().contains(bad.trim()), "{err}");
        }
    }

    /// Generated keys are clamped and round-trip through base64.
    #[test]
    fn generate_roundtrip() {
        let k = PrivateKey::generate();
        assert_eq!(k.as_bytes()[0] & 7, 0);
        assert_eq!(k.as_bytes()[31] & 0xc0, 0x40);
        let again = PrivateKey::from_base64(&k.to_base64()).unwrap();
        assert_eq!(again.public_key(), k.public_key());
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }
}
