//! MLLP peers for the transport's interop tests, and the process plumbing to run them.
//!
//! - Python (in the virtualenv of [`crate::python`], pinned in `requirements.txt`):
//!   python `hl7`'s `mllp_send` client and its asyncio server (glue:
//!   `peers/hl7_asyncio_server.py`), `txHL7` run by `twistd`, and `hl7apy`'s MLLP server
//!   (glue: `peers/hl7apy_server.py`), which closes the connection after each reply.
//! - Node (pinned by `peers/mllp-node/package.json` and its lock file, installed with
//!   `npm ci` into `target/peers/mllp-node/`): `@medplum/hl7`'s `Hl7Client` (glue:
//!   `peers/mllp-node/medplum_send.mjs`).
//!
//! Peers run as child processes on loopback, are killed when their [`PeerProcess`] is
//! dropped, and are waited for by a line they print, never by sleeping.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// `target/peers/mllp-node`, with `@medplum/hl7` installed (reinstalled when the pinned
/// files change). Panics with npm's output on failure.
pub fn node_dir() -> PathBuf {
    crate::npm_peer(
        "mllp-node",
        &["package.json", "package-lock.json", "medplum_send.mjs"],
        "the MLLP node peers",
    )
}

/// A program of the peers' virtualenv (`mllp_send`, `twistd`…), installing it if needed.
pub fn venv_bin(name: &str) -> PathBuf {
    let python = crate::python();
    let bin = python.parent().expect("venv bin dir").join(name);
    assert!(bin.exists(), "{} is not installed", bin.display());
    bin
}

/// A glue script in `crates/testkit/peers/`.
pub fn script(name: &str) -> PathBuf {
    crate::peers_source_dir().join(name)
}

/// A running peer, killed (and reaped) on drop. Its stdout and stderr are read by
/// background threads into one channel of lines.
#[derive(Debug)]
pub struct PeerProcess {
    name: String,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl PeerProcess {
    /// Starts `command` with piped output.
    pub fn spawn(name: &str, command: &mut Command) -> PeerProcess {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(line);
            }
        });
        PeerProcess {
            name: name.to_owned(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line containing `needle` and returns it; panics (with everything the
    /// peer printed) after `timeout` or if the peer exits first.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "{} did not print {needle:?} within {timeout:?}; it printed:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every line printed until the process exits (bounded by `timeout`), and whether it
    /// exited successfully.
    pub fn wait_exit(&mut self, timeout: Duration) -> (bool, Vec<String>) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Drain what the reader threads still hold.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return (status.success(), self.seen.clone());
            }
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => self.seen.push(line),
                Err(_) if Instant::now() > deadline => panic!(
                    "{} did not exit within {timeout:?}; it printed:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
                Err(_) => {}
            }
        }
    }
}

impl PeerProcess {
    /// Waits (up to `timeout`) for the process to exit, without panicking: for a stop
    /// requested from a `Drop`. Returns whether it exited.
    pub fn wait_exit_quietly(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            // Lines it prints while stopping; also paces the loop.
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(50)) {
                self.seen.push(line);
            }
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts TCP connections on `addr`; panics after `timeout`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {addr} after {timeout:?}"
        );
        std::thread::yield_now();
    }
}

/// The port number at the end of a line such as `listening on 127.0.0.1:4242` or
/// `MLLPFactory starting on 4242`.
pub fn port_in(line: &str) -> u16 {
    let digits: String = line
        .trim_end()
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no port at the end of {line:?}"))
}
