//! An engine in a temporary folder, run as the real `passerelle serve --config` process.

#![allow(dead_code, clippy::unwrap_used)] // each test binary uses part of it

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use passerelle_testkit::mllp::PeerProcess;
use passerelle_testkit::workspace_root;

/// Writes `passerelle.toml` (store in `data`, one listener and the admin API on free
/// loopback ports, the
/// repository's mapping packs, `defaults` appended) and one route file into `dir`.
pub(crate) fn setup(dir: &Path, route: &str, defaults: &str) -> PathBuf {
    let routes = dir.join("routes.d");
    std::fs::create_dir_all(&routes).unwrap();
    std::fs::write(routes.join("10-route.toml"), route).unwrap();
    let config = dir.join("passerelle.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\npath = \"data\"\n[[listeners]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n[admin]\nbind = \"127.0.0.1:0\"\n[paths]\nroutes = \"routes.d\"\nmappings = \"{}\"\n[defaults]\n{defaults}",
            workspace_root().join("mappings").display()
        ),
    )
    .unwrap();
    config
}

/// Starts the engine; returns it and its MLLP address once it listens.
pub(crate) fn start(config: &Path) -> (PeerProcess, String) {
    let (engine, mllp, _) = start_with_env(config, &[]);
    (engine, mllp)
}

/// Starts the engine with extra environment variables; returns it, its MLLP address and
/// its admin API address (`host:port`) once both are announced.
pub(crate) fn start_with_env(config: &Path, env: &[(&str, &str)]) -> (PeerProcess, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_passerelle"));
    command.args(["serve", "--config", config.to_str().unwrap()]);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut engine = PeerProcess::spawn("passerelle serve", &mut command);
    let line = engine.wait_for_line("listening on", Duration::from_secs(60));
    let mllp = line
        .split("listening on ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();
    let line = engine.wait_for_line("admin API on http://", Duration::from_secs(30));
    let admin = line.split("http://").nth(1).unwrap().trim().to_owned();
    (engine, mllp, admin)
}

/// Sends a signal (`-TERM`, `-KILL`) to the engine.
pub(crate) fn signal(engine: &PeerProcess, which: &str) {
    signal_pid(engine.id(), which);
}

/// Sends a signal (`-TERM`, `-KILL`) to a process.
pub(crate) fn signal_pid(pid: u32, which: &str) {
    assert!(
        Command::new("kill")
            .args([which, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// SIGTERM, then a clean exit.
pub(crate) fn stop(mut engine: PeerProcess) {
    signal(&engine, "-TERM");
    let (ok, lines) = engine.wait_exit(Duration::from_secs(30));
    assert!(
        ok,
        "the engine stops cleanly on SIGTERM:\n{}",
        lines.join("\n")
    );
}

/// A GET over plain HTTP/1.1 on loopback; returns (status, body).
pub(crate) fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    http_request(addr, "GET", path, token, None)
}

/// A request over plain HTTP/1.1 on loopback, with a JSON body if given; returns
/// (status, body).
pub(crate) fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    json: Option<&str>,
) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = json
        .map(|b| {
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )
        })
        .unwrap_or_else(|| "\r\n".to_owned());
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n{body}"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Runs `command` with its stdout a pipe nobody reads: closed before the command writes,
/// as `| head` leaves it once it has its lines. Returns the exit code and stderr.
pub(crate) fn run_with_stdout_closed(command: &mut Command) -> (Option<i32>, String) {
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Puts the admin API of `config` (written by [`setup`]) on a fixed free port, with a
/// token from `token_env`; returns the port.
pub(crate) fn fixed_admin(config: &Path, token_env: &str) -> u16 {
    let port = passerelle_testkit::free_port();
    let text = std::fs::read_to_string(config).unwrap().replace(
        "[admin]\nbind = \"127.0.0.1:0\"\n",
        &format!("[admin]\nbind = \"127.0.0.1:{port}\"\ntoken_env = \"{token_env}\"\n"),
    );
    std::fs::write(config, text).unwrap();
    port
}

/// The lines of a file (0 when it does not exist yet).
pub(crate) fn lines_in(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Waits until `path` has `n` lines or more; panics after 30 s.
pub(crate) fn wait_for_lines(path: &Path, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while lines_in(path) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never reached {n} lines",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50)); // polls the observable output file
    }
}
