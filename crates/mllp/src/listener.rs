//! The MLLP listener: accepts TCP or TLS connections, decodes frames, hands each one to a
//! [`Handler`] and writes the ACK it returns, in order, on the same connection.
//!
//! Admission happens in this order, cheapest first: IP allow-list, per-IP cap, global cap,
//! then (TLS) the handshake under a deadline, then the client-certificate allow-list. A
//! refused connection is closed at once and counted; nothing of it reaches the handler.
//!
//! Per connection, one task reads, decodes and answers. Frames are handled one after the
//! other, so ACKs leave in the order the frames came in, whether the sender waits for each
//! ACK or pipelines several frames. Two clocks bound a connection: the idle timeout while
//! between frames, and the frame deadline from the start block to the end block
//! (slowloris). ACK writes have their own deadline.
//!
//! Graceful shutdown: the listening socket closes first; then each connection finishes the
//! frame it is receiving (within the frame deadline), answers every frame it has, and
//! closes; connections idle between frames close at once. After the grace period whatever
//! remains is dropped.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use passerelle_hl7::ack::{self, AckError, AckOptions, Outcome, Severity};
use passerelle_hl7::{ErrorCode, HeaderSummary};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::codec::{CodecOptions, Frame, FrameError, MllpCodec, Tolerated, UnframedKind};
use crate::tls::{PeerIdentity, ServerTls};

/// Receives every frame and returns its acknowledgement.
///
/// The contract: return only once the frame is safe. For the durable store that means
/// after the frame's bytes are flushed to disk (or after it is known that they could not
/// be, with a NAK); the listener sends whatever is returned straight to the sender. Calls
/// for one connection are sequential, in arrival order; calls for different connections
/// run concurrently, which is what lets a store commit several frames with one flush.
///
/// `None` sends nothing back: only for a sender that asked for no acknowledgement
/// (enhanced mode, MSH-15 `NE`, or `ER`/`SU` when they say so). A handler must not panic;
/// if it does, only that connection closes.
pub trait Handler: Send + Sync + 'static {
    /// Handles one frame's payload (without the MLLP framing).
    fn handle(&self, frame: Bytes, peer: &PeerInfo) -> impl Future<Output = Option<Bytes>> + Send;
}

impl<H: Handler> Handler for Arc<H> {
    fn handle(&self, frame: Bytes, peer: &PeerInfo) -> impl Future<Output = Option<Bytes>> + Send {
        (**self).handle(frame, peer)
    }
}

/// Who sent a frame.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's address.
    pub addr: SocketAddr,
    /// The listener's name.
    pub listener: Arc<str>,
    /// A number for the connection, unique within the listener, for logs.
    pub connection: u64,
    /// The client certificate's identity, on a mutual TLS connection.
    pub tls: Option<Arc<PeerIdentity>>,
    /// Cancelled once no one waits for an answer any more: the peer closed its side of
    /// the connection (or it broke) while a frame was being handled, or the listener is
    /// shutting down. A handler that is only holding a frame back (backpressure) may then
    /// give up: the frame is neither kept nor answered, and its sender, which got no ACK,
    /// sends it again. (A peer that only half-closed and still reads gets no answer
    /// either; it sends again too.)
    pub abandoned: CancellationToken,
}

/// An IP network, `10.0.0.0/8` or `::1/128`; a bare address means the address alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in this network. IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A CIDR that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid network {0:?}: expected an address or ADDRESS/PREFIX, e.g. 10.0.0.0/8")]
pub struct CidrError(String);

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let err = || CidrError(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = IpAddr::from_str(addr.trim())
            .map_err(|_| err())?
            .to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| err())?,
            None => max,
        };
        if prefix > max {
            return Err(err());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Listener settings. [`ListenerConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// A name for logs and [`PeerInfo::listener`].
    pub name: String,
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Framing limits and leniencies.
    pub codec: CodecOptions,
    /// Most connections open at once. Default 1024.
    pub max_connections: usize,
    /// Most connections open at once from one IP address. Default 64.
    pub max_connections_per_ip: usize,
    /// Networks allowed to connect. Empty: any.
    pub allow: Vec<Cidr>,
    /// A connection silent this long between frames is closed. Default 10 minutes.
    pub idle_timeout: Duration,
    /// Once a start block arrives, the whole frame must arrive within this. Default 60 s.
    pub frame_timeout: Duration,
    /// Deadline for a TLS handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// Deadline for writing an ACK. Default 30 s.
    pub write_timeout: Duration,
    /// TCP keepalive idle time; `None` disables keepalive. Default 60 s.
    pub keepalive: Option<Duration>,
    /// How long graceful shutdown waits for connections to finish. Default 30 s.
    pub shutdown_grace: Duration,
    /// MLLP release 2: send a commit acknowledgement block (`0x06`) once the handler has
    /// returned, before the ACK message. Default off.
    pub commit_acks: bool,
    /// With TLS: how often to check the certificate files and reload them when they
    /// changed. `None`: only on [`ServerTls::reload`]. Default 60 s.
    pub tls_reload_interval: Option<Duration>,
}

impl ListenerConfig {
    /// Defaults for a listener on `bind`.
    pub fn new(bind: SocketAddr) -> ListenerConfig {
        ListenerConfig {
            name: "mllp".to_owned(),
            bind,
            codec: CodecOptions::default(),
            max_connections: 1024,
            max_connections_per_ip: 64,
            allow: Vec::new(),
            idle_timeout: Duration::from_secs(600),
            frame_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            keepalive: Some(Duration::from_secs(60)),
            shutdown_grace: Duration::from_secs(30),
            commit_acks: false,
            tls_reload_interval: Some(Duration::from_secs(60)),
        }
    }
}

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        #[derive(Debug, Default)]
        struct Counters { $($name: AtomicU64,)* }

        /// A snapshot of a listener's counters.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct Stats { $($(#[$doc])* pub $name: u64,)* }

        impl Counters {
            fn snapshot(&self) -> Stats {
                Stats { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Connections admitted (TLS: before the handshake).
    accepted,
    /// Connections open now.
    open,
    /// Refused by the IP allow-list.
    refused_address,
    /// Refused by the global or per-IP connection cap.
    refused_limit,
    /// TLS handshakes that failed or timed out.
    tls_failed,
    /// TLS clients whose certificate is not on the allow-list.
    refused_identity,
    /// Frames handed to the handler.
    frames,
    /// ACKs written.
    acks,
    /// Frames over the size limit (connection closed).
    oversized,
    /// Other framing errors (connection closed).
    protocol_errors,
    /// Runs of bytes received outside a frame that are not filler: data dropped, from a
    /// sender that does not frame its messages or lost a start block (warned, with the
    /// peer and the size; `discarded_bytes` counts their bytes).
    unframed_data,
    /// Connections closed for idleness.
    idle_timeouts,
    /// Connections closed because a frame did not complete in time.
    frame_timeouts,
    /// Connections that closed inside a frame.
    truncated,
    /// Connections closed because an ACK could not be written in time (a peer that
    /// does not read its ACKs).
    write_timeouts,
    /// Tolerated: filler bytes between frames.
    filler_bytes,
    /// Tolerated: other bytes before a start block.
    discarded_bytes,
    /// Tolerated: end blocks without CR.
    missing_cr,
    /// Tolerated: unfinished frames abandoned for a new start block.
    abandoned_frames,
}

impl Counters {
    fn add_tolerated(&self, t: &Tolerated) {
        self.filler_bytes
            .fetch_add(t.filler_bytes, Ordering::Relaxed);
        self.discarded_bytes
            .fetch_add(t.discarded_bytes, Ordering::Relaxed);
        self.missing_cr.fetch_add(t.missing_cr, Ordering::Relaxed);
        self.abandoned_frames
            .fetch_add(t.abandoned_frames, Ordering::Relaxed);
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A bound listener, not serving yet.
pub struct Listener {
    tcp: TcpListener,
    config: Arc<ListenerConfig>,
    tls: Option<Arc<ServerTls>>,
    counters: Arc<Counters>,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.tcp.local_addr().ok())
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Shared state of the running accept loop.
struct Shared<H> {
    config: Arc<ListenerConfig>,
    tls: Option<Arc<ServerTls>>,
    counters: Arc<Counters>,
    handler: H,
    /// Graceful: finish frames in progress, then close.
    stop: CancellationToken,
    /// Forced: close now.
    kill: CancellationToken,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
}

/// One connection's place in the per-IP count, given back on drop.
struct IpSlot<H> {
    shared: Arc<Shared<H>>,
    ip: IpAddr,
}

impl<H> Drop for IpSlot<H> {
    fn drop(&mut self) {
        let mut map = self
            .shared
            .per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
        self.shared.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Listener {
    /// Binds the listening socket. `tls`: serve TLS only on this port.
    pub async fn bind(config: ListenerConfig, tls: Option<ServerTls>) -> io::Result<Listener> {
        let tcp = TcpListener::bind(config.bind).await?;
        Ok(Listener {
            tcp,
            config: Arc::new(config),
            tls: tls.map(Arc::new),
            counters: Arc::default(),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The TLS state, to reload certificates.
    pub fn tls(&self) -> Option<Arc<ServerTls>> {
        self.tls.clone()
    }

    /// Serves until `shutdown` completes, then shuts down gracefully and returns the
    /// final counters.
    pub async fn serve<H: Handler>(self, handler: H, shutdown: impl Future<Output = ()>) -> Stats {
        let shared = Arc::new(Shared {
            slots: Arc::new(Semaphore::new(self.config.max_connections)),
            config: self.config,
            tls: self.tls,
            counters: self.counters,
            handler,
            stop: CancellationToken::new(),
            kill: CancellationToken::new(),
            per_ip: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        let tracker = TaskTracker::new();
        let name = shared.config.name.clone();
        info!(listener = %name, addr = ?self.tcp.local_addr().ok(), tls = shared.tls.is_some(), "listening");
        if let (Some(tls), Some(every)) = (shared.tls.clone(), shared.config.tls_reload_interval) {
            let stop = shared.stop.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => match tls.reload_if_changed() {
                            Ok(true) => info!(listener = %name, "TLS certificates reloaded"),
                            Ok(false) => {}
                            Err(e) => warn!(listener = %name, error = %e, "TLS reload failed; keeping the previous certificates"),
                        },
                    }
                }
            });
        }
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, addr)) => admit(&shared, &tracker, stream, addr),
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning on accept.
                        warn!(listener = %name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(self.tcp);
        info!(listener = %name, open = shared.counters.open.load(Ordering::Relaxed), "stopped accepting; draining connections");
        shared.stop.cancel();
        tracker.close();
        if timeout(shared.config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            warn!(listener = %name, open = shared.counters.open.load(Ordering::Relaxed), "grace period over; closing remaining connections");
            shared.kill.cancel();
            tracker.wait().await;
        }
        let stats = shared.counters.snapshot();
        info!(listener = %name, frames = stats.frames, acks = stats.acks, "listener closed");
        stats
    }

    /// Serves in a background task; the returned handle shuts it down.
    pub fn spawn<H: Handler>(self, handler: H) -> RunningListener {
        let addr = self.tcp.local_addr().unwrap_or(self.config.bind);
        let counters = self.counters.clone();
        let tls = self.tls.clone();
        let stop = CancellationToken::new();
        let signal = stop.clone();
        let task = tokio::spawn(self.serve(handler, async move { signal.cancelled().await }));
        RunningListener {
            addr,
            counters,
            tls,
            stop,
            task,
        }
    }
}

/// A listener serving in the background.
#[derive(Debug)]
pub struct RunningListener {
    addr: SocketAddr,
    counters: Arc<Counters>,
    tls: Option<Arc<ServerTls>>,
    stop: CancellationToken,
    task: JoinHandle<Stats>,
}

impl RunningListener {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// The TLS state, to reload certificates.
    pub fn tls(&self) -> Option<Arc<ServerTls>> {
        self.tls.clone()
    }

    /// Graceful shutdown; returns the final counters.
    pub async fn shutdown(self) -> Stats {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

fn admit<H: Handler>(
    shared: &Arc<Shared<H>>,
    tracker: &TaskTracker,
    stream: TcpStream,
    addr: SocketAddr,
) {
    let config = &shared.config;
    let ip = addr.ip().to_canonical();
    if !config.allow.is_empty() && !config.allow.iter().any(|n| n.contains(ip)) {
        bump(&shared.counters.refused_address);
        warn!(listener = %config.name, peer = %addr, "connection refused: address not in the allow-list");
        return;
    }
    let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
        bump(&shared.counters.refused_limit);
        warn!(listener = %config.name, peer = %addr, max = config.max_connections, "connection refused: too many connections");
        return;
    };
    {
        let mut map = shared
            .per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(ip).or_insert(0);
        if *n >= config.max_connections_per_ip {
            drop(map);
            bump(&shared.counters.refused_limit);
            warn!(listener = %config.name, peer = %addr, max = config.max_connections_per_ip, "connection refused: too many connections from this address");
            return;
        }
        *n += 1;
    }
    bump(&shared.counters.open);
    bump(&shared.counters.accepted);
    let slot = IpSlot {
        shared: shared.clone(),
        ip,
    };
    tune(&stream, config, addr);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let shared = shared.clone();
    tracker.spawn(async move {
        let _permit: OwnedSemaphorePermit = permit;
        let _slot = slot;
        let mut peer = PeerInfo {
            addr,
            listener: Arc::from(shared.config.name.as_str()),
            connection: id,
            tls: None,
            abandoned: CancellationToken::new(),
        };
        debug!(listener = %shared.config.name, peer = %addr, connection = id, "connection opened");
        match shared.tls.clone() {
            None => connection(&shared, stream, &peer).await,
            Some(tls) => {
                let handshake = tokio::select! {
                    _ = shared.kill.cancelled() => return,
                    r = timeout(shared.config.handshake_timeout, tls.acceptor().accept(stream)) => r,
                };
                let stream = match handshake {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) if not_a_handshake(&e) => {
                        bump(&shared.counters.tls_failed);
                        warn!(listener = %shared.config.name, peer = %addr, connection = id, error = %e, "TLS handshake failed: the peer did not start one (a sender without TLS?)");
                        return;
                    }
                    Ok(Err(e)) => {
                        bump(&shared.counters.tls_failed);
                        warn!(listener = %shared.config.name, peer = %addr, connection = id, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        bump(&shared.counters.tls_failed);
                        warn!(listener = %shared.config.name, peer = %addr, connection = id, "TLS handshake timed out");
                        return;
                    }
                };
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| PeerIdentity::from_der(c));
                if !tls.allows(identity.as_ref()) {
                    bump(&shared.counters.refused_identity);
                    warn!(listener = %shared.config.name, peer = %addr, connection = id,
                        subject = identity.as_ref().map(|i| i.subject.as_str()).unwrap_or("none"),
                        "connection refused: client certificate not in the allow-list");
                    let mut stream = stream;
                    let _ = timeout(Duration::from_secs(1), stream.shutdown()).await;
                    return;
                }
                if let Some(identity) = &identity {
                    debug!(peer = %addr, connection = id, subject = %identity.subject, "TLS client authenticated");
                }
                peer.tls = identity.map(Arc::new);
                connection(&shared, stream, &peer).await;
            }
        }
    });
}

/// No Nagle delay for ACKs; keepalive so that peers gone without a FIN (NAT timeouts,
/// pulled cables: Mirth connect#1889) are noticed.
fn tune(stream: &TcpStream, config: &ListenerConfig, addr: SocketAddr) {
    let _ = stream.set_nodelay(true);
    if let Some(idle) = config.keepalive {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(10))
            .with_retries(5);
        if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
            debug!(peer = %addr, error = %e, "cannot set TCP keepalive");
        }
    }
}

enum Close {
    Done,
    Eof,
}

async fn connection<H: Handler, S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared<H>,
    mut stream: S,
    peer: &PeerInfo,
) {
    let mut codec = MllpCodec::new(shared.config.codec.clone());
    let result = serve_connection(shared, &mut stream, peer, &mut codec).await;
    note_unframed(shared, peer, &mut codec, true);
    let tolerated = codec.tolerated();
    shared.counters.add_tolerated(&tolerated);
    let deviations = tolerated.deviations();
    match result {
        Ok(_) => {
            let _ = timeout(Duration::from_secs(1), stream.shutdown()).await;
        }
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            warn!(peer = %peer.addr, connection = peer.connection, "the peer does not read its ACKs; connection closed")
        }
        Err(e) => {
            debug!(peer = %peer.addr, connection = peer.connection, error = %e, "connection error")
        }
    }
    if deviations.is_empty() {
        debug!(listener = %peer.listener, peer = %peer.addr, connection = peer.connection, frames = tolerated.frames, "connection closed");
    } else {
        info!(listener = %peer.listener, peer = %peer.addr, connection = peer.connection, frames = tolerated.frames, tolerated = ?deviations, "connection closed");
    }
}

/// Whether a failed handshake failed because the peer sent something else than TLS (an
/// MLLP frame, most likely: a sender set up without TLS).
fn not_a_handshake(e: &io::Error) -> bool {
    matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType
        ))
    )
}

/// Warns about, and counts, each run of unframed data the codec has finished (with
/// `at_end`, also the one under way): bytes a sender meant as a message, or part of one,
/// that nobody will read. Only their size and kind are told, never their content.
fn note_unframed<H>(
    shared: &Shared<H>,
    peer: &PeerInfo,
    codec: &mut MllpCodec,
    at_end: bool,
) -> Option<UnframedKind> {
    let unframed = codec.take_unframed(at_end)?;
    bump(&shared.counters.unframed_data);
    warn!(listener = %peer.listener, peer = %peer.addr, connection = peer.connection,
        bytes = unframed.bytes, looks_like = unframed.kind.name(),
        "bytes received outside an MLLP frame were dropped: {}", unframed.kind.hint());
    Some(unframed.kind)
}

async fn write_all<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
    deadline: Duration,
    counters: &Counters,
) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let result = timeout(deadline, async {
        stream.write_all(out).await?;
        stream.flush().await
    })
    .await;
    out.clear();
    match result {
        Ok(r) => r,
        Err(_) => {
            bump(&counters.write_timeouts);
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "ACK write timed out",
            ))
        }
    }
}

/// What is read ahead of the frame being handled, at most (the next frames of a sender
/// that does not wait for its ACKs; the codec bounds a frame only when it decodes it).
const READ_AHEAD: usize = 1 << 20;

async fn serve_connection<H: Handler, S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared<H>,
    stream: &mut S,
    peer: &PeerInfo,
    codec: &mut MllpCodec,
) -> io::Result<Close> {
    let config = &shared.config;
    let counters = &shared.counters;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out = BytesMut::new();
    let mut frame_started: Option<Instant> = None;
    let mut last_activity = Instant::now();
    loop {
        // Answer every complete frame already received, in order.
        loop {
            let decoded = codec.decode(&mut buf);
            if note_unframed(shared, peer, codec, false) == Some(UnframedKind::Tls) {
                // A TLS client will never frame: what the codec found in its handshake's
                // bytes is no message to keep or answer.
                return Ok(Close::Done);
            }
            match decoded {
                Ok(Some(Frame::Message(payload))) => {
                    bump(&counters.frames);
                    let size = payload.len();
                    let handling = shared.handler.handle(payload, peer);
                    tokio::pin!(handling);
                    // While the handler works (or holds the frame back), keep reading: a
                    // peer that closes is seen, and said to the handler, at once.
                    let mut eof = false;
                    let reply = loop {
                        tokio::select! {
                            biased;
                            // Only after the shutdown grace period: drop the handler's work.
                            _ = shared.kill.cancelled() => return Ok(Close::Done),
                            reply = &mut handling => break reply,
                            _ = shared.stop.cancelled(), if !peer.abandoned.is_cancelled() => {
                                peer.abandoned.cancel();
                            }
                            read = stream.read_buf(&mut buf), if !eof && buf.len() < READ_AHEAD => {
                                if !matches!(read, Ok(n) if n > 0) {
                                    eof = true;
                                    peer.abandoned.cancel();
                                }
                            }
                        }
                    };
                    if config.commit_acks {
                        codec.encode(Frame::CommitAck, &mut out)?;
                    }
                    match reply {
                        Some(ack) => {
                            codec.encode(ack, &mut out)?;
                            bump(&counters.acks);
                        }
                        None => {
                            debug!(peer = %peer.addr, connection = peer.connection, size, "no acknowledgement requested")
                        }
                    }
                }
                Ok(Some(other)) => {
                    debug!(peer = %peer.addr, connection = peer.connection, frame = ?other, "commit block from the peer ignored");
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { max, head }) => {
                    bump(&counters.oversized);
                    warn!(peer = %peer.addr, connection = peer.connection, max, "frame over the size limit; answering AR and closing the connection");
                    let nak = too_large_nak(&head, max);
                    codec.encode(Bytes::from(nak), &mut out)?;
                    write_all(stream, &mut out, config.write_timeout, counters).await?;
                    linger(stream).await;
                    return Ok(Close::Done);
                }
                Err(e) => {
                    bump(&counters.protocol_errors);
                    warn!(peer = %peer.addr, connection = peer.connection, error = %e, "MLLP framing error; closing the connection");
                    write_all(stream, &mut out, config.write_timeout, counters).await?;
                    return Ok(Close::Done);
                }
            }
        }
        if !out.is_empty() {
            write_all(stream, &mut out, config.write_timeout, counters).await?;
            last_activity = Instant::now();
        }
        if codec.in_frame() {
            frame_started.get_or_insert_with(Instant::now);
        } else {
            frame_started = None;
            if shared.stop.is_cancelled() {
                return Ok(Close::Done);
            }
        }
        let deadline = match frame_started {
            Some(t) => t + config.frame_timeout,
            None => last_activity + config.idle_timeout,
        };
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        let in_frame = codec.in_frame();
        tokio::select! {
            biased;
            _ = shared.kill.cancelled() => return Ok(Close::Done),
            _ = shared.stop.cancelled(), if !in_frame => {
                // Bytes already received are in flight: take them without waiting, and
                // finish their frame before closing.
                match timeout(Duration::ZERO, stream.read_buf(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => last_activity = Instant::now(),
                    _ => return Ok(Close::Done),
                }
            }
            read = stream.read_buf(&mut buf) => match read? {
                0 => {
                    if codec.in_frame() {
                        bump(&counters.truncated);
                        warn!(peer = %peer.addr, connection = peer.connection, received = buf.len(), "peer closed the connection inside a frame; nothing to answer");
                    }
                    return Ok(Close::Eof);
                }
                _ => last_activity = Instant::now(),
            },
            () = sleep_until(deadline) => {
                if in_frame {
                    bump(&counters.frame_timeouts);
                    warn!(peer = %peer.addr, connection = peer.connection, received = buf.len(), timeout_s = config.frame_timeout.as_secs_f64(), "frame not completed in time; closing the connection");
                } else {
                    bump(&counters.idle_timeouts);
                    debug!(peer = %peer.addr, connection = peer.connection, "idle connection closed");
                }
                return Ok(Close::Done);
            }
        }
    }
}

/// After refusing a frame mid-stream: stop writing, and read (and drop) what the sender
/// still sends for a short while, so that closing does not reset the connection before
/// the sender has read the NAK.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let _ = timeout(Duration::from_secs(1), stream.shutdown()).await;
    let mut sink = vec![0u8; 64 * 1024];
    let _ = timeout(Duration::from_secs(2), async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// AR for a frame refused for its size; MSA-2 names the message when its header is in
/// the first bytes.
fn too_large_nak(head: &[u8], max: usize) -> Vec<u8> {
    let header = HeaderSummary::salvage(head);
    ack::build(
        header.as_ref(),
        Outcome::Reject,
        &[AckError {
            code: ErrorCode::ApplicationInternalError,
            severity: Severity::Error,
            location: None,
            text: format!("message exceeds the maximum frame size of {max} bytes"),
        }],
        &AckOptions::default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let any: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(any.contains("1.2.3.4".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
    }

    #[tokio::test]
    async fn accepted_sockets_get_keepalive_and_nodelay() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = tcp.accept().await.unwrap();
        let mut config = ListenerConfig::new(addr);
        config.keepalive = Some(Duration::from_secs(42));
        tune(&stream, &config, peer);
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(42));
        assert!(stream.nodelay().unwrap());
    }

    #[test]
    fn too_large_nak_names_the_message() {
        let nak = too_large_nak(
            b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|CTRL9|P|2.5\rOBX|1|ED|",
            100,
        );
        let text = String::from_utf8(nak).unwrap();
        assert!(text.contains("\rMSA|AR|CTRL9"), "{text}");
        assert!(text.contains("maximum frame size"), "{text}");
    }
}
