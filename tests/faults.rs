//! SPEC §3 step 8 on real sockets: a fault-injecting relay between the proxy and a
//! counting upstream, on both `store_statuses = ["2xx"]` and `["2xx", "5xx"]`. Each test
//! states what the first request gets, how often the upstream ran, and what a retry
//! with the same key gets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use idemgate::body::full;
use support::relay::{Fault, Relay};
use support::*;

const KEY: &str = "idempotency-key";
const ORDER: &str = r#"{"sku":"a"}"#;
/// Large enough that every truncation point below is inside the body.
const BODY_LEN: usize = 64 * 1024;
/// A cut well past the response head and well before the end of the body.
const MID_BODY: usize = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// `store_statuses = ["2xx"]`: an unknown outcome frees the key (at-least-once).
    Only2xx,
    /// `store_statuses = ["2xx", "5xx"]`: an unknown outcome is recorded (at-most-once).
    With5xx,
}

fn toml(stored: Stored, timeout: &str, extra: &str) -> String {
    let statuses = match stored {
        Stored::Only2xx => r#"["2xx"]"#,
        Stored::With5xx => r#"["2xx", "5xx"]"#,
    };
    format!(
        r#"
[upstream]
url = "{{upstream}}"
timeout = "{timeout}"

[idempotency]
wait_timeout = "10s"
store_statuses = {statuses}
{extra}

[[routes]]
name = "orders"
methods = ["POST"]
path = "/v1/orders"
"#
    )
}

/// Answers 201 with `BODY_LEN` bytes of the support pattern and an explicit
/// `Content-Length`, so any truncation is observable.
async fn big_upstream() -> FakeUpstream {
    FakeUpstream::buffered(|_seen, n| async move {
        let body: Vec<u8> = (0..BODY_LEN).map(pattern_byte).collect();
        Response::builder()
            .status(StatusCode::CREATED)
            .header("content-type", "application/octet-stream")
            .header("content-length", BODY_LEN.to_string())
            .header("x-upstream-call", n.to_string())
            .body(full(body))
            .unwrap()
    })
    .await
}

struct Rig {
    upstream: FakeUpstream,
    relay: Relay,
    proxy: TestProxy,
    client: Client,
}

impl Rig {
    async fn start(stored: Stored, timeout: &str, extra: &str, fault: Fault) -> Rig {
        let upstream = big_upstream().await;
        let relay = Relay::start(upstream.addr, fault).await;
        let proxy = TestProxy::start(&toml(stored, timeout, extra), &relay.url()).await;
        Rig {
            upstream,
            relay,
            proxy,
            client: Client::new(),
        }
    }

    async fn post(&self, key: &str) -> Got {
        let url = self.proxy.url("/v1/orders");
        let headers = [(KEY, key)];
        let send = self.client.post(&url, &headers, ORDER);
        tokio::time::timeout(Duration::from_secs(5), send)
            .await
            .expect("the proxy did not answer within 5s")
    }

    async fn stop(self) {
        self.proxy.shutdown().await;
    }
}

/// A full, fresh 201 from upstream call `call`: every byte of the body is there.
fn assert_fresh_201(got: &Got, call: usize) {
    assert_eq!(got.status, StatusCode::CREATED, "{got:?}");
    assert_eq!(got.header("idempotent-replayed"), None, "{got:?}");
    assert_eq!(got.header("x-upstream-call"), Some(&*call.to_string()));
    assert_full_body(got);
}

fn assert_full_body(got: &Got) {
    assert_eq!(
        got.body.len(),
        BODY_LEN,
        "a 201 with a truncated body reached the client"
    );
    let wrong = got
        .body
        .iter()
        .enumerate()
        .find(|(i, b)| **b != pattern_byte(*i));
    assert_eq!(wrong, None, "201 body differs from what the upstream sent");
}

fn assert_problem(got: &Got, status: StatusCode, code: &str) {
    assert_eq!(got.status, status, "{got:?}");
    assert_eq!(got.code(), code, "{got:?}");
    assert_eq!(got.json()["status"], status.as_u16(), "{got:?}");
}

/// The retry that follows an unknown outcome (`first`), on a healthy relay: a replay of
/// the same problem with 5xx stored, a fresh full run otherwise.
async fn assert_retry_after_unknown_outcome(rig: &Rig, stored: Stored, key: &str, first: &Got) {
    rig.relay.set_fault(Fault::Pass).await;
    let accepted = rig.relay.accepted();
    let retry = rig.post(key).await;
    match stored {
        Stored::With5xx => {
            assert_eq!(retry.status, first.status, "{retry:?}");
            assert_eq!(retry.header("idempotent-replayed"), Some("true"));
            assert_eq!(
                retry.header("content-type"),
                Some("application/problem+json")
            );
            assert_eq!(retry.body, first.body, "replay is not the recorded problem");
            assert!(retry.header("date").is_some());
            assert_eq!(rig.upstream.calls(), 1, "at-most-once: the retry ran again");
            assert_eq!(rig.relay.accepted(), accepted, "the retry went upstream");
        }
        Stored::Only2xx => {
            assert_fresh_201(&retry, 2);
            assert_eq!(rig.upstream.calls(), 2);
            // And that success is now what replays.
            let again = rig.post(key).await;
            assert_eq!(again.status, StatusCode::CREATED);
            assert_eq!(again.header("idempotent-replayed"), Some("true"));
            assert_eq!(again.header("x-upstream-call"), Some("2"));
            assert_full_body(&again);
            assert_eq!(rig.upstream.calls(), 2);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Connection refused: the request never left; the key is always freed.

async fn refused_frees_the_key(stored: Stored) {
    let rig = Rig::start(stored, "2s", "", Fault::Refuse).await;
    let first = rig.post("refused").await;
    assert_problem(&first, StatusCode::BAD_GATEWAY, "upstream_unavailable");
    assert_eq!(rig.upstream.calls(), 0);
    assert_eq!(rig.relay.accepted(), 0);

    // Even with 5xx stored, nothing was recorded: a retry runs upstream.
    let again_refused = rig.post("refused").await;
    assert_problem(
        &again_refused,
        StatusCode::BAD_GATEWAY,
        "upstream_unavailable",
    );
    assert_eq!(again_refused.header("idempotent-replayed"), None);

    rig.relay.set_fault(Fault::Pass).await;
    let retry = rig.post("refused").await;
    assert_fresh_201(&retry, 1);
    assert_eq!(rig.upstream.calls(), 1);
    let replay = rig.post("refused").await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.header("x-upstream-call"), Some("1"));
    assert_full_body(&replay);
    assert_eq!(rig.upstream.calls(), 1);
    rig.stop().await;
}

#[tokio::test]
async fn refused_connect_is_502_and_frees_the_key_2xx_only() {
    refused_frees_the_key(Stored::Only2xx).await;
}

#[tokio::test]
async fn refused_connect_is_502_and_frees_the_key_even_with_5xx_stored() {
    refused_frees_the_key(Stored::With5xx).await;
}

// ---------------------------------------------------------------------------------------
// Reset after the request was sent: unknown outcome, 502.

async fn reset_is_an_unknown_outcome(stored: Stored, after_bytes: usize) {
    let rig = Rig::start(
        stored,
        "2s",
        "",
        Fault::ResetAfterResponseBytes(after_bytes),
    )
    .await;
    let first = rig.post("reset").await;
    assert_problem(&first, StatusCode::BAD_GATEWAY, "upstream_unavailable");
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(
        rig.upstream.calls(),
        1,
        "the request did reach the upstream"
    );
    assert_eq!(rig.relay.faults_fired(), 1);
    assert_eq!(rig.relay.response_bytes(), after_bytes as u64);
    assert_retry_after_unknown_outcome(&rig, stored, "reset", &first).await;
    rig.stop().await;
}

#[tokio::test]
async fn reset_mid_body_is_502_and_the_retry_runs_again_2xx_only() {
    reset_is_an_unknown_outcome(Stored::Only2xx, MID_BODY).await;
}

#[tokio::test]
async fn reset_mid_body_is_502_and_the_retry_replays_it_with_5xx_stored() {
    reset_is_an_unknown_outcome(Stored::With5xx, MID_BODY).await;
}

#[tokio::test]
async fn reset_before_any_response_byte_is_502_and_the_retry_runs_again_2xx_only() {
    reset_is_an_unknown_outcome(Stored::Only2xx, 0).await;
}

#[tokio::test]
async fn reset_before_any_response_byte_is_502_and_the_retry_replays_it_with_5xx_stored() {
    reset_is_an_unknown_outcome(Stored::With5xx, 0).await;
}

// ---------------------------------------------------------------------------------------
// Timeout: unknown outcome, 504.

const SHORT_TIMEOUT: &str = "400ms";

async fn timeout_is_an_unknown_outcome(stored: Stored, fault: Fault) {
    let rig = Rig::start(stored, SHORT_TIMEOUT, "", fault).await;
    let started = tokio::time::Instant::now();
    let first = rig.post("stall").await;
    let took = started.elapsed();
    assert_problem(&first, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "504 after {took:?}, timeout is {SHORT_TIMEOUT}"
    );
    assert_eq!(
        rig.upstream.calls(),
        1,
        "the request did reach the upstream"
    );
    assert_eq!(rig.relay.faults_fired(), 1);
    assert_retry_after_unknown_outcome(&rig, stored, "stall", &first).await;
    rig.stop().await;
}

#[tokio::test]
async fn stalled_response_is_504_and_the_retry_runs_again_2xx_only() {
    timeout_is_an_unknown_outcome(Stored::Only2xx, Fault::StallResponse).await;
}

#[tokio::test]
async fn stalled_response_is_504_and_the_retry_replays_it_with_5xx_stored() {
    timeout_is_an_unknown_outcome(Stored::With5xx, Fault::StallResponse).await;
}

#[tokio::test]
async fn body_stalled_mid_way_is_504_and_the_retry_runs_again_2xx_only() {
    timeout_is_an_unknown_outcome(Stored::Only2xx, Fault::StallAfterResponseBytes(MID_BODY)).await;
}

#[tokio::test]
async fn body_stalled_mid_way_is_504_and_the_retry_replays_it_with_5xx_stored() {
    timeout_is_an_unknown_outcome(Stored::With5xx, Fault::StallAfterResponseBytes(MID_BODY)).await;
}

/// A duplicate that waits on a request which then times out gets what a retry would:
/// the recorded 504 (5xx stored) or a run of its own (2xx only).
async fn waiter_of_a_timed_out_request(stored: Stored) {
    let rig = Rig::start(stored, "1s", "", Fault::StallResponse).await;
    let url = rig.proxy.url("/v1/orders");
    let first = spawn_post(&rig.client, &url, &[(KEY, "wait")], ORDER);
    eventually!(
        rig.upstream.calls() == 1,
        "first request never reached upstream"
    );
    // The stalled connection keeps its fault; the waiter's own run (if any) does not.
    rig.relay.set_fault(Fault::Pass).await;
    let waiter = spawn_post(&rig.client, &url, &[(KEY, "wait")], ORDER);
    let first = first.await.unwrap();
    assert_problem(&first, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout");
    let waiter = waiter.await.unwrap();
    match stored {
        Stored::With5xx => {
            assert_eq!(waiter.status, StatusCode::GATEWAY_TIMEOUT, "{waiter:?}");
            assert_eq!(waiter.header("idempotent-replayed"), Some("true"));
            assert_eq!(waiter.body, first.body);
            assert_eq!(rig.upstream.calls(), 1);
        }
        Stored::Only2xx => {
            assert_fresh_201(&waiter, 2);
            assert_eq!(rig.upstream.calls(), 2);
        }
    }
    rig.stop().await;
}

#[tokio::test]
async fn waiter_of_a_timed_out_request_runs_again_2xx_only() {
    waiter_of_a_timed_out_request(Stored::Only2xx).await;
}

#[tokio::test]
async fn waiter_of_a_timed_out_request_gets_the_recorded_504_with_5xx_stored() {
    waiter_of_a_timed_out_request(Stored::With5xx).await;
}

// ---------------------------------------------------------------------------------------
// Clean close mid-body (FIN before Content-Length bytes): a truncation, never a success.

async fn truncated_body_is_never_recorded(stored: Stored) {
    let rig = Rig::start(stored, "2s", "", Fault::CloseMidBody(MID_BODY)).await;
    let first = rig.post("cut").await;
    assert_ne!(
        first.status,
        StatusCode::CREATED,
        "a truncated body was answered as a success: {} of {BODY_LEN} bytes",
        first.body.len()
    );
    assert_problem(&first, StatusCode::BAD_GATEWAY, "upstream_unavailable");
    assert_eq!(rig.upstream.calls(), 1);
    assert_eq!(rig.relay.faults_fired(), 1);
    assert_eq!(rig.relay.response_bytes(), MID_BODY as u64);
    // The retry is a fresh full run (2xx only) or the replayed 502 (5xx stored); a 201
    // here is checked byte for byte, so a replayed short 201 fails.
    assert_retry_after_unknown_outcome(&rig, stored, "cut", &first).await;
    rig.stop().await;
}

#[tokio::test]
async fn clean_close_mid_body_is_not_a_success_and_the_retry_runs_again_2xx_only() {
    truncated_body_is_never_recorded(Stored::Only2xx).await;
}

#[tokio::test]
async fn clean_close_mid_body_is_not_a_success_and_the_retry_replays_502_with_5xx_stored() {
    truncated_body_is_never_recorded(Stored::With5xx).await;
}

/// A body over `max_stored_response` streams: the client sees the 201 head, then a body
/// that breaks off. The retry must not replay a short 201; per SPEC §3 step 7 the record
/// keeps status and headers only, so the retry gets 410 and the upstream is not run again.
async fn truncated_stream_is_never_replayed(stored: Stored) {
    let rig = Rig::start(
        stored,
        "2s",
        "max_stored_response = \"16KiB\"",
        Fault::CloseMidBody(MID_BODY + 10_000),
    )
    .await;
    let raw = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = request(
        "POST",
        &rig.proxy.url("/v1/orders"),
        &[(KEY, "stream")],
        ORDER,
    );
    let resp = raw.request(req).await.unwrap();
    let status = resp.status();
    let read = verify_pattern(resp.into_body()).await;
    match status {
        StatusCode::CREATED => {
            let err = read.expect_err("a truncated stream ended as if complete");
            assert!(err.starts_with("body error"), "{err}");
        }
        other => panic!("first answer {other}, expected the streamed 201 head"),
    }
    assert_eq!(rig.upstream.calls(), 1);

    let retry = rig.post("stream").await;
    assert_problem(
        &retry,
        StatusCode::GONE,
        "idempotency_response_not_retained",
    );
    assert_eq!(rig.upstream.calls(), 1);
    rig.stop().await;
}

#[tokio::test]
async fn truncated_stream_over_max_stored_response_is_never_replayed_as_201_2xx_only() {
    truncated_stream_is_never_replayed(Stored::Only2xx).await;
}

#[tokio::test]
async fn truncated_stream_over_max_stored_response_is_never_replayed_as_201_with_5xx_stored() {
    truncated_stream_is_never_replayed(Stored::With5xx).await;
}

// ---------------------------------------------------------------------------------------
// Sanity: a slow but healthy upstream is a normal success.

async fn delay_within_timeout_is_a_success(stored: Stored) {
    let rig = Rig::start(stored, "2s", "", Fault::Delay(Duration::from_millis(150))).await;
    let first = rig.post("slow").await;
    assert_fresh_201(&first, 1);
    assert_eq!(rig.relay.faults_fired(), 1);
    assert!(rig.relay.response_bytes() > BODY_LEN as u64);
    let accepted = rig.relay.accepted();
    let replay = rig.post("slow").await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.header("x-upstream-call"), Some("1"));
    assert_eq!(replay.body, first.body);
    assert_eq!(rig.upstream.calls(), 1);
    assert_eq!(rig.relay.accepted(), accepted);
    rig.stop().await;
}

#[tokio::test]
async fn delay_shorter_than_the_timeout_is_a_normal_201_and_replays_2xx_only() {
    delay_within_timeout_is_a_success(Stored::Only2xx).await;
}

#[tokio::test]
async fn delay_shorter_than_the_timeout_is_a_normal_201_and_replays_with_5xx_stored() {
    delay_within_timeout_is_a_success(Stored::With5xx).await;
}

// ---------------------------------------------------------------------------------------
// The harness itself: each fault is what a client on a raw socket sees.

#[tokio::test]
async fn relay_faults_are_what_a_raw_client_sees() {
    use std::io::ErrorKind;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let upstream = big_upstream().await;
    let relay = Relay::start(upstream.addr, Fault::Refuse).await;
    let refused = TcpStream::connect(relay.addr()).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);

    let head = "POST /v1/orders HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n";
    // Reads until EOF or an error; returns the bytes and how it ended.
    async fn exchange(relay: &Relay, head: &str) -> (usize, Option<ErrorKind>) {
        let mut s = TcpStream::connect(relay.addr()).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 8192];
        loop {
            match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
                Err(_) => return (got, Some(ErrorKind::TimedOut)),
                Ok(Ok(0)) => return (got, None),
                Ok(Ok(n)) => got += n,
                Ok(Err(e)) => return (got, Some(e.kind())),
            }
        }
    }
    relay.set_fault(Fault::ResetAfterResponseBytes(1000)).await;
    let (got, end) = exchange(&relay, head).await;
    assert!(got <= 1000, "{got}");
    assert_eq!(end, Some(ErrorKind::ConnectionReset));

    relay.set_fault(Fault::CloseMidBody(1000)).await;
    assert_eq!(exchange(&relay, head).await, (1000, None));

    relay.set_fault(Fault::StallAfterResponseBytes(1000)).await;
    assert_eq!(
        exchange(&relay, head).await,
        (1000, Some(ErrorKind::TimedOut))
    );

    relay.set_fault(Fault::StallResponse).await;
    assert_eq!(exchange(&relay, head).await, (0, Some(ErrorKind::TimedOut)));

    assert_eq!(
        upstream.calls(),
        4,
        "every faulted request reached the upstream"
    );
    assert_eq!(relay.accepted(), 4);
    assert_eq!(relay.faults_fired(), 4);
    assert!(relay.request_bytes() >= 4 * head.len() as u64);
}

/// `upstream.timeout` is the whole exchange (SPEC §2) and no request may hang past its
/// timeouts (SPEC §4): a streamed body that stalls must be cut off at the deadline.
#[tokio::test]
async fn stalled_stream_over_max_stored_response_ends_within_the_timeout() {
    let rig = Rig::start(
        Stored::Only2xx,
        SHORT_TIMEOUT,
        "max_stored_response = \"16KiB\"",
        Fault::StallAfterResponseBytes(MID_BODY + 10_000),
    )
    .await;
    let raw = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = request(
        "POST",
        &rig.proxy.url("/v1/orders"),
        &[(KEY, "slow-stream")],
        ORDER,
    );
    let started = tokio::time::Instant::now();
    let resp = raw.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let read = tokio::time::timeout(Duration::from_secs(5), verify_pattern(resp.into_body())).await;
    let read =
        read.unwrap_or_else(|_| panic!("streamed body still open after {:?}", started.elapsed()));
    let err = read.expect_err("a stalled stream ended as if complete");
    assert!(err.starts_with("body error"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    rig.stop().await;
}
