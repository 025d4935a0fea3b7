//! The admin API's token: every endpoint but the two probes refuses a request without
//! it, or with a wrong one, whatever the request otherwise holds.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use passerelle_engine::pipeline::UnroutedAnswer;
use reqwest::Method;

mod common;
use common::{Harness, serve_admin};

const TOKEN: &str = "s3cret";

/// The statuses of one request without a token, with a wrong one and with the right one.
async fn statuses(base: &str, method: &Method, path: &str) -> [u16; 3] {
    let client = reqwest::Client::new();
    let mut out = [0; 3];
    for (i, token) in [None, Some("wrong"), Some(TOKEN)].into_iter().enumerate() {
        let mut request = client
            .request(method.clone(), format!("{base}{path}"))
            .json(&serde_json::json!({}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        out[i] = request.send().await.unwrap().status().as_u16();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_but_the_probes_wants_the_token() {
    let engine = Harness::new(
        "name = \"all\"\nmapping = \"v2-to-fhir\"\ndefault = true\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n",
    );
    let (_listener, pipeline) = engine
        .start_with(UnroutedAnswer::Accept, Default::default())
        .await;
    let base = serve_admin(pipeline, TOKEN).await;

    for path in ["/health", "/ready"] {
        assert_eq!(
            statuses(&base, &Method::GET, path).await,
            [200; 3],
            "{path}"
        );
    }
    for (method, path) in [
        (Method::GET, "/metrics"),
        (Method::GET, "/api/messages"),
        (Method::POST, "/api/messages/query"),
        (Method::GET, "/api/messages/1"),
        (Method::POST, "/api/messages/replay"),
        (Method::POST, "/api/messages/purge"),
        (Method::POST, "/api/messages/resubmit"),
    ] {
        let [none, wrong, right] = statuses(&base, &method, path).await;
        assert_eq!([none, wrong], [401, 401], "{method} {path}");
        // With the token the request reaches its handler, whose answer to this empty
        // body is its own (a page, a 404, a 400 or 422 for a missing field).
        assert_ne!(right, 401, "{method} {path}");
    }
}
