//! A FHIR R4 server over HTTP(S): each attempt POSTs the message's transaction bundle to
//! the server's base URL (`Content-Type: application/fhir+json`, `Prefer: return=minimal`),
//! as the FHIR RESTful API defines for `transaction` interactions. The mapping makes bundles deterministic
//! (conditional updates, stable ids), so a repeated attempt is harmless.
//!
//! Transport: reqwest over rustls (no OpenSSL), HTTP/1.1 or HTTP/2, one connection pool per
//! destination, no redirects followed (a redirected POST would silently become a GET).
//!
//! | answer | outcome | `error_class` |
//! |--------|---------|---------------|
//! | 2xx | delivered (`status` kept) | |
//! | 408 | transient | `http_408` |
//! | 429 | transient | `http_429` |
//! | 5xx | transient | `http_5xx` |
//! | other 4xx | permanent | `http_4xx` |
//! | 1xx, 3xx | permanent | `http_3xx` (`http_1xx`) |
//! | no connection (refused, DNS, TLS handshake) | transient | `connect` |
//! | no answer within `timeout_s` | transient | `timeout` |
//! | the connection broke mid-exchange | transient | `http_io` |
//! | the message has no bundle | permanent | `no_bundle` |
//! | no access token (`smart_backend`): token endpoint unreachable, 408, 429, 5xx / refused | transient / permanent | `auth` |
//!
//! A transient answer's `Retry-After` (delta-seconds or HTTP date) becomes the report's
//! `retry_after_ms`. A refused answer's `detail` is an excerpt of its OperationOutcome
//! (`severity`, `code`, `diagnostics` or `details.text`, and the first `expression` of each
//! issue, about 300 characters), with every value of the bundle sent and anything quoted
//! masked as `…` (servers echo the values they refuse); a body that is not an
//! OperationOutcome is not echoed.
//!
//! Authentication: `auth = { type = "none" }` (default), `{ type = "basic", username,
//! password_env }`, `{ type = "bearer", token_env }`, or SMART Backend Services. The `*_env`
//! keys name environment variables, read once when the destination is built. Server
//! certificates are checked against the system's roots, or only against the PEM file `ca`
//! when given; `client_cert` and `client_key` (PEM) present a client certificate (mutual
//! TLS).
//!
//! SMART Backend Services (OAuth 2.0 client credentials with a signed JWT assertion, see
//! the `smart` module): `{ type = "smart_backend", token_url, client_id, private_key_file,
//! algorithm, scope, kid }`. `private_key_file` (unencrypted PKCS#8 PEM, RSA or EC P-384,
//! relative to the base dir) is read and checked when the destination is built;
//! `algorithm` (`RS384` or `ES384`) defaults to the key's, `scope` to `system/*.write`, and
//! `kid`, when given, goes in the JWT header. The token endpoint is reached with the FHIR
//! server's HTTP client (timeouts, `ca`, client certificate), unless the `auth` table has
//! a `ca` of its own: a PEM file, or the word `"system"` for the system's roots (a private
//! FHIR server with a public identity provider); that client presents no certificate,
//! since the signed assertion authenticates the client. Access tokens are
//! cached and shared; a 401 from the FHIR server makes the attempt fetch a new token once
//! and POST once more. Failing to get a token gives `error_class` `auth`: transient when the
//! token endpoint is unreachable or answers 408, 429 or 5xx, permanent when it refuses the
//! client (its OAuth `error` code in `detail`).

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use passerelle_store::AttemptReport;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Certificate, Client, Identity, StatusCode, Url};

use crate::settings::{Reader, invalid, read_file};
use crate::smart::{AccessToken, SmartAuth};
use crate::{Item, SettingsError, truncate, with_detail};

/// The most of an error answer's body that is read (to excerpt an OperationOutcome).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Default `timeout_s`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// POSTs transaction bundles to a FHIR server.
pub struct FhirDestination {
    url: Url,
    client: Client,
    auth: Auth,
}

/// How requests are authenticated.
enum Auth {
    None,
    /// Basic or bearer: one header value, built once.
    Static {
        header: HeaderValue,
        kind: &'static str,
    },
    /// SMART Backend Services: tokens fetched and renewed.
    Smart(Box<SmartAuth>),
}

impl Auth {
    fn kind(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Static { kind, .. } => kind,
            Auth::Smart(_) => "smart_backend",
        }
    }
}

impl fmt::Debug for FhirDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The credentials stay out.
        f.debug_struct("FhirDestination")
            .field("url", &self.url.as_str())
            .field("auth", &self.auth.kind())
            .finish_non_exhaustive()
    }
}

impl FhirDestination {
    /// From settings: `url` (required), `timeout_s`, `auth`, `ca`, `client_cert`,
    /// `client_key`.
    pub fn from_settings(
        settings: &toml::Table,
        base_dir: &Path,
    ) -> Result<FhirDestination, SettingsError> {
        let r = Reader::new(
            settings,
            "",
            &[
                "url",
                "timeout_s",
                "auth",
                "ca",
                "client_cert",
                "client_key",
            ],
        )?;
        let url_text = r.required_string("url")?;
        let url = Url::parse(url_text).map_err(|e| invalid("url", format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("url", "the scheme must be http or https"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                "url",
                "the FHIR base URL takes no query or fragment",
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                "url",
                "credentials do not belong in the URL: use `auth`",
            ));
        }
        let timeout = r.seconds("timeout_s")?.unwrap_or(DEFAULT_TIMEOUT);

        let ca = match r.path_setting("ca", base_dir)? {
            Some(path) => Some(read_ca("ca", &path)?),
            None => None,
        };
        let cert = r.path_setting("client_cert", base_dir)?;
        let key = r.path_setting("client_key", base_dir)?;
        let identity = match (cert, key) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(SettingsError::Missing {
                    key: "client_key".to_owned(),
                });
            }
            (None, Some(_)) => {
                return Err(SettingsError::Missing {
                    key: "client_cert".to_owned(),
                });
            }
            (Some(cert), Some(key)) => {
                let mut pem = read_file("client_cert", &cert)?;
                pem.push(b'\n');
                pem.extend_from_slice(&read_file("client_key", &key)?);
                Some(Identity::from_pem(&pem).map_err(|e| {
                    invalid(
                        "client_cert",
                        format!("cannot use the certificate and key: {e}"),
                    )
                })?)
            }
        };
        let client = http_client(timeout, ca, identity)?;
        let auth = match r.table("auth")? {
            None => Auth::None,
            Some(table) => read_auth(table, base_dir, timeout)?,
        };
        Ok(FhirDestination { url, client, auth })
    }

    /// The base URL.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// One attempt: see the module doc.
    pub async fn deliver(&self, item: &Item<'_>) -> AttemptReport {
        let Some(bundle) = item.bundle else {
            return with_detail(
                AttemptReport::permanent("no_bundle"),
                "the message has no FHIR bundle (its route maps nothing) for a FHIR destination",
            );
        };
        let mut token = match &self.auth {
            Auth::Smart(smart) => match smart.token(&self.client).await {
                Ok(token) => Some(token),
                Err(report) => return report,
            },
            _ => None,
        };
        let mut response = match self.post(bundle, token.as_deref()).await {
            Ok(response) => response,
            Err(e) => return transport_failure(&e),
        };
        if response.status() == StatusCode::UNAUTHORIZED
            && let (Auth::Smart(smart), Some(refused)) = (&self.auth, &token)
        {
            // Revoked, or expired sooner than announced: one fresh token, one more try.
            smart.forget(refused);
            drain(response).await;
            token = match smart.token(&self.client).await {
                Ok(token) => Some(token),
                Err(report) => return report,
            };
            response = match self.post(bundle, token.as_deref()).await {
                Ok(response) => response,
                Err(e) => return transport_failure(&e),
            };
        }
        let status = response.status();
        if status.is_success() {
            // Drain the answer (without keeping it) so the connection goes back to the pool.
            drain(response).await;
            let mut report = AttemptReport::delivered();
            report.status = Some(status.as_u16());
            return report;
        }
        let retry_after = retry_after_ms(response.headers(), SystemTime::now());
        let body = read_bounded(response, MAX_ERROR_BODY).await;
        classify(status, retry_after, &body, bundle)
    }

    /// POSTs the bundle, with the configured credentials (`token` for SMART).
    async fn post(
        &self,
        bundle: &str,
        token: Option<&AccessToken>,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/fhir+json")
            .header(ACCEPT, "application/fhir+json")
            // The transaction-response need not repeat the resources.
            .header("Prefer", "return=minimal")
            .body(bundle.to_owned());
        if let Auth::Static { header, .. } = &self.auth {
            request = request.header(AUTHORIZATION, header.clone());
        }
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, token.header());
        }
        request.send().await
    }
}

/// Reads an answer to its end without keeping it, so the connection can be reused.
async fn drain(mut response: reqwest::Response) {
    while let Ok(Some(_)) = response.chunk().await {}
}

/// The HTTP client of a destination (or of its token endpoint): server certificates
/// checked against `ca` only when given, else the system's roots; `identity` presented
/// when given (mutual TLS); no redirects.
pub(crate) fn http_client(
    timeout: Duration,
    ca: Option<Vec<Certificate>>,
    identity: Option<Identity>,
) -> Result<Client, SettingsError> {
    // rustls needs one process-wide crypto provider; the workspace uses aws-lc-rs.
    // Installing fails harmlessly when one is already installed.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut builder = Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("passerelle/", env!("CARGO_PKG_VERSION")));
    if let Some(certs) = ca {
        builder = builder.tls_certs_only(certs);
    }
    if let Some(identity) = identity {
        builder = builder.identity(identity);
    }
    builder
        .build()
        .map_err(|e| invalid("url", format!("cannot build the HTTP client: {e}")))
}

/// The certificates of the PEM file `path` (setting `key`): at least one.
pub(crate) fn read_ca(key: &str, path: &Path) -> Result<Vec<Certificate>, SettingsError> {
    let pem = read_file(key, path)?;
    let certs = Certificate::from_pem_bundle(&pem)
        .map_err(|e| invalid(key, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(key, "the file holds no certificate"));
    }
    Ok(certs)
}

fn read_auth(
    table: &toml::Table,
    base_dir: &Path,
    timeout: Duration,
) -> Result<Auth, SettingsError> {
    const EXPECTED: &str = "expected \"none\", \"basic\", \"bearer\" or \"smart_backend\"";
    let kind = table
        .get("type")
        .ok_or_else(|| SettingsError::Missing {
            key: "auth.type".to_owned(),
        })?
        .as_str()
        .ok_or_else(|| invalid("auth.type", EXPECTED))?;
    let secret_header = |text: String, kind: &'static str| {
        let mut header = HeaderValue::from_str(&text).map_err(|_| {
            invalid(
                "auth",
                "the credentials hold characters not allowed in a header",
            )
        })?;
        header.set_sensitive(true);
        Ok::<_, SettingsError>(Auth::Static { header, kind })
    };
    match kind {
        "none" => {
            Reader::new(table, "auth", &["type"])?;
            Ok(Auth::None)
        }
        "basic" => {
            let r = Reader::new(table, "auth", &["type", "username", "password_env"])?;
            let username = r.required_string("username")?;
            if username.contains(':') {
                return Err(invalid("auth.username", "must not contain ':'"));
            }
            let password = r.secret_from_env("password_env")?;
            let token = base64_encode(format!("{username}:{password}").as_bytes(), false);
            secret_header(format!("Basic {token}"), "basic")
        }
        "bearer" => {
            let r = Reader::new(table, "auth", &["type", "token_env"])?;
            let token = r.secret_from_env("token_env")?;
            secret_header(format!("Bearer {token}"), "bearer")
        }
        "smart_backend" => {
            let r = Reader::new(table, "auth", SmartAuth::KEYS)?;
            Ok(Auth::Smart(Box::new(SmartAuth::from_settings(
                &r, base_dir, timeout,
            )?)))
        }
        other => Err(invalid("auth.type", format!("{other:?}: {EXPECTED}"))),
    }
}

/// Base64 (RFC 4648): the standard alphabet with padding (Basic authentication), or with
/// `url_safe` the URL-safe alphabet without padding (JWS, RFC 7515).
pub(crate) fn base64_encode(input: &[u8], url_safe: bool) -> String {
    const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let alphabet = if url_safe { URL_SAFE } else { STANDARD };
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(alphabet[((n >> (18 - 6 * i)) & 63) as usize]));
            } else if !url_safe {
                out.push('=');
            }
        }
    }
    out
}

/// A request that got no HTTP answer.
pub(crate) fn transport_failure(e: &reqwest::Error) -> AttemptReport {
    let class = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "http_io"
    };
    // reqwest's message names the URL (configuration) and the cause, never the body.
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    with_detail(AttemptReport::transient(class), text)
}

/// Reads at most `max` bytes of an answer; a broken body reads as empty.
pub(crate) async fn read_bounded(mut response: reqwest::Response, max: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < max {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(max);
    body
}

/// Classifies a non-2xx answer to the POST of `sent`.
fn classify(
    status: StatusCode,
    retry_after_ms: Option<u64>,
    body: &[u8],
    sent: &str,
) -> AttemptReport {
    let code = status.as_u16();
    let mut report = match code {
        408 => AttemptReport::transient("http_408"),
        429 => AttemptReport::transient("http_429"),
        500..=599 => AttemptReport::transient("http_5xx"),
        400..=499 => AttemptReport::permanent("http_4xx"),
        300..=399 => AttemptReport::permanent("http_3xx"),
        _ => AttemptReport::permanent("http_1xx"),
    };
    report.status = Some(code);
    if report.outcome == passerelle_store::AttemptOutcome::Transient {
        report.retry_after_ms = retry_after_ms;
    }
    report.detail = match outcome_excerpt(body, sent) {
        Some(excerpt) => truncate(format!("HTTP {code}: {excerpt}"), 300),
        None => format!("HTTP {code} (no OperationOutcome in the answer)"),
    };
    report
}

/// `severity code: diagnostics at expression` of each issue of an OperationOutcome, joined
/// by `; `; `None` when the body is not an OperationOutcome.
///
/// Servers echo the values they refuse (`Invalid date "1980-13-01"`), and a delivery's
/// detail must hold no patient data, so the diagnostics (or `details.text`) are kept with
/// every value of the bundle `sent` masked as `…` wherever it stands as a whole word (in
/// any ASCII case), any run holding four digits or more masked (dates, identifiers and
/// phone numbers echoed in another format), and anything in quotes masked too. Severity, code
/// and the FHIRPath expression name elements, never content, and are kept as they are.
pub fn outcome_excerpt(body: &[u8], sent: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    if value.get("resourceType")?.as_str()? != "OperationOutcome" {
        return None;
    }
    let issues = value.get("issue")?.as_array()?;
    let sent_values = bundle_values(sent);
    let mut parts = Vec::new();
    for issue in issues {
        let field = |name: &str| issue.get(name).and_then(|v| v.as_str()).unwrap_or("?");
        let mut part = format!("{} {}", field("severity"), field("code"));
        let text = issue
            .get("diagnostics")
            .and_then(|d| d.as_str())
            .or_else(|| {
                issue
                    .get("details")
                    .and_then(|d| d.get("text"))
                    .and_then(|t| t.as_str())
            });
        if let Some(text) = text {
            part.push_str(": ");
            part.push_str(&mask_quoted(&mask_numbers(&mask_values(
                text,
                &sent_values,
            ))));
        }
        if let Some(expr) = issue
            .get("expression")
            .and_then(|e| e.as_array())
            .and_then(|e| e.first())
            .and_then(|e| e.as_str())
        {
            part.push_str(" at ");
            part.push_str(expr);
        }
        parts.push(part);
    }
    Some(truncate(parts.join("; "), 300))
}

/// Every string and number of a bundle (two characters or more), longest first, so that
/// a value is masked before a shorter one inside it. Resource type names are left out:
/// they are schema, not data, and diagnostics name them (`Patient.birthDate`).
fn bundle_values(bundle: &str) -> Vec<String> {
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Number(n) => out.push(n.to_string()),
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            serde_json::Value::Object(members) => members
                .iter()
                .filter(|(key, _)| key.as_str() != "resourceType")
                .for_each(|(_, v)| walk(v, out)),
            serde_json::Value::Bool(_) | serde_json::Value::Null => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(bundle) {
        walk(&value, &mut out);
    }
    out.retain(|v| v.chars().count() >= 2);
    out.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    out.dedup();
    out
}

/// `text` with each of `values` replaced by `…` where it stands as a whole word (not
/// inside a longer word: a code `en` must not eat the middle of `transient`), whatever
/// the case of its ASCII letters (servers echo `DUPONT` as `Dupont`).
fn mask_values(text: &str, values: &[String]) -> String {
    let is_word = |c: char| c.is_alphanumeric();
    let mut text = text.to_owned();
    // ASCII case folding keeps every byte where it is, so positions found in the folded
    // copy are positions in the text.
    let mut folded = text.to_ascii_lowercase();
    for value in values {
        let wanted = value.to_ascii_lowercase();
        let mut from = 0;
        while let Some(pos) = folded[from..].find(wanted.as_str()).map(|p| p + from) {
            let end = pos + wanted.len();
            let before = text[..pos].chars().next_back();
            let after = text[end..].chars().next();
            let starts_word = value.starts_with(is_word) && before.is_some_and(is_word);
            let ends_word = value.ends_with(is_word) && after.is_some_and(is_word);
            if starts_word || ends_word {
                from = end;
            } else {
                text.replace_range(pos..end, "…");
                folded.replace_range(pos..end, "…");
                from = pos + "…".len();
            }
        }
    }
    text
}

/// `text` with every run of letters, digits and `/ . - : _ +` that holds four digits or
/// more replaced by `…`: a server may echo a value reformatted (a birth date sent as
/// `1978-04-12` comes back as `19780412` or `12/04/1978`, an identifier in another case
/// or with its authority), and dates, identifiers and phone numbers all carry digits.
/// A space between two digits joins the run (`06 12 34 56 78`). Element paths
/// (`entry[3].resource`) and status codes keep their digits.
fn mask_numbers(text: &str) -> String {
    let in_run = |c: char| c.is_alphanumeric() || "/.-:_+".contains(c);
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.chars().filter(char::is_ascii_digit).count() >= 4 {
            out.push('…');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for (i, &c) in chars.iter().enumerate() {
        let joins_digits = c == ' '
            && run.ends_with(|p: char| p.is_ascii_digit())
            && chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if in_run(c) || joins_digits {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// `text` with what stands between quotes replaced by `…`: `"…"`, `“…”`, `«…»`, and
/// `'…'` when the quotes are not apostrophes (`can't` is left alone).
fn mask_quoted(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let close = match c {
            '"' => Some('"'),
            '“' => Some('”'),
            '«' => Some('»'),
            '\'' if i == 0 || !chars[i - 1].is_alphanumeric() => Some('\''),
            _ => None,
        };
        let end = close.and_then(|close| {
            (i + 1..chars.len()).find(|&j| {
                chars[j] == close
                    && (close != '\''
                        || chars.get(j + 1).is_none_or(|next| !next.is_alphanumeric()))
            })
        });
        match end {
            Some(j) => {
                out.push(c);
                out.push('…');
                out.push(chars[j]);
                i = j + 1;
            }
            None => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// `Retry-After` as milliseconds from `now`: delta-seconds or an HTTP date (a date in the
/// past gives 0). `None` when absent or unreadable.
pub fn retry_after_ms(headers: &HeaderMap, now: SystemTime) -> Option<u64> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(secs.saturating_mul(1000));
    }
    let when = httpdate::parse_http_date(text).ok()?;
    Some(
        when.duration_since(now)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(input.as_bytes(), false), want);
            // base64url: another alphabet, no padding.
            assert_eq!(
                base64_encode(input.as_bytes(), true),
                want.trim_end_matches('=')
            );
        }
        assert_eq!(base64_encode(&[0xfb, 0xff], false), "+/8=");
        assert_eq!(base64_encode(&[0xfb, 0xff], true), "-_8");
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after_ms(&h, now), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(retry_after_ms(&h, now), Some(120_000));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(5));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).expect("header"));
        assert_eq!(retry_after_ms(&h, now), Some(5_000));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(5));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&earlier).expect("header"),
        );
        assert_eq!(retry_after_ms(&h, now), Some(0));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after_ms(&h, now), None);
    }

    #[test]
    fn classifies_statuses() {
        let oo = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"bad","expression":["Patient.name"]}]}"#;
        let r = classify(StatusCode::UNPROCESSABLE_ENTITY, Some(5), oo, "{}");
        assert_eq!(r.outcome, passerelle_store::AttemptOutcome::Permanent);
        assert_eq!(r.error_class, "http_4xx");
        assert_eq!(r.status, Some(422));
        assert_eq!(r.retry_after_ms, None);
        assert_eq!(r.detail, "HTTP 422: error invalid: bad at Patient.name");
        let r = classify(StatusCode::SERVICE_UNAVAILABLE, Some(5), b"<html>", "{}");
        assert_eq!(r.outcome, passerelle_store::AttemptOutcome::Transient);
        assert_eq!(r.error_class, "http_5xx");
        assert_eq!(r.retry_after_ms, Some(5));
        assert_eq!(r.detail, "HTTP 503 (no OperationOutcome in the answer)");
        assert_eq!(
            classify(StatusCode::REQUEST_TIMEOUT, None, b"", "{}").error_class,
            "http_408"
        );
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, None, b"", "{}").error_class,
            "http_429"
        );
        assert_eq!(
            classify(StatusCode::FOUND, None, b"", "{}").outcome,
            passerelle_store::AttemptOutcome::Permanent
        );
        let long = format!(
            r#"{{"resourceType":"OperationOutcome","issue":[{{"severity":"error","code":"invalid","diagnostics":"{}"}}]}}"#,
            "é".repeat(400)
        );
        assert!(
            classify(StatusCode::BAD_REQUEST, None, long.as_bytes(), "{}")
                .detail
                .len()
                <= 304
        );
    }

    /// What a server echoes of the bundle never reaches the stored detail.
    #[test]
    fn excerpts_mask_what_the_bundle_carried() {
        let sent = r#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient",
            "name":[{"family":"DUPONT","given":["Jean Marc"]}],"birthDate":"1980-13-01",
            "gender":"male","communication":[{"language":{"coding":[{"code":"en"}]}}],
            "multipleBirthInteger":12}}]}"#;
        let outcome = |diagnostics: &str| {
            let body = serde_json::json!({
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "invalid", "diagnostics": diagnostics,
                           "expression": ["Patient.birthDate"]}]
            });
            outcome_excerpt(body.to_string().as_bytes(), sent).unwrap()
        };
        assert_eq!(
            outcome("Invalid date 1980-13-01 for DUPONT, Jean Marc (male, 12 births)"),
            "error invalid: Invalid date … for …, … (…, … births) at Patient.birthDate"
        );
        // Whole words only: the code `en` stays inside `transient` and `Gender`; resource
        // type names are not data.
        assert_eq!(
            outcome("Patient.communication: transient Gender en"),
            "error invalid: Patient.communication: transient Gender … at Patient.birthDate"
        );
        // Quoted text goes too, even when the server changed it; apostrophes stay.
        assert_eq!(
            outcome(r#"Value "13/01/1980" can't be parsed as 'date' (« Dupont »)"#),
            "error invalid: Value \"…\" can't be parsed as '…' («…») at Patient.birthDate"
        );
        assert_eq!(outcome_excerpt(b"<html>", sent), None);
    }

    #[test]
    fn excerpts_mask_values_echoed_in_another_case_or_format() {
        let sent = r#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient",
            "name":[{"family":"Whitfield"}],"birthDate":"1978-04-12",
            "identifier":[{"system":"urn:oid:2.999.1.10","value":"RB1002341"}]}}]}"#;
        let body = serde_json::json!({
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "processing",
                       "diagnostics": "WHITFIELD born 19780412 (MRN RBGH/rb1002341), whitfield, DOB 12/04/1978, +33 6 12 34 56 78 in Bundle.entry[12].resource"}]
        });
        assert_eq!(
            outcome_excerpt(body.to_string().as_bytes(), sent).unwrap(),
            "error processing: … born … (MRN RBGH/…), …, DOB …, … in Bundle.entry[12].resource"
        );
    }
}
