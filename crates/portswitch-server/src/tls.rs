//! TLS for client connections (rustls, ring provider): server certificates, optional
//! client certificates (mutual TLS) whose common name names a user, and the
//! `tls-exporter` value that binds a SCRAM exchange to its TLS connection (RFC 9266).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client has to complete the TLS handshake.
pub const HANDSHAKE_MS_MAX: u64 = 10_000;

/// Where the server's TLS material is.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key of the server.
    pub key: PathBuf,
    /// PEM CA whose client certificates are accepted (mutual TLS). A client that
    /// presents one is logged in as the user its common name names; clients without a
    /// certificate can still use SCRAM.
    pub client_ca: Option<PathBuf>,
}

fn io_err(what: &str, path: &Path, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{what} {}: {e}", path.display()),
    )
}

/// Says which setting a file error is about (the error names the file).
fn file(what: &str) -> impl Fn(portswitch_files::FileError) -> std::io::Error + '_ {
    move |e| {
        let e = std::io::Error::from(e);
        std::io::Error::new(e.kind(), format!("TLS {what}: {e}"))
    }
}

/// Builds the acceptor, failing with the file at fault.
pub fn acceptor(s: &TlsSettings) -> std::io::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = portswitch_files::load_certs(&s.cert).map_err(file("certificate"))?;
    let key = portswitch_files::load_key(&s.key).map_err(file("key"))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?;
    let config = match &s.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in portswitch_files::load_roots(ca).map_err(file("client CA"))? {
                roots.add(c).map_err(|e| io_err("client CA", ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| io_err("client CA", ca, e))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)
        }
        None => builder.with_no_client_auth().with_single_cert(certs, key),
    }
    .map_err(|e| io_err("certificate/key", &s.cert, e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// What a finished handshake tells the server about the connection.
#[derive(Debug, Clone, Default)]
pub struct ConnSecurity {
    /// The connection's `tls-exporter` value, for SCRAM channel binding.
    pub exporter: Option<[u8; 32]>,
    /// The common name of a verified client certificate.
    pub cert_user: Option<String>,
}

/// Facts about a TLS connection the server needs: its exporter and client identity.
pub fn security_of(stream: &TlsStream<TcpStream>) -> ConnSecurity {
    let (_, conn) = stream.get_ref();
    let mut out = [0u8; 32];
    let exported = conn
        .export_keying_material(&mut out, b"EXPORTER-Channel-Binding", None)
        .is_ok();
    let exporter = exported.then_some(out);
    // The verifier accepted the chain; the first certificate is the client's.
    let cert_user = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|der| common_name(der));
    ConnSecurity {
        exporter,
        cert_user,
    }
}

fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}
