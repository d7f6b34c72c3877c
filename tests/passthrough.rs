//! Routes that are not enforced: the proxy is a faithful, streaming reverse proxy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use http::{Response, StatusCode};
use idemgate::body::full;
use support::*;

const BASE: &str = r#"
[upstream]
url = "{upstream}"
timeout = "2s"
"#;

#[tokio::test]
async fn request_and_response_arrive_unchanged() {
    let upstream = FakeUpstream::buffered(|seen, _| async move {
        let doc = serde_json::json!({
            "method": seen.method.as_str(),
            "uri": seen.uri.to_string(),
            "x-custom": seen.headers.get("x-custom").map(|v| v.to_str().unwrap()),
            "host": seen.headers.get("host").map(|v| v.to_str().unwrap()),
            "content-length": seen.headers.get("content-length").map(|v| v.to_str().unwrap()),
            "body": String::from_utf8_lossy(&seen.body),
        });
        Response::builder()
            .status(StatusCode::ACCEPTED)
            .header("x-from-upstream", "yes")
            .header("content-type", "application/json")
            .body(full(doc.to_string()))
            .unwrap()
    })
    .await;
    let proxy = TestProxy::start(BASE, &upstream.url()).await;
    let client = Client::new();
    let got = client
        .send(request(
            "PATCH",
            &proxy.url("/v1/things/7?expand=a&x=%20y"),
            &[("x-custom", "hello"), ("host", "api.example")],
            "payload bytes",
        ))
        .await;
    assert_eq!(got.status, StatusCode::ACCEPTED);
    assert_eq!(got.header("x-from-upstream"), Some("yes"));
    let seen = got.json();
    assert_eq!(seen["method"], "PATCH");
    assert_eq!(seen["uri"], "/v1/things/7?expand=a&x=%20y");
    assert_eq!(seen["x-custom"], "hello");
    assert_eq!(seen["host"], "api.example");
    assert_eq!(seen["content-length"], "13");
    assert_eq!(seen["body"], "payload bytes");
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways_and_forwarding_headers_set() {
    let upstream = FakeUpstream::buffered(|seen, _| async move {
        let names: Vec<String> = seen.headers.keys().map(|k| k.to_string()).collect();
        let h = |n: &str| seen.headers.get(n).map(|v| v.to_str().unwrap().to_string());
        let doc = serde_json::json!({
            "names": names,
            "xff": h("x-forwarded-for"),
            "proto": h("x-forwarded-proto"),
            "fhost": h("x-forwarded-host"),
        });
        Response::builder()
            .header("connection", "x-upstream-private")
            .header("x-upstream-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("x-upstream-public", "ok")
            .body(full(doc.to_string()))
            .unwrap()
    })
    .await;
    let proxy = TestProxy::start(BASE, &upstream.url()).await;
    let got = Client::new()
        .send(request(
            "GET",
            &proxy.url("/anything"),
            &[
                ("connection", "x-client-private"),
                ("x-client-private", "1"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                ("te", "trailers"),
                ("x-forwarded-for", "203.0.113.9"),
                ("host", "shop.example"),
                ("x-kept", "1"),
            ],
            "",
        ))
        .await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = got.json();
    let names: Vec<&str> = seen["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for gone in [
        "connection",
        "x-client-private",
        "proxy-authorization",
        "te",
        "keep-alive",
    ] {
        assert!(
            !names.contains(&gone),
            "{gone} reached the upstream: {names:?}"
        );
    }
    assert!(names.contains(&"x-kept"));
    assert_eq!(seen["xff"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["proto"], "http");
    assert_eq!(seen["fhost"], "shop.example");
    assert_eq!(got.header("x-upstream-public"), Some("ok"));
    assert_eq!(got.header("x-upstream-private"), None);
    assert_eq!(got.header("keep-alive"), None);
    proxy.shutdown().await;
}

#[tokio::test]
async fn upstream_down_gives_502_problem() {
    // Bind and drop a listener to get a port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = TestProxy::start(BASE, &format!("http://127.0.0.1:{port}")).await;
    let got = Client::new().get(&proxy.url("/x")).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.code(), "upstream_unavailable");
    let doc = got.json();
    assert_eq!(doc["status"], 502);
    assert!(doc["type"].is_string() && doc["title"].is_string() && doc["detail"].is_string());
    proxy.shutdown().await;
}

#[tokio::test]
async fn slow_upstream_gives_504_problem() {
    let (upstream, gate) = gated_echo().await;
    let toml = BASE.replace("timeout = \"2s\"", "timeout = \"200ms\"");
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let got = Client::new().get(&proxy.url("/slow")).await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(got.code(), "upstream_timeout");
    assert_eq!(upstream.calls(), 1);
    gate.open();
    proxy.shutdown().await;
}

#[tokio::test]
async fn request_in_flight_at_shutdown_gets_its_full_response() {
    let (upstream, gate) = gated_echo().await;
    let mut proxy = TestProxy::start(BASE, &upstream.url()).await;
    let url = proxy.url("/in-flight");
    let admin = proxy.admin.unwrap();
    let client = Client::new();
    let in_flight = tokio::spawn(async move { client.get(&url).await });
    gate.entered().await;
    let stopped = proxy.trigger_shutdown();
    // While draining, readiness reports 503 and new connections are refused.
    let admin_client = Client::new();
    let readyz = format!("http://{admin}/readyz");
    eventually!(
        admin_client.get(&readyz).await.status == StatusCode::SERVICE_UNAVAILABLE,
        "readyz never reported draining"
    );
    gate.open();
    let got = in_flight.await.unwrap();
    assert_eq!(got.status, StatusCode::CREATED);
    assert_eq!(got.json()["uri"], "/in-flight");
    stopped.await.unwrap().unwrap();
}

#[tokio::test]
async fn admin_health_endpoints() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(BASE, &upstream.url()).await;
    let admin = proxy.admin.unwrap();
    let client = Client::new();
    assert_eq!(
        client.get(&format!("http://{admin}/healthz")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        client.get(&format!("http://{admin}/readyz")).await.status,
        StatusCode::OK
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn slow_headers_are_cut_off_by_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = FakeUpstream::echo().await;
    let toml = format!("[server]\nheader_read_timeout = \"200ms\"\n{BASE}");
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(b"GET /slow-headers HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The proxy closes the connection; without the timer this read would hang.
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf))
        .await
        .expect("connection with slow headers was never closed")
        .ok();
    assert_eq!(upstream.calls(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn max_connections_closes_further_connections_at_once_until_one_closes() {
    use http_body_util::Full;
    let upstream = FakeUpstream::echo().await;
    let toml = format!("[server]\nmax_connections = 1\n{BASE}");
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let connect = |addr| async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        (sender, conn)
    };
    let get = |path: &'static str| {
        http::Request::get(path)
            .header("host", "x")
            .body(Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let (mut first, first_conn) = connect(proxy.addr).await;
    assert_eq!(
        first.send_request(get("/one")).await.unwrap().status(),
        StatusCode::CREATED
    );
    // Over the limit: the connection is closed at once, never left waiting.
    let (mut second, _second_conn) = connect(proxy.addr).await;
    let refused = tokio::time::timeout(Duration::from_secs(5), second.send_request(get("/two")))
        .await
        .expect("a connection over max_connections was left hanging");
    assert!(
        refused.is_err(),
        "served beyond max_connections: {refused:?}"
    );
    assert_eq!(upstream.calls(), 1);
    drop(first);
    first_conn.await.unwrap().unwrap();
    // The slot is free again (the refused socket never held one).
    let c = Client::new();
    eventually!(
        c.try_get(&proxy.url("/three")).await.map(|g| g.status) == Some(StatusCode::CREATED),
        "the freed slot was never served"
    );
    proxy.shutdown().await;
}
