//! TLS for the listener and the client: rustls 0.23 with the aws-lc-rs provider, TLS 1.2
//! and 1.3, optional mutual TLS with a client CA and an allow-list of peer identities,
//! and certificates reloaded from disk without a restart.
//!
//! The provider is passed explicitly to every config (never installed process-wide), so a
//! dependency that enables another provider cannot make rustls panic at run time.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A TLS configuration that cannot be loaded. Names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the combination (e.g. a key that does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// Options that do not make sense together.
    #[error("TLS configuration: {0}")]
    Invalid(String),
}

/// The listener's TLS settings. Paths are re-read on [`ServerTls::reload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsConfig {
    /// PEM certificate chain presented to clients (leaf first).
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to. Set: every client must
    /// present a valid certificate (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: the client identities let in. Empty: any certificate of the CA.
    /// An entry matches the certificate's full subject as printed by OpenSSL-style
    /// RFC 4514 (`CN=lab, O=Hospital`), its common name as `CN=lab`, or one of its subject
    /// alternative names as `DNS:lab.example`, `IP:10.0.0.1`, `URI:…` or `email:…`.
    pub allowed_peers: Vec<String>,
}

/// What a client proved about itself during the TLS handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The full subject, RFC 4514 style.
    pub subject: String,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// Subject alternative names as `DNS:…`, `IP:…`, `URI:…`, `email:…`.
    pub sans: Vec<String>,
}

impl PeerIdentity {
    /// Reads the identity from a DER certificate. `None` if it does not parse.
    pub fn from_der(der: &[u8]) -> Option<PeerIdentity> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let subject = cert.subject().to_string();
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(s) => sans.push(format!("DNS:{s}")),
                    GeneralName::URI(s) => sans.push(format!("URI:{s}")),
                    GeneralName::RFC822Name(s) => sans.push(format!("email:{s}")),
                    GeneralName::IPAddress(b) => {
                        let ip = match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            _ => None,
                        };
                        if let Some(ip) = ip {
                            sans.push(format!("IP:{ip}"));
                        }
                    }
                    _ => {}
                }
            }
        }
        Some(PeerIdentity {
            subject,
            common_name,
            sans,
        })
    }

    /// Whether an allow-list entry names this identity (see
    /// [`ServerTlsConfig::allowed_peers`]).
    pub fn matches(&self, entry: &str) -> bool {
        let entry = entry.trim();
        entry == self.subject
            || self
                .common_name
                .as_deref()
                .is_some_and(|cn| entry.strip_prefix("CN=") == Some(cn))
            || self.sans.iter().any(|san| san == entry)
    }
}

/// The process's crypto provider: aws-lc-rs.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn file_error(path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Reads every certificate of a PEM file; fails if there is none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

/// Root store of the certificates in a PEM file.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn build_server_config(config: &ServerTlsConfig) -> Result<ServerConfig, TlsError> {
    if config.client_ca.is_none() && !config.allowed_peers.is_empty() {
        return Err(TlsError::Invalid(
            "an allow-list of client certificates needs a client CA".to_owned(),
        ));
    }
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &config.client_ca {
        Some(ca) => {
            let roots = Arc::new(load_roots(ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| TlsError::Invalid(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let certs = load_certs(&config.cert)?;
    let key = load_key(&config.key)?;
    Ok(builder.with_single_cert(certs, key)?)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

struct Loaded {
    acceptor: TlsAcceptor,
    stamps: Vec<Option<SystemTime>>,
}

/// The listener's TLS state: the current acceptor, replaced atomically by
/// [`reload`](ServerTls::reload). Handshakes in progress keep the config they started
/// with; new connections get the new one.
pub struct ServerTls {
    config: ServerTlsConfig,
    current: RwLock<Arc<Loaded>>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the files; fails with the file and the reason.
    pub fn load(config: ServerTlsConfig) -> Result<ServerTls, TlsError> {
        let loaded = Self::build(&config)?;
        Ok(ServerTls {
            config,
            current: RwLock::new(Arc::new(loaded)),
        })
    }

    fn stamps(config: &ServerTlsConfig) -> Vec<Option<SystemTime>> {
        let mut paths = vec![&config.cert, &config.key];
        paths.extend(config.client_ca.as_ref());
        paths.into_iter().map(|p| modified(p)).collect()
    }

    fn build(config: &ServerTlsConfig) -> Result<Loaded, TlsError> {
        let stamps = Self::stamps(config);
        let server = build_server_config(config)?;
        Ok(Loaded {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            stamps,
        })
    }

    /// The settings.
    pub fn config(&self) -> &ServerTlsConfig {
        &self.config
    }

    /// Re-reads the certificate, key and client CA. On error the previous configuration
    /// stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = Self::build(&self.config)?;
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = Arc::new(loaded);
        Ok(())
    }

    /// Reloads when a file's modification time changed since the last load. `Ok(true)`
    /// when it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let before = self.current().stamps.clone();
        if Self::stamps(&self.config) == before {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current().acceptor.clone()
    }

    /// Whether a handshake's client certificate passes the allow-list.
    pub fn allows(&self, identity: Option<&PeerIdentity>) -> bool {
        if self.config.allowed_peers.is_empty() {
            return true;
        }
        identity.is_some_and(|id| self.config.allowed_peers.iter().any(|e| id.matches(e)))
    }
}

/// The client's TLS settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsConfig {
    /// PEM CA certificates to trust for the server. `None`: the system's roots.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain, for mutual TLS.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// The name to verify the server certificate against. Default: the host to connect to.
    pub server_name: Option<String>,
}

/// Builds the connector for a client.
pub fn connector(config: &ClientTlsConfig) -> Result<TlsConnector, TlsError> {
    let roots = match &config.ca {
        Some(ca) => load_roots(ca)?,
        None => {
            let mut roots = RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                // Skip the odd malformed system certificate rather than fail.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(TlsError::Invalid(
                    "no system CA certificates found; pass a CA file".to_owned(),
                ));
            }
            roots
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots);
    let client = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => {
            builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(TlsError::Invalid(
                "a client certificate needs its key, and a key its certificate".to_owned(),
            ));
        }
    };
    Ok(TlsConnector::from(Arc::new(client)))
}
