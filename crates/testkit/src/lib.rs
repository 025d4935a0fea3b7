//! # passerelle-testkit: support shared by passerelle's tests
//!
//! Its job: find the repository's fixtures, and provision the third-party peers that the
//! interop tests talk to (the python `hl7` library today; MLLP servers, FHIR servers and
//! validators as they come), so that `cargo test` works on a fresh machine as well as in
//! CI. Peers are installed from the package registries into `target/peers/`, pinned by
//! the requirement files in `crates/testkit/peers/`, once per machine: a lock file
//! serialises concurrent test processes, and a stamp holding the requirements' content
//! makes a changed pin reinstall.
//!
//! [`postgres::PgServer`] starts a throwaway PostgreSQL server (from the system's
//! PostgreSQL binaries) for the PostgreSQL store's tests.
//!
//! Nothing here is a mock: tests drive the real programs.

pub mod fhir;
pub mod fhir_server;
pub mod mllp;
pub mod pki;
pub mod postgres;
pub mod smart_auth;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A free loopback TCP port: bound, then released for a process under test to take.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/testkit sits two levels below the root")
        .to_path_buf()
}

/// The `*.hl7` files of a fixtures folder (relative to `fixtures/`), sorted by name.
pub fn fixture_files(folder: &str) -> Vec<PathBuf> {
    let dir = workspace_root().join("fixtures").join(folder);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "hl7"))
        .collect();
    files.sort();
    files
}

/// Where peers are installed: `$PASSERELLE_PEERS_DIR`, or `target/peers`.
pub fn peers_dir() -> PathBuf {
    std::env::var_os("PASSERELLE_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target").join("peers"))
}

/// The folder holding the peers' pinned requirements and glue scripts.
pub fn peers_source_dir() -> PathBuf {
    workspace_root()
        .join("crates")
        .join("testkit")
        .join("peers")
}

/// The Python interpreter of a virtualenv with `peers/requirements.txt` installed,
/// creating or updating it when needed. Panics with the installer's output on failure:
/// an interop test cannot run without its peer, and must not pass without it.
pub fn python() -> PathBuf {
    let dir = peers_dir();
    fs::create_dir_all(&dir).expect("create peers dir");
    let venv = dir.join("py");
    let python = venv.join("bin").join("python");
    let requirements = peers_source_dir().join("requirements.txt");
    let wanted = fs::read_to_string(&requirements).expect("read requirements.txt");
    let stamp = venv.join(".passerelle-requirements");

    let lock = File::create(dir.join(".py.lock")).expect("create lock file");
    lock.lock().expect("lock peers dir");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        if !python.exists() {
            run(
                Command::new("python3").arg("-m").arg("venv").arg(&venv),
                "create virtualenv",
            );
        }
        run(
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "-r",
                ])
                .arg(&requirements),
            "pip install the test peers",
        );
        fs::write(&stamp, &wanted).expect("write stamp");
    }
    lock.unlock().expect("unlock peers dir");
    python
}

/// The folder `peers/<name>` is installed into (`npm ci`), with `files` (its package.json,
/// package-lock.json and scripts) copied from the sources. It is installed again only when
/// those files changed (a stamp holds their text), under a lock file so that concurrent
/// tests install once. Panics with npm's output on failure: a test must not pass without
/// its peer.
fn npm_peer(name: &str, files: &[&str], what: &str) -> PathBuf {
    let source = peers_source_dir().join(name);
    let root = peers_dir();
    fs::create_dir_all(&root).expect("create peers dir");
    let dir = root.join(name);
    let lock = File::create(root.join(format!(".{name}.lock"))).expect("create lock file");
    lock.lock().expect("lock peers dir");
    let mut wanted = String::new();
    for file in files {
        let text = fs::read_to_string(source.join(file))
            .unwrap_or_else(|e| panic!("read {name}/{file}: {e}"));
        wanted.push_str(&text);
    }
    let stamp = dir.join(".passerelle-stamp");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {name} dir: {e}"));
        for file in files {
            fs::copy(source.join(file), dir.join(file))
                .unwrap_or_else(|e| panic!("copy {name}/{file}: {e}"));
        }
        run(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir),
            &format!("npm ci {what}"),
        );
        fs::write(&stamp, &wanted).expect("write stamp");
    }
    lock.unlock().expect("unlock peers dir");
    dir
}

fn run(command: &mut Command, what: &str) {
    output_of(command, what);
}

/// Runs a command to its end; its standard output, trimmed. Panics with both outputs when
/// it fails.
pub(crate) fn output_of(command: &mut Command, what: &str) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}
