//! The idempotency engine on the memory store (SPEC §3-§6): every decision a client can
//! observe, with a real counting upstream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use http::{Response, StatusCode};
use idemgate::body::full;
use support::*;

const ORDERS: &str = r#"
[upstream]
url = "{upstream}"
timeout = "2s"

[idempotency]
wait_timeout = "10s"

[[routes]]
name = "orders"
methods = ["POST"]
path = "/v1/orders"
"#;

fn with(extra_idempotency: &str) -> String {
    ORDERS.replace(
        "wait_timeout = \"10s\"",
        &format!("wait_timeout = \"10s\"\n{extra_idempotency}"),
    )
}

const KEY: &str = "idempotency-key";

#[tokio::test]
async fn first_request_runs_and_retry_replays_the_same_response() {
    let upstream = FakeUpstream::buffered(|seen, n| async move {
        let mut resp = echo_response(&seen, n);
        resp.headers_mut()
            .insert("set-cookie", "session=abc".parse().unwrap());
        resp.headers_mut()
            .insert("x-order", format!("ord_{n}").parse().unwrap());
        let key = seen.headers.get("idempotency-key").unwrap().clone();
        resp.headers_mut().insert("x-saw-key", key);
        resp
    })
    .await;
    let proxy = TestProxy::start(ORDERS, &upstream.url()).await;
    let c = Client::new();
    let first = c
        .post(&proxy.url("/v1/orders"), &[(KEY, "k-1")], r#"{"sku":"a"}"#)
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(first.header("set-cookie"), Some("session=abc"));
    assert_eq!(
        first.header("x-saw-key"),
        Some("k-1"),
        "key forwarded unchanged"
    );
    let again = c
        .post(
            &proxy.url("/v1/orders"),
            &[(KEY, "\"k-1\"")],
            r#"{"sku":"a"}"#,
        )
        .await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.body, first.body, "replay body differs");
    assert_eq!(again.header("x-order"), Some("ord_1"));
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        again.header("set-cookie"),
        None,
        "replay_drop_headers not applied"
    );
    assert!(again.header("date").is_some());
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn requests_without_a_key_pass_through_and_required_routes_refuse_them() {
    let upstream = FakeUpstream::echo().await;
    let toml =
        format!("{ORDERS}\n[[routes]]\nname = \"pay\"\npath = \"/v1/pay\"\nrequired = true\n");
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let c = Client::new();
    c.post(&proxy.url("/v1/orders"), &[], "x").await;
    c.post(&proxy.url("/v1/orders"), &[], "x").await;
    assert_eq!(upstream.calls(), 2, "keyless requests must each run");
    let got = c.post(&proxy.url("/v1/pay"), &[], "x").await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(got.code(), "idempotency_key_missing");
    assert_eq!(upstream.calls(), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn invalid_keys_get_400_and_never_reach_the_upstream() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(&with("max_key_length = 8"), &upstream.url()).await;
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    for bad in [
        "",
        "\"\"",
        "123456789",
        "has space",
        "caf\u{e9}",
        "\"unterminated",
    ] {
        let req = http::Request::post(&url)
            .header(KEY, http::HeaderValue::from_bytes(bad.as_bytes()).unwrap());
        let got = c
            .send(
                req.body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap(),
            )
            .await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "key {bad:?}");
        assert_eq!(got.code(), "idempotency_key_invalid", "key {bad:?}");
    }
    let twice = c.post(&url, &[(KEY, "a"), (KEY, "b")], "").await;
    assert_eq!(twice.code(), "idempotency_key_invalid");
    assert_eq!(upstream.calls(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn same_key_with_another_body_is_a_mismatch() {
    let upstream = FakeUpstream::echo().await;
    let toml = format!("{ORDERS}\n[[routes]]\nname = \"refunds\"\npath = \"/v1/refunds\"\n");
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let c = Client::new();
    assert_eq!(
        c.post(&proxy.url("/v1/orders"), &[(KEY, "m")], "a")
            .await
            .status,
        StatusCode::CREATED
    );
    let other = c.post(&proxy.url("/v1/orders"), &[(KEY, "m")], "b").await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.code(), "idempotency_key_mismatch");
    let other_path = c.post(&proxy.url("/v1/refunds"), &[(KEY, "m")], "a").await;
    assert_eq!(other_path.code(), "idempotency_key_mismatch");
    let query = c
        .post(&proxy.url("/v1/orders?dry=1"), &[(KEY, "m")], "a")
        .await;
    assert_eq!(query.code(), "idempotency_key_mismatch");
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn json_fingerprint_ignores_key_order_and_whitespace() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(&with("body_fingerprint = \"json\""), &upstream.url()).await;
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let first = c
        .post(&url, &[(KEY, "j")], r#"{"a":1,"b":{"x":[1,2]}}"#)
        .await;
    let again = c
        .post(
            &url,
            &[(KEY, "j")],
            "{ \"b\": {\"x\": [1, 2]},\n \"a\": 1 }",
        )
        .await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    let changed = c
        .post(&url, &[(KEY, "j")], r#"{"a":1,"b":{"x":[2,1]}}"#)
        .await;
    assert_eq!(changed.code(), "idempotency_key_mismatch");
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn storm_of_50_identical_requests_runs_the_upstream_once() {
    let (upstream, gate) = gated_echo().await;
    let proxy = TestProxy::start(ORDERS, &upstream.url()).await;
    let url = proxy.url("/v1/orders");
    let c = Client::new();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        tasks.push(spawn_post(&c, &url, &[(KEY, "storm")], "same body"));
    }
    assert_eq!(gate.entered().await, 1);
    gate.open();
    let mut bodies = Vec::new();
    let mut replayed = 0;
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.status, StatusCode::CREATED);
        replayed += usize::from(got.header("idempotent-replayed") == Some("true"));
        bodies.push(got.body);
    }
    assert!(bodies.iter().all(|b| *b == bodies[0]), "bodies differ");
    assert_eq!(replayed, 49);
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn storm_with_two_bodies_runs_once_and_the_other_body_only_gets_mismatch() {
    let (upstream, gate) = gated_echo().await;
    let proxy = TestProxy::start(ORDERS, &upstream.url()).await;
    let url = proxy.url("/v1/orders");
    let c = Client::new();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let body = if i % 2 == 0 { "body-A" } else { "body-B" };
        tasks.push((body, spawn_post(&c, &url, &[(KEY, "split")], body)));
    }
    gate.entered().await;
    gate.open();
    let mut results = Vec::new();
    for (body, t) in tasks {
        results.push((body, t.await.unwrap()));
    }
    let winner = results
        .iter()
        .find(|(_, g)| g.status == StatusCode::CREATED)
        .unwrap()
        .0;
    for (body, got) in &results {
        if *body == winner {
            assert_eq!(got.status, StatusCode::CREATED);
            assert_eq!(got.json()["body"], winner);
        } else {
            assert_eq!(
                got.status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{body} got {:?}",
                got.body
            );
            assert_eq!(got.code(), "idempotency_key_mismatch");
        }
    }
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn reject_mode_answers_409_with_retry_after_while_in_flight() {
    let (upstream, gate) = gated_echo().await;
    let proxy = TestProxy::start(&with("concurrent = \"reject\""), &upstream.url()).await;
    let url = proxy.url("/v1/orders");
    let c = Client::new();
    let first = spawn_post(&c, &url, &[(KEY, "r")], "x");
    gate.entered().await;
    let dup = c.post(&url, &[(KEY, "r")], "x").await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    assert_eq!(dup.code(), "idempotency_request_in_progress");
    assert_eq!(dup.header("retry-after"), Some("1"));
    gate.open();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    let after = c.post(&url, &[(KEY, "r")], "x").await;
    assert_eq!(after.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_waiter_gets_409_when_wait_timeout_passes() {
    let (upstream, gate) = gated_echo().await;
    let toml = ORDERS.replace("wait_timeout = \"10s\"", "wait_timeout = \"150ms\"");
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let url = proxy.url("/v1/orders");
    let c = Client::new();
    let first = spawn_post(&c, &url, &[(KEY, "w")], "x");
    gate.entered().await;
    let dup = c.post(&url, &[(KEY, "w")], "x").await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    assert_eq!(dup.code(), "idempotency_request_in_progress");
    assert!(dup.header("retry-after").is_some());
    gate.open();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_flight_finds_its_response_on_retry() {
    let (upstream, gate) = gated_echo().await;
    let proxy = TestProxy::start(ORDERS, &upstream.url()).await;
    let url = proxy.url("/v1/orders");
    let gone = tokio::spawn({
        let url = url.clone();
        async move { Client::new().post(&url, &[(KEY, "d")], "work").await }
    });
    gate.entered().await;
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    gate.open();
    let retry = Client::new().post(&url, &[(KEY, "d")], "work").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.json()["call"], 1);
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn tenants_with_the_same_key_never_share_a_record() {
    let (upstream, gate) = gated_echo().await;
    let proxy = TestProxy::start(ORDERS, &upstream.url()).await;
    let url = proxy.url("/v1/orders");
    let c = Client::new();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (tenant, body) = if i % 2 == 0 {
            ("Bearer alice", "alice-order")
        } else {
            ("Bearer bob", "bob-order")
        };
        let headers = [(KEY, "shared"), ("authorization", tenant)];
        tasks.push((body, spawn_post(&c, &url, &headers, body)));
    }
    gate.entered().await;
    gate.entered().await;
    gate.open();
    for (body, t) in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.status, StatusCode::CREATED);
        assert_eq!(
            got.json()["body"],
            body,
            "a tenant saw another tenant's response"
        );
    }
    assert_eq!(upstream.calls(), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_record_expires_after_its_ttl() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(&with("ttl = \"1s\""), &upstream.url()).await;
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    c.post(&url, &[(KEY, "t")], "x").await;
    let replay = c.post(&url, &[(KEY, "t")], "x").await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let mut fresh;
    eventually!(
        {
            let got = c.post(&url, &[(KEY, "t")], "x").await;
            let expired = got.header("idempotent-replayed").is_none();
            fresh = Some(got);
            expired
        },
        "record never expired"
    );
    assert_eq!(fresh.unwrap().json()["call"], 2);
    assert_eq!(upstream.calls(), 2);
    proxy.shutdown().await;
}

async fn status_upstream(status: u16) -> FakeUpstream {
    FakeUpstream::buffered(move |_, n| async move {
        Response::builder()
            .status(status)
            .body(full(format!("attempt {n}")))
            .unwrap()
    })
    .await
}

#[tokio::test]
async fn a_5xx_is_not_recorded_by_default() {
    let upstream = status_upstream(500).await;
    let proxy = TestProxy::start(ORDERS, &upstream.url()).await;
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    assert_eq!(c.post(&url, &[(KEY, "e")], "x").await.body, "attempt 1");
    let retry = c.post(&url, &[(KEY, "e")], "x").await;
    assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(retry.body, "attempt 2");
    assert_eq!(upstream.calls(), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_5xx_is_recorded_when_store_statuses_says_so() {
    let upstream = status_upstream(503).await;
    let proxy = TestProxy::start(&with("store_statuses = [\"2xx\", 503]"), &upstream.url()).await;
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    c.post(&url, &[(KEY, "e5")], "x").await;
    let retry = c.post(&url, &[(KEY, "e5")], "x").await;
    assert_eq!(retry.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry.body, "attempt 1");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_response_over_max_stored_response_streams_once_then_410() {
    let upstream =
        FakeUpstream::buffered(|_, _| async move { Response::new(full(vec![b'L'; 300_000])) })
            .await;
    let proxy = TestProxy::start(&with("max_stored_response = \"100KiB\""), &upstream.url()).await;
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let first = c.post(&url, &[(KEY, "big")], "x").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body.len(), 300_000);
    assert!(first.body.iter().all(|b| *b == b'L'));
    let retry = c.post(&url, &[(KEY, "big")], "x").await;
    assert_eq!(retry.status, StatusCode::GONE);
    assert_eq!(retry.code(), "idempotency_response_not_retained");
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn bodies_over_max_request_body_get_413_and_never_reach_the_upstream() {
    let upstream = FakeUpstream::echo().await;
    let toml = format!("[server]\nmax_request_body = \"1KiB\"\n{ORDERS}");
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let big = "x".repeat(2048);
    let got = c.post(&url, &[(KEY, "b")], &big).await;
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(got.code(), "request_body_too_large");
    // Chunked (no Content-Length): judged while reading.
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>(4);
    let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
    let req = http::Request::post(&url)
        .header(KEY, "b2")
        .body(body)
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let sending = tokio::spawn(async move {
        for _ in 0..4 {
            if tx
                .send(Ok(http_body::Frame::data(bytes::Bytes::from(vec![
                    b'y';
                    600
                ]))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    sending.await.unwrap();
    assert_eq!(upstream.calls(), 0);
    // The key was never claimed: a proper request with it runs.
    assert_eq!(
        c.post(&url, &[(KEY, "b")], "small").await.status,
        StatusCode::CREATED
    );
    proxy.shutdown().await;
}

/// A minimal Stream over an mpsc receiver (no extra crate needed).
fn tokio_stream_from<T>(rx: tokio::sync::mpsc::Receiver<T>) -> ReceiverStream<T> {
    ReceiverStream(rx)
}

struct ReceiverStream<T>(tokio::sync::mpsc::Receiver<T>);

impl<T> futures_core::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

#[tokio::test]
async fn a_slow_body_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = FakeUpstream::echo().await;
    let toml = format!("[server]\nbody_read_timeout = \"200ms\"\n{ORDERS}");
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = "POST /v1/orders HTTP/1.1\r\nhost: x\r\nidempotency-key: slow\r\ncontent-length: 10\r\n\r\nabc";
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_body_timeout"), "{text}");
    assert_eq!(upstream.calls(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn upstream_refused_answers_502_and_leaves_the_key_free() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let proxy = TestProxy::start(
        &with("store_statuses = [\"2xx\", \"5xx\"]"),
        &format!("http://{addr}"),
    )
    .await;
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let got = c.post(&url, &[(KEY, "down")], "x").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.code(), "upstream_unavailable");
    // Never recorded even with 5xx in store_statuses: the request never left.
    let again = c.post(&url, &[(KEY, "down")], "x").await;
    assert_eq!(again.header("idempotent-replayed"), None);
    assert_eq!(again.code(), "upstream_unavailable");
    proxy.shutdown().await;
}

#[tokio::test]
async fn upstream_timeout_is_recorded_only_when_5xx_is_kept() {
    let (upstream, gate) = gated_echo().await;
    let default = ORDERS.replace("timeout = \"2s\"", "timeout = \"100ms\"");
    let keep = default.replace(
        "wait_timeout = \"10s\"",
        "wait_timeout = \"10s\"\nstore_statuses = [\"2xx\", \"5xx\"]",
    );
    let c = Client::new();

    let proxy = TestProxy::start(&default, &upstream.url()).await;
    let url = proxy.url("/v1/orders");
    assert_eq!(
        c.post(&url, &[(KEY, "slow")], "x").await.code(),
        "upstream_timeout"
    );
    assert_eq!(
        c.post(&url, &[(KEY, "slow")], "x").await.code(),
        "upstream_timeout"
    );
    assert_eq!(upstream.calls(), 2, "not kept: the retry runs again");
    proxy.shutdown().await;

    let proxy = TestProxy::start(&keep, &upstream.url()).await;
    let url = proxy.url("/v1/orders");
    assert_eq!(
        c.post(&url, &[(KEY, "slow")], "x").await.code(),
        "upstream_timeout"
    );
    let replay = c.post(&url, &[(KEY, "slow")], "x").await;
    assert_eq!(replay.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.calls(), 3, "kept: at most once");
    gate.open();
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_reset_after_the_request_was_sent_is_an_unknown_outcome() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            drop(s); // the request arrived; the connection dies before any answer
        }
    });
    let proxy = TestProxy::start(
        &with("store_statuses = [\"2xx\", \"5xx\"]"),
        &format!("http://{addr}"),
    )
    .await;
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let got = c.post(&url, &[(KEY, "reset")], "x").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.code(), "upstream_unavailable");
    let replay = c.post(&url, &[(KEY, "reset")], "x").await;
    assert_eq!(replay.status, StatusCode::BAD_GATEWAY);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn json_pointer_keys_and_duplicate_response() {
    let upstream = FakeUpstream::echo().await;
    let toml = format!(
        "{ORDERS}\n[[routes]]\nname = \"hook\"\npath = \"/hooks\"\nkey = {{ json_pointer = \"/id\" }}\nrequired = true\nduplicate_response = {{ status = 200, body = '{{\"ok\":true,\"cached\":true}}' }}\n"
    );
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let c = Client::new();
    let url = proxy.url("/hooks");
    let first = c.post(&url, &[], r#"{"id":"evt_1","type":"paid"}"#).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let dup = c.post(&url, &[], r#"{"id":"evt_1","type":"paid"}"#).await;
    assert_eq!(dup.status, StatusCode::OK);
    assert_eq!(dup.body, r#"{"ok":true,"cached":true}"#);
    assert_eq!(dup.header("content-type"), Some("application/json"));
    let missing = c.post(&url, &[], r#"{"type":"paid"}"#).await;
    assert_eq!(missing.code(), "idempotency_key_missing");
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn conflicting_content_lengths_get_400_and_nothing_is_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(ORDERS, &upstream.url()).await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let req =
        "POST /v1/orders HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd";
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 400"));
    assert_eq!(upstream.calls(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_answered_once_then_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(ORDERS, &upstream.url()).await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // A smuggling attempt: the second request hides in what CL would call the body.
    let smuggled = "GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";
    let req = format!(
        "POST /other HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
        5 + smuggled.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert!(!text.contains("/smuggled"), "{text}");
    assert_eq!(
        upstream.calls(),
        1,
        "only the request before the smuggled one ran"
    );
    proxy.shutdown().await;
}
