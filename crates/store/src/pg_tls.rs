//! TLS between passerelle and PostgreSQL, with rustls (aws-lc-rs; no OpenSSL).
//!
//! ## Settings, named after libpq's
//!
//! The mode ([`PgTlsMode`]) takes libpq's `sslmode` names, so that a DBA recognises them:
//!
//! | mode          | encrypted | server certificate checked                                 |
//! |---------------|-----------|------------------------------------------------------------|
//! | `disable`     | no        | -                                                          |
//! | `prefer`      | if the server offers TLS; plaintext otherwise | no                     |
//! | `require`     | yes, or no connection | no (as libpq: encryption without authentication), unless a CA file is given: then as `verify-ca` |
//! | `verify-ca`   | yes       | signed by a trusted CA (any host name)                     |
//! | `verify-full` | yes       | signed by a trusted CA **and** names the host connected to |
//!
//! `prefer` and `require` (without a CA file) protect against a passive eavesdropper only:
//! an active attacker on the path can present any certificate. Only `verify-full` proves
//! that the peer is the database named in the connection string.
//!
//! The trusted CAs are those of the CA file (PEM), or, without one, the system's roots
//! (read from the platform's certificate files, never fetched). A client certificate and
//! its key (PEM) are presented when given, for servers that authenticate clients by
//! certificate (pg_hba `cert`, or `clientcert=verify-ca|verify-full`).
//!
//! The settings come from passerelle's configuration (`[store] tls`, `tls_ca_file`,
//! `tls_cert_file`, `tls_key_file`) or from the connection string's libpq keys `sslmode`,
//! `sslrootcert`, `sslcert` and `sslkey` (taken out of it before the rest is parsed: the
//! client library knows only three of the six modes); a setting given in both places
//! must agree. With neither, the mode is `prefer`, libpq's default. Other libpq TLS keys
//! (`sslcrl`, `sslpassword`, `sslsni`…) are refused as unknown options.
//!
//! TLS applies to TCP connections only: a Unix socket is local, and PostgreSQL does not
//! offer TLS on it (libpq ignores `sslmode` there too).
//!
//! SCRAM authentication over TLS binds itself to the channel (`tls-server-end-point`, RFC
//! 5929) when the server's certificate is signed with RSA or ECDSA over SHA-1/256/384/512,
//! so that a password exchange cannot be relayed through another TLS session.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// How the store's connections use TLS (libpq's `sslmode` values; `allow` is not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgTlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl PgTlsMode {
    pub const ALL: [PgTlsMode; 5] = [
        PgTlsMode::Disable,
        PgTlsMode::Prefer,
        PgTlsMode::Require,
        PgTlsMode::VerifyCa,
        PgTlsMode::VerifyFull,
    ];

    pub fn parse(text: &str) -> Option<PgTlsMode> {
        Self::ALL.into_iter().find(|m| m.name() == text)
    }

    pub fn name(self) -> &'static str {
        match self {
            PgTlsMode::Disable => "disable",
            PgTlsMode::Prefer => "prefer",
            PgTlsMode::Require => "require",
            PgTlsMode::VerifyCa => "verify-ca",
            PgTlsMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for PgTlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// TLS settings of the PostgreSQL store, from passerelle's configuration. Each one left
/// `None` may come from the connection string (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTls {
    /// `None`: the connection string's `sslmode`, else `prefer`.
    pub mode: Option<PgTlsMode>,
    /// PEM CA certificates to trust for the server (`sslrootcert`). `None`: the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for servers that ask for one (`sslcert`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (`sslkey`).
    pub key_file: Option<PathBuf>,
}

/// A TLS setting that cannot be used: which one, and why. `field` is the name of the
/// setting in `[store]` (`tls`, `tls_ca_file`, `tls_cert_file`, `tls_key_file`) or `url`
/// when the connection string holds the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PgTlsError {
    pub field: &'static str,
    pub message: String,
}

fn tls_error(field: &'static str, message: impl fmt::Display) -> PgTlsError {
    PgTlsError {
        field,
        message: message.to_string(),
    }
}

/// The libpq TLS keys found in a connection string (raw text values).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct UrlTls {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

impl UrlTls {
    fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        match key {
            "sslmode" => Some(&mut self.sslmode),
            "sslrootcert" => Some(&mut self.sslrootcert),
            "sslcert" => Some(&mut self.sslcert),
            "sslkey" => Some(&mut self.sslkey),
            _ => None,
        }
    }
}

/// Takes the libpq TLS keys out of a connection string (either form); returns the rest,
/// for the client library to parse, and what was taken. The error never quotes the string.
pub(crate) fn split_tls_options(url: &str) -> Result<(String, UrlTls), String> {
    let mut found = UrlTls::default();
    let trimmed = url.trim_start();
    if let Some(scheme_end) = ["postgresql://", "postgres://"]
        .iter()
        .find_map(|p| trimmed.starts_with(p).then_some(p.len()))
    {
        let Some(q) = trimmed[scheme_end..].find('?').map(|q| q + scheme_end) else {
            return Ok((url.to_owned(), found));
        };
        let mut kept = Vec::new();
        for pair in trimmed[q + 1..].split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match found.slot(key) {
                Some(slot) => *slot = Some(percent_decode(value)?),
                None => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            trimmed[..q].to_owned()
        } else {
            format!("{}?{}", &trimmed[..q], kept.join("&"))
        };
        return Ok((rest, found));
    }
    // key = value form, read as the client library reads it.
    let mut kept: Vec<&str> = Vec::new();
    let mut chars = url.char_indices().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key_end = start;
        while let Some((i, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key_end = i + c.len_utf8();
        }
        let key = &url[start..key_end];
        skip_ws(&mut chars);
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            return Err(format!("expected = after {key:?}"));
        }
        skip_ws(&mut chars);
        let mut value = String::new();
        let mut end = url.len();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            let mut closed = false;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\'' => {
                        end = i + 1;
                        closed = true;
                        break;
                    }
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("unterminated quoted value of {key:?}"));
            }
        } else {
            while let Some((i, c)) = chars.peek().copied() {
                if c.is_whitespace() {
                    end = i;
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.extend(chars.next().map(|(_, c)| c));
                } else {
                    value.push(c);
                }
            }
        }
        match found.slot(key) {
            Some(slot) => *slot = Some(value),
            None => kept.push(&url[start..end]),
        }
    }
    Ok((kept.join(" "), found))
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a bad %-escape in a TLS option")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a TLS option that is not UTF-8".to_owned())
}

/// The TLS settings in force: passerelle's configuration merged with the connection
/// string's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub(crate) mode: PgTlsMode,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

/// Merges the two sources; a setting given in both must agree.
pub(crate) fn resolve(config: &PgTls, url: &UrlTls) -> Result<Resolved, PgTlsError> {
    let url_mode = match &url.sslmode {
        None => None,
        Some(m) => Some(PgTlsMode::parse(m).ok_or_else(|| {
            tls_error(
                "url",
                format!(
                    "sslmode {m:?} is not one of {}",
                    PgTlsMode::ALL.map(PgTlsMode::name).join(", ")
                ),
            )
        })?),
    };
    let mode = merge("tls", "sslmode", config.mode, url_mode)?.unwrap_or(PgTlsMode::Prefer);
    let path = |field, key, ours: &Option<PathBuf>, theirs: &Option<String>| {
        merge(field, key, ours.clone(), theirs.as_ref().map(PathBuf::from))
    };
    let resolved = Resolved {
        mode,
        ca_file: path(
            "tls_ca_file",
            "sslrootcert",
            &config.ca_file,
            &url.sslrootcert,
        )?,
        cert_file: path("tls_cert_file", "sslcert", &config.cert_file, &url.sslcert)?,
        key_file: path("tls_key_file", "sslkey", &config.key_file, &url.sslkey)?,
    };
    match (&resolved.cert_file, &resolved.key_file) {
        (Some(_), None) => Err(tls_error(
            "tls_key_file",
            "a client certificate (tls_cert_file) needs its key",
        )),
        (None, Some(_)) => Err(tls_error(
            "tls_cert_file",
            "a client key (tls_key_file) needs its certificate",
        )),
        _ => Ok(resolved),
    }
}

fn merge<T: PartialEq + fmt::Debug>(
    field: &'static str,
    url_key: &str,
    ours: Option<T>,
    theirs: Option<T>,
) -> Result<Option<T>, PgTlsError> {
    match (ours, theirs) {
        (Some(a), Some(b)) if a != b => Err(tls_error(
            field,
            format!(
                "set to {a:?}, but the connection string's {url_key} says {b:?}: set it in one place"
            ),
        )),
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certs(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, PgTlsError> {
    let bad = |e: &dyn fmt::Display| tls_error(field, format!("{}: {e}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no PEM certificate in it"));
    }
    Ok(certs)
}

/// The CAs to trust: the CA file's, or the system's.
fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, PgTlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certs("tls_ca_file", path)? {
                roots.add(cert).map_err(|e| {
                    tls_error(
                        "tls_ca_file",
                        format!("{}: not a usable CA certificate: {e}", path.display()),
                    )
                })?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // A malformed system certificate is skipped, as other clients do.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(tls_error(
                    "tls_ca_file",
                    "no system CA certificates found to check the server's certificate: \
                     set tls_ca_file",
                ));
            }
        }
    }
    Ok(roots)
}

/// What the client checks of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Only that the server holds the certificate's key (`prefer`, `require`).
    Nothing,
    /// The chain to a trusted CA (`verify-ca`).
    Chain,
    /// The chain and the host name (`verify-full`).
    Full,
}

/// Builds the connector for the resolved settings, reading every file: a file that is
/// missing or unusable fails here, at start, naming its setting.
pub(crate) fn connector(resolved: &Resolved) -> Result<MakeRustls, PgTlsError> {
    let check = match resolved.mode {
        PgTlsMode::Disable => {
            return Ok(MakeRustls { config: None });
        }
        PgTlsMode::Prefer => Check::Nothing,
        // libpq: `require` with a root CA file verifies as `verify-ca`.
        PgTlsMode::Require if resolved.ca_file.is_some() => Check::Chain,
        PgTlsMode::Require => Check::Nothing,
        PgTlsMode::VerifyCa => Check::Chain,
        PgTlsMode::VerifyFull => Check::Full,
    };
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls_error("tls", e))?;
    let builder = match check {
        Check::Full => builder.with_root_certificates(roots(resolved.ca_file.as_deref())?),
        Check::Chain => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient {
                roots: Some(Arc::new(roots(resolved.ca_file.as_deref())?)),
                algorithms: provider.signature_verification_algorithms,
            })),
        Check::Nothing => {
            // A CA file given with `prefer` is still read, so that a bad one is reported.
            if let Some(ca) = &resolved.ca_file {
                roots(Some(ca))?;
            }
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient {
                    roots: None,
                    algorithms: provider.signature_verification_algorithms,
                }))
        }
    };
    let config = match (&resolved.cert_file, &resolved.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs("tls_cert_file", cert)?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| tls_error("tls_key_file", format!("{}: {e}", key.display())))?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                tls_error(
                    "tls_key_file",
                    format!("{} does not go with {}: {e}", key.display(), cert.display()),
                )
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(MakeRustls {
        config: Some(Arc::new(config)),
    })
}

/// `verify-ca` (with `roots`): the chain must reach a trusted CA, and the name in the
/// certificate is not compared with the host. `prefer` and `require` (no `roots`): any
/// certificate. Either way the handshake's signatures are checked (the server must hold
/// the key of the certificate it shows), which is what makes SCRAM's channel binding
/// meaningful.
#[derive(Debug)]
struct Lenient {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The store's [`MakeTlsConnect`]: rustls, with the settings' verifier. `config` is `None`
/// for `disable` (the client library then never asks for a handshake).
#[derive(Clone)]
pub(crate) struct MakeRustls {
    config: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for MakeRustls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MakeRustls")
            .field("tls", &self.config.is_some())
            .finish()
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    /// Called for every connection, Unix sockets included (with an empty `domain`): only
    /// a handshake needs a name, so a missing one fails there.
    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = if domain.is_empty() {
            None
        } else {
            Some(ServerName::try_from(domain.to_owned()).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{domain:?} cannot be checked against a certificate: {e}"),
                )
            })?)
        };
        Ok(RustlsConnect {
            config: self.config.clone(),
            name,
        })
    }
}

/// One handshake to come.
#[derive(Debug)]
pub(crate) struct RustlsConnect {
    config: Option<Arc<ClientConfig>>,
    name: Option<ServerName<'static>>,
}

type Handshake<S> = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Handshake<S>;

    fn connect(self, stream: S) -> Handshake<S> {
        Box::pin(async move {
            let (Some(config), Some(name)) = (self.config, self.name) else {
                return Err(io::Error::other(
                    "TLS is disabled, or there is no host name",
                ));
            };
            let host = name.to_str().into_owned();
            match tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
            {
                Ok(tls) => Ok(RustlsStream(tls)),
                Err(e) => Err(explain(e, &host)),
            }
        })
    }
}

/// Says in words what a refused server certificate means for the operator.
fn explain(e: io::Error, host: &str) -> io::Error {
    let hint = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "the server's certificate is not signed by a CA passerelle trusts (tls_ca_file, \
             or the system's roots)"
                .to_owned()
        }
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => format!(
            "the server's certificate does not name the host {host:?} (verify-full checks \
             the host of the connection string)"
        ),
        Some(rustls::Error::InvalidCertificate(CertificateError::Expired))
        | Some(rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })) => {
            "the server's certificate has expired".to_owned()
        }
        _ => return e,
    };
    io::Error::new(e.kind(), format!("{hint}: {e}"))
}

/// A connection inside TLS.
#[derive(Debug)]
pub(crate) struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    /// `tls-server-end-point` (RFC 5929 section 4.1): a hash of the server's certificate,
    /// with the hash of its signature algorithm (SHA-256 for MD5 and SHA-1). `none` for
    /// other algorithms (Ed25519, RSA-PSS): SCRAM then runs without channel binding.
    fn channel_binding(&self) -> ChannelBinding {
        use sha2::Digest;
        let Some(cert) = self
            .0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
        else {
            return ChannelBinding::none();
        };
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
            return ChannelBinding::none();
        };
        let digest = match parsed.signature_algorithm.algorithm.to_id_string().as_str() {
            // md5, sha1, sha256 with RSA; ecdsa with sha1, sha256
            "1.2.840.113549.1.1.4"
            | "1.2.840.113549.1.1.5"
            | "1.2.840.113549.1.1.11"
            | "1.2.840.10045.4.1"
            | "1.2.840.10045.4.3.2" => sha2::Sha256::digest(cert.as_ref()).to_vec(),
            // sha384 with RSA, ecdsa
            "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => {
                sha2::Sha384::digest(cert.as_ref()).to_vec()
            }
            // sha512 with RSA, ecdsa
            "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => {
                sha2::Sha512::digest(cert.as_ref()).to_vec()
            }
            _ => return ChannelBinding::none(),
        };
        ChannelBinding::tls_server_end_point(digest)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn key_value_strings_lose_their_tls_keys_only() {
        let (rest, found) = split_tls_options(
            "host=db.example port=5432 sslmode = verify-full sslrootcert='/etc/my ca.pem' \
             user=p\\ q sslcert=/c.pem sslkey=/k.pem dbname='x'",
        )
        .unwrap();
        assert_eq!(rest, "host=db.example port=5432 user=p\\ q dbname='x'");
        assert_eq!(
            found,
            UrlTls {
                sslmode: Some("verify-full".into()),
                sslrootcert: Some("/etc/my ca.pem".into()),
                sslcert: Some("/c.pem".into()),
                sslkey: Some("/k.pem".into()),
            }
        );
        rest.parse::<tokio_postgres::Config>().unwrap();
    }

    #[test]
    fn urls_lose_their_tls_query_parameters_only() {
        let (rest, found) = split_tls_options(
            "postgres://u:p%40ss@db.example:5432/pass?sslmode=verify-ca&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p%40ss@db.example:5432/pass?application_name=x"
        );
        assert_eq!(found.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(found.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        let (rest, found) =
            split_tls_options("postgresql://db.example/pass?sslmode=require").unwrap();
        assert_eq!(rest, "postgresql://db.example/pass");
        assert_eq!(found.sslmode.as_deref(), Some("require"));
        let (rest, found) = split_tls_options("postgres://db.example/pass").unwrap();
        assert_eq!(rest, "postgres://db.example/pass");
        assert_eq!(found, UrlTls::default());
    }

    #[test]
    fn broken_strings_are_refused_without_quoting_them() {
        let e = split_tls_options("host=x password='secret").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert!(split_tls_options("host").is_err());
        let e = split_tls_options("postgres://h/d?sslrootcert=%zz").unwrap_err();
        assert!(e.contains("%-escape"), "{e}");
    }

    #[test]
    fn both_sources_must_agree_and_prefer_is_the_default() {
        let url = UrlTls {
            sslmode: Some("require".into()),
            ..UrlTls::default()
        };
        let ours = PgTls {
            mode: Some(PgTlsMode::VerifyFull),
            ..PgTls::default()
        };
        let e = resolve(&ours, &url).unwrap_err();
        assert_eq!(e.field, "tls");
        assert_eq!(
            resolve(&PgTls::default(), &url).unwrap().mode,
            PgTlsMode::Require
        );
        assert_eq!(
            resolve(&PgTls::default(), &UrlTls::default()).unwrap().mode,
            PgTlsMode::Prefer
        );
        let bad = UrlTls {
            sslmode: Some("allow".into()),
            ..UrlTls::default()
        };
        assert_eq!(resolve(&PgTls::default(), &bad).unwrap_err().field, "url");
        let half = PgTls {
            cert_file: Some("/c.pem".into()),
            ..PgTls::default()
        };
        assert_eq!(
            resolve(&half, &UrlTls::default()).unwrap_err().field,
            "tls_key_file"
        );
    }

    #[test]
    fn unusable_files_name_their_setting() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let resolved = |ca: Option<PathBuf>| Resolved {
            mode: PgTlsMode::VerifyFull,
            ca_file: ca,
            cert_file: None,
            key_file: None,
        };
        let e = connector(&resolved(Some(junk.clone()))).unwrap_err();
        assert_eq!(e.field, "tls_ca_file");
        assert!(e.message.contains("no PEM certificate"), "{e}");
        let e = connector(&resolved(Some(dir.path().join("missing.pem")))).unwrap_err();
        assert_eq!(e.field, "tls_ca_file");
        assert!(e.message.contains("missing.pem"), "{e}");
    }
}
