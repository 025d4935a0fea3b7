//! The MLLP client: sends one message at a time over TCP or TLS and waits for its ACK.
//!
//! Invariants, each learnt from another engine's bug tracker:
//!
//! - **An ACK is matched, never assumed.** MSA-2 must equal the message's MSH-10; any
//!   other answer is [`ClientError::Mismatch`] and the connection is dropped, since the
//!   stream is out of step.
//! - **A late ACK is never accepted.** When the ACK does not come within
//!   [`ClientConfig::ack_timeout`], the connection is closed, so the late answer cannot be
//!   read as the answer to the next message (Mirth connect#1441).
//! - **Reconnects back off.** Connecting retries with exponential backoff and jitter, a
//!   bounded number of times. A reused connection that the server closed while idle (a
//!   server that closes after each message) is detected before sending, and a frame sent
//!   into such a connection, with the close arriving before any byte of the answer, is
//!   sent once more on a fresh connection.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use passerelle_hl7::HeaderSummary;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_util::codec::{Decoder, Encoder};
use tracing::{debug, warn};

use crate::codec::{CodecOptions, Frame, FrameError, MllpCodec};
use crate::tls::{self, ClientTlsConfig, TlsError};

/// Client settings. [`ClientConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` to connect to.
    pub address: String,
    /// TLS settings; `None` for plain TCP.
    pub tls: Option<ClientTlsConfig>,
    /// Deadline for one connection attempt (TCP connect and TLS handshake). Default 10 s.
    pub connect_timeout: Duration,
    /// Deadline for the ACK, from the start of the send. Default 30 s.
    pub ack_timeout: Duration,
    /// Connection attempts before giving up. Default 5.
    pub connect_attempts: u32,
    /// First backoff delay between attempts; doubles up to `backoff_max`. Default 200 ms.
    pub backoff_initial: Duration,
    /// Longest backoff delay. Default 10 s.
    pub backoff_max: Duration,
    /// Framing limits for the ACKs.
    pub codec: CodecOptions,
}

impl ClientConfig {
    /// Defaults for a peer at `address` (`host:port`).
    pub fn new(address: impl Into<String>) -> ClientConfig {
        ClientConfig {
            address: address.into(),
            tls: None,
            connect_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(30),
            connect_attempts: 5,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            codec: CodecOptions::default(),
        }
    }
}

/// Why a send failed. None of them quotes message content.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The message has no MSH-10, so its ACK could not be matched.
    #[error("the message has no control id (MSH-10); its ACK could not be matched")]
    NoControlId,
    /// The message holds a byte that MLLP uses for framing (0x0B or 0x1C), so the receiver
    /// would cut it; it must be escaped or cleaned first.
    #[error("the message contains an MLLP framing byte (0x0B or 0x1C) at offset {offset}")]
    FramingByte {
        /// Where.
        offset: usize,
    },
    /// Every connection attempt failed.
    #[error("cannot connect to {address} after {attempts} attempts: {source}")]
    Connect {
        /// The peer.
        address: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        source: io::Error,
    },
    /// The TLS handshake failed (certificate refused, not a TLS server…).
    #[error("TLS handshake with {address} failed: {source}")]
    Handshake {
        /// The peer.
        address: String,
        /// The handshake error.
        source: io::Error,
    },
    /// The TLS settings could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Reading or writing failed.
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    /// No ACK within the deadline; the connection was closed.
    #[error("no ACK for {control_id} within {after:?}")]
    Timeout {
        /// MSH-10 of the message.
        control_id: String,
        /// The deadline.
        after: Duration,
    },
    /// The peer closed the connection before answering.
    #[error("the peer closed the connection before acknowledging {control_id}")]
    Closed {
        /// MSH-10 of the message.
        control_id: String,
    },
    /// The ACK names another message.
    #[error("ACK mismatch: sent {expected}, the ACK's MSA-2 is {got:?}")]
    Mismatch {
        /// MSH-10 sent.
        expected: String,
        /// MSA-2 received.
        got: String,
    },
    /// MLLP release 2 negative commit acknowledgement.
    #[error("the peer refused {control_id} with an MLLP commit NAK")]
    CommitNak {
        /// MSH-10 of the message.
        control_id: String,
    },
    /// The answer is not an ACK.
    #[error("invalid ACK for {control_id}: {reason}")]
    InvalidAck {
        /// MSH-10 of the message.
        control_id: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The answer's framing is broken.
    #[error("framing error: {0}")]
    Framing(#[from] FrameError),
}

impl ClientError {
    /// A short label for summaries: `timeout`, `mismatch`, `connect`…
    pub fn label(&self) -> &'static str {
        match self {
            ClientError::NoControlId => "no-control-id",
            ClientError::FramingByte { .. } => "framing-byte",
            ClientError::Connect { .. } => "connect",
            ClientError::Handshake { .. } | ClientError::Tls(_) => "tls",
            ClientError::Io(_) => "io",
            ClientError::Timeout { .. } => "timeout",
            ClientError::Closed { .. } => "closed",
            ClientError::Mismatch { .. } => "mismatch",
            ClientError::CommitNak { .. } => "commit-nak",
            ClientError::InvalidAck { .. } => "invalid-ack",
            ClientError::Framing(_) => "framing",
        }
    }
}

/// An acknowledgement, as received.
#[derive(Clone, PartialEq, Eq)]
pub struct Ack {
    /// MSA-1: AA, AE, AR, CA, CE, CR.
    pub code: String,
    /// MSA-2: the acknowledged message's control id.
    pub control_id: String,
    /// ERR-8 or, before v2.5, MSA-3: the receiver's diagnostic.
    pub text: Option<String>,
    /// The whole ACK message.
    pub bytes: Bytes,
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ack")
            .field("code", &self.code)
            .field("control_id", &self.control_id)
            .field("text", &self.text)
            .field("size", &self.bytes.len())
            .finish()
    }
}

impl Ack {
    /// Reads MSA-1, MSA-2 and the diagnostic text. `None` if there is no MSA segment.
    pub fn parse(bytes: Bytes) -> Option<Ack> {
        let lines = || {
            bytes
                .split(|b| *b == b'\r' || *b == b'\n')
                .filter(|l| l.len() > 3)
        };
        let msa = lines().find(|l| l.starts_with(b"MSA"))?;
        let sep = msa[3];
        let field = |line: &[u8], n: usize| -> String {
            let v = line.split(|b| *b == sep).nth(n).unwrap_or_default();
            String::from_utf8_lossy(v).trim().to_owned()
        };
        let code = field(msa, 1);
        let control_id = field(msa, 2);
        let text = lines()
            .filter(|l| l.starts_with(b"ERR"))
            .map(|l| field(l, 8))
            .find(|t| !t.is_empty())
            .or_else(|| Some(field(msa, 3)).filter(|t| !t.is_empty()));
        Some(Ack {
            code,
            control_id,
            text,
            bytes,
        })
    }

    /// AA or CA.
    pub fn is_accept(&self) -> bool {
        matches!(self.code.as_str(), "AA" | "CA")
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Conn {
    stream: Box<dyn Io>,
    buf: BytesMut,
    codec: MllpCodec,
    peer: SocketAddr,
    /// Messages acknowledged on this connection.
    used: u64,
}

/// An MLLP client. Not shared between tasks: one client, one connection, one message in
/// flight.
pub struct Client {
    config: ClientConfig,
    connector: Option<TlsConnector>,
    server_name: Option<ServerName<'static>>,
    conn: Option<Conn>,
    connections: u64,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.config)
            .field("connected", &self.conn.as_ref().map(|c| c.peer))
            .field("connections", &self.connections)
            .finish()
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A pseudo-random fraction in [0.5, 1.0) from the clock, for backoff jitter.
fn jitter() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    0.5 + f64::from(nanos % 1000) / 2000.0
}

impl Client {
    /// A client for `config`; loads the TLS files now so that errors show up at once.
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        let (connector, server_name) = match &config.tls {
            Some(t) => {
                let name = t
                    .server_name
                    .clone()
                    .unwrap_or_else(|| host_of(&config.address).to_owned());
                let server_name = ServerName::try_from(name.clone())
                    .map_err(|_| TlsError::Invalid(format!("invalid server name {name:?}")))?;
                (Some(tls::connector(t)?), Some(server_name))
            }
            None => (None, None),
        };
        Ok(Client {
            config,
            connector,
            server_name,
            conn: None,
            connections: 0,
        })
    }

    /// Connections opened so far.
    pub fn connections(&self) -> u64 {
        self.connections
    }

    /// Closes the connection, if any.
    pub async fn close(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.stream.shutdown()).await;
        }
    }

    async fn connect_once(&self) -> Result<Conn, ClientError> {
        let deadline = Instant::now() + self.config.connect_timeout;
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
        let tcp = timeout_at(deadline, TcpStream::connect(&self.config.address))
            .await
            .map_err(|_| timed_out())??;
        tcp.set_nodelay(true)?;
        let peer = tcp.peer_addr()?;
        let stream: Box<dyn Io> = match (&self.connector, &self.server_name) {
            (Some(connector), Some(name)) => {
                let handshake = timeout_at(deadline, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| timed_out())
                    .and_then(|r| r);
                match handshake {
                    Ok(s) => Box::new(s),
                    Err(source) => {
                        return Err(ClientError::Handshake {
                            address: self.config.address.clone(),
                            source,
                        });
                    }
                }
            }
            _ => Box::new(tcp),
        };
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(4096),
            codec: MllpCodec::new(self.config.codec.clone()),
            peer,
            used: 0,
        })
    }

    /// Connects, retrying with backoff.
    async fn connect(&mut self) -> Result<(), ClientError> {
        let attempts = self.config.connect_attempts.max(1);
        let mut delay = self.config.backoff_initial;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.connect_once().await {
                Ok(conn) => {
                    debug!(peer = %conn.peer, attempt, "connected");
                    self.connections += 1;
                    self.conn = Some(conn);
                    return Ok(());
                }
                Err(ClientError::Io(source)) if attempt < attempts => {
                    let wait = delay.mul_f64(jitter());
                    warn!(address = %self.config.address, attempt, error = %source, retry_in_ms = wait.as_millis() as u64, "connect failed; retrying");
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(self.config.backoff_max);
                }
                Err(ClientError::Io(source)) => {
                    return Err(ClientError::Connect {
                        address: self.config.address.clone(),
                        attempts: attempt,
                        source,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the open connection is still usable: not closed by the peer and with no
    /// unsolicited bytes waiting.
    async fn check_idle_connection(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let mut probe = BytesMut::with_capacity(512);
        match tokio::time::timeout(Duration::ZERO, conn.stream.read_buf(&mut probe)).await {
            Err(_) => {} // nothing to read: fine.
            Ok(Ok(0)) => {
                debug!(peer = %conn.peer, "the peer closed the idle connection; reconnecting");
                self.conn = None;
            }
            Ok(Ok(n)) => {
                warn!(peer = %conn.peer, bytes = n, "unsolicited bytes on an idle connection; reconnecting");
                self.conn = None;
            }
            Ok(Err(e)) => {
                debug!(peer = %conn.peer, error = %e, "idle connection failed; reconnecting");
                self.conn = None;
            }
        }
    }

    /// Sends one message (unframed HL7) and waits for its ACK. `Ok` holds any ACK whose
    /// MSA-2 matches, AA or not: look at [`Ack::code`].
    pub async fn send(&mut self, message: &[u8]) -> Result<Ack, ClientError> {
        let control_id = HeaderSummary::salvage(message)
            .map(|h| h.control_id)
            .filter(|c| !c.is_empty())
            .ok_or(ClientError::NoControlId)?;
        if let Some(offset) =
            memchr::memchr2(crate::codec::START_BLOCK, crate::codec::END_BLOCK, message)
        {
            return Err(ClientError::FramingByte { offset });
        }
        let deadline = Instant::now() + self.config.ack_timeout;
        let mut resent = false;
        loop {
            self.check_idle_connection().await;
            if self.conn.is_none() {
                self.connect().await?;
            }
            let result = self.exchange(message, &control_id, deadline).await;
            let reused = self.conn.as_ref().is_some_and(|c| c.used > 0);
            match result {
                Ok(ack) => {
                    if let Some(conn) = self.conn.as_mut() {
                        conn.used += 1;
                    }
                    return Ok(ack);
                }
                Err(Exchange::ClosedBeforeAnswer(e)) if reused && !resent => {
                    debug!(control_id = %control_id, error = %e, "reused connection closed before any answer; sending again on a new connection");
                    self.conn = None;
                    resent = true;
                }
                Err(Exchange::ClosedBeforeAnswer(e)) => {
                    self.conn = None;
                    return Err(e);
                }
                Err(Exchange::Failed(e)) => {
                    self.close().await;
                    return Err(e);
                }
            }
        }
    }

    async fn exchange(
        &mut self,
        message: &[u8],
        control_id: &str,
        deadline: Instant,
    ) -> Result<Ack, Exchange> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(Exchange::ClosedBeforeAnswer(ClientError::Closed {
                control_id: control_id.to_owned(),
            }));
        };
        let timed_out = || {
            Exchange::Failed(ClientError::Timeout {
                control_id: control_id.to_owned(),
                after: self.config.ack_timeout,
            })
        };
        let closed = |e: Option<io::Error>| {
            Exchange::ClosedBeforeAnswer(match e {
                Some(e)
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    ClientError::Io(e)
                }
                _ => ClientError::Closed {
                    control_id: control_id.to_owned(),
                },
            })
        };
        let mut out = BytesMut::with_capacity(message.len() + 3);
        conn.codec
            .encode(message, &mut out)
            .map_err(|e| Exchange::Failed(e.into()))?;
        match timeout_at(deadline, async {
            conn.stream.write_all(&out).await?;
            conn.stream.flush().await
        })
        .await
        {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => return Err(closed(Some(e))),
            Ok(Ok(())) => {}
        }
        let mut received_any = false;
        loop {
            match conn.codec.decode(&mut conn.buf) {
                Ok(Some(Frame::Message(payload))) => {
                    let Some(ack) = Ack::parse(payload) else {
                        return Err(Exchange::Failed(ClientError::InvalidAck {
                            control_id: control_id.to_owned(),
                            reason: "no MSA segment",
                        }));
                    };
                    if ack.control_id != control_id {
                        return Err(Exchange::Failed(ClientError::Mismatch {
                            expected: control_id.to_owned(),
                            got: ack.control_id,
                        }));
                    }
                    return Ok(ack);
                }
                Ok(Some(Frame::CommitAck)) => {
                    debug!(control_id = %control_id, "MLLP commit ACK");
                    received_any = true;
                    continue;
                }
                Ok(Some(Frame::CommitNak)) => {
                    return Err(Exchange::Failed(ClientError::CommitNak {
                        control_id: control_id.to_owned(),
                    }));
                }
                Ok(None) => {}
                Err(e) => return Err(Exchange::Failed(e.into())),
            }
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(4096);
            }
            match timeout_at(deadline, conn.stream.read_buf(&mut conn.buf)).await {
                Err(_) => return Err(timed_out()),
                Ok(Ok(0)) | Ok(Err(_))
                    if !received_any && conn.buf.is_empty() && !conn.codec.in_frame() =>
                {
                    return Err(closed(None));
                }
                Ok(Ok(0)) => {
                    return Err(Exchange::Failed(ClientError::Closed {
                        control_id: control_id.to_owned(),
                    }));
                }
                Ok(Err(e)) => return Err(Exchange::Failed(e.into())),
                Ok(Ok(_)) => received_any = true,
            }
        }
    }
}

enum Exchange {
    /// The connection ended before any byte of an answer: the frame may be sent again on
    /// a new connection if this one was reused.
    ClosedBeforeAnswer(ClientError),
    Failed(ClientError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_acks() {
        let ack = Ack::parse(Bytes::from_static(
            b"MSH|^~\\&|R|F|S|G|20240101||ACK^A01^ACK|A1|P|2.5\rMSA|AE|CTRL1\rERR||PID^1^3|102^Data type error^HL70357|E||||bad date\r",
        ))
        .unwrap();
        assert_eq!(ack.code, "AE");
        assert_eq!(ack.control_id, "CTRL1");
        assert_eq!(ack.text.as_deref(), Some("bad date"));
        assert!(!ack.is_accept());
        let ack = Ack::parse(Bytes::from_static(
            b"MSH|^~\\&|||||||ACK|1|P|2.3\rMSA|AR|X|too old\r",
        ))
        .unwrap();
        assert_eq!(ack.text.as_deref(), Some("too old"));
        assert!(Ack::parse(Bytes::from_static(b"MSH|^~\\&|\r")).is_none());
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("127.0.0.1:2575"), "127.0.0.1");
        assert_eq!(host_of("[::1]:2575"), "::1");
        assert_eq!(host_of("lab.example:1"), "lab.example");
    }
}
