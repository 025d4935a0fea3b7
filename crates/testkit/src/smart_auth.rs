//! A real OAuth 2.0 authorization server for the SMART Backend Services tests, provisioned
//! from npm on demand.
//!
//! node-oidc-provider (`oidc-provider`, by panva) behind `node:http` (glue:
//! `peers/smart-auth/server.mjs`): the `client_credentials` grant with `private_key_jwt`
//! client authentication (it checks the assertion's signature against the client's
//! registered public key, and its `iss`, `aud`, `exp` and `jti` replay itself), and RFC 7662
//! token introspection for a resource server. Pinned by
//! `crates/testkit/peers/smart-auth/package.json` and its lock file, installed with
//! `npm ci` into `target/peers/smart-auth/`.
//!
//! [`FhirServer::start_behind`](crate::fhir_server::FhirServer::start_behind) starts the
//! FHIR server as that resource server: it introspects the bearer token of every request
//! and answers 401 unless the token is active.
//!
//! Two test hooks beside OAuth: [`SmartAuthServer::stats`] (token requests and tokens
//! issued per client, the last granted scope and OAuth error) and
//! [`SmartAuthServer::revoke_tokens`] (forget a client's tokens, as a server-side
//! revocation would). The server is killed when the [`SmartAuthServer`] is dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::mllp::{PeerProcess, port_in};

const FILES: [&str; 3] = ["package.json", "package-lock.json", "server.mjs"];

/// The client id the resource server (the FHIR server) introspects tokens with.
pub const INTROSPECTOR_ID: &str = "fhir-resource-server";
/// Its client secret (HTTP Basic). A test peer on loopback: nothing to protect.
pub const INTROSPECTOR_SECRET: &str = "introspector-secret-for-tests-only-0123456789";

/// The folder holding `server.mjs` and its `node_modules`, installing it when the pinned
/// files changed or nothing is installed yet. Panics with npm's output on failure.
pub fn server_dir() -> PathBuf {
    crate::npm_peer("smart-auth", &FILES, "the authorization server")
}

/// A client registered with the server: it authenticates with a JWT signed by the private
/// key matching `public_key_pem` (SPKI PEM, RSA or EC).
#[derive(Debug, Clone)]
pub struct SmartClient {
    /// Its client id (letters, digits, `-`, `_`, `.`).
    pub client_id: String,
    /// Its public key, `-----BEGIN PUBLIC KEY-----` PEM.
    pub public_key_pem: String,
    /// The `kid` of its registered key, if any (assertions naming another are refused).
    pub kid: Option<String>,
    /// How long its access tokens live, in seconds (`expires_in`).
    pub access_token_ttl_s: u32,
}

/// What the server saw of one client's token requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStats {
    /// Token requests that named the client (in the assertion's `iss`), whatever their
    /// outcome.
    pub requests: u32,
    /// Access tokens issued to it.
    pub issued: u32,
    /// The scope of the last token issued (`-` when none).
    pub scope: String,
    /// The OAuth `error` of the last refused request (`-` when none).
    pub error: String,
}

/// A running authorization server on a loopback port, killed on drop.
#[derive(Debug)]
pub struct SmartAuthServer {
    port: u16,
    scheme: &'static str,
    _process: PeerProcess,
}

impl SmartAuthServer {
    /// Installs (if needed) and starts the server with `clients` registered, and waits
    /// until it listens. Blocking: from async code, call it in `spawn_blocking`.
    pub fn start(clients: &[SmartClient]) -> SmartAuthServer {
        SmartAuthServer::spawn(clients, None)
    }

    /// Like [`SmartAuthServer::start`], serving HTTPS only with the PEM certificate `cert`
    /// and its key `key`. The test hooks ([`SmartAuthServer::stats`],
    /// [`SmartAuthServer::revoke_tokens`]) speak plain HTTP: not for this server.
    pub fn start_tls(clients: &[SmartClient], cert: &Path, key: &Path) -> SmartAuthServer {
        SmartAuthServer::spawn(clients, Some((cert, key)))
    }

    fn spawn(clients: &[SmartClient], tls: Option<(&Path, &Path)>) -> SmartAuthServer {
        let dir = server_dir();
        let mut config = String::from("{\"clients\":[");
        for (i, client) in clients.iter().enumerate() {
            assert!(
                client
                    .client_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                "client id {:?}: letters, digits, -, _ and . only",
                client.client_id
            );
            if i > 0 {
                config.push(',');
            }
            config.push_str(&format!(
                "{{\"client_id\":{},\"public_key_pem\":{},\"access_token_ttl_s\":{}",
                json_string(&client.client_id),
                json_string(&client.public_key_pem),
                client.access_token_ttl_s
            ));
            if let Some(kid) = &client.kid {
                config.push_str(&format!(",\"kid\":{}", json_string(kid)));
            }
            config.push('}');
        }
        config.push_str(&format!(
            "],\"introspector\":{{\"client_id\":{},\"client_secret\":{}}}}}",
            json_string(INTROSPECTOR_ID),
            json_string(INTROSPECTOR_SECRET)
        ));
        let mut command = Command::new("node");
        command.env("SMART_AUTH_CONFIG", config);
        if let Some((cert, key)) = tls {
            command
                .env("SMART_AUTH_TLS_CERT", cert)
                .env("SMART_AUTH_TLS_KEY", key);
        }
        let mut process = PeerProcess::spawn(
            "authorization server (oidc-provider)",
            command
                .arg(dir.join("server.mjs"))
                .arg("0")
                .current_dir(&dir),
        );
        let line = process.wait_for_line("listening on", Duration::from_secs(60));
        SmartAuthServer {
            port: port_in(&line),
            scheme: if tls.is_some() { "https" } else { "http" },
            _process: process,
        }
    }

    /// The issuer, `http://127.0.0.1:PORT` (`https` with TLS).
    pub fn issuer(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.issuer())
    }

    /// The introspection endpoint (RFC 7662), for [`INTROSPECTOR_ID`].
    pub fn introspection_url(&self) -> String {
        format!("{}/token/introspection", self.issuer())
    }

    /// What the server saw of `client_id`'s token requests so far.
    pub fn stats(&self, client_id: &str) -> TokenStats {
        let body = self.call("GET", &format!("/test/stats?client_id={client_id}"));
        let field = |name: &str| {
            body.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} in {body:?}"))
                .to_owned()
        };
        TokenStats {
            requests: field("requests").parse().expect("requests"),
            issued: field("issued").parse().expect("issued"),
            scope: field("scope"),
            error: field("error"),
        }
    }

    /// Forgets every access token issued to `client_id` (introspection then says they are
    /// not active); returns how many there were.
    pub fn revoke_tokens(&self, client_id: &str) -> u32 {
        let body = self.call("POST", &format!("/test/revoke?client_id={client_id}"));
        body.trim()
            .strip_prefix("revoked=")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected answer {body:?}"))
    }

    fn call(&self, method: &str, target: &str) -> String {
        test_hook(self.port, method, target)
    }
}

/// One HTTP/1.0 request to a peer's test hook on 127.0.0.1:`port`; the body of its 200
/// answer (panics on anything else).
pub(crate) fn test_hook(port: u16, method: &str, target: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "{method} {target} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read answer");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "{method} {target}: {head}"
    );
    body.to_owned()
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
