//! The listener and the client against each other and against raw, misbehaving sockets:
//! ordering, quirks, NAKs, limits, timeouts, allow-lists, graceful shutdown, ACK matching
//! and reconnects.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use passerelle_hl7::HeaderSummary;
use passerelle_mllp::codec::frame;
use passerelle_mllp::{Client, ClientConfig, ClientError, Handler, ParseAckHandler, PeerInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

#[tokio::test]
async fn pipelined_frames_are_answered_in_order_with_quirks_tolerated() {
    let server = start_parser(config()).await;
    let mut raw = Raw::connect(server.local_addr()).await;
    // 20 frames in one write: NULs and CR/LF between frames, some end blocks without CR,
    // garbage before the first start block.
    let mut bytes = b"junk".to_vec();
    for i in 0..20 {
        bytes.push(0x0B);
        bytes.extend_from_slice(&message(&format!("P{i}")));
        bytes.push(0x1C);
        if i % 3 != 0 {
            bytes.push(b'\r');
        }
        if i % 2 == 0 {
            bytes.extend_from_slice(b"\0\0\r\n");
        }
    }
    raw.write(&bytes).await;
    for i in 0..20 {
        let ack = raw.read_ack().await.expect("an ACK");
        assert_eq!(ack.code, "AA");
        assert_eq!(ack.control_id, format!("P{i}"));
    }
    drop(raw);
    let stats = server.shutdown().await;
    assert_eq!(stats.frames, 20);
    assert_eq!(stats.acks, 20);
    assert_eq!(stats.discarded_bytes, 4);
    assert!(stats.missing_cr >= 6, "{stats:?}");
    assert!(stats.filler_bytes >= 40, "{stats:?}");
}

#[tokio::test]
async fn one_message_per_connection_senders() {
    let server = start_parser(config()).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let addr = server.local_addr();
        tasks.push(tokio::spawn(async move {
            let mut raw = Raw::connect(addr).await;
            raw.send(&message(&format!("C{i}"))).await;
            // Half-close, as some senders do, then wait for the ACK.
            raw.stream.shutdown().await.unwrap();
            let ack = raw.read_ack().await.expect("an ACK after half-close");
            assert_eq!(ack.control_id, format!("C{i}"));
            assert!(raw.closed().await);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = server.shutdown().await;
    assert_eq!(stats.accepted, 20);
    assert_eq!(stats.acks, 20);
}

#[tokio::test]
async fn malformed_frames_get_naks_with_reasons() {
    let server = start_parser(config()).await;
    let mut raw = Raw::connect(server.local_addr()).await;

    raw.send(b"this is not HL7 at all").await;
    let ack = raw.read_ack().await.unwrap();
    assert_eq!(ack.code, "AR");
    assert_eq!(ack.control_id, "");
    assert!(
        String::from_utf8_lossy(&ack.bytes).contains("\rERR|"),
        "{ack:?}"
    );
    assert!(ack.text.is_some());

    // Readable header, no MSH-9: refused but named.
    raw.send(b"MSH|^~\\&|SND|FAC|RCV|FAC|20240101|||BAD1|P|2.5\rPID|1\r")
        .await;
    let ack = raw.read_ack().await.unwrap();
    assert!(ack.code == "AR" || ack.code == "AE", "{ack:?}");
    assert_eq!(ack.control_id, "BAD1");
    assert!(ack.text.is_some());

    // The connection still works.
    raw.send(&message("GOOD")).await;
    assert_eq!(raw.read_ack().await.unwrap().code, "AA");
    drop(raw);
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_frame_closes_that_connection_only() {
    let mut c = config();
    c.codec.max_frame_size = 4096;
    let server = start_parser(c).await;
    let mut good = Raw::connect(server.local_addr()).await;
    good.send(&message("G1")).await;
    assert_eq!(good.read_ack().await.unwrap().control_id, "G1");

    let mut bad = Raw::connect(server.local_addr()).await;
    let mut big = message("BIG1");
    big.extend_from_slice(b"OBX|1|ED|PDF||");
    big.extend(std::iter::repeat_n(b'A', 64 * 1024));
    big.push(b'\r');
    // The server answers and closes while we are still writing: ignore write errors.
    let _ = bad.stream.write_all(&frame(&big)).await;
    let nak = bad.read_ack().await.expect("a NAK before the close");
    assert_eq!(nak.code, "AR");
    assert_eq!(nak.control_id, "BIG1");
    assert!(nak.text.unwrap().contains("maximum frame size"));
    assert!(bad.closed().await);

    good.send(&message("G2")).await;
    assert_eq!(good.read_ack().await.unwrap().control_id, "G2");
    drop(good);
    let stats = server.shutdown().await;
    assert_eq!(stats.oversized, 1);
}

#[tokio::test]
async fn idle_and_slow_connections_do_not_block_a_real_sender() {
    let mut c = config();
    c.max_connections = 500;
    c.max_connections_per_ip = 500;
    let server = start_parser(c).await;
    let addr = server.local_addr();
    let mut hogs = Vec::new();
    for i in 0..200 {
        let mut raw = Raw::connect(addr).await;
        if i % 2 == 0 {
            // Slowloris: a frame started, never finished.
            raw.write(b"\x0bMSH|^~\\&|SLOW|").await;
        }
        hogs.push(raw);
    }
    let mut client = Client::new(ClientConfig::new(addr.to_string())).unwrap();
    let started = std::time::Instant::now();
    for i in 0..50 {
        let ack = client.send(&message(&format!("R{i}"))).await.unwrap();
        assert_eq!(ack.code, "AA");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(server.stats().open, 201);
    drop(hogs);
    client.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn frame_deadline_and_idle_timeout_close_connections() {
    let mut c = config();
    c.frame_timeout = Duration::from_millis(300);
    c.idle_timeout = Duration::from_millis(600);
    let server = start_parser(c).await;

    let mut slow = Raw::connect(server.local_addr()).await;
    slow.write(b"\x0bMSH|^~\\&|").await;
    let t = std::time::Instant::now();
    assert!(slow.closed().await);
    assert!(t.elapsed() >= Duration::from_millis(250));

    let mut idle = Raw::connect(server.local_addr()).await;
    idle.send(&message("I1")).await;
    assert_eq!(idle.read_ack().await.unwrap().code, "AA");
    let t = std::time::Instant::now();
    assert!(idle.closed().await);
    assert!(t.elapsed() >= Duration::from_millis(500));

    let stats = server.shutdown().await;
    assert_eq!(stats.frame_timeouts, 1);
    assert_eq!(stats.idle_timeouts, 1);
}

#[tokio::test]
async fn ip_allow_list() {
    let mut c = config();
    c.allow = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
    let server = start_parser(c).await;
    let mut raw = Raw::connect(server.local_addr()).await;
    let _ = raw.stream.write_all(&frame(&message("X"))).await;
    assert!(raw.closed().await, "a loopback client must be refused");
    let stats = server.shutdown().await;
    assert_eq!(stats.refused_address, 1);
    assert_eq!(stats.frames, 0);

    let mut c = config();
    c.allow = vec!["127.0.0.0/8".parse().unwrap()];
    let server = start_parser(c).await;
    let mut raw = Raw::connect(server.local_addr()).await;
    raw.send(&message("Y")).await;
    assert_eq!(raw.read_ack().await.unwrap().control_id, "Y");
    drop(raw);
    assert_eq!(server.shutdown().await.refused_address, 0);
}

#[tokio::test]
async fn connection_caps() {
    let mut c = config();
    c.max_connections_per_ip = 2;
    let server = start_parser(c).await;
    let mut a = Raw::connect(server.local_addr()).await;
    let mut b = Raw::connect(server.local_addr()).await;
    // Make sure both are admitted before the third arrives.
    a.send(&message("A")).await;
    assert!(a.read_ack().await.is_some());
    b.send(&message("B")).await;
    assert!(b.read_ack().await.is_some());
    let mut third = Raw::connect(server.local_addr()).await;
    assert!(third.closed().await);
    assert_eq!(server.stats().refused_limit, 1);
    // A slot frees up when a connection closes.
    drop(a);
    let mut fourth = loop {
        let mut r = Raw::connect(server.local_addr()).await;
        let _ = r.stream.write_all(&frame(&message("D"))).await;
        if let Some(ack) = r.read_ack().await {
            assert_eq!(ack.control_id, "D");
            break r;
        }
        tokio::task::yield_now().await;
    };
    fourth.send(&message("E")).await;
    assert!(fourth.read_ack().await.is_some());
    drop((b, fourth));
    server.shutdown().await;

    // The global cap.
    let mut c = config();
    c.max_connections = 1;
    let server = start_parser(c).await;
    let mut only = Raw::connect(server.local_addr()).await;
    only.send(&message("ONLY")).await;
    assert!(only.read_ack().await.is_some());
    let mut second = Raw::connect(server.local_addr()).await;
    assert!(second.closed().await);
    only.send(&message("STILL")).await;
    assert_eq!(only.read_ack().await.unwrap().control_id, "STILL");
    drop(only);
    assert_eq!(server.shutdown().await.refused_limit, 1);
}

/// Blocks each frame until the test releases it, and reports that it started.
struct Gated {
    gate: Semaphore,
    started: mpsc::UnboundedSender<String>,
}

impl Handler for Gated {
    async fn handle(&self, frame: Bytes, peer: &PeerInfo) -> Option<Bytes> {
        let id = HeaderSummary::salvage(&frame)
            .map(|h| h.control_id)
            .unwrap_or_default();
        let _ = self.started.send(id);
        self.gate.acquire().await.unwrap().forget();
        ParseAckHandler::default().handle(frame, peer).await
    }
}

#[tokio::test]
async fn graceful_shutdown_answers_in_flight_frames_then_closes() {
    let (tx, mut started) = mpsc::unbounded_channel();
    let handler = Arc::new(Gated {
        gate: Semaphore::new(0),
        started: tx,
    });
    let server = start(config(), None, handler.clone()).await;
    let addr = server.local_addr();

    // A connection idle between frames when shutdown begins.
    let mut idle = Raw::connect(addr).await;
    idle.send(&message("IDLE")).await;
    assert_eq!(started.recv().await.unwrap(), "IDLE");
    handler.gate.add_permits(1);
    assert_eq!(idle.read_ack().await.unwrap().control_id, "IDLE");
    // A frame inside the handler when shutdown begins.
    let mut busy = Raw::connect(addr).await;
    busy.send(&message("INFLIGHT")).await;
    assert_eq!(started.recv().await.unwrap(), "INFLIGHT");
    // A frame half received when shutdown begins.
    let mut half = Raw::connect(addr).await;
    let whole = frame(&message("HALF"));
    half.write(&whole[..20]).await;

    let shutdown = tokio::spawn(server.shutdown());
    // New connections are refused once the listening socket is closed.
    tokio::time::timeout(WAIT, async {
        loop {
            match tokio::net::TcpStream::connect(addr).await {
                Err(_) => break,
                Ok(s) => {
                    drop(s);
                    tokio::task::yield_now().await;
                }
            }
        }
    })
    .await
    .expect("the listening socket closes");
    assert!(idle.closed().await, "an idle connection closes at once");
    half.write(&whole[20..]).await;
    handler.gate.add_permits(10);
    assert_eq!(started.recv().await.unwrap(), "HALF");
    let ack = half.read_ack().await.expect("the half frame is answered");
    assert_eq!(ack.control_id, "HALF");
    assert!(half.closed().await);
    let ack = busy
        .read_ack()
        .await
        .expect("the frame in the handler is answered");
    assert_eq!(ack.control_id, "INFLIGHT");
    assert!(busy.closed().await);
    let stats = tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
    assert_eq!(stats.frames, 3);
    assert_eq!(stats.acks, 3);
    assert_eq!(stats.open, 0);
}

/// Answers slowly for control ids starting with SLOW, and with a wrong MSA-2 for WRONG.
struct Quirky;

impl Handler for Quirky {
    async fn handle(&self, frame: Bytes, peer: &PeerInfo) -> Option<Bytes> {
        let id = HeaderSummary::salvage(&frame)
            .map(|h| h.control_id)
            .unwrap_or_default();
        if id.starts_with("SLOW") {
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
        if id == "WRONG" {
            let other = String::from_utf8_lossy(&frame).replace("WRONG", "OTHER");
            return ParseAckHandler::default()
                .handle(Bytes::from(other.into_bytes()), peer)
                .await;
        }
        ParseAckHandler::default().handle(frame, peer).await
    }
}

#[tokio::test]
async fn client_never_takes_a_late_ack_for_the_next_message() {
    let server = start(config(), None, Quirky).await;
    let mut cfg = ClientConfig::new(server.local_addr().to_string());
    cfg.ack_timeout = Duration::from_millis(200);
    let mut client = Client::new(cfg).unwrap();
    let err = client.send(&message("SLOW1")).await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    // The late ACK for SLOW1 must not be read as the answer to NEXT.
    let ack = client.send(&message("NEXT")).await.unwrap();
    assert_eq!(ack.control_id, "NEXT");
    assert_eq!(client.connections(), 2);

    let err = client.send(&message("WRONG")).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Mismatch { ref got, .. } if got == "OTHER"),
        "{err}"
    );
    let ack = client.send(&message("AFTER")).await.unwrap();
    assert_eq!(ack.control_id, "AFTER");
    assert_eq!(client.connections(), 3);
    client.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn client_reconnects_to_a_server_that_closes_after_each_message() {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let server = tokio::spawn(async move {
        for _ in 0..3 {
            let (stream, _) = tcp.accept().await.unwrap();
            let mut raw = Raw::new(stream);
            let payload = read_frame(&mut raw.stream, &mut raw.codec, &mut raw.buf)
                .await
                .unwrap();
            let (_, ack) = ParseAckHandler::default().answer(&payload);
            raw.send(&ack.unwrap()).await;
            // Close right after answering, as hl7apy's server does.
        }
    });
    let mut client = Client::new(ClientConfig::new(addr.to_string())).unwrap();
    for i in 0..3 {
        let ack = client.send(&message(&format!("R{i}"))).await.unwrap();
        assert_eq!(ack.control_id, format!("R{i}"));
    }
    assert_eq!(client.connections(), 3);
    tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
}

#[tokio::test]
async fn client_gives_up_after_bounded_attempts() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = ClientConfig::new(format!("127.0.0.1:{port}"));
    cfg.connect_attempts = 3;
    cfg.backoff_initial = Duration::from_millis(10);
    let mut client = Client::new(cfg).unwrap();
    let err = client.send(&message("X")).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Connect { attempts: 3, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn client_refuses_a_message_without_control_id() {
    let mut client = Client::new(ClientConfig::new("127.0.0.1:9")).unwrap();
    let err = client
        .send(b"MSH|^~\\&|A|B|C|D|2024||ADT^A01||P|2.5\r")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NoControlId));
}

#[tokio::test]
async fn mllp_release_2_commit_blocks() {
    let mut c = config();
    c.commit_acks = true;
    let server = start_parser(c).await;
    let mut raw = Raw::connect(server.local_addr()).await;
    raw.send(&message("R2")).await;
    let mut first = [0u8; 4];
    tokio::time::timeout(WAIT, raw.stream.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&first, b"\x0b\x06\x1c\r");
    assert_eq!(raw.read_ack().await.unwrap().control_id, "R2");
    // The client skips the commit block and reads the ACK.
    let mut client = Client::new(ClientConfig::new(server.local_addr().to_string())).unwrap();
    assert_eq!(client.send(&message("R2C")).await.unwrap().code, "AA");
    drop(raw);
    client.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_sender_that_never_reads_its_acks_is_disconnected() {
    let mut c = config();
    c.write_timeout = Duration::from_millis(300);
    let server = start_parser(c).await;
    // A small receive buffer so that unread ACKs fill the pipe quickly.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = tokio::time::timeout(WAIT, socket.connect(server.local_addr()))
        .await
        .unwrap()
        .unwrap();
    let mut burst = Vec::new();
    for i in 0..100 {
        burst.extend_from_slice(&frame(&message(&format!("W{i}"))));
    }
    // Keep sending, never read: the server must give up on this connection.
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            if stream.write_all(&burst).await.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the server kept a connection that never reads"
    );
    let stats = server.shutdown().await;
    assert_eq!(stats.write_timeouts, 1);
    // It was answered until its unread ACKs filled the connection.
    assert!(stats.acks > 0);
}

#[tokio::test]
async fn ipv6_listener_and_allow_list() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback on this machine");
        return;
    }
    let mut c = config();
    c.bind = "[::1]:0".parse().unwrap();
    c.allow = vec!["::1/128".parse().unwrap()];
    let server = start_parser(c).await;
    let mut client = Client::new(ClientConfig::new(server.local_addr().to_string())).unwrap();
    assert_eq!(client.send(&message("V6")).await.unwrap().control_id, "V6");
    client.close().await;
    server.shutdown().await;

    let mut c = config();
    c.bind = "[::1]:0".parse().unwrap();
    c.allow = vec!["127.0.0.0/8".parse().unwrap()];
    let server = start_parser(c).await;
    let mut raw = Raw::connect(server.local_addr()).await;
    assert!(raw.closed().await);
    assert_eq!(server.shutdown().await.refused_address, 1);
}
