//! Helpers shared by the integration tests: messages, and raw MLLP I/O with deadlines.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use passerelle_mllp::codec::frame;
use passerelle_mllp::{
    Ack, Frame, Handler, Listener, ListenerConfig, MllpCodec, ParseAckHandler, RunningListener,
    ServerTls,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;

/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

/// A well-formed ADT^A01 with control id `id`.
pub fn message(id: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|SND|FAC|RCV|FAC|20240101120000||ADT^A01^ADT_A01|{id}|P|2.5\rEVN|A01|20240101120000\rPID|1||123^^^HOSP^PI||DOE^JANE\r"
    )
    .into_bytes()
}

pub fn config() -> ListenerConfig {
    let mut c = ListenerConfig::new("127.0.0.1:0".parse().unwrap());
    c.shutdown_grace = Duration::from_secs(10);
    c
}

pub async fn start<H: Handler>(
    config: ListenerConfig,
    tls: Option<ServerTls>,
    handler: H,
) -> RunningListener {
    Listener::bind(config, tls)
        .await
        .expect("bind")
        .spawn(handler)
}

pub async fn start_parser(config: ListenerConfig) -> RunningListener {
    start(config, None, ParseAckHandler::default()).await
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Reads frames until one message frame arrives (commit blocks skipped), within WAIT.
/// `None` when the connection closes first.
pub async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    codec: &mut MllpCodec,
    buf: &mut BytesMut,
) -> Option<Bytes> {
    tokio::time::timeout(WAIT, async {
        loop {
            match codec.decode(buf) {
                Ok(Some(Frame::Message(b))) => return Some(b),
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(_) => return None,
            }
            buf.reserve(4096);
            match stream.read_buf(buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("a frame or a close within the deadline")
}

/// A raw MLLP connection for tests that need to misbehave.
pub struct Raw<S> {
    pub stream: S,
    pub codec: MllpCodec,
    pub buf: BytesMut,
}

impl Raw<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> Self {
        Raw::new(connect(addr).await)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    pub fn new(stream: S) -> Self {
        Raw {
            stream,
            codec: MllpCodec::default(),
            buf: BytesMut::new(),
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        self.stream.flush().await.expect("flush");
    }

    pub async fn send(&mut self, payload: &[u8]) {
        self.write(&frame(payload)).await;
    }

    pub async fn read_ack(&mut self) -> Option<Ack> {
        read_frame(&mut self.stream, &mut self.codec, &mut self.buf)
            .await
            .map(|b| Ack::parse(b).expect("an MSA segment"))
    }

    /// Waits (bounded) for the server to close: true on EOF or reset, false if bytes came.
    pub async fn closed(&mut self) -> bool {
        let mut b = [0u8; 256];
        match tokio::time::timeout(WAIT, self.stream.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) => false,
            Err(_) => panic!("the server did not close the connection within {WAIT:?}"),
        }
    }
}
