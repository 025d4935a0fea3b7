//! `passerelle send FILE... --to HOST:PORT [--tls] [--ca F] [--cert F] [--key F] [--json]`.
//!
//! Sends every message of the files (one message, concatenated messages, a batch, or an
//! MLLP capture) one at a time on one connection, waits for each ACK and checks that it
//! answers that message. Segment terminators are sent as CR, whatever the file uses.
//! Prints one line per message that was not accepted and a summary of the ACK codes;
//! `--json` prints one object per message and a summary object. Exits 1 when any message
//! got a NAK, no ACK, or was not sent, or a file could not be read; when no file holds a
//! message to send, says so and connects to nobody.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::BytesMut;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use passerelle_hl7::{HeaderSummary, batch};
use passerelle_mllp::codec::START_BLOCK;
use passerelle_mllp::{Client, ClientConfig, ClientError, ClientTlsConfig, Frame, MllpCodec};
use serde_json::json;
use tokio_util::codec::Decoder;

use crate::output::{Output, errln, outln};

/// Progress is drawn (on a terminal) from this many messages on.
const PROGRESS_FROM: usize = 20;

#[derive(Debug, Args)]
pub(crate) struct SendArgs {
    /// Files to send: one message, several concatenated, a batch (FHS/BHS), or MLLP frames.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The receiver, HOST:PORT.
    #[arg(long)]
    to: String,
    /// Connect with TLS.
    #[arg(long)]
    tls: bool,
    /// PEM CA certificates to trust for the receiver (default: the system's).
    #[arg(long, requires = "tls")]
    ca: Option<PathBuf>,
    /// PEM client certificate, for mutual TLS.
    #[arg(long, requires_all = ["tls", "key"])]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Name to check the receiver's certificate against (default: the host of --to).
    #[arg(long, requires = "tls")]
    server_name: Option<String>,
    /// Seconds to wait for each ACK.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Connection attempts (with backoff) before giving up.
    #[arg(long, default_value_t = 5)]
    connect_attempts: u32,
    /// One JSON object per message, then a summary object.
    #[arg(long)]
    json: bool,
}

/// One message to send.
struct Outgoing {
    label: String,
    bytes: Vec<u8>,
}

/// Splits a file into messages with CR segment terminators.
fn messages_of(name: &str, bytes: &[u8]) -> Result<Vec<Outgoing>, String> {
    let first = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace() && *b != 0);
    let parts: Vec<Vec<u8>> = if first.is_some_and(|i| bytes[i] == START_BLOCK) {
        // An MLLP capture: take the frames as they are.
        let mut codec = MllpCodec::default();
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        loop {
            match codec.decode_eof(&mut buf) {
                Ok(Some(Frame::Message(m))) => out.push(m.to_vec()),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        out
    } else {
        let split = batch::split(bytes).map_err(|e| e.to_string())?;
        split.messages.iter().map(|m| m.bytes.to_vec()).collect()
    };
    let several = parts.len() > 1;
    Ok(parts
        .into_iter()
        .enumerate()
        .map(|(i, p)| Outgoing {
            label: if several {
                format!("{name}#{}", i + 1)
            } else {
                name.to_owned()
            },
            bytes: with_cr_terminators(&p),
        })
        .collect())
}

/// LF and CRLF terminators become CR; blank lines go; the message ends with one CR.
pub(crate) fn with_cr_terminators(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 1);
    for line in message.split(|b| *b == b'\r' || *b == b'\n') {
        if !line.is_empty() {
            out.extend_from_slice(line);
            out.push(b'\r');
        }
    }
    out
}

#[derive(Default)]
struct Summary {
    sent: usize,
    codes: BTreeMap<String, usize>,
    errors: BTreeMap<&'static str, usize>,
    not_sent: usize,
    /// Files that could not be read or split into messages (each said on stderr).
    unreadable_files: usize,
}

impl Summary {
    fn failed(&self) -> bool {
        self.not_sent > 0
            || self.unreadable_files > 0
            || !self.errors.is_empty()
            || self.codes.keys().any(|c| c != "AA" && c != "CA")
    }

    fn text(&self, to: &str) -> String {
        let mut parts: Vec<String> = self.codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        parts.extend(self.errors.iter().map(|(e, n)| format!("{e} {n}")));
        if self.not_sent > 0 {
            parts.push(format!("not sent {}", self.not_sent));
        }
        if self.unreadable_files > 0 {
            parts.push(format!("unreadable file(s) {}", self.unreadable_files));
        }
        let mut text = format!("sent {} message(s) to {to}", self.sent);
        if !parts.is_empty() {
            text.push_str(": ");
            text.push_str(&parts.join(", "));
        }
        text
    }
}

pub(crate) fn run(args: &SendArgs) -> ExitCode {
    let mut outgoing = Vec::new();
    let mut unreadable = 0usize;
    for file in &args.files {
        let name = file.display().to_string();
        match std::fs::read(file)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|b| messages_of(&name, &b))
        {
            Ok(m) => outgoing.extend(m),
            Err(e) => {
                errln!("{name}: {e}");
                unreadable += 1;
            }
        }
    }
    if outgoing.is_empty() {
        errln!(
            "passerelle send: nothing to send: {}",
            if unreadable > 0 {
                format!("{unreadable} file(s) could not be read (see above)")
            } else {
                "the files hold no message".to_owned()
            }
        );
        return ExitCode::FAILURE;
    }
    let mut config = ClientConfig::new(args.to.clone());
    config.ack_timeout = Duration::from_secs_f64(args.timeout.max(0.001));
    config.connect_attempts = args.connect_attempts;
    if args.tls {
        config.tls = Some(ClientTlsConfig {
            ca: args.ca.clone(),
            cert: args.cert.clone(),
            key: args.key.clone(),
            server_name: args.server_name.clone(),
        });
    }
    let mut client = match Client::new(config) {
        Ok(c) => c,
        Err(e) => {
            errln!("passerelle send: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            errln!("passerelle send: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = Output::stdout();
    let mut summary = runtime.block_on(send_all(args, &mut client, &outgoing, &mut out));
    summary.unreadable_files = unreadable;
    if args.json {
        let doc = json!({
            "summary": {
                "to": args.to,
                "sent": summary.sent,
                "codes": summary.codes,
                "errors": summary.errors,
                "not_sent": summary.not_sent,
                "unreadable_files": summary.unreadable_files,
            }
        });
        outln!(out, "{doc}");
    } else {
        outln!(out, "{}", summary.text(&args.to));
    }
    let status = if summary.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    };
    out.finish("send", status)
}

/// Sends every message, whatever becomes of the output (sending is the work).
async fn send_all(
    args: &SendArgs,
    client: &mut Client,
    outgoing: &[Outgoing],
    out: &mut Output<io::Stdout>,
) -> Summary {
    let mut summary = Summary::default();
    let progress = if outgoing.len() >= PROGRESS_FROM && io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(
            Some(outgoing.len() as u64),
            ProgressDrawTarget::stderr(),
        );
        if let Ok(style) =
            ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta} {msg}")
        {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    for (i, message) in outgoing.iter().enumerate() {
        let control_id = HeaderSummary::salvage(&message.bytes)
            .map(|h| h.control_id)
            .unwrap_or_default();
        let result = client.send(&message.bytes).await;
        progress.inc(1);
        let (code, error, text) = match &result {
            Ok(ack) => {
                summary.sent += 1;
                *summary.codes.entry(ack.code.clone()).or_default() += 1;
                (Some(ack.code.clone()), None, ack.text.clone())
            }
            Err(e) => {
                if !matches!(
                    e,
                    ClientError::NoControlId
                        | ClientError::FramingByte { .. }
                        | ClientError::Connect { .. }
                        | ClientError::Handshake { .. }
                        | ClientError::Tls(_)
                ) {
                    summary.sent += 1;
                }
                *summary.errors.entry(e.label()).or_default() += 1;
                (None, Some(e.label()), Some(e.to_string()))
            }
        };
        if args.json {
            let line = json!({
                "file": message.label,
                "control_id": control_id,
                "ack": code,
                "error": error,
                "text": text,
            });
            progress.suspend(|| outln!(out, "{line}"));
        } else if !result.as_ref().is_ok_and(|a| a.is_accept()) {
            let what = code.as_deref().or(error).unwrap_or("?");
            let detail = text.map(|t| format!(": {t}")).unwrap_or_default();
            progress.suspend(|| errln!("{} ({control_id}): {what}{detail}", message.label));
        }
        if let Err(
            ClientError::Connect { .. } | ClientError::Handshake { .. } | ClientError::Tls(_),
        ) = result
        {
            summary.not_sent += outgoing.len() - i - 1;
            break;
        }
    }
    progress.finish_and_clear();
    client.close().await;
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_normalises() {
        let m = messages_of("f", b"MSH|^~\\&|A\r\nPID|1\r\n\r\nMSH|^~\\&|B\nPID|2\n").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].bytes, b"MSH|^~\\&|A\rPID|1\r");
        assert_eq!(m[1].bytes, b"MSH|^~\\&|B\rPID|2\r");
        assert_eq!(m[1].label, "f#2");
        let framed = messages_of(
            "g",
            b"\x0bMSH|^~\\&|C\rPID|3\r\x1c\r\x0bMSH|^~\\&|D\r\x1c\r",
        )
        .unwrap();
        assert_eq!(framed.len(), 2);
        assert_eq!(framed[1].bytes, b"MSH|^~\\&|D\r");
    }
}
