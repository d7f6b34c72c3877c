//! The real binary as a user runs it: large bodies stream through without the proxy's
//! memory growing by their size, and SIGTERM drains in-flight exchanges.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use idemgate::body::{full, stream};
use support::*;

const TWENTY_MIB: usize = 20 * 1024 * 1024;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "10s"

[upstream]
url = "{upstream}"
"#;

async fn pattern_upstream() -> FakeUpstream {
    FakeUpstream::raw(|req, _| async move {
        if req.uri().path() == "/download" {
            return Response::new(stream(PatternBody::new(TWENTY_MIB)));
        }
        let verdict = match verify_pattern(req.into_body()).await {
            Ok(n) => format!("ok {n}"),
            Err(e) => e,
        };
        Response::new(full(verdict))
    })
    .await
}

#[tokio::test]
async fn twenty_mib_up_and_down_stream_byte_exact_without_buffering() {
    let upstream = pattern_upstream().await;
    let proxy = ProxyProcess::spawn(CONFIG, &upstream.url()).await;
    let client: HyperClient<_, PatternBody> =
        HyperClient::builder(TokioExecutor::new()).build_http();

    // Warm up once so the baseline includes the connection pools and buffers.
    let warm = Request::post(proxy.url("/upload"))
        .body(PatternBody::new(CHUNK))
        .unwrap();
    let warm = client
        .request(warm)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(warm.to_bytes(), Bytes::from(format!("ok {CHUNK}")));
    let baseline = proxy.peak_rss_kib();

    let up = Request::post(proxy.url("/upload"))
        .body(PatternBody::new(TWENTY_MIB))
        .unwrap();
    let resp = client.request(up).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let verdict = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        verdict,
        Bytes::from(format!("ok {TWENTY_MIB}")),
        "upload arrived changed"
    );

    let down = Request::get(proxy.url("/download"))
        .body(PatternBody::new(0))
        .unwrap();
    let resp = client.request(down).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        verify_pattern(resp.into_body()).await,
        Ok(TWENTY_MIB),
        "download arrived changed"
    );

    let grown_kib = proxy.peak_rss_kib().saturating_sub(baseline);
    eprintln!("proxy peak RSS: {baseline} KiB before, +{grown_kib} KiB after 2 x 20 MiB");
    // 20 MiB moved each way; a buffering proxy would grow by at least that much.
    assert!(
        grown_kib < 8 * 1024,
        "proxy peak memory grew by {grown_kib} KiB"
    );
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let (upstream, gate) = gated_echo().await;
    let mut proxy = ProxyProcess::spawn(CONFIG, &upstream.url()).await;
    let url = proxy.url("/slow");
    let client = Client::new();
    let in_flight = tokio::spawn(async move { client.get(&url).await });
    gate.entered().await;

    proxy.signal("TERM");
    // The drain has begun once the process logs it; only then let the upstream answer.
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = proxy.lines.recv().await {
            if line.contains("draining") {
                return;
            }
        }
    })
    .await
    .expect("no drain log line after SIGTERM");
    gate.open();

    let got = in_flight.await.unwrap();
    assert_eq!(got.status, StatusCode::CREATED);
    assert_eq!(got.json()["uri"], "/slow");
    let status = proxy.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn demo_replays_a_retried_order_and_refuses_a_reused_key() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::spawn_args(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        dir,
    )
    .await;
    let c = Client::new();
    let url = proxy.url("/v1/orders");
    let key = [("idempotency-key", "order-123")];
    let first = c.post(&url, &key, r#"{"sku":"tea","qty":1}"#).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.json()["id"], "ord_1");
    let retry = c.post(&url, &key, r#"{"sku":"tea","qty":1}"#).await;
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    let other = c.post(&url, &key, r#"{"sku":"coffee"}"#).await;
    assert_eq!(other.code(), "idempotency_key_mismatch");
    assert_eq!(c.get(&url).await.json()["orders_created"], 1);
    let admin = proxy.admin.unwrap();
    assert_eq!(
        c.get(&format!("http://{admin}/healthz")).await.status,
        StatusCode::OK
    );
}
