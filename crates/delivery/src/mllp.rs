//! MLLP forward: each attempt sends the message's raw HL7 v2 bytes to a peer with
//! [`passerelle_mllp::Client`] and waits for its ACK, over one persistent connection per
//! destination, one message in flight at a time (MLLP has no other way to match ACKs,
//! and per-key order holds).
//!
//! The client lives on a thread of its own (a current-thread tokio runtime) fed by a
//! channel, because `Client::send`'s future is not `Send` (the client is not `Sync`), and
//! the engine's delivery tasks must be spawnable. Attempts queue on the channel in order;
//! the thread ends, closing the connection, when the destination is dropped.
//!
//! | result | outcome | `error_class` |
//! |--------|---------|---------------|
//! | AA, CA | delivered | |
//! | AE, CE (application or commit *error*: the receiver refuses this content) | permanent | `nak_ae` |
//! | AR, CR (application or commit *reject*: type, version or processing id refused) | permanent | `nak_ar` |
//! | any other MSA-1 | permanent | `nak_other` |
//! | no connection after the client's attempts | transient | `connect` |
//! | TLS handshake failed | transient | `tls` |
//! | no ACK within `ack_timeout_s` (the connection is dropped) | transient | `timeout` |
//! | connection closed or broken before the ACK | transient | `closed` / `io` |
//! | an ACK for another message, a broken frame, not an ACK | transient | `mismatch` / `framing` / `invalid_ack` |
//! | MLLP release 2 commit NAK (the receiver could not store it) | transient | `commit_nak` |
//! | the message has no MSH-10 or holds an MLLP framing byte | permanent | `no_control_id` / `framing_byte` |
//!
//! Both negative ACK families are permanent by default: sending the same bytes again
//! gets the same answer, so the message goes to dead letter for an operator (who can
//! `replay` it once the peer is fixed). Some receivers answer AE for a passing trouble of
//! their own (a locked record, a database down); for those, `application_errors =
//! "retry"` makes AE and CE transient, retried with the destination's backoff until its
//! retry policy gives up. AR and CR (the receiver refuses the message's type, version or
//! processing id) stay permanent. Transport failures are transient: the connection is dropped and the
//! next attempt reconnects. A NAK's `detail` holds its code, control id and the peer's
//! diagnostic (ERR-8 or MSA-3), truncated; never the message.
//!
//! Settings: `peer` (`host:port`, required), `ack_timeout_s` (30), `connect_timeout_s`
//! (10), `tls = { ca, client_cert, client_key, server_name }` (all optional; an empty
//! table means TLS with the system's roots), `charset` (optional), `application_errors`
//! (`"dead"`, the default, or `"retry"`).
//!
//! **Raw or re-encoded.** By default the peer gets the bytes the sender sent. With
//! `charset = "UNICODE UTF-8"` (or `8859/1`, `8859/15`, `ASCII`), the message is decoded
//! with its own MSH-18 and written again in that character set, MSH-18 updated, values
//! re-escaped: for a receiver that only reads UTF-8 behind a Latin-9 sender. A message
//! that cannot be re-encoded (a character the target set lacks) is permanent
//! (`reencode`), naming the segment and field, never the value.

use std::path::Path;
use std::time::Duration;

use passerelle_hl7::{Charset, Message, OwnedMessage, Path as Hl7Path};
use passerelle_mllp::{Ack, Client, ClientConfig, ClientError, ClientTlsConfig};
use passerelle_store::AttemptReport;
use tokio::sync::{mpsc, oneshot};

use crate::settings::{Reader, invalid};
use crate::{Item, SettingsError, with_detail};

/// One attempt handed to the client's thread.
struct Job {
    raw: Vec<u8>,
    reply: oneshot::Sender<Result<Ack, ClientError>>,
}

/// Forwards messages to an MLLP peer.
#[derive(Debug)]
pub struct MllpDestination {
    peer: String,
    jobs: mpsc::Sender<Job>,
    /// Re-encode into this character set before sending (`None`: the raw bytes).
    reencode: Option<Charset>,
    /// AE and CE are retried (transient) rather than dead-lettered.
    retry_application_errors: bool,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("size", &self.raw.len())
            .finish()
    }
}

impl MllpDestination {
    /// A destination for `config`: loads its TLS files and starts the client's thread
    /// (it connects at the first attempt).
    pub fn new(config: ClientConfig) -> Result<MllpDestination, ClientError> {
        let peer = config.address.clone();
        let mut client = Client::new(config)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (jobs, mut rx) = mpsc::channel::<Job>(16);
        std::thread::Builder::new()
            .name("mllp-forward".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some(job) = rx.recv().await {
                        if job.reply.is_closed() {
                            continue; // the caller gave up: do not send behind its back
                        }
                        let result = client.send(&job.raw).await;
                        let _ = job.reply.send(result);
                    }
                    client.close().await;
                });
            })?;
        Ok(MllpDestination {
            peer,
            jobs,
            reencode: None,
            retry_application_errors: false,
        })
    }

    /// From settings: see the module doc.
    pub fn from_settings(
        settings: &toml::Table,
        base_dir: &Path,
    ) -> Result<MllpDestination, SettingsError> {
        let r = Reader::new(
            settings,
            "",
            &[
                "peer",
                "ack_timeout_s",
                "connect_timeout_s",
                "tls",
                "charset",
                "application_errors",
            ],
        )?;
        let retry_application_errors = match r.string("application_errors")? {
            None | Some("dead") => false,
            Some("retry") => true,
            Some(other) => {
                return Err(invalid(
                    "application_errors",
                    format!("expected \"dead\" or \"retry\", found {other:?}"),
                ));
            }
        };
        let reencode = match r.string("charset")? {
            None => None,
            Some(name) => Some(Charset::from_name(name).ok_or_else(|| {
                invalid(
                    "charset",
                    format!(
                        "{name:?} is not a character set passerelle writes \
                         (UNICODE UTF-8, 8859/1, 8859/15, ASCII)"
                    ),
                )
            })?),
        };
        let peer = r.required_string("peer")?;
        match peer.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => {
                return Err(invalid(
                    "peer",
                    format!("expected host:port, found {peer:?}"),
                ));
            }
        }
        let mut config = ClientConfig::new(peer);
        // The engine retries with backoff; inside one attempt, one reconnect is enough.
        config.connect_attempts = 2;
        if let Some(t) = r.seconds("ack_timeout_s")? {
            config.ack_timeout = t;
        }
        if let Some(t) = r.seconds("connect_timeout_s")? {
            config.connect_timeout = t;
        }
        if let Some(tls) = r.table("tls")? {
            let t = Reader::new(
                tls,
                "tls",
                &["ca", "client_cert", "client_key", "server_name"],
            )?;
            let cert = t.path_setting("client_cert", base_dir)?;
            let key = t.path_setting("client_key", base_dir)?;
            match (&cert, &key) {
                (Some(_), None) => {
                    return Err(SettingsError::Missing {
                        key: "tls.client_key".to_owned(),
                    });
                }
                (None, Some(_)) => {
                    return Err(SettingsError::Missing {
                        key: "tls.client_cert".to_owned(),
                    });
                }
                _ => {}
            }
            config.tls = Some(ClientTlsConfig {
                ca: t.path_setting("ca", base_dir)?,
                cert,
                key,
                server_name: t.string("server_name")?.map(str::to_owned),
            });
        }
        let mut destination = MllpDestination::new(config).map_err(|e| match e {
            ClientError::Tls(_) => invalid("tls", e.to_string()),
            other => invalid("peer", other.to_string()),
        })?;
        destination.reencode = reencode;
        destination.retry_application_errors = retry_application_errors;
        Ok(destination)
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// One attempt: see the module doc.
    pub async fn deliver(&self, item: &Item<'_>) -> AttemptReport {
        let raw = match self.reencode {
            None => item.raw.to_vec(),
            Some(charset) => match reencode(item.raw, charset) {
                Ok(bytes) => bytes,
                Err(why) => return with_detail(AttemptReport::permanent("reencode"), why),
            },
        };
        let (reply, answer) = oneshot::channel();
        let job = Job { raw, reply };
        let result = match self.jobs.send(job).await {
            Ok(()) => answer.await.ok(),
            Err(_) => None,
        };
        let Some(result) = result else {
            return with_detail(
                AttemptReport::transient("io"),
                "the MLLP client thread has stopped",
            );
        };
        match result {
            Ok(ack) => {
                let report = match ack.code.as_str() {
                    "AA" | "CA" => return AttemptReport::delivered(),
                    "AE" | "CE" if self.retry_application_errors => {
                        AttemptReport::transient("nak_ae")
                    }
                    "AE" | "CE" => AttemptReport::permanent("nak_ae"),
                    "AR" | "CR" => AttemptReport::permanent("nak_ar"),
                    _ => AttemptReport::permanent("nak_other"),
                };
                let mut detail = format!("{} for {}", ack.code, ack.control_id);
                if let Some(text) = ack.text.as_deref().filter(|t| !t.is_empty()) {
                    detail.push_str(": ");
                    detail.push_str(text);
                }
                with_detail(report, detail)
            }
            Err(e) => {
                let report = match &e {
                    ClientError::NoControlId => AttemptReport::permanent("no_control_id"),
                    ClientError::FramingByte { .. } => AttemptReport::permanent("framing_byte"),
                    ClientError::Connect { .. } => AttemptReport::transient("connect"),
                    ClientError::Handshake { .. } | ClientError::Tls(_) => {
                        AttemptReport::transient("tls")
                    }
                    ClientError::Io(_) => AttemptReport::transient("io"),
                    ClientError::Timeout { .. } => AttemptReport::transient("timeout"),
                    ClientError::Closed { .. } => AttemptReport::transient("closed"),
                    ClientError::Mismatch { .. } => AttemptReport::transient("mismatch"),
                    ClientError::CommitNak { .. } => AttemptReport::transient("commit_nak"),
                    ClientError::InvalidAck { .. } => AttemptReport::transient("invalid_ack"),
                    ClientError::Framing(_) => AttemptReport::transient("framing"),
                };
                // The client's errors name addresses, control ids and offsets, not content.
                with_detail(report, e.to_string())
            }
        }
    }
}

/// The message written again in `charset`, with MSH-18 saying so. The error names the
/// segment and field at fault, never a value.
pub fn reencode(raw: &[u8], charset: Charset) -> Result<Vec<u8>, String> {
    let message = Message::parse(raw).map_err(|e| format!("cannot re-encode: {e}"))?;
    let mut owned = OwnedMessage::from_message(&message);
    owned.charset = charset;
    let msh18: Hl7Path = "MSH-18".parse().map_err(|e| format!("MSH-18: {e}"))?;
    owned
        .set(&msh18, charset.label())
        .and_then(|()| owned.write())
        .map_err(|e| format!("cannot re-encode into {}: {e}", charset.label()))
}

/// Default ACK deadline, as [`ClientConfig::new`] sets it.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);
