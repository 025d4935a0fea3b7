//! Destination settings: every missing, unknown or invalid key is an error naming it;
//! secrets come from the environment and never show in `Debug`.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use passerelle_delivery::{AttemptOutcome, Destination, Item, SettingsError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

/// An environment variable no test machine sets.
const UNSET: &str = "PASSERELLE_DELIVERY_TEST_SURELY_UNSET";

fn build(kind: &str, toml_text: &str) -> Result<Destination, SettingsError> {
    let settings: toml::Table = toml::from_str(toml_text).unwrap();
    Destination::from_settings(kind, &settings, Path::new("/nonexistent-base"))
}

/// The error for `toml_text`, which must fail.
fn error(kind: &str, toml_text: &str) -> SettingsError {
    match build(kind, toml_text) {
        Ok(d) => panic!("{toml_text:?} was accepted: {d:?}"),
        Err(e) => e,
    }
}

fn missing(kind: &str, toml_text: &str, key: &str) {
    let e = error(kind, toml_text);
    assert_eq!(
        e,
        SettingsError::Missing {
            key: key.to_owned()
        },
        "{toml_text}"
    );
    assert!(e.to_string().contains(key));
}

fn unknown(kind: &str, toml_text: &str, key: &str) {
    let e = error(kind, toml_text);
    assert_eq!(
        e,
        SettingsError::Unknown {
            key: key.to_owned()
        },
        "{toml_text}"
    );
}

/// Fails on `key`, with a reason containing `reason`.
fn invalid(kind: &str, toml_text: &str, key: &str, reason: &str) {
    let e = error(kind, toml_text);
    match &e {
        SettingsError::Invalid { key: k, reason: r } => {
            assert_eq!(k, key, "{toml_text}: {e}");
            assert!(r.contains(reason), "{toml_text}: {e}");
        }
        other => panic!("{toml_text}: expected Invalid({key}), got {other:?}"),
    }
    assert!(e.to_string().contains(key));
}

#[test]
fn unknown_type() {
    let e = error("kafka", "");
    assert_eq!(
        e,
        SettingsError::UnknownType {
            kind: "kafka".to_owned()
        }
    );
    assert_eq!(e.key(), "type");
}

#[test]
fn ndjson_settings() {
    assert!(build("ndjson", "type = \"ndjson\"\ndir = \"out\"").is_ok());
    missing("ndjson", "", "dir");
    missing("ndjson", "max_file_bytes = 10", "dir");
    unknown("ndjson", "dir = \"out\"\ndirectory = \"x\"", "directory");
    unknown("ndjson", "dir = \"out\"\nurl = \"http://x\"", "url");
    invalid("ndjson", "dir = \"\"", "dir", "empty");
    invalid("ndjson", "dir = 3", "dir", "expected a string");
    let file = tempfile::NamedTempFile::new().unwrap();
    invalid(
        "ndjson",
        &format!("dir = {:?}", file.path().display().to_string()),
        "dir",
        "not a directory",
    );
    invalid(
        "ndjson",
        "dir = \"out\"\nmax_file_bytes = 0",
        "max_file_bytes",
        "positive",
    );
    invalid(
        "ndjson",
        "dir = \"out\"\nmax_file_bytes = \"1G\"",
        "max_file_bytes",
        "integer",
    );
}

#[test]
fn fhir_settings() {
    let url = "url = \"https://fhir.example.org/fhir/R4\"";
    assert!(build("fhir", url).is_ok());
    assert!(build("fhir", &format!("{url}\ntimeout_s = 2.5")).is_ok());
    missing("fhir", "", "url");
    missing("fhir", "timeout_s = 3", "url");
    unknown("fhir", &format!("{url}\ntimeout = 3"), "timeout");
    unknown("fhir", &format!("{url}\npeer = \"a:1\""), "peer");
    invalid("fhir", "url = \"not a url\"", "url", "not a URL");
    invalid("fhir", "url = \"ftp://x/fhir\"", "url", "http or https");
    invalid("fhir", "url = \"https://u:p@x/fhir\"", "url", "auth");
    invalid("fhir", "url = \"https://x/fhir?a=b\"", "url", "query");
    invalid("fhir", "url = 42", "url", "expected a string");
    invalid(
        "fhir",
        &format!("{url}\ntimeout_s = 0"),
        "timeout_s",
        "between",
    );
    invalid(
        "fhir",
        &format!("{url}\ntimeout_s = -1"),
        "timeout_s",
        "between",
    );
    invalid(
        "fhir",
        &format!("{url}\ntimeout_s = \"30s\""),
        "timeout_s",
        "seconds",
    );
}

#[test]
fn fhir_auth_settings() {
    let url = "url = \"https://fhir.example.org/fhir/R4\"\n";
    let with = |auth: &str| format!("{url}auth = {auth}");
    assert!(build("fhir", &with("{ type = \"none\" }")).is_ok());
    // Secrets come from the environment: PATH and HOME are set everywhere.
    assert!(build("fhir", &with("{ type = \"bearer\", token_env = \"PATH\" }")).is_ok());
    assert!(
        build(
            "fhir",
            &with("{ type = \"basic\", username = \"svc\", password_env = \"HOME\" }")
        )
        .is_ok()
    );
    invalid("fhir", &format!("{url}auth = \"bearer\""), "auth", "table");
    missing("fhir", &with("{ token_env = \"PATH\" }"), "auth.type");
    invalid(
        "fhir",
        &with("{ type = \"oauth\" }"),
        "auth.type",
        "\"oauth\"",
    );
    invalid("fhir", &with("{ type = 1 }"), "auth.type", "expected");
    missing("fhir", &with("{ type = \"bearer\" }"), "auth.token_env");
    missing(
        "fhir",
        &with("{ type = \"basic\", password_env = \"HOME\" }"),
        "auth.username",
    );
    missing(
        "fhir",
        &with("{ type = \"basic\", username = \"svc\" }"),
        "auth.password_env",
    );
    invalid(
        "fhir",
        &with(&format!("{{ type = \"bearer\", token_env = \"{UNSET}\" }}")),
        "auth.token_env",
        "is not set",
    );
    invalid(
        "fhir",
        &with(&format!(
            "{{ type = \"basic\", username = \"svc\", password_env = \"{UNSET}\" }}"
        )),
        "auth.password_env",
        UNSET,
    );
    invalid(
        "fhir",
        &with("{ type = \"basic\", username = \"a:b\", password_env = \"HOME\" }"),
        "auth.username",
        "':'",
    );
    // A secret written in the file itself is refused.
    unknown(
        "fhir",
        &with("{ type = \"bearer\", token = \"s3cret\" }"),
        "auth.token",
    );
    unknown(
        "fhir",
        &with("{ type = \"basic\", username = \"svc\", password = \"s3cret\" }"),
        "auth.password",
    );
    unknown(
        "fhir",
        &with("{ type = \"none\", token_env = \"PATH\" }"),
        "auth.token_env",
    );
}

#[test]
fn fhir_smart_backend_settings() {
    let keys = common::Keys::new();
    // Relative key files resolve against the base dir (the keys' directory here).
    let build = |auth: &str| {
        let settings: toml::Table = toml::from_str(&format!(
            "url = \"https://fhir.example.org/fhir/R4\"\nauth = {{ type = \"smart_backend\", {auth} }}"
        ))
        .unwrap();
        Destination::from_settings("fhir", &settings, keys.dir())
    };
    let base = "token_url = \"https://auth.example.org/token\", client_id = \"passerelle\"";
    let with = |rest: &str| format!("{base}, {rest}");
    let fails = |auth: &str| match build(auth) {
        Ok(d) => panic!("{auth:?} was accepted: {d:?}"),
        Err(e) => e,
    };
    let fails_on = |auth: &str, key: &str, reason: &str| {
        let e = fails(auth);
        match &e {
            SettingsError::Invalid { key: k, reason: r } => {
                assert_eq!(k, key, "{auth}: {e}");
                assert!(r.contains(reason), "{auth}: {e}");
            }
            other => panic!("{auth}: expected Invalid({key}), got {other:?}"),
        }
    };

    // Good: the algorithm follows the key, or is stated and matches it.
    let rsa = build(&with("private_key_file = \"rsa.pem\"")).unwrap();
    let debug = format!("{rsa:?}");
    assert!(debug.contains("smart_backend"), "{debug}");
    assert!(!debug.contains("PRIVATE"), "{debug}");
    build(&with(
        "private_key_file = \"rsa.pem\", algorithm = \"RS384\", scope = \"system/Patient.write system/Encounter.write\", kid = \"2024-1\"",
    ))
    .unwrap();
    build(&with(
        "private_key_file = \"ec384.pem\", algorithm = \"ES384\"",
    ))
    .unwrap();
    // An absolute path too.
    let absolute = keys.dir().join("ec384.pem");
    build(&with(&format!("private_key_file = {absolute:?}"))).unwrap();

    // Missing keys.
    for (auth, key) in [
        (
            "client_id = \"p\", private_key_file = \"rsa.pem\"",
            "auth.token_url",
        ),
        (
            "token_url = \"https://a/token\", private_key_file = \"rsa.pem\"",
            "auth.client_id",
        ),
        (base, "auth.private_key_file"),
    ] {
        assert_eq!(
            fails(auth),
            SettingsError::Missing {
                key: key.to_owned()
            },
            "{auth}"
        );
    }
    // Unknown keys: a typo, a key of another kind, a secret in the file.
    for (extra, key) in [
        ("audience = \"x\"", "auth.audience"),
        ("token_env = \"PATH\"", "auth.token_env"),
        ("client_secret = \"s3cret\"", "auth.client_secret"),
    ] {
        assert_eq!(
            fails(&with(&format!("private_key_file = \"rsa.pem\", {extra}"))),
            SettingsError::Unknown {
                key: key.to_owned()
            }
        );
    }
    let key = "private_key_file = \"rsa.pem\"";
    // The token URL.
    for (url, reason) in [
        ("not a url", "not a URL"),
        ("ftp://auth.example.org/token", "http or https"),
        ("https://u:p@auth.example.org/token", "credentials"),
        ("https://auth.example.org/token#x", "fragment"),
    ] {
        fails_on(
            &format!("token_url = {url:?}, client_id = \"p\", {key}"),
            "auth.token_url",
            reason,
        );
    }
    // The client id, scope and kid.
    fails_on(
        &format!("token_url = \"https://a/token\", client_id = \"\", {key}"),
        "auth.client_id",
        "empty",
    );
    fails_on(
        &format!("token_url = \"https://a/token\", client_id = 7, {key}"),
        "auth.client_id",
        "string",
    );
    fails_on(
        &with(&format!("{key}, scope = \"\"")),
        "auth.scope",
        "empty",
    );
    fails_on(
        &with(&format!("{key}, scope = \"system/*.write  system/*.read\"")),
        "auth.scope",
        "single spaces",
    );
    fails_on(
        &with(&format!("{key}, scope = 'system/\"x\".write'")),
        "auth.scope",
        "quote",
    );
    fails_on(&with(&format!("{key}, kid = \"\"")), "auth.kid", "empty");
    // The algorithm: a known one, and the one the key can make.
    fails_on(
        &with(&format!("{key}, algorithm = \"HS256\"")),
        "auth.algorithm",
        "\"RS384\" or \"ES384\"",
    );
    fails_on(
        &with(&format!("{key}, algorithm = \"RS256\"")),
        "auth.algorithm",
        "\"RS256\"",
    );
    fails_on(
        &with("private_key_file = \"rsa.pem\", algorithm = \"ES384\""),
        "auth.algorithm",
        "an RSA key: use RS384",
    );
    fails_on(
        &with("private_key_file = \"ec384.pem\", algorithm = \"RS384\""),
        "auth.algorithm",
        "an EC P-384 key: use ES384",
    );
    // The key file, read and parsed now.
    for (file, reason) in [
        ("nowhere.pem", "cannot read"),
        ("not-a-key.pem", "no unencrypted PKCS#8 private key"),
        ("rsa.pub", "no unencrypted PKCS#8 private key"),
        ("rsa-pkcs1.pem", "PKCS#1"),
        ("ec256.pem", "P-256"),
    ] {
        fails_on(
            &with(&format!("private_key_file = {file:?}")),
            "auth.private_key_file",
            reason,
        );
    }
    // The error names the file, never the key's content.
    let e = fails(&with("private_key_file = \"ec256.pem\""));
    assert!(!e.to_string().contains("BEGIN"), "{e}");
}

#[test]
fn fhir_tls_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let url = "url = \"https://fhir.example.org/fhir/R4\"\n";
    // Relative paths resolve against the base dir.
    let settings: toml::Table = toml::from_str(&format!("{url}ca = \"ca.pem\"")).unwrap();
    match Destination::from_settings("fhir", &settings, tmp.path()) {
        Err(SettingsError::Invalid { key, reason }) => {
            assert_eq!(key, "ca");
            assert!(
                reason.contains(&tmp.path().join("ca.pem").display().to_string()),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    std::fs::write(tmp.path().join("ca.pem"), "not a certificate").unwrap();
    let e = Destination::from_settings("fhir", &settings, tmp.path()).unwrap_err();
    assert_eq!(e.key(), "ca", "{e}");
    missing(
        "fhir",
        &format!("{url}client_cert = \"c.pem\""),
        "client_key",
    );
    missing(
        "fhir",
        &format!("{url}client_key = \"k.pem\""),
        "client_cert",
    );
    invalid(
        "fhir",
        &format!("{url}client_cert = \"c.pem\"\nclient_key = \"k.pem\""),
        "client_cert",
        "cannot read",
    );
}

#[test]
fn mllp_settings() {
    assert!(build("mllp", "peer = \"127.0.0.1:2575\"").is_ok());
    assert!(build("mllp", "peer = \"lab.example.org:2575\"\nack_timeout_s = 5").is_ok());
    missing("mllp", "", "peer");
    missing("mllp", "ack_timeout_s = 5", "peer");
    unknown("mllp", "peer = \"h:1\"\nurl = \"x\"", "url");
    invalid("mllp", "peer = \"localhost\"", "peer", "host:port");
    invalid("mllp", "peer = \"h:0\"", "peer", "host:port");
    invalid("mllp", "peer = \"h:99999\"", "peer", "host:port");
    invalid("mllp", "peer = \":2575\"", "peer", "host:port");
    invalid(
        "mllp",
        "peer = \"h:1\"\nack_timeout_s = 0",
        "ack_timeout_s",
        "between",
    );
    invalid(
        "mllp",
        "peer = \"h:1\"\nconnect_timeout_s = true",
        "connect_timeout_s",
        "seconds",
    );
    invalid("mllp", "peer = \"h:1\"\ntls = true", "tls", "table");
    unknown(
        "mllp",
        "peer = \"h:1\"\ntls = { cafile = \"x\" }",
        "tls.cafile",
    );
    missing(
        "mllp",
        "peer = \"h:1\"\ntls = { client_cert = \"c.pem\" }",
        "tls.client_key",
    );
    missing(
        "mllp",
        "peer = \"h:1\"\ntls = { client_key = \"k.pem\" }",
        "tls.client_cert",
    );
    let e = error("mllp", "peer = \"h:1\"\ntls = { ca = \"missing.pem\" }");
    assert_eq!(e.key(), "tls", "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_sent_and_never_printed() {
    // A one-shot HTTP server that records the request head and answers 201.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            let n = socket.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the client closed early");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap();
        while buf.len() < head_end + length {
            let n = socket.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        socket
            .write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        (head, String::from_utf8(buf[head_end..].to_vec()).unwrap())
    });
    let dest = build(
        "fhir",
        &format!(
            "url = \"http://127.0.0.1:{port}/fhir/R4\"\nauth = {{ type = \"bearer\", token_env = \"PATH\" }}"
        ),
    )
    .unwrap();
    let token = std::env::var("PATH").unwrap();
    assert!(!format!("{dest:?}").contains(&token), "{dest:?}");
    let bundle = r#"{"resourceType":"Bundle","type":"transaction","entry":[]}"#;
    let report = dest
        .deliver(&Item {
            message_id: 9,
            bundle: Some(bundle),
            raw: b"",
        })
        .await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    assert_eq!(report.status, Some(201));
    let (head, body) = server.await.unwrap();
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("POST /fhir/R4 HTTP/1.1\r\n"), "{head}");
    assert!(
        lower.contains("\r\ncontent-type: application/fhir+json\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("\r\nauthorization: Bearer {token}\r\n")),
        "{head}"
    );
    assert_eq!(body, bundle);
}
