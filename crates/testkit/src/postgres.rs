//! A throwaway PostgreSQL server for the store's and the engine's tests.
//!
//! [`PgServer::start`] runs `initdb` into a fresh temporary folder and starts `postgres`
//! on a Unix socket in that folder only (no TCP port, so parallel tests never collide),
//! with trust authentication for the `postgres` role. The server is stopped (immediate
//! shutdown) and its folder deleted when the [`PgServer`] is dropped.
//!
//! The binaries are looked for in `PATH`, then in `/usr/lib/postgresql/*/bin` (Debian's
//! layout, highest version first). Without them the test **fails** with a message saying
//! what to install: a PostgreSQL test must never pass by not running. PostgreSQL refuses
//! to run as root; when the tests run as root, the server runs as the `postgres` OS user
//! (through `setpriv`), which then owns the folder.
//!
//! [`PgServer::start_with`] also listens on TCP (127.0.0.1, a free port), with TLS when
//! given a certificate ([`PgServerTls`], made by the test, e.g. with rcgen) and with the
//! test's `pg_hba.conf` rules for TCP connections (`hostssl`, `hostnossl … reject`,
//! `cert`), so that a test can prove what the server accepts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::mllp::PeerProcess;
use crate::output_of;

/// The folder holding `initdb` and `postgres`. Panics, saying what to install, without them.
pub fn bin_dir() -> PathBuf {
    let in_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut debian: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    // Highest major version first.
    debian.sort_by_key(|p| {
        std::cmp::Reverse(
            p.parent()
                .and_then(Path::file_name)
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    in_path
        .into_iter()
        .chain(debian)
        .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
        // `initdb` may be a symbolic link (into /usr/lib/postgresql/N/bin): the folder it
        // points into holds the other programs (createdb).
        .map(|dir| {
            fs::canonicalize(dir.join("initdb"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or(dir)
        })
        .unwrap_or_else(|| {
            panic!(
                "PostgreSQL server binaries (initdb, postgres) are not in PATH nor in \
                 /usr/lib/postgresql/*/bin: install them (Debian/Ubuntu: apt-get install -y \
                 postgresql) to run the PostgreSQL store tests"
            )
        })
}

/// Whether this process runs as root (PostgreSQL then needs another user).
fn is_root() -> bool {
    output_of(Command::new("id").arg("-u"), "id -u") == "0"
}

/// A running throwaway PostgreSQL server, stopped and deleted on drop.
#[derive(Debug)]
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// Whether the server also listens on 127.0.0.1:`port`.
    tcp: bool,
    process: Option<PeerProcess>,
}

/// The server side of TLS, in PEM.
#[derive(Debug, Clone)]
pub struct PgServerTls {
    /// The server's certificate (chain).
    pub cert_pem: String,
    pub key_pem: String,
    /// CAs whose client certificates the server accepts (`ssl_ca_file`), for pg_hba
    /// `cert` rules and `clientcert=`.
    pub client_ca_pem: Option<String>,
}

/// What [`PgServer::start_with`] adds to the Unix-socket-only default.
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// `ssl = on` with these files.
    pub tls: Option<PgServerTls>,
    /// `pg_hba.conf` lines for TCP connections, after `local all all trust` (for example
    /// `hostssl all all 127.0.0.1/32 scram-sha-256`). Only connections from 127.0.0.1
    /// arrive.
    pub hba: Vec<String>,
}

impl PgServer {
    /// Creates a cluster in a temporary folder and starts it; returns once it accepts
    /// connections. Blocking: from async code, call it in `spawn_blocking`.
    pub fn start() -> PgServer {
        Self::start_with(PgOptions::default())
    }

    /// As [`start`](Self::start); with TLS or TCP rules in `options`, the server also
    /// listens on 127.0.0.1 ([`tcp_url`](Self::tcp_url)). Blocking.
    pub fn start_with(options: PgOptions) -> PgServer {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let bin = bin_dir();
        let dir = std::env::temp_dir().join(format!(
            "passerelle-pg-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let as_postgres = is_root();
        if as_postgres {
            output_of(
                Command::new("chown").arg("postgres:postgres").arg(&dir),
                "give the PostgreSQL folder to the postgres user",
            );
        }
        let command = |program: &str| {
            let mut c = if as_postgres {
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid=postgres",
                    "--regid=postgres",
                    "--init-groups",
                    "--",
                ])
                .arg(bin.join(program));
                c
            } else {
                Command::new(bin.join(program))
            };
            c.current_dir(&dir).env("LC_ALL", "C");
            c
        };
        let data = dir.join("data");
        output_of(
            command("initdb").arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]),
            "initdb",
        );
        let tcp = options.tls.is_some() || !options.hba.is_empty();
        // Unix sockets live in `dir`, so any port does; a TCP port must be free.
        let port = if tcp { free_port() } else { 5432 };
        let mut server = command("postgres");
        server
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&dir)
            .args(["-p", &port.to_string()]);
        if tcp {
            let hba = dir.join("pg_hba.conf");
            let mut rules = vec!["local all all trust".to_owned()];
            rules.extend(options.hba.iter().cloned());
            write_owned(&hba, &(rules.join("\n") + "\n"), as_postgres);
            server.args(["-c", "listen_addresses=127.0.0.1", "-c"]);
            server.arg(format!("hba_file={}", hba.display()));
        } else {
            server.args(["-c", "listen_addresses="]);
        }
        if let Some(tls) = &options.tls {
            let cert = dir.join("server.crt");
            let key = dir.join("server.key");
            write_owned(&cert, &tls.cert_pem, as_postgres);
            // PostgreSQL refuses a key that others may read.
            write_owned(&key, &tls.key_pem, as_postgres);
            server.args(["-c", "ssl=on", "-c"]);
            server.arg(format!("ssl_cert_file={}", cert.display()));
            server
                .arg("-c")
                .arg(format!("ssl_key_file={}", key.display()));
            if let Some(ca) = &tls.client_ca_pem {
                let path = dir.join("client-ca.crt");
                write_owned(&path, ca, as_postgres);
                server
                    .arg("-c")
                    .arg(format!("ssl_ca_file={}", path.display()));
            }
        }
        let mut process = PeerProcess::spawn("PostgreSQL server", &mut server);
        process.wait_for_line(
            "database system is ready to accept connections",
            Duration::from_secs(60),
        );
        PgServer {
            dir,
            bin,
            port,
            tcp,
            process: Some(process),
        }
    }

    /// A connection string over TCP to 127.0.0.1 for the database `name` as `user`,
    /// presenting `host` as the server's name (what TLS checks the certificate against).
    /// Panics for a server started without TCP.
    pub fn tcp_url(&self, host: &str, user: &str, name: &str) -> String {
        assert!(
            self.tcp,
            "this PostgreSQL server listens on a Unix socket only"
        );
        format!(
            "host={host} hostaddr=127.0.0.1 port={} user={user} dbname={name}",
            self.port
        )
    }

    /// A connection string for the `postgres` database (key=value form, Unix socket).
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// A connection string for the database `name`.
    pub fn url_for(&self, name: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={name}",
            self.dir.display(),
            self.port
        )
    }

    /// Creates an empty database and returns its connection string.
    pub fn create_database(&self, name: &str) -> String {
        output_of(
            Command::new(self.bin.join("createdb"))
                .arg("-h")
                .arg(&self.dir)
                .args(["-p", &self.port.to_string(), "-U", "postgres", name]),
            "createdb",
        );
        self.url_for(name)
    }

    /// Stops the server now (immediate shutdown, as after a crash), for tests of an
    /// unreachable database. Dropping the server stops it too.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            // SIGQUIT: the postmaster stops its backends and exits at once.
            let _ = Command::new("kill")
                .args(["-QUIT", &process.id().to_string()])
                .status();
            process.wait_exit_quietly(Duration::from_secs(20));
        }
    }
}

/// A TCP port no one listens on now (the kernel's pick; free again once closed).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("find a free TCP port: {e}"))
}

/// Writes a file only its owner may read, owned by the server's user.
fn write_owned(path: &Path, text: &str, as_postgres: bool) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    if as_postgres {
        output_of(
            Command::new("chown").arg("postgres:postgres").arg(path),
            "give a PostgreSQL file to the postgres user",
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
