//! Helpers shared by the PostgreSQL test binaries.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // each binary uses part of it

/// A plain client of the test's own (no TLS: loopback or a Unix socket), to look at or
/// damage the database behind a store's back.
pub async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}
