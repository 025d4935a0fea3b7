//! SMART Backend Services authentication for the FHIR destination: the HL7 SMART App
//! Launch "Backend Services" profile of OAuth 2.0, where a system (no user) gets access
//! tokens with the `client_credentials` grant and authenticates with a JWT it signs with
//! its own private key (RFC 7523 `private_key_jwt`); the authorization server knows the
//! matching public key (a JWKS registered for the client).
//!
//! ## The token request
//!
//! `POST token_url` (`application/x-www-form-urlencoded`) with `grant_type=client_credentials`,
//! `scope` (default `system/*.write`), `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`
//! and `client_assertion`: a JWT with header `{"alg": "RS384"|"ES384", "typ": "JWT", "kid"?}`
//! and claims `iss` = `sub` = the client id, `aud` = the token URL, `iat`, `exp` four
//! minutes ahead (SMART allows at most five) and a random 128-bit `jti` (servers refuse a
//! replayed assertion), signed with RSASSA-PKCS1-v1_5 SHA-384 or ECDSA P-384 SHA-384 (raw
//! `r‖s`). Signing uses aws-lc-rs, the crypto provider the workspace's rustls already uses.
//!
//! ## The token cache
//!
//! - **Fetched on first use, then reused** until `expires_in` minus a margin (a tenth of the
//!   lifetime, at most 30 s), so that a token is not sent in its last seconds. An answer
//!   without `expires_in` is taken as five minutes.
//! - **One fetch at a time.** Concurrent deliveries that find no valid token queue behind
//!   one fetch and share its result, success or failure: a burst of deliveries makes one
//!   token request, not one each. A refusal (a permanent failure, below) is also given
//!   without asking again to the deliveries of the next [`REFUSAL_MEMORY`], however they
//!   are spread in time, so that a queue of messages behind a wrong key does not send
//!   the token endpoint one doomed request each.
//! - **A 401 from the FHIR server** drops the token it was given (unless a newer one already
//!   replaced it); the destination then fetches once more and retries the POST once.
//!
//! ## Failures (`error_class` `auth`)
//!
//! | token endpoint | outcome |
//! |----------------|---------|
//! | no connection, no answer in time, broken answer | transient |
//! | 408, 429, 5xx | transient (`Retry-After` honoured) |
//! | 400, 401, other 4xx (`invalid_client`, `invalid_scope`…) | permanent |
//! | 2xx that holds no usable bearer token | permanent |
//!
//! A refused client is permanent on purpose: the request is deterministic, retrying it
//! cannot succeed until someone fixes the registration or the key, and hammering the
//! server may lock the client out. The messages go to dead letter with the OAuth `error`
//! code in `detail`; once fixed, `passerelle replay` sends them again.
//!
//! ## Secrets
//!
//! The private key is read and checked when the destination is built (`passerelle check`
//! fails on a bad key). Tokens, assertions and keys never reach a log, a `Debug` output or
//! a report's `detail`: the detail holds the token endpoint's status, OAuth `error` and
//! `error_description` (dropped if it would quote the assertion).

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
    RSA_PKCS1_SHA384, RsaKeyPair,
};
use passerelle_store::{AttemptOutcome, AttemptReport};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use reqwest::{Client, Url};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use crate::fhir::{base64_encode, http_client, read_bounded, read_ca, retry_after_ms};
use crate::settings::{Reader, invalid, read_file};
use crate::{SettingsError, truncate, with_detail};

/// `client_assertion_type` for a JWT assertion (RFC 7523).
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Default `scope`: write any resource type, as a system.
const DEFAULT_SCOPE: &str = "system/*.write";
/// How far ahead the assertion's `exp` is: SMART allows at most five minutes; one less
/// leaves room for a server whose clock runs ahead.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(240);
/// The most of its lifetime a token is not used for.
const MAX_MARGIN: Duration = Duration::from_secs(30);
/// The lifetime assumed when the answer gives no `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// The longest lifetime believed (a day), so that an absurd `expires_in` cannot overflow.
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);
/// The most of a token endpoint's answer that is read.
const MAX_ANSWER: usize = 64 * 1024;
/// The error class of every failure to get a token.
const CLASS: &str = "auth";

/// The signing key and its JWS algorithm.
enum Signer {
    Rs384(RsaKeyPair),
    Es384(EcdsaKeyPair),
}

impl Signer {
    fn alg(&self) -> &'static str {
        match self {
            Signer::Rs384(_) => "RS384",
            Signer::Es384(_) => "ES384",
        }
    }

    fn sign(&self, rng: &SystemRandom, message: &[u8]) -> Option<Vec<u8>> {
        match self {
            Signer::Rs384(key) => {
                let mut signature = vec![0; key.public_modulus_len()];
                key.sign(&RSA_PKCS1_SHA384, rng, message, &mut signature)
                    .ok()?;
                Some(signature)
            }
            Signer::Es384(key) => Some(key.sign(rng, message).ok()?.as_ref().to_vec()),
        }
    }
}

/// How long a refused token request answers for the next ones (see the module doc).
pub(crate) const REFUSAL_MEMORY: Duration = Duration::from_secs(10);

/// An access token ready to send, and when to stop using it.
pub(crate) struct AccessToken {
    header: HeaderValue,
    generation: u64,
    refresh_at: Instant,
}

impl AccessToken {
    /// `Bearer …`, marked sensitive.
    pub(crate) fn header(&self) -> HeaderValue {
        self.header.clone()
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// The client side of SMART Backend Services for one destination: see the module doc.
pub(crate) struct SmartAuth {
    token_url: Url,
    client_id: String,
    scope: String,
    kid: Option<String>,
    /// The token endpoint's own client, when `auth.ca` is given; otherwise the FHIR
    /// destination's client is used (its `ca` and client certificate).
    token_client: Option<Client>,
    signer: Signer,
    rng: SystemRandom,
    /// The token in use. Locked only to read or swap it, never across an await.
    current: Mutex<Option<Arc<AccessToken>>>,
    /// Held while a token is fetched; holds when the last fetch failed, and how.
    fetching: tokio::sync::Mutex<Option<(Instant, AttemptReport)>>,
    generations: AtomicU64,
}

impl fmt::Debug for SmartAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key and the tokens stay out.
        f.debug_struct("SmartAuth")
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .field("algorithm", &self.signer.alg())
            .finish_non_exhaustive()
    }
}

impl SmartAuth {
    /// The keys of an `auth = { type = "smart_backend", … }` table.
    pub(crate) const KEYS: &[&str] = &[
        "type",
        "token_url",
        "client_id",
        "private_key_file",
        "algorithm",
        "scope",
        "kid",
        "ca",
    ];

    /// From the `auth` table (already checked to hold only [`SmartAuth::KEYS`]). Reads
    /// and checks the private key now.
    pub(crate) fn from_settings(
        r: &Reader<'_>,
        base_dir: &Path,
        timeout: Duration,
    ) -> Result<SmartAuth, SettingsError> {
        let url_text = r.required_string("token_url")?;
        let token_url = Url::parse(url_text)
            .map_err(|e| invalid("auth.token_url", format!("not a URL: {e}")))?;
        if !matches!(token_url.scheme(), "http" | "https") {
            return Err(invalid(
                "auth.token_url",
                "the scheme must be http or https",
            ));
        }
        if !token_url.username().is_empty()
            || token_url.password().is_some()
            || token_url.fragment().is_some()
        {
            return Err(invalid(
                "auth.token_url",
                "the token URL takes no credentials and no fragment",
            ));
        }
        let client_id = r.required_string("client_id")?.to_owned();
        let scope = r.string("scope")?.unwrap_or(DEFAULT_SCOPE).to_owned();
        // RFC 6749 §3.3: scope tokens are printable ASCII without `"` and `\`, joined by
        // single spaces.
        let token_char = |c: char| c.is_ascii_graphic() && c != '"' && c != '\\';
        if scope
            .split(' ')
            .any(|t| t.is_empty() || !t.chars().all(token_char))
        {
            return Err(invalid(
                "auth.scope",
                "expected scope tokens (printable ASCII, no quote or backslash) separated by single spaces",
            ));
        }
        let kid = r.string("kid")?.map(str::to_owned);
        let algorithm = r.string("algorithm")?;
        if let Some(alg) = algorithm
            && !matches!(alg, "RS384" | "ES384")
        {
            return Err(invalid(
                "auth.algorithm",
                format!("{alg:?}: expected \"RS384\" or \"ES384\""),
            ));
        }
        let key_path = r
            .path_setting("private_key_file", base_dir)?
            .ok_or_else(|| SettingsError::Missing {
                key: "auth.private_key_file".to_owned(),
            })?;
        let signer = read_signer(&read_file("auth.private_key_file", &key_path)?)?;
        if let Some(alg) = algorithm
            && alg != signer.alg()
        {
            return Err(invalid(
                "auth.algorithm",
                format!(
                    "{alg} does not go with the key of private_key_file ({} key: use {})",
                    match signer {
                        Signer::Rs384(_) => "an RSA",
                        Signer::Es384(_) => "an EC P-384",
                    },
                    signer.alg()
                ),
            ));
        }
        // The token endpoint often sits behind another certificate authority than the FHIR
        // server (a public identity provider, a private FHIR server): `ca` lets it differ.
        let token_client = match r.string("ca")? {
            None => None,
            Some("system") => Some(http_client(timeout, None, None)?),
            Some(file) => Some(http_client(
                timeout,
                Some(read_ca("auth.ca", &base_dir.join(file))?),
                None,
            )?),
        };
        Ok(SmartAuth {
            token_url,
            client_id,
            scope,
            kid,
            token_client,
            signer,
            rng: SystemRandom::new(),
            current: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(None),
            generations: AtomicU64::new(0),
        })
    }

    /// A valid access token: the cached one, or a fresh one from the token endpoint (one
    /// fetch at a time; see the module doc). A failure comes as the report to return.
    pub(crate) async fn token(&self, client: &Client) -> Result<Arc<AccessToken>, AttemptReport> {
        let client = self.token_client.as_ref().unwrap_or(client);
        let asked_at = Instant::now();
        if let Some(token) = self.valid_token() {
            return Ok(token);
        }
        let mut last_failure = self.fetching.lock().await;
        // Another delivery may have fetched, or failed to, while this one waited.
        if let Some(token) = self.valid_token() {
            return Ok(token);
        }
        if let Some((failed_at, report)) = last_failure.as_ref()
            && (*failed_at >= asked_at
                || report.outcome == AttemptOutcome::Permanent
                    && failed_at.elapsed() < REFUSAL_MEMORY)
        {
            return Err(report.clone());
        }
        match self.fetch(client).await {
            Ok(token) => {
                *last_failure = None;
                let token = Arc::new(token);
                *self.lock_current() = Some(Arc::clone(&token));
                Ok(token)
            }
            Err(report) => {
                tracing::warn!(
                    client_id = %self.client_id,
                    outcome = ?report.outcome,
                    detail = %report.detail,
                    "SMART token request failed"
                );
                *last_failure = Some((Instant::now(), report.clone()));
                Err(report)
            }
        }
    }

    /// The FHIR server refused `token`: stop using it, unless a newer one replaced it.
    pub(crate) fn forget(&self, token: &AccessToken) {
        let mut current = self.lock_current();
        if current
            .as_ref()
            .is_some_and(|t| t.generation == token.generation)
        {
            *current = None;
        }
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<Arc<AccessToken>>> {
        // A panic elsewhere cannot leave the Option half-written: carry on.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn valid_token(&self) -> Option<Arc<AccessToken>> {
        let current = self.lock_current();
        current
            .as_ref()
            .filter(|t| Instant::now() < t.refresh_at)
            .map(Arc::clone)
    }

    /// One token request.
    async fn fetch(&self, client: &Client) -> Result<AccessToken, AttemptReport> {
        let Some(assertion) = self.assertion() else {
            return Err(with_detail(
                AttemptReport::permanent(CLASS),
                "cannot sign the client assertion",
            ));
        };
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("scope", &self.scope)
            .append_pair("client_assertion_type", CLIENT_ASSERTION_TYPE)
            .append_pair("client_assertion", &assertion)
            .finish();
        let sent_at = Instant::now();
        let response = client
            .post(self.token_url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(form)
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(e) => {
                let mut report = crate::fhir::transport_failure(&e);
                report.error_class = CLASS.to_owned();
                report.detail = truncate(format!("token endpoint: {}", report.detail), 300);
                return Err(report);
            }
        };
        let status = response.status();
        let retry_after = retry_after_ms(response.headers(), SystemTime::now());
        let body = read_bounded(response, MAX_ANSWER).await;
        if !status.is_success() {
            return Err(refused(status.as_u16(), retry_after, &body, &assertion));
        }
        let (header, lifetime) = read_token_answer(&body).map_err(|why| {
            with_detail(
                AttemptReport::permanent(CLASS),
                format!("token endpoint: HTTP {}, but {why}", status.as_u16()),
            )
        })?;
        let margin = (lifetime / 10).min(MAX_MARGIN);
        tracing::debug!(
            client_id = %self.client_id,
            expires_in_s = lifetime.as_secs(),
            "SMART access token fetched"
        );
        Ok(AccessToken {
            header,
            generation: self.generations.fetch_add(1, Ordering::Relaxed),
            refresh_at: sent_at + lifetime - margin,
        })
    }

    /// A fresh signed client assertion (compact JWS); `None` if signing fails.
    fn assertion(&self) -> Option<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        let mut jti = [0u8; 16];
        self.rng.fill(&mut jti).ok()?;
        let jti: String = jti.iter().map(|b| format!("{b:02x}")).collect();
        let mut header = serde_json::json!({ "alg": self.signer.alg(), "typ": "JWT" });
        if let Some(kid) = &self.kid {
            header["kid"] = serde_json::Value::from(kid.as_str());
        }
        let claims = serde_json::json!({
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url.as_str(),
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
            "jti": jti,
        });
        let signing_input = format!(
            "{}.{}",
            base64_encode(header.to_string().as_bytes(), true),
            base64_encode(claims.to_string().as_bytes(), true)
        );
        let signature = self.signer.sign(&self.rng, signing_input.as_bytes())?;
        Some(format!(
            "{signing_input}.{}",
            base64_encode(&signature, true)
        ))
    }
}

/// The PKCS#8 PEM private key of `private_key_file`, as a signer.
fn read_signer(pem: &[u8]) -> Result<Signer, SettingsError> {
    let key = "auth.private_key_file";
    let der = match PrivateKeyDer::from_pem_slice(pem) {
        Ok(PrivateKeyDer::Pkcs8(der)) => der,
        Ok(PrivateKeyDer::Pkcs1(_)) => {
            return Err(invalid(
                key,
                "holds a PKCS#1 RSA key (BEGIN RSA PRIVATE KEY): convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in OLD -out NEW`",
            ));
        }
        Ok(PrivateKeyDer::Sec1(_)) => {
            return Err(invalid(
                key,
                "holds a SEC1 EC key (BEGIN EC PRIVATE KEY): convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in OLD -out NEW`",
            ));
        }
        Ok(_) | Err(_) => {
            return Err(invalid(
                key,
                "holds no unencrypted PKCS#8 private key (-----BEGIN PRIVATE KEY-----)",
            ));
        }
    };
    let der = der.secret_pkcs8_der();
    if let Ok(rsa) = RsaKeyPair::from_pkcs8(der) {
        return Ok(Signer::Rs384(rsa));
    }
    if let Ok(ec) = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, der) {
        return Ok(Signer::Es384(ec));
    }
    if EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der).is_ok() {
        return Err(invalid(
            key,
            "holds an EC key on P-256: SMART Backend Services signs with ES384 (P-384) or RS384 (RSA)",
        ));
    }
    Err(invalid(
        key,
        "holds a key that is neither RSA (2048 to 8192 bits) nor EC P-384",
    ))
}

/// A successful token answer (RFC 6749 §5.1): the `Authorization` header to send (marked
/// sensitive) and the token's lifetime; or why the answer cannot be used.
fn read_token_answer(body: &[u8]) -> Result<(HeaderValue, Duration), &'static str> {
    let answer: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "the answer is not JSON")?;
    let access_token = answer
        .get("access_token")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .ok_or("the answer has no access_token")?;
    let token_type = answer
        .get("token_type")
        .and_then(|t| t.as_str())
        .unwrap_or("");
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err("the token_type is not Bearer");
    }
    // A number, though some servers send it as a string.
    let expires_in = answer.get("expires_in").and_then(|e| {
        e.as_f64()
            .or_else(|| e.as_str().and_then(|s| s.trim().parse().ok()))
    });
    let lifetime = match expires_in {
        // Clamped before converting: from_secs_f64 cannot take any f64.
        Some(secs) if secs.is_finite() && secs >= 0.0 => {
            Duration::from_secs_f64(secs.min(MAX_LIFETIME.as_secs_f64()))
        }
        _ => DEFAULT_LIFETIME,
    };
    let mut header = HeaderValue::from_str(&format!("Bearer {access_token}"))
        .map_err(|_| "the access token holds characters not allowed in a header")?;
    header.set_sensitive(true);
    Ok((header, lifetime))
}

/// A token endpoint's refusal (non-2xx), classified.
fn refused(status: u16, retry_after: Option<u64>, body: &[u8], assertion: &str) -> AttemptReport {
    let mut report = match status {
        408 | 429 | 500..=599 => AttemptReport::transient(CLASS),
        _ => AttemptReport::permanent(CLASS),
    };
    if report.outcome == AttemptOutcome::Transient {
        report.retry_after_ms = retry_after;
    }
    let answer: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        answer
            .as_ref()
            .and_then(|a| a.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let mut detail = format!("token endpoint: HTTP {status}");
    if let Some(error) = field("error") {
        // An OAuth error code is a short ASCII word (RFC 6749 §5.2).
        let error: String = error
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(64)
            .collect();
        detail.push(' ');
        detail.push_str(&error);
        if let Some(description) = field("error_description")
            && !description.contains(assertion)
        {
            detail.push_str(": ");
            detail.push_str(&description);
        }
    }
    with_detail(report, detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{
        ECDSA_P384_SHA384_FIXED, KeyPair, RSA_PKCS1_2048_8192_SHA384, UnparsedPublicKey,
    };

    fn pem(der: &[u8]) -> String {
        let body = base64_encode(der, false);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        )
    }

    fn base64url_decode(text: &str) -> Vec<u8> {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut bits = 0u32;
        let mut count = 0;
        let mut out = Vec::new();
        for c in text.bytes() {
            let v = ALPHABET.iter().position(|&a| a == c).expect("base64url") as u32;
            bits = (bits << 6) | v;
            count += 6;
            if count >= 8 {
                count -= 8;
                out.push((bits >> count) as u8);
            }
        }
        out
    }

    fn auth(dir: &Path, extra: &str) -> SmartAuth {
        let table: toml::Table = toml::from_str(&format!(
            "type = \"smart_backend\"\ntoken_url = \"https://auth.example/token\"\nclient_id = \"svc-1\"\nprivate_key_file = \"key.pem\"\n{extra}"
        ))
        .expect("toml");
        let r = Reader::new(&table, "auth", SmartAuth::KEYS).expect("keys");
        SmartAuth::from_settings(&r, dir, Duration::from_secs(10)).expect("settings")
    }

    /// Splits a compact JWS into (header, claims, signing input, signature).
    fn parts(jws: &str) -> (serde_json::Value, serde_json::Value, String, Vec<u8>) {
        let pieces: Vec<&str> = jws.split('.').collect();
        assert_eq!(pieces.len(), 3, "{jws}");
        let json = |p: &str| serde_json::from_slice(&base64url_decode(p)).expect("json");
        (
            json(pieces[0]),
            json(pieces[1]),
            format!("{}.{}", pieces[0], pieces[1]),
            base64url_decode(pieces[2]),
        )
    }

    #[test]
    fn es384_assertions_carry_the_smart_claims_and_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).expect("generate");
        std::fs::write(dir.path().join("key.pem"), pem(pkcs8.as_ref())).expect("write");
        let public = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref())
            .expect("key")
            .public_key()
            .as_ref()
            .to_vec();
        let auth = auth(dir.path(), "kid = \"k-7\"");
        assert_eq!(auth.scope, "system/*.write");

        let first = auth.assertion().expect("signed");
        let (header, claims, input, signature) = parts(&first);
        assert_eq!(
            header,
            serde_json::json!({"alg": "ES384", "typ": "JWT", "kid": "k-7"})
        );
        assert_eq!(claims["iss"], "svc-1");
        assert_eq!(claims["sub"], "svc-1");
        assert_eq!(claims["aud"], "https://auth.example/token");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let exp = claims["exp"].as_u64().expect("exp");
        assert!(exp > now && exp <= now + 300, "{claims}");
        assert_eq!(claims["jti"].as_str().expect("jti").len(), 32);
        // ES384 in JWS is the raw r‖s pair.
        assert_eq!(signature.len(), 96);
        UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &public)
            .verify(input.as_bytes(), &signature)
            .expect("the signature verifies");

        // Each assertion has its own jti.
        let (_, again, _, _) = parts(&auth.assertion().expect("signed"));
        assert_ne!(claims["jti"], again["jti"]);
    }

    #[test]
    fn rs384_assertions_verify_and_omit_an_absent_kid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("generate");
        let pkcs8 =
            aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'static>>::as_der(&key)
                .expect("pkcs8");
        std::fs::write(dir.path().join("key.pem"), pem(pkcs8.as_ref())).expect("write");
        let auth = auth(dir.path(), "scope = \"system/Bundle.write\"");
        assert_eq!(auth.scope, "system/Bundle.write");
        let (header, _, input, signature) = parts(&auth.assertion().expect("signed"));
        assert_eq!(header, serde_json::json!({"alg": "RS384", "typ": "JWT"}));
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA384, key.public_key().as_ref())
            .verify(input.as_bytes(), &signature)
            .expect("the signature verifies");
        // Debug shows the configuration, not the key.
        let debug = format!("{auth:?}");
        assert!(
            debug.contains("RS384") && debug.contains("svc-1"),
            "{debug}"
        );
    }

    #[test]
    fn token_answers_are_read_or_refused() {
        let read = |body: &str| read_token_answer(body.as_bytes());
        let (header, lifetime) =
            read(r#"{"access_token":"abc","token_type":"bearer","expires_in":3600}"#)
                .expect("usable");
        assert_eq!(header.to_str().expect("ascii"), "Bearer abc");
        assert!(header.is_sensitive());
        assert_eq!(lifetime, Duration::from_secs(3600));
        let lifetime = |body: &str| read(body).expect("usable").1;
        assert_eq!(
            lifetime(r#"{"access_token":"a","token_type":"Bearer","expires_in":"90"}"#),
            Duration::from_secs(90)
        );
        assert_eq!(
            lifetime(r#"{"access_token":"a","token_type":"Bearer"}"#),
            DEFAULT_LIFETIME
        );
        assert_eq!(
            lifetime(r#"{"access_token":"a","token_type":"Bearer","expires_in":-5}"#),
            DEFAULT_LIFETIME
        );
        // Absurd lifetimes are capped, not a panic.
        assert_eq!(
            lifetime(r#"{"access_token":"a","token_type":"Bearer","expires_in":1e300}"#),
            MAX_LIFETIME
        );
        assert_eq!(read("<html>").unwrap_err(), "the answer is not JSON");
        assert_eq!(
            read(r#"{"token_type":"Bearer"}"#).unwrap_err(),
            "the answer has no access_token"
        );
        assert_eq!(
            read(r#"{"access_token":"a","token_type":"mac"}"#).unwrap_err(),
            "the token_type is not Bearer"
        );
        assert!(read(r#"{"access_token":"a\nb","token_type":"Bearer"}"#).is_err());
    }

    #[test]
    fn refusals_are_classified_and_carry_the_oauth_error() {
        let body =
            br#"{"error":"invalid_client","error_description":"client authentication failed"}"#;
        let r = refused(401, Some(5), body, "eyJ.assertion.sig");
        assert_eq!(r.outcome, AttemptOutcome::Permanent);
        assert_eq!(r.error_class, "auth");
        assert_eq!(r.retry_after_ms, None);
        assert_eq!(
            r.detail,
            "token endpoint: HTTP 401 invalid_client: client authentication failed"
        );

        let r = refused(503, Some(2000), b"<html>down</html>", "x.y.z");
        assert_eq!(r.outcome, AttemptOutcome::Transient);
        assert_eq!(r.retry_after_ms, Some(2000));
        assert_eq!(r.detail, "token endpoint: HTTP 503");
        assert_eq!(
            refused(429, None, b"", "a.b.c").outcome,
            AttemptOutcome::Transient
        );
        assert_eq!(
            refused(400, None, b"", "a.b.c").outcome,
            AttemptOutcome::Permanent
        );

        // A description that quotes the assertion is dropped.
        let body =
            br#"{"error":"invalid_request","error_description":"bad assertion eyJ.assertion.sig"}"#;
        let r = refused(400, None, body, "eyJ.assertion.sig");
        assert_eq!(r.detail, "token endpoint: HTTP 400 invalid_request");
    }
}
