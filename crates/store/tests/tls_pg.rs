//! TLS between the PostgreSQL store and a real PostgreSQL server started with `ssl = on`,
//! a certificate made for the test, and pg_hba rules that refuse every TCP connection
//! without TLS (`hostnossl … reject`): whatever connects over TCP and works is encrypted.
//!
//! Checks: `verify-full` with the right CA works (every connection of the store, the
//! listening one included, is encrypted; SCRAM is bound to the channel) and passes
//! contract checks; a wrong CA, a wrong host name and a missing client certificate are
//! refused with a clear error; `verify-ca` and `require` behave as libpq's; plaintext is
//! refused; a client certificate logs in where pg_hba says `cert`; unusable files fail
//! at open.
//!
//! Without PostgreSQL's binaries these tests fail, saying what to install.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

mod common;

use std::path::PathBuf;
use std::time::Duration;

use passerelle_store::*;
use passerelle_testkit::pki::Pki;
use passerelle_testkit::postgres::{PgOptions, PgServer, PgServerTls};

/// The name in the server's certificate (resolved by nobody: `hostaddr` gives 127.0.0.1).
const DB_HOST: &str = "db.passerelle.test";
const PASSWORD: &str = "tls-test-password";

/// A server with TLS only over TCP: the role `passerelle` logs in with a password
/// (SCRAM), the role `passerelle_cert` with a client certificate.
struct TlsServer {
    server: PgServer,
    pki: Pki,
}

async fn tls_server() -> TlsServer {
    let pki = Pki::new("postgres");
    let (cert, key) = pki.issue("server", DB_HOST, &[DB_HOST], false);
    let (cert_pem, key_pem) = (
        std::fs::read_to_string(cert).unwrap(),
        std::fs::read_to_string(key).unwrap(),
    );
    pki.issue("client", "passerelle_cert", &[], true);
    let client_ca_pem = Some(std::fs::read_to_string(pki.ca()).unwrap());
    let options = PgOptions {
        tls: Some(PgServerTls {
            cert_pem,
            key_pem,
            client_ca_pem,
        }),
        hba: vec![
            "hostnossl all all 127.0.0.1/32 reject".into(),
            "hostssl all passerelle_cert 127.0.0.1/32 cert".into(),
            "hostssl all all 127.0.0.1/32 scram-sha-256".into(),
        ],
    };
    let server = tokio::task::spawn_blocking(move || PgServer::start_with(options))
        .await
        .unwrap();
    let admin = common::client(&server.url()).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE passerelle LOGIN SUPERUSER PASSWORD '{PASSWORD}'; \
             CREATE ROLE passerelle_cert LOGIN SUPERUSER;"
        ))
        .await
        .unwrap();
    TlsServer { server, pki }
}

impl TlsServer {
    /// A fresh database, as `passerelle` with its password over TCP, naming `host`.
    fn database(&self, name: &str, host: &str) -> String {
        self.server.create_database(name);
        format!(
            "{} password={PASSWORD}",
            self.server.tcp_url(host, "passerelle", name)
        )
    }
}

fn config(url: String, mode: PgTlsMode, ca: Option<PathBuf>) -> PgConfig {
    let mut c = PgConfig::new(url);
    c.pool_size = 2;
    c.connect_timeout = Duration::from_secs(10);
    c.tls = PgTls {
        mode: Some(mode),
        ca_file: ca,
        ..PgTls::default()
    };
    c
}

/// How many of the database's sessions are passerelle's (pool and liveness, and the
/// listening connection, counted apart), and how many of each are encrypted
/// (`pg_stat_ssl`).
async fn passerelle_sessions(admin: &tokio_postgres::Client, db: &str) -> [i64; 4] {
    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE a.application_name = 'passerelle'), \
                 count(*) FILTER (WHERE a.application_name = 'passerelle' AND s.ssl), \
                 count(*) FILTER (WHERE a.application_name = $2), \
                 count(*) FILTER (WHERE a.application_name = $2 AND s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1",
            &[&db, &LISTENER_APPLICATION],
        )
        .await
        .unwrap();
    [row.get(0), row.get(1), row.get(2), row.get(3)]
}

fn open_error(result: Result<PgStore, StoreError>) -> String {
    match result {
        Ok(store) => panic!("the store opened: {store:?}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_ca_encrypts_every_connection() {
    let tls = tls_server().await;
    // channel_binding=require: SCRAM must be bound to this TLS session.
    let open = |db: &str| {
        let url = format!("{} channel_binding=require", tls.database(db, DB_HOST));
        PgStore::open(config(url, PgTlsMode::VerifyFull, Some(tls.pki.ca())))
    };
    // Two contract checks over TLS (the whole contract runs over a Unix socket in
    // contract_pg.rs; the SQL is the same).
    contract::journal_keeps_frames_and_orders_ids(open("tls_journal").await.unwrap()).await;
    contract::fifo_per_key_and_parallel_keys(open("tls_fifo").await.unwrap()).await;
    let store = open("verified").await.unwrap();
    store
        .journal(b"MSH|^~\\&|A", JournalMeta::default())
        .await
        .unwrap();
    let admin = common::client(&tls.server.url()).await;
    let [sessions, encrypted, listening, listening_encrypted] =
        passerelle_sessions(&admin, "verified").await;
    assert_eq!(
        (listening, listening_encrypted),
        (1, 1),
        "the store's listening connection is there, encrypted"
    );
    assert!(
        sessions >= 2,
        "the pool and the liveness connection are there ({sessions})"
    );
    assert_eq!(encrypted, sessions, "every connection of the store is TLS");
    // The same settings given libpq's way, in the connection string.
    let url = format!(
        "{} sslmode=verify-full sslrootcert='{}'",
        tls.database("verified_by_url", DB_HOST),
        tls.pki.ca().display()
    );
    let mut by_url = PgConfig::new(url);
    by_url.pool_size = 1;
    let store = PgStore::open(by_url).await.unwrap();
    store
        .journal(b"MSH|^~\\&|A", JournalMeta::default())
        .await
        .unwrap();
    let [sessions, encrypted, listening, listening_encrypted] =
        passerelle_sessions(&admin, "verified_by_url").await;
    assert_eq!((listening, listening_encrypted), (1, 1));
    assert!(
        sessions >= 2 && encrypted == sessions,
        "{encrypted}/{sessions}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_host_name_is_refused_and_plaintext_never_gets_in() {
    let tls = tls_server().await;
    let other = Pki::new("stranger");
    // A CA that did not sign the server's certificate.
    let url = tls.database("refused", DB_HOST);
    let e = open_error(
        PgStore::open(config(url.clone(), PgTlsMode::VerifyFull, Some(other.ca()))).await,
    );
    assert!(
        e.contains("not signed by a CA passerelle trusts") && e.contains("UnknownIssuer"),
        "{e}"
    );
    // The right CA, another host name: verify-full refuses, verify-ca accepts.
    let elsewhere = url.replace(DB_HOST, "other.passerelle.test");
    let e = open_error(
        PgStore::open(config(
            elsewhere.clone(),
            PgTlsMode::VerifyFull,
            Some(tls.pki.ca()),
        ))
        .await,
    );
    assert!(
        e.contains("does not name the host \"other.passerelle.test\""),
        "{e}"
    );
    PgStore::open(config(elsewhere, PgTlsMode::VerifyCa, Some(tls.pki.ca())))
        .await
        .unwrap();
    // require without a CA file checks nothing (as libpq), but still encrypts.
    PgStore::open(config(url.clone(), PgTlsMode::Require, None))
        .await
        .unwrap();
    // require with a CA file checks the chain (as libpq): the stranger's CA is refused.
    let e =
        open_error(PgStore::open(config(url.clone(), PgTlsMode::Require, Some(other.ca()))).await);
    assert!(e.contains("UnknownIssuer"), "{e}");
    // Plaintext is refused by the server: by the store, and by a bare client.
    let e = open_error(PgStore::open(config(url.clone(), PgTlsMode::Disable, None)).await);
    assert!(e.contains("no encryption"), "{e}");
    let bare = tokio_postgres::connect(&format!("{url} sslmode=disable"), tokio_postgres::NoTls)
        .await
        .map(|_| ())
        .unwrap_err();
    let refusal = bare.as_db_error().map(|d| d.message().to_owned());
    assert!(
        refusal
            .as_deref()
            .is_some_and(|m| m.contains("pg_hba.conf") && m.contains("no encryption")),
        "{refusal:?}"
    );
    let admin = common::client(&tls.server.url()).await;
    let [sessions, encrypted, listening, listening_encrypted] =
        passerelle_sessions(&admin, "refused").await;
    assert_eq!(
        listening, listening_encrypted,
        "no plaintext listening session"
    );
    assert_eq!(
        sessions, encrypted,
        "no plaintext session of passerelle got in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_logs_in_where_pg_hba_says_cert() {
    let tls = tls_server().await;
    tls.server.create_database("mutual");
    let url = tls.server.tcp_url(DB_HOST, "passerelle_cert", "mutual");
    // Without a certificate the server refuses the role.
    let e = open_error(
        PgStore::open(config(
            url.clone(),
            PgTlsMode::VerifyFull,
            Some(tls.pki.ca()),
        ))
        .await,
    );
    assert!(e.contains("certificate"), "{e}");
    let mut c = config(url, PgTlsMode::VerifyFull, Some(tls.pki.ca()));
    c.tls.cert_file = Some(tls.pki.file("client.pem"));
    c.tls.key_file = Some(tls.pki.file("client.key"));
    let store = PgStore::open(c).await.unwrap();
    let id = store
        .journal(b"MSH|^~\\&|A", JournalMeta::default())
        .await
        .unwrap();
    assert!(store.get(id).await.unwrap().is_some());
    let admin = common::client(&tls.server.url()).await;
    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl AND s.client_dn = '/CN=passerelle_cert'), count(*) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = 'mutual' AND a.application_name LIKE 'passerelle%'",
            &[],
        )
        .await
        .unwrap();
    let (with_cert, all): (i64, i64) = (row.get(0), row.get(1));
    assert!(all >= 3, "pool, liveness and listening connections: {all}");
    assert_eq!(
        with_cert, all,
        "every session presented the client certificate"
    );
}

#[tokio::test]
async fn unusable_tls_files_fail_at_open_naming_the_setting() {
    let pki = Pki::new("files");
    std::fs::write(pki.file("junk.pem"), "not PEM").unwrap();
    // No server is needed: the files are read before connecting.
    let url = "host=db.passerelle.test hostaddr=127.0.0.1 port=9 user=p dbname=d".to_owned();
    let e = open_error(
        PgStore::open(config(
            url.clone(),
            PgTlsMode::VerifyFull,
            Some(pki.file("junk.pem")),
        ))
        .await,
    );
    assert!(
        e.starts_with("TLS to the database: tls_ca_file:") && e.contains("junk.pem"),
        "{e}"
    );
    let mut c = config(url.clone(), PgTlsMode::VerifyFull, Some(pki.ca()));
    pki.issue("client", "c", &[], true);
    pki.issue("other", "o", &[], true);
    c.tls.cert_file = Some(pki.file("client.pem"));
    c.tls.key_file = Some(pki.file("other.key"));
    let e = open_error(PgStore::open(c.clone()).await);
    assert!(
        e.contains("tls_key_file") && e.contains("does not go with"),
        "{e}"
    );
    assert_eq!(c.check_tls().unwrap_err().field, "tls_key_file");
    c.tls.key_file = Some(pki.file("client.key"));
    assert_eq!(c.check_tls().unwrap(), PgTlsMode::VerifyFull);
    let mut c = config(
        format!("{url} sslmode=require"),
        PgTlsMode::VerifyFull,
        None,
    );
    c.tls.ca_file = Some(pki.ca());
    let e = c.check_tls().unwrap_err();
    assert_eq!(e.field, "tls");
    assert!(e.message.contains("set it in one place"), "{e}");
}
