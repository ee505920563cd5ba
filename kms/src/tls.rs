//! Mutual TLS to KMS servers with rustls 0.23 (ring provider).
//!
//! kmip-protocol's own TLS feature pulls in rustls 0.19, webpki 0.21 and
//! ring 0.16, all with security advisories, and rustls-pemfile, which is
//! unmaintained. Its client takes any `Read + Write` stream, so vmcrypt
//! makes the TLS connection itself and hands the stream over. A current
//! rustls also verifies servers named by IP address (IP SANs).
//!
//! The CA, certificate and key are parsed once; the PEM bytes of the key
//! are zeroed after parsing, and no copy is made per connection.

use std::io;
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use zeroize::Zeroizing;

use crate::KmsError;

/// A TLS stream to a KMS server.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// Why a connection failed: worth trying again (or the next server), or a
/// definite answer (a certificate refused on either side).
#[derive(Debug)]
pub enum ConnectError {
    Retry(String),
    Refused(String),
}

/// The client side of mutual TLS, ready to connect.
pub struct TlsClient {
    config: Arc<ClientConfig>,
}

impl TlsClient {
    /// Reads the CA, the client certificate chain and its key (PEM files).
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, KmsError> {
        let bad = |p: &Path, reason: String| KmsError::Config {
            path: p.display().to_string(),
            reason,
        };
        let read = |p: &Path| std::fs::read(p).map_err(|e| bad(p, e.to_string()));
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&read(ca)?) {
            let c = c.map_err(|e| bad(ca, format!("not a PEM certificate: {e}")))?;
            roots
                .add(c)
                .map_err(|e| bad(ca, format!("unusable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad(ca, "no CA certificate in it".into()));
        }
        let chain = CertificateDer::pem_slice_iter(&read(cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(cert, format!("not a PEM certificate: {e}")))?;
        if chain.is_empty() {
            return Err(bad(cert, "no certificate in it".into()));
        }
        let key_pem = Zeroizing::new(read(key)?);
        let private = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| bad(key, format!("not a PEM private key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(ca, format!("TLS set-up: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private)
            .map_err(|e| bad(key, format!("does not fit the certificate: {e}")))?;
        Ok(TlsClient {
            config: Arc::new(config),
        })
    }

    /// Runs the TLS handshake on `tcp` with the server `name` (a DNS name
    /// or an IP address, checked against the certificate's SANs).
    pub fn connect(&self, tcp: TcpStream, name: &str) -> Result<TlsStream, ConnectError> {
        let server = ServerName::try_from(name.to_string())
            .map_err(|e| ConnectError::Refused(format!("server name '{name}': {e}")))?;
        let conn = ClientConnection::new(self.config.clone(), server)
            .map_err(|e| ConnectError::Refused(format!("TLS set-up: {e}")))?;
        let mut tls = StreamOwned::new(conn, tcp);
        // Finish the handshake now, so that its failures are told apart
        // from a request's.
        while tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                return Err(classify(e));
            }
        }
        Ok(tls)
    }
}

/// A handshake error: a TLS-level one (alert, certificate) is the server's
/// or our definite answer; an I/O one (reset, timeout) may pass.
fn classify(e: io::Error) -> ConnectError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => ConnectError::Refused(format!(
            "TLS handshake failed (certificate not accepted?): {tls}"
        )),
        None => ConnectError::Retry(format!("TLS handshake: {e}")),
    }
}
