//! A real FHIR R4 server for the delivery tests, provisioned from npm on demand.
//!
//! `@medplum/fhir-router`'s `FhirRouter` over a `MemoryRepository`, behind `node:http`
//! (glue: `peers/fhir-server/server.js`): transaction bundles, `urn:uuid` reference
//! rewriting, conditional create and update, search. Pinned by
//! `crates/testkit/peers/fhir-server/package.json` and its lock file (the same @medplum
//! versions as the validators), installed with `npm ci` into `target/peers/fhir-server/`.
//!
//! The FHIR base is `/fhir/R4`. For failure tests, a base `/fail/STATUS/N/fhir/R4` answers
//! its first N requests with STATUS and an OperationOutcome (503 and 429 with
//! `Retry-After`, 2 s, as seconds and as an HTTP date respectively), then behaves like
//! `/fhir/R4`. [`FhirServer::start_tls`] serves HTTPS and requires a client certificate
//! (mutual TLS). [`FhirServer::start_behind`] requires a bearer token on every request and
//! asks a [`SmartAuthServer`](crate::smart_auth::SmartAuthServer) whether it is active
//! (token introspection); 401 otherwise, counted by [`FhirServer::unauthorized_count`]. The server starts in a few seconds; it is killed
//! when the [`FhirServer`] is dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::mllp::{PeerProcess, port_in};

const FILES: [&str; 3] = ["package.json", "package-lock.json", "server.js"];

/// The folder holding `server.js` and its `node_modules`, installing it when the pinned
/// files changed or nothing is installed yet. Panics with npm's output on failure.
pub fn server_dir() -> PathBuf {
    crate::npm_peer("fhir-server", &FILES, "the FHIR server")
}

/// A running FHIR server on a loopback port, killed on drop.
#[derive(Debug)]
pub struct FhirServer {
    port: u16,
    scheme: &'static str,
    _process: PeerProcess,
}

impl FhirServer {
    /// Installs (if needed) and starts the server, and waits until it listens. Blocking:
    /// from async code, call it in `spawn_blocking`.
    pub fn start() -> FhirServer {
        let dir = server_dir();
        FhirServer::spawn(&mut Command::new("node"), &dir, "http")
    }

    /// Like [`FhirServer::start`], over HTTPS with the PEM certificate `cert` and key
    /// `key`, requiring client certificates issued by the PEM CA `client_ca`.
    pub fn start_tls(cert: &Path, key: &Path, client_ca: &Path) -> FhirServer {
        let dir = server_dir();
        FhirServer::spawn(
            Command::new("node")
                .env("FHIR_SERVER_TLS_CERT", cert)
                .env("FHIR_SERVER_TLS_KEY", key)
                .env("FHIR_SERVER_TLS_CLIENT_CA", client_ca),
            &dir,
            "https",
        )
    }

    /// Like [`FhirServer::start`], as a resource server of an authorization server: a
    /// request without a bearer token that `introspection_url` (a
    /// [`SmartAuthServer::introspection_url`](crate::smart_auth::SmartAuthServer::introspection_url))
    /// says is active, asked on every request, gets 401.
    pub fn start_behind(introspection_url: &str) -> FhirServer {
        let dir = server_dir();
        FhirServer::spawn(
            Command::new("node")
                .env("FHIR_SERVER_INTROSPECT_URL", introspection_url)
                .env(
                    "FHIR_SERVER_INTROSPECT_CLIENT_ID",
                    crate::smart_auth::INTROSPECTOR_ID,
                )
                .env(
                    "FHIR_SERVER_INTROSPECT_CLIENT_SECRET",
                    crate::smart_auth::INTROSPECTOR_SECRET,
                ),
            &dir,
            "http",
        )
    }

    fn spawn(command: &mut Command, dir: &Path, scheme: &'static str) -> FhirServer {
        let mut process = PeerProcess::spawn(
            "FHIR server (@medplum/fhir-router)",
            command.arg(dir.join("server.js")).arg("0").current_dir(dir),
        );
        let line = process.wait_for_line("listening on", Duration::from_secs(120));
        FhirServer {
            port: port_in(&line),
            scheme,
            _process: process,
        }
    }

    /// How many requests a server started with [`FhirServer::start_behind`] refused with
    /// 401 so far.
    pub fn unauthorized_count(&self) -> u32 {
        let body = crate::smart_auth::test_hook(self.port, "GET", "/test/unauthorized");
        body.trim()
            .parse()
            .unwrap_or_else(|_| panic!("unexpected answer {body:?}"))
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The FHIR base URL, `http://127.0.0.1:PORT/fhir/R4` (`https` with TLS).
    pub fn base_url(&self) -> String {
        format!("{}://127.0.0.1:{}/fhir/R4", self.scheme, self.port)
    }

    /// A base URL whose first `count` requests are answered with `status` (see the module
    /// doc). Each distinct (status, count) pair counts on its own.
    pub fn failing_base_url(&self, status: u16, count: u32) -> String {
        format!(
            "{}://127.0.0.1:{}/fail/{status}/{count}/fhir/R4",
            self.scheme, self.port
        )
    }
}
