//! Hostile clients on raw sockets: idle and half-open connections, oversized heads,
//! malformed framing, and JSON keys built to confuse. Each test states the exact answer
//! a client gets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::{Response, StatusCode};
use idemgate::body::full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ORDERS: &str = r#"
[upstream]
url = "{upstream}"
[[routes]]
name = "orders"
path = "/v1/orders"
"#;

/// Writes `bytes`, then reads until the server closes (at most 5 s).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_to_close(&mut s).await
}

async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open: {:?}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// The `code` of a raw HTTP/1 problem+json answer, asserting its status line.
fn problem_code(raw: &str, status: u16) -> String {
    assert!(raw.starts_with(&format!("HTTP/1.1 {status} ")), "{raw}");
    assert!(
        raw.contains("content-type: application/problem+json"),
        "{raw}"
    );
    let body = raw.split("\r\n\r\n").nth(1).unwrap();
    let doc: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(doc["status"], status, "{raw}");
    doc["code"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn idle_and_half_open_connections_are_closed_and_cannot_lock_out_clients() {
    let upstream = FakeUpstream::echo().await;
    // Long enough that the four idle sockets are still open while the checks below run on
    // a loaded machine; short enough to wait for their close.
    let toml = format!("[server]\nmax_connections = 4\nheader_read_timeout = \"1500ms\"\n{ORDERS}");
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let admin = format!("http://{}/readyz", proxy.admin.unwrap());
    let c = Client::new();
    // Nothing at all, part of the HTTP/2 preface, part of a request line, a head
    // without its blank line: every one of them fills a slot.
    let mut idle = Vec::new();
    for partial in [
        &b""[..],
        b"PRI * HTTP/2.0\r\n",
        b"POST /v1/ord",
        b"GET / HTTP/1.1\r\nHost: x\r\n",
    ] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(partial).await.unwrap();
        idle.push(s);
    }
    eventually!(
        c.get(&admin).await.status == StatusCode::SERVICE_UNAVAILABLE,
        "readyz never reported saturation"
    );
    // One more is closed at once, not left hanging in the backlog.
    let mut over = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = over.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(
        read_to_close(&mut over).await,
        "",
        "over the limit: closed with no answer"
    );
    // Each idle socket is closed by header_read_timeout, whatever it sent.
    for s in &mut idle {
        read_to_close(s).await;
    }
    eventually!(
        c.get(&admin).await.status == StatusCode::OK,
        "readyz never recovered"
    );
    let got = c
        .post(&proxy.url("/v1/orders"), &[("idempotency-key", "k")], "x")
        .await;
    assert_eq!(got.status, StatusCode::CREATED);
    proxy.shutdown().await;
}

/// A proxy with `header_read_timeout = 300ms` and a connection that has sent one GET.
async fn one_request_sent() -> (FakeUpstream, TestProxy, TcpStream) {
    let upstream = FakeUpstream::echo().await;
    let toml = format!("[server]\nheader_read_timeout = \"300ms\"\n{ORDERS}");
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    (upstream, proxy, s)
}

#[tokio::test]
async fn a_kept_alive_connection_is_closed_after_header_read_timeout_of_silence() {
    let (_upstream, proxy, mut s) = one_request_sent().await;
    let raw = read_to_close(&mut s).await;
    assert!(raw.starts_with("HTTP/1.1 201 "), "{raw}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_second_head_left_half_sent_on_a_kept_alive_connection_is_cut_off() {
    let (upstream, proxy, mut s) = one_request_sent().await;
    let mut head = vec![0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 201");
    // A slow client: the next head starts and never ends. The connection is closed,
    // with no answer to the half head.
    s.write_all(b"GET /b HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let rest = read_to_close(&mut s).await;
    assert_eq!(rest.matches("HTTP/1.1").count(), 0, "{rest}");
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn heads_over_max_header_bytes_get_431_problem_json() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(ORDERS, &upstream.url()).await;
    // Under the 64 KiB default: forwarded.
    let fits = format!(
        "GET /a HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(60 * 1024)
    );
    assert!(exchange(proxy.addr, fits.as_bytes())
        .await
        .starts_with("HTTP/1.1 201 "));
    // One header past it, or many small ones past it, or more than 100 headers: 431.
    let big = format!(
        "GET /a HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(65 * 1024)
    );
    assert_eq!(
        problem_code(&exchange(proxy.addr, big.as_bytes()).await, 431),
        "request_headers_too_large"
    );
    let many: String = (0..50)
        .map(|i| format!("X-H{i}: {}\r\n", "b".repeat(1400)))
        .collect();
    let many = format!("GET /a HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert_eq!(
        problem_code(&exchange(proxy.addr, many.as_bytes()).await, 431),
        "request_headers_too_large"
    );
    let count: String = (0..101).map(|i| format!("X-H{i}: 1\r\n")).collect();
    let count = format!("GET /a HTTP/1.1\r\nHost: x\r\n{count}\r\n");
    assert_eq!(
        problem_code(&exchange(proxy.addr, count.as_bytes()).await, 431),
        "request_headers_too_large"
    );
    // A head that never ends is cut at the limit, not buffered without bound.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        .await
        .unwrap();
    let chunk = vec![b'z'; 16 * 1024];
    for _ in 0..5 {
        if s.write_all(&chunk).await.is_err() {
            break;
        }
    }
    assert_eq!(
        problem_code(&read_to_close(&mut s).await, 431),
        "request_headers_too_large"
    );
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn http2_heads_over_max_header_bytes_get_431_problem_json() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(ORDERS, &upstream.url()).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = request(
        "GET",
        &proxy.url("/a"),
        &[("x-big", &"a".repeat(70 * 1024))],
        "",
    );
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let ok = client
        .request(request("GET", &proxy.url("/a"), &[], ""))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_parsers_own_refusals_are_problem_json() {
    let upstream = FakeUpstream::echo().await;
    let toml = format!("[server]\nmax_header_bytes = \"128KiB\"\n{ORDERS}");
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let bad_header = exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    )
    .await;
    assert_eq!(problem_code(&bad_header, 400), "bad_request");
    let bad_line = exchange(proxy.addr, b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(problem_code(&bad_line, 400), "bad_request");
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "u".repeat(70_000));
    assert_eq!(
        problem_code(&exchange(proxy.addr, long_uri.as_bytes()).await, 414),
        "uri_too_long"
    );
    let two_lengths =
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
    assert_eq!(
        problem_code(&exchange(proxy.addr, two_lengths).await, 400),
        "bad_request"
    );
    assert_eq!(upstream.calls(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_overflowing_chunk_size_on_a_passthrough_route_is_400() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(ORDERS, &upstream.url()).await;
    let raw = b"POST /pass HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\nabc\r\n";
    assert_eq!(
        problem_code(&exchange(proxy.addr, raw).await, 400),
        "bad_request"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_upstreams_own_bare_400_passes_through_unchanged() {
    let upstream = FakeUpstream::buffered(|_, _| async {
        let mut resp = Response::new(full(""));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        resp
    })
    .await;
    let proxy = TestProxy::start(ORDERS, &upstream.url()).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let raw = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(raw.starts_with("http/1.1 400 "), "{raw}");
    assert!(
        raw.contains("content-length: 0") && !raw.contains("problem+json"),
        "{raw}"
    );
    // The connection stays usable: it was the upstream's answer, not a parse error.
    s.write_all(b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(read_to_close(&mut s).await.starts_with("HTTP/1.1 400 "));
    proxy.shutdown().await;
}

const WEBHOOK: &str = r#"
[upstream]
url = "{upstream}"
[[routes]]
name = "hook"
path = "/hook"
key = { json_pointer = "/id" }
"#;

#[tokio::test]
async fn json_number_keys_are_their_exact_text() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(WEBHOOK, &upstream.url()).await;
    let c = Client::new();
    let url = proxy.url("/hook");
    let a = c
        .post(&url, &[], r#"{"id":18446744073709551616,"n":1}"#)
        .await;
    let b = c
        .post(&url, &[], r#"{"id":18446744073709551617,"n":2}"#)
        .await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    let big = c.post(&url, &[], r#"{"id":1e400,"n":3}"#).await;
    let again = c.post(&url, &[], r#"{"id":1e400,"n":3}"#).await;
    assert_eq!(big.status, StatusCode::CREATED);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.calls(), 3);
    proxy.shutdown().await;
}

#[tokio::test]
async fn deep_nesting_cannot_make_a_key_absent_on_an_optional_route() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(WEBHOOK, &upstream.url()).await;
    let c = Client::new();
    let body: &'static str = Box::leak(
        format!(
            r#"{{"pad":{}0{},"id":"evt_deep"}}"#,
            "[".repeat(300),
            "]".repeat(300)
        )
        .into_boxed_str(),
    );
    let first = c.post(&proxy.url("/hook"), &[], body).await;
    let second = c.post(&proxy.url("/hook"), &[], body).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_missing_body_key_says_where_to_put_it() {
    let upstream = FakeUpstream::echo().await;
    let toml = WEBHOOK.replace("key = {", "required = true\nkey = {");
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let got = Client::new()
        .post(&proxy.url("/hook"), &[], r#"{"type":"x"}"#)
        .await;
    assert_eq!(got.code(), "idempotency_key_missing");
    assert_eq!(
        got.json()["detail"],
        "this endpoint requires an idempotency key in the JSON body member /id"
    );
    proxy.shutdown().await;
}

/// Peak virtual memory of a process in KiB: an allocation shows here even if its pages
/// are never touched (and so never counted in RSS).
fn peak_virtual_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmPeak:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_declared_length_is_never_allocated_up_front() {
    let upstream = FakeUpstream::echo().await;
    let toml =
        format!("[server]\nlisten = \"127.0.0.1:0\"\nmax_request_body = \"1GiB\"\nbody_read_timeout = \"300ms\"\n{ORDERS}");
    let proxy = ProxyProcess::spawn(&toml, &upstream.url()).await;
    let before = peak_virtual_kib(proxy.child.id());
    let mut open = Vec::new();
    for i in 0..20 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!("POST /v1/orders HTTP/1.1\r\nHost: x\r\nIdempotency-Key: big{i}\r\nContent-Length: 1073741824\r\n\r\nabc");
        s.write_all(head.as_bytes()).await.unwrap();
        open.push(s);
    }
    // Each upload was being buffered until its body_read_timeout: 408, never an abort.
    for s in &mut open {
        let raw = read_to_close(s).await;
        assert_eq!(problem_code(&raw, 408), "request_body_timeout");
    }
    let grew = peak_virtual_kib(proxy.child.id()).saturating_sub(before);
    println!("peak virtual memory grew {grew} KiB for 20 uploads declaring 1 GiB each");
    assert!(
        grew < 1 << 20,
        "virtual memory grew {grew} KiB: a declared length was allocated"
    );
    let got = Client::new()
        .post(
            &proxy.url("/v1/orders"),
            &[("idempotency-key", "small")],
            "x",
        )
        .await;
    assert_eq!(got.status, StatusCode::CREATED);
}

#[tokio::test]
async fn http2_connections_get_a_concurrent_stream_limit() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(ORDERS, &upstream.url()).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (client, mut conn) = h2::client::handshake(tcp).await.unwrap();
    // The server's SETTINGS arrive with the first exchange; drive one request through.
    let req = http::Request::get(proxy.url("/a")).body(()).unwrap();
    let (resp, _) = client
        .ready()
        .await
        .unwrap()
        .send_request(req, true)
        .unwrap();
    let drive = async {
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
    };
    tokio::select! {
        _ = drive => {}
        r = &mut conn => panic!("connection ended: {r:?}"),
    }
    assert_eq!(conn.max_concurrent_send_streams(), 128);
    drop(conn);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_slow_reader_is_not_cut_off_by_the_idle_close() {
    // A replay is handed to hyper whole: larger than the kernel's socket buffers on both
    // ends, most of it waits in the proxy while the client drains it.
    const LEN: usize = 48 << 20;
    let upstream = FakeUpstream::buffered(|_, _| async {
        let mut resp = Response::new(full(bytes::Bytes::from(vec![b'z'; LEN])));
        *resp.status_mut() = StatusCode::CREATED;
        resp
    })
    .await;
    let toml = format!(
        "[server]\nheader_read_timeout = \"700ms\"\n[store]\nmax_bytes = \"256MiB\"\n[idempotency]\nmax_stored_response = \"64MiB\"\n{ORDERS}"
    );
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let first = Client::new()
        .post(&proxy.url("/v1/orders"), &[("idempotency-key", "big")], "x")
        .await;
    assert_eq!(first.body.len(), LEN);
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let req = "POST /v1/orders HTTP/1.1\r\nHost: x\r\nIdempotency-Key: big\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx";
    s.write_all(req.as_bytes()).await.unwrap();
    // At most 1 MiB every 20 ms: slower than the proxy can write, for longer than
    // header_read_timeout, but always making progress.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    loop {
        pace.tick().await;
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
        {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        got.starts_with(b"HTTP/1.1 201"),
        "{:?}",
        String::from_utf8_lossy(&got[..head_end])
    );
    assert_eq!(got.len() - head_end, LEN, "the replay was cut short");
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}
