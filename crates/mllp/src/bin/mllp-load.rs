//! `mllp-load`: an MLLP load generator for ACK round-trip benchmarks on loopback.
//!
//! Opens `--connections` connections to an MLLP receiver; each keeps `--window` messages
//! in flight (pipelining; 1 = send, wait for the ACK, send the next). Every message has a
//! unique MSH-10, and every ACK's MSA-2 is checked against the oldest message in flight
//! on its connection: a mismatch stops that connection and counts as an error. The run
//! stops after `--count` messages or `--duration` seconds, whichever comes first, waits
//! (bounded) for the ACKs in flight, and prints msgs/s and ACK latency percentiles.
//!
//! `--patients N` spreads the messages over N patient identifiers (PID-3), message `i`
//! naming patient `i mod N`: an engine that keeps order per patient can deliver N of
//! them side by side. The default, 1, puts every message in one ordering key.
//!
//! `--spawn CMD ARGS...` (last option) starts the receiver itself, reads the port from
//! the first line it prints containing `listening on` or `starting on`, runs the load,
//! and kills it.
//!
//! ```text
//! mllp-load --to 127.0.0.1:2575 --connections 64 --window 1 --count 20000
//! mllp-load --connections 1 --spawn passerelle serve --listen 127.0.0.1:0
//! ```

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use passerelle_mllp::{Ack, Frame, MllpCodec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

const USAGE: &str = "usage: mllp-load [--to HOST:PORT] [--connections N] [--window W] \
[--count N] [--duration SECS] [--ack-timeout SECS] [--patients N] [--label NAME] [--json] \
[--spawn CMD ARGS...]";

#[derive(Debug, Clone)]
struct Options {
    to: Option<String>,
    connections: usize,
    window: usize,
    count: u64,
    duration: Duration,
    ack_timeout: Duration,
    patients: u64,
    label: Option<String>,
    json: bool,
    spawn: Vec<String>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        to: None,
        connections: 1,
        window: 1,
        count: 20_000,
        duration: Duration::from_secs(20),
        ack_timeout: Duration::from_secs(10),
        patients: 1,
        label: None,
        json: false,
        spawn: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        let number = |v: String| v.parse::<f64>().map_err(|_| format!("not a number: {v}"));
        match arg.as_str() {
            "--to" => o.to = Some(value()?),
            "--connections" => o.connections = number(value()?)?.max(1.0) as usize,
            "--window" => o.window = number(value()?)?.max(1.0) as usize,
            "--count" => o.count = number(value()?)?.max(1.0) as u64,
            "--duration" => o.duration = Duration::from_secs_f64(number(value()?)?),
            "--ack-timeout" => o.ack_timeout = Duration::from_secs_f64(number(value()?)?),
            "--patients" => o.patients = number(value()?)?.max(1.0) as u64,
            "--label" => o.label = Some(value()?),
            "--json" => o.json = true,
            "--spawn" => {
                o.spawn = args.by_ref().collect();
                if o.spawn.is_empty() {
                    return Err("--spawn needs a command".to_owned());
                }
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if o.to.is_none() && o.spawn.is_empty() {
        return Err(USAGE.to_owned());
    }
    Ok(o)
}

/// The receiver started by `--spawn`, killed on drop.
struct Spawned(std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The port in `listening on 127.0.0.1:4242 (mllp)` or `MLLPFactory starting on 4242`.
fn port_after_on(line: &str) -> Option<u16> {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "on" {
            let next = words.next()?;
            let port = next.rsplit(':').next()?;
            let digits: String = port.chars().take_while(char::is_ascii_digit).collect();
            return digits.parse().ok();
        }
    }
    None
}

fn spawn(command: &[String]) -> Result<(Spawned, String), String> {
    let (program, args) = command.split_first().ok_or("empty command")?;
    let mut child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            // Keep draining so the receiver never blocks on a full pipe.
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let guard = Spawned(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .map_err(|_| format!("{program} printed no port within 30 s"))?;
        if (line.contains("listening on") || line.contains("starting on"))
            && let Some(port) = port_after_on(&line)
        {
            return Ok((guard, format!("127.0.0.1:{port}")));
        }
    }
}

fn message(id: &str, patient: u64) -> Vec<u8> {
    format!(
        "MSH|^~\\&|LOAD|HOSP|PASSERELLE|HOSP|20240101120000||ADT^A01^ADT_A01|{id}|P|2.5\r\
         EVN|A01|20240101120000\r\
         PID|1||{}^^^HOSP^PI||DOE^JANE^Q||19800101|F|||1 RUE DE LA PAIX^^PARIS^^75001^FRA\r\
         PV1|1|I|WARD^101^A|||||||MED\r",
        123_456 + patient
    )
    .into_bytes()
}

#[derive(Debug, Default)]
struct Outcome {
    latencies_us: Vec<u32>,
    errors: Vec<String>,
}

struct Shared {
    issued: AtomicU64,
    count: u64,
    patients: u64,
    deadline: Instant,
}

impl Shared {
    /// Takes a ticket for one more message, if the budget allows.
    fn ticket(&self) -> Option<u64> {
        if Instant::now() >= self.deadline {
            return None;
        }
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        (n < self.count).then_some(n)
    }
}

async fn connection(
    n: usize,
    to: String,
    window: usize,
    ack_timeout: Duration,
    shared: Arc<Shared>,
) -> Outcome {
    let mut out = Outcome::default();
    let mut stream = match TcpStream::connect(&to).await {
        Ok(s) => s,
        Err(e) => {
            out.errors.push(format!("connection {n}: connect: {e}"));
            return out;
        }
    };
    let _ = stream.set_nodelay(true);
    let mut codec = MllpCodec::default();
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let mut in_flight: VecDeque<(String, Instant)> = VecDeque::with_capacity(window);
    let mut done = false;
    loop {
        while !done && in_flight.len() < window {
            match shared.ticket() {
                Some(seq) => {
                    let id = format!("L{n}-{seq}");
                    let patient = seq % shared.patients;
                    let _ = codec.encode(&message(&id, patient)[..], &mut wbuf);
                    in_flight.push_back((id, Instant::now()));
                }
                None => done = true,
            }
        }
        if !wbuf.is_empty() {
            if let Err(e) = stream.write_all(&wbuf).await {
                out.errors.push(format!("connection {n}: write: {e}"));
                return out;
            }
            wbuf.clear();
        }
        if in_flight.is_empty() {
            let _ = stream.shutdown().await;
            return out;
        }
        // Read until at least one ACK.
        let mut got = 0;
        while got == 0 {
            loop {
                match codec.decode(&mut rbuf) {
                    Ok(Some(Frame::Message(payload))) => {
                        let Some((expected, sent)) = in_flight.pop_front() else {
                            out.errors.push(format!("connection {n}: unsolicited ACK"));
                            return out;
                        };
                        let ack = Ack::parse(payload);
                        match ack {
                            Some(a) if a.control_id == expected => {
                                let us =
                                    sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                                out.latencies_us.push(us);
                                if !a.is_accept() {
                                    out.errors.push(format!("{expected}: {}", a.code));
                                }
                                got += 1;
                            }
                            Some(a) => {
                                out.errors.push(format!(
                                    "connection {n}: ACK mismatch: expected {expected}, got {}",
                                    a.control_id
                                ));
                                return out;
                            }
                            None => {
                                out.errors
                                    .push(format!("connection {n}: answer without MSA"));
                                return out;
                            }
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        out.errors.push(format!("connection {n}: framing: {e}"));
                        return out;
                    }
                }
            }
            if got > 0 {
                break;
            }
            rbuf.reserve(16 * 1024);
            match tokio::time::timeout(ack_timeout, stream.read_buf(&mut rbuf)).await {
                Err(_) => {
                    out.errors
                        .push(format!("connection {n}: no ACK within {ack_timeout:?}"));
                    return out;
                }
                Ok(Ok(0)) => {
                    out.errors
                        .push(format!("connection {n}: closed by the receiver"));
                    return out;
                }
                Ok(Err(e)) => {
                    out.errors.push(format!("connection {n}: read: {e}"));
                    return out;
                }
                Ok(Ok(_)) => {}
            }
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

async fn run(o: Options, to: String) -> ExitCode {
    let shared = Arc::new(Shared {
        issued: AtomicU64::new(0),
        count: o.count,
        patients: o.patients,
        deadline: Instant::now() + o.duration,
    });
    let started = Instant::now();
    let tasks: Vec<_> = (0..o.connections)
        .map(|n| {
            tokio::spawn(connection(
                n,
                to.clone(),
                o.window,
                o.ack_timeout,
                shared.clone(),
            ))
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(out) => {
                latencies.extend(out.latencies_us);
                errors.extend(out.errors);
            }
            Err(e) => errors.push(format!("task: {e}")),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let acked = latencies.len();
    let rate = acked as f64 / elapsed;
    let (p50, p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.99));
    let label = o.label.clone().unwrap_or_else(|| to.clone());
    if o.json {
        println!(
            "{{\"target\":\"{label}\",\"connections\":{},\"window\":{},\"acked\":{acked},\"errors\":{},\"seconds\":{elapsed:.3},\"msgs_per_s\":{rate:.0},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3}}}",
            o.connections,
            o.window,
            errors.len()
        );
    } else {
        println!(
            "{label}: {} connection(s), window {}: {acked} ACKs in {elapsed:.2} s = {rate:.0} msgs/s, latency p50 {p50:.3} ms, p99 {p99:.3} ms, {} error(s)",
            o.connections,
            o.window,
            errors.len()
        );
    }
    for e in errors.iter().take(5) {
        eprintln!("  {e}");
    }
    if errors.is_empty() && acked > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let (guard, to) = if o.spawn.is_empty() {
        (None, o.to.clone().unwrap_or_default())
    } else {
        match spawn(&o.spawn) {
            Ok((g, to)) => (Some(g), to),
            Err(e) => {
                eprintln!("mllp-load: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mllp-load: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(o, to));
    drop(guard);
    code
}
