//! Each serving thread's own upstream connections (`src/proxy/pool.rs`), on real
//! sockets: a TCP relay in front of the upstream counts the connections the proxy opens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;

use http::StatusCode;
use support::relay::{Fault, Relay};
use support::*;

const ROUTES: &str = r#"
[upstream]
url = "{upstream}"

[[routes]]
name = "orders"
methods = ["POST"]
path = "/v1/orders"
"#;

/// Pass-through GETs and recorded POSTs, one after another: each answer is the
/// upstream's, and all of them went over the first connection.
#[tokio::test]
async fn requests_one_after_another_share_one_http1_connection() {
    let upstream = FakeUpstream::echo().await;
    let relay = Relay::start(upstream.addr, Fault::Pass).await;
    let proxy = TestProxy::start(ROUTES, &relay.url()).await;
    let client = Client::new();
    for n in 1..=10 {
        let got = client.get(&proxy.url(&format!("/items/{n}"))).await;
        assert_eq!(got.status, StatusCode::CREATED, "{got:?}");
        assert_eq!(got.json()["uri"], format!("/items/{n}"));
        let key = format!("order-{n}");
        let got = client
            .post(&proxy.url("/v1/orders"), &[("idempotency-key", &key)], &key)
            .await;
        assert_eq!(got.status, StatusCode::CREATED, "{got:?}");
        assert_eq!(got.json()["body"], key);
    }
    assert_eq!(upstream.calls(), 20);
    assert_eq!(relay.accepted(), 1, "a connection was not reused");
    proxy.shutdown().await;
}

/// An HTTPS upstream that negotiates h2 by ALPN: its one connection carries every
/// request, a burst on a fresh proxy included (the burst waits for the first connect
/// instead of opening a connection each).
#[tokio::test]
async fn an_h2_upstream_connection_is_shared() {
    // The https upstream is idemgate itself terminating TLS in front of an echo server.
    let echo = FakeUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let terminating = format!(
        "[upstream]\nurl = \"{{upstream}}\"\n[server.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n"
    );
    let https = TestProxy::start(&terminating, &echo.url()).await;
    let relay = Relay::start(https.addr, Fault::Pass).await;
    let trusting = ROUTES.replace(
        "url = \"{upstream}\"",
        &format!("url = \"{{upstream}}\"\nca_file = {cert:?}"),
    );
    let toml = trusting;
    let url = format!("https://localhost:{}", relay.addr().port());
    let proxy = Arc::new(TestProxy::start(&toml, &url).await);
    let client = Client::new();
    let at_once: Vec<_> = (1..=8)
        .map(|n| {
            let (client, url) = (client.clone(), proxy.url("/v1/orders"));
            tokio::spawn(async move {
                let key = format!("k{n}");
                let got = client.post(&url, &[("idempotency-key", &key)], &key).await;
                (n, got)
            })
        })
        .collect();
    for task in at_once {
        let (n, got) = task.await.unwrap();
        assert_eq!(got.status, StatusCode::CREATED, "{got:?}");
        assert_eq!(got.json()["body"], format!("k{n}"));
    }
    let last = client
        .post(&proxy.url("/v1/orders"), &[("idempotency-key", "k0")], "k0")
        .await;
    assert_eq!(last.status, StatusCode::CREATED, "{last:?}");
    assert_eq!(echo.calls(), 9);
    assert_eq!(relay.accepted(), 1, "the h2 connection was not shared");
    Arc::into_inner(proxy).unwrap().shutdown().await;
    https.shutdown().await;
}
