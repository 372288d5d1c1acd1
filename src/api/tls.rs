//! HTTPS for the admin API: rustls (TLS 1.2 and 1.3 only, its safe defaults)
//! with the ring provider, from PEM files named in `[api]`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use tokio_rustls::rustls;

/// # Errors
/// Naming the key at fault: a file unreadable, empty or not PEM, a key file
/// readable by group or others, or a key that does not match the certificate.
pub(super) fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = {
        let text = std::fs::read(cert)
            .with_context(|| format!("api.tls_cert_file {}: cannot read", cert.display()))?;
        rustls_pemfile::certs(&mut text.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("api.tls_cert_file {}: not PEM", cert.display()))?
    };
    if certs.is_empty() {
        return Err(anyhow!(
            "api.tls_cert_file {} holds no certificate",
            cert.display()
        ));
    }
    let private = {
        // Like the token file and the server key: a private key others can
        // read is refused, not served.
        use std::os::unix::fs::MetadataExt;
        let mode = std::fs::metadata(key)
            .with_context(|| format!("api.tls_key_file {}: cannot read", key.display()))?
            .mode();
        if mode & 0o077 != 0 {
            return Err(anyhow!(
                "api.tls_key_file {} is mode {:04o}: readable by group or others; run chmod 600",
                key.display(),
                mode & 0o7777
            ));
        }
        let text = zeroize::Zeroizing::new(
            std::fs::read(key)
                .with_context(|| format!("api.tls_key_file {}: cannot read", key.display()))?,
        );
        rustls_pemfile::private_key(&mut text.as_slice())
            .with_context(|| format!("api.tls_key_file {}: not PEM", key.display()))?
            .ok_or_else(|| anyhow!("api.tls_key_file {} holds no private key", key.display()))?
    };
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS setup")?
    .with_no_client_auth()
    .with_single_cert(certs, private)
    .with_context(|| {
        format!(
            "api.tls_key_file {} does not fit api.tls_cert_file {}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
