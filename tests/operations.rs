//! What an operator relies on: metrics for every outcome, SIGHUP reload with a real
//! signal, and one structured log line per request that never carries a key or credential.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use http::{Response, StatusCode};
use idemgate::body::full;
use support::*;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_request_body = "1KiB"

[upstream]
url = "{upstream}"

[store]
max_bytes = "4KiB"

[idempotency]
concurrent = "wait"
max_stored_response = "2KiB"

[[routes]]
name = "orders"
path = "/v1/orders"

[[routes]]
name = "strict"
path = "/v1/strict"
required = true
concurrent = "reject"
"#;

/// The value of one sample line, e.g. `idemgate_requests_total{route="orders",outcome="forwarded"}`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

async fn scrape(admin: SocketAddr) -> String {
    let got = Client::new().get(&format!("http://{admin}/metrics")).await;
    assert_eq!(got.status, StatusCode::OK);
    String::from_utf8(got.body.to_vec()).unwrap()
}

fn requests(route: &str, outcome: &str) -> String {
    format!("idemgate_requests_total{{route=\"{route}\",outcome=\"{outcome}\"}}")
}

#[tokio::test]
async fn every_outcome_is_counted_once() {
    let (upstream, gate) = gated_echo().await;
    let proxy = TestProxy::start(CONFIG, &upstream.url()).await;
    let admin = proxy.admin.unwrap();
    let c = Client::new();
    let orders = proxy.url("/v1/orders");
    let strict = proxy.url("/v1/strict");
    gate.open();

    c.get(&proxy.url("/health")).await; // passthrough
    c.post(&orders, &[("idempotency-key", "a")], "x").await; // forwarded
    c.post(&orders, &[("idempotency-key", "a")], "x").await; // replayed
    c.post(&orders, &[("idempotency-key", "a")], "y").await; // mismatch
    c.post(&strict, &[], "x").await; // key_missing
    c.post(&strict, &[("idempotency-key", "bad key")], "x")
        .await; // key_invalid
    c.post(&strict, &[("idempotency-key", "big")], &"z".repeat(2000))
        .await; // too_large

    // conflict on the strict route (reject), coalesced on orders (wait)
    gate.close();
    let first = spawn_post(&c, &strict, &[("idempotency-key", "busy")], "x");
    // Calls 1 (pass-through) and 2 (forwarded) went through the open gate.
    assert_eq!((gate.entered().await, gate.entered().await), (1, 2));
    assert_eq!(gate.entered().await, 3, "the held request");
    let inflight = scrape(admin).await;
    assert_eq!(
        sample(&inflight, "idemgate_inflight{route=\"strict\"}"),
        Some(1.0)
    );
    assert_eq!(
        c.post(&strict, &[("idempotency-key", "busy")], "x")
            .await
            .code(),
        "idempotency_request_in_progress"
    );
    let held = spawn_post(&c, &orders, &[("idempotency-key", "co")], "x");
    assert_eq!(gate.entered().await, 4);
    let waiter = spawn_post(&c, &orders, &[("idempotency-key", "co")], "x");
    // Open the gate only once the duplicate is parked behind the first.
    eventually!(
        sample(&scrape(admin).await, "idemgate_waiting{route=\"orders\"}") == Some(1.0),
        "the duplicate never waited"
    );
    gate.open();
    first.await.unwrap();
    held.await.unwrap();
    let w = waiter.await.unwrap();
    assert_eq!(w.header("idempotent-replayed"), Some("true"));

    // upstream_error: a proxy whose upstream is gone.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = TestProxy::start(CONFIG, &format!("http://127.0.0.1:{port}")).await;
    c.post(&dead.url("/v1/orders"), &[("idempotency-key", "u")], "x")
        .await;
    let dead_metrics = scrape(dead.admin.unwrap()).await;
    assert_eq!(
        sample(&dead_metrics, &requests("orders", "upstream_error")),
        Some(1.0)
    );
    dead.shutdown().await;

    let m = scrape(admin).await;
    for (route, outcome, n) in [
        ("unrouted", "passthrough", 1.0),
        ("orders", "forwarded", 2.0),
        ("orders", "replayed", 1.0),
        ("orders", "mismatch", 1.0),
        ("strict", "key_missing", 1.0),
        ("strict", "key_invalid", 1.0),
        ("strict", "too_large", 1.0),
        ("strict", "conflict", 1.0),
        ("strict", "forwarded", 1.0),
    ] {
        assert_eq!(
            sample(&m, &requests(route, outcome)),
            Some(n),
            "{route}/{outcome} in\n{m}"
        );
    }
    assert_eq!(
        sample(&m, &requests("orders", "coalesced")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(sample(&m, "idemgate_waiting{route=\"orders\"}"), Some(0.0));
    assert_eq!(sample(&m, "idemgate_inflight{route=\"strict\"}"), Some(0.0));
    assert!(
        sample(
            &m,
            "idemgate_upstream_duration_seconds_count{route=\"orders\"}"
        )
        .unwrap()
            >= 2.0
    );
    assert!(sample(&m, "idemgate_store_records").is_some());
    assert!(sample(&m, "idemgate_store_bytes").unwrap() > 0.0);
    assert_eq!(sample(&m, "idemgate_lease_lost_total"), Some(0.0));
    assert!(sample(&m, "idemgate_evicted_before_ttl_total").is_some());
    proxy.shutdown().await;
}

#[tokio::test]
async fn early_evictions_are_counted() {
    let upstream =
        FakeUpstream::buffered(|_, _| async { Response::new(full(vec![b'e'; 1500])) }).await;
    let proxy = TestProxy::start(CONFIG, &upstream.url()).await;
    let c = Client::new();
    for i in 0..10 {
        let got = c
            .post(
                &proxy.url("/v1/orders"),
                &[("idempotency-key", &format!("k{i}"))],
                "x",
            )
            .await;
        assert_eq!(got.status, StatusCode::OK);
    }
    let m = scrape(proxy.admin.unwrap()).await;
    assert!(
        sample(&m, "idemgate_evicted_before_ttl_total").unwrap() >= 7.0,
        "{m}"
    );
    assert!(sample(&m, "idemgate_store_bytes").unwrap() <= 4096.0, "{m}");
    // The oldest key was evicted early: its retry runs again (SPEC §6, counted above).
    let again = c
        .post(&proxy.url("/v1/orders"), &[("idempotency-key", "k0")], "x")
        .await;
    assert_eq!(again.header("idempotent-replayed"), None);
    assert_eq!(upstream.calls(), 11);
    proxy.shutdown().await;
}

#[tokio::test]
async fn sighup_swaps_routes_keeps_records_and_survives_a_bad_file() {
    let upstream = FakeUpstream::echo().await;
    let mut proxy = ProxyProcess::spawn(CONFIG, &upstream.url()).await;
    let c = Client::new();
    let orders = proxy.url("/v1/orders");
    assert_eq!(
        c.post(&orders, &[], "no key").await.status,
        StatusCode::CREATED
    );
    c.post(&orders, &[("idempotency-key", "kept")], "x").await;

    // Make /v1/orders require a key, and change the listener (needs a restart).
    let stricter = CONFIG
        .replace(
            "name = \"orders\"\n",
            "name = \"orders\"\nrequired = true\n",
        )
        .replace(
            "listen = \"127.0.0.1:0\"\nadmin",
            "listen = \"127.0.0.1:1\"\nadmin",
        )
        .replace("{upstream}", &upstream.url());
    std::fs::write(proxy.config_path(), &stricter).unwrap();
    proxy.signal("HUP");
    let (_, lines) = proxy.wait_for_line("config reloaded").await;
    let (restart, _) = proxy.wait_for_line("need a restart").await;
    assert!(restart.contains("server"), "{restart} after {lines:?}");
    let refused = c.post(&orders, &[], "no key").await;
    assert_eq!(refused.code(), "idempotency_key_missing");
    let replay = c.post(&orders, &[("idempotency-key", "kept")], "x").await;
    assert_eq!(
        replay.header("idempotent-replayed"),
        Some("true"),
        "records must survive a reload"
    );

    std::fs::write(proxy.config_path(), "[server]\nlisten = 5\n").unwrap();
    proxy.signal("HUP");
    let (failed, _) = proxy.wait_for_line("reload failed").await;
    assert!(failed.contains("server.listen"), "{failed}");
    assert!(failed.contains("upstream"), "{failed}");
    assert_eq!(
        c.post(&orders, &[], "no key").await.code(),
        "idempotency_key_missing"
    );
    assert_eq!(upstream.calls(), 2);
    proxy.signal("TERM");
    assert!(proxy
        .wait_exit(std::time::Duration::from_secs(10))
        .await
        .success());
}

#[tokio::test]
async fn one_log_line_per_request_without_keys_or_credentials() {
    let upstream = FakeUpstream::echo().await;
    let mut proxy = ProxyProcess::spawn(CONFIG, &upstream.url()).await;
    let c = Client::new();
    let orders = proxy.url("/v1/orders");
    let secret = [
        ("idempotency-key", "super-secret-key-123"),
        ("authorization", "Bearer t0psecret"),
    ];
    c.post(&orders, &secret, "x").await;
    c.post(&orders, &secret, "x").await;
    c.get(&proxy.url("/done")).await;
    let (_, lines) = proxy.wait_for_line("\"/done\"").await;
    let requests: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|doc| doc["message"] == "request")
        .collect();
    assert_eq!(requests.len(), 3, "{lines:#?}");
    let first = &requests[0];
    assert_eq!(first["route"], "orders");
    assert_eq!(first["outcome"], "forwarded");
    assert_eq!(first["status"], 201);
    assert!(first["upstream_ms"].as_f64().is_some());
    let record = first["record"].as_str().unwrap();
    assert_eq!(record.len(), 12);
    assert_eq!(requests[1]["outcome"], "replayed");
    assert_eq!(requests[1]["record"], record);
    assert_eq!(requests[2]["outcome"], "passthrough");
    for line in &lines {
        assert!(
            !line.contains("super-secret-key-123"),
            "raw key logged: {line}"
        );
        assert!(!line.contains("t0psecret"), "credential logged: {line}");
    }
}
