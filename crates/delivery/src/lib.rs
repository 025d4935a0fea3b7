//! # passerelle-delivery: the destinations the pipeline delivers to
//!
//! Its job: take one queued message (its FHIR bundle and its raw HL7 v2 bytes) and make
//! **one attempt** to hand it to one destination, then say what happened as a
//! [`passerelle_store::AttemptReport`]. Retries, backoff, ordering and dead letters belong
//! to the engine and the store; this crate only attempts and classifies.
//!
//! Three kinds of destination, each configured by a route's `[[destinations]]` table
//! ([`Destination::from_settings`]):
//!
//! | `type`   | what an attempt does | settings |
//! |----------|----------------------|----------|
//! | `ndjson` | appends each `entry[].resource` of the bundle as one line to `<dir>/<resourceType>.ndjson` (FHIR Bulk Data layout), then `fdatasync`; rotates a file that would grow past `max_file_bytes` to `<resourceType>.<n>.ndjson` | `dir`, `max_file_bytes` (default 256 MiB) |
//! | `fhir`   | POSTs the transaction bundle to the FHIR base URL (`application/fhir+json`) | `url`, `timeout_s` (30), `auth` (`none` / `basic` / `bearer`, secrets from environment variables; `smart_backend`: OAuth 2.0 client credentials with a JWT signed by a key file), `ca`, `client_cert` + `client_key` (mutual TLS) |
//! | `mllp`   | sends the raw message over one persistent MLLP connection and waits for its ACK | `peer` (`host:port`), `ack_timeout_s` (30), `connect_timeout_s` (10), `tls` (`ca`, `client_cert`, `client_key`, `server_name`) |
//!
//! See each module for the details: [`ndjson`], [`fhir`], [`mllp`].
//!
//! ## Invariants
//!
//! - **Never panics.** [`Destination::deliver`] returns a report for every input and every
//!   failure of the peer, the network or the disk.
//! - **Every failure is classified**: [`AttemptOutcome::Transient`] when the same attempt
//!   may succeed later (network, timeouts, HTTP 408/429/5xx, disk errors, an MLLP peer that
//!   does not answer), [`AttemptOutcome::Permanent`] when it cannot (a refused bundle, an
//!   MLLP AE/AR, a message without a bundle for a bundle destination, a client the OAuth
//!   token endpoint refuses). The report's `error_class` is a short stable label
//!   (`connect`, `timeout`, `http_5xx`, `http_4xx`, `auth`, `nak_ae`, `io`…) fit for
//!   metrics.
//! - **No patient data in `detail` or logs.** `detail` holds error texts of the transport
//!   (which name configured addresses, never content), an excerpt of a server's
//!   OperationOutcome (`severity`, `code`, expression, and diagnostics with every value of
//!   the bundle sent and anything quoted masked, truncated to about 300 characters)
//!   or an MLLP ACK's code; never the bundle nor the message. Logs name the destination
//!   kind, the message id, sizes and classes.
//! - **Secrets never sit in configuration files.** Passwords and tokens are read from
//!   environment variables whose *names* the file gives, once, when the destination is
//!   built; a SMART private key sits in its own file, which the configuration names.
//!   `Debug` prints none of them, and neither do logs or reports: access tokens and signed
//!   assertions stay inside the HTTP requests.

pub mod fhir;
pub mod mllp;
pub mod ndjson;
mod settings;
mod smart;

use std::path::Path;

pub use fhir::FhirDestination;
pub use mllp::MllpDestination;
pub use ndjson::NdjsonDestination;
pub use passerelle_store::{AttemptOutcome, AttemptReport};
pub use settings::SettingsError;

/// One message to deliver: its id in the store, its FHIR bundle (JSON) when the route
/// maps, and its raw HL7 v2 bytes.
#[derive(Debug, Clone, Copy)]
pub struct Item<'a> {
    /// The store's message id (logged, never content).
    pub message_id: u64,
    /// The mapped FHIR transaction bundle, as JSON.
    pub bundle: Option<&'a str>,
    /// The message as received. Only an MLLP forward sends it: the engine reads the frame
    /// from the store for those alone and leaves it empty for FHIR and NDJSON destinations.
    pub raw: &'a [u8],
}

/// A configured destination.
#[derive(Debug)]
pub enum Destination {
    /// NDJSON files, one per resource type.
    Ndjson(NdjsonDestination),
    /// A FHIR R4 server over HTTP(S).
    Fhir(FhirDestination),
    /// An MLLP peer (HL7 v2 forward).
    Mllp(MllpDestination),
}

impl Destination {
    /// Builds a destination from a route's `[[destinations]]` table: `kind` is its `type`
    /// and `settings` the table (a `type` key in it is ignored; any other key the kind does
    /// not know is an error naming it). Relative paths resolve against `base_dir` (the
    /// engine passes the directory of passerelle.toml). Files (CA, certificates) are read and environment
    /// variables looked up here, so a bad setting fails at start-up, not at the first
    /// message.
    pub fn from_settings(
        kind: &str,
        settings: &toml::Table,
        base_dir: &Path,
    ) -> Result<Destination, SettingsError> {
        match kind {
            "ndjson" => Ok(Destination::Ndjson(NdjsonDestination::from_settings(
                settings, base_dir,
            )?)),
            "fhir" => Ok(Destination::Fhir(FhirDestination::from_settings(
                settings, base_dir,
            )?)),
            "mllp" => Ok(Destination::Mllp(MllpDestination::from_settings(
                settings, base_dir,
            )?)),
            other => Err(SettingsError::UnknownType {
                kind: other.to_owned(),
            }),
        }
    }

    /// Tries, on this machine, what the first delivery will need and that can be tried
    /// without sending anything: an NDJSON destination's folder can be written (see
    /// [`NdjsonDestination::probe`]). FHIR and MLLP destinations are not contacted (a
    /// check must not post to a production server); they pass.
    pub fn probe(&self) -> Result<(), SettingsError> {
        match self {
            Destination::Ndjson(d) => d.probe(),
            Destination::Fhir(_) | Destination::Mllp(_) => Ok(()),
        }
    }

    /// The kind, as written in `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Destination::Ndjson(_) => "ndjson",
            Destination::Fhir(_) => "fhir",
            Destination::Mllp(_) => "mllp",
        }
    }

    /// Makes one attempt. Never panics; every failure is classified transient or permanent.
    pub async fn deliver(&self, item: &Item<'_>) -> AttemptReport {
        let report = match self {
            Destination::Ndjson(d) => d.deliver(item).await,
            Destination::Fhir(d) => d.deliver(item).await,
            Destination::Mllp(d) => d.deliver(item).await,
        };
        if report.outcome != AttemptOutcome::Delivered {
            tracing::debug!(
                kind = self.kind(),
                message_id = item.message_id,
                outcome = ?report.outcome,
                class = %report.error_class,
                status = report.status,
                "delivery attempt failed"
            );
        }
        report
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut with `…`.
pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// A report with a detail.
pub(crate) fn with_detail(mut report: AttemptReport, detail: impl Into<String>) -> AttemptReport {
    report.detail = truncate(detail.into(), 300);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn attempts_can_be_spawned() {
        // The engine runs attempts in spawned tasks: the futures must be Send, and the
        // destinations Send + Sync.
        fn shareable<T: Send + Sync>() {}
        shareable::<Destination>();
        let settings: toml::Table = toml::from_str("dir = \"/tmp\"").expect("toml");
        let d = Destination::from_settings("ndjson", &settings, Path::new("/")).expect("ok");
        let item = Item {
            message_id: 1,
            bundle: None,
            raw: b"",
        };
        let future = d.deliver(&item);
        assert_send(&future);
    }
}
