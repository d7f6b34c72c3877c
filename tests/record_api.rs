//! The record API (SPEC §8) as the Syllecta records profile configures it: lock, store,
//! reuse, release, leases, tenants, 401 and 429.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use http::StatusCode;
use serde_json::{json, Value};
use support::*;

const TOKEN: &str = "tok-alice";

fn profile(extra: &str) -> String {
    // Every test in this file sets the same value, so parallel tests agree.
    std::env::set_var("IDEMGATE_RECORD_TOKEN", TOKEN);
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/profiles/syllecta-records.toml"
    ))
    .unwrap();
    let text = text.replace(
        "tokens = [\"env:IDEMGATE_RECORD_TOKEN\"]",
        "tokens = [\"env:IDEMGATE_RECORD_TOKEN\", \"tok-bob\"]",
    );
    format!(
        "{}\n{extra}",
        text.replace("http://127.0.0.1:3000", "{upstream}")
    )
}

async fn call(
    c: &Client,
    api: SocketAddr,
    method: &str,
    token: Option<&str>,
    doc: Value,
) -> (StatusCode, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let got = c
        .send(request(
            method,
            &format!("http://{api}/v1/record"),
            &headers,
            &doc.to_string(),
        ))
        .await;
    (
        got.status,
        serde_json::from_slice(&got.body).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn lock_store_then_cached_for_every_later_worker() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(&profile(""), &upstream.url()).await;
    let api = proxy.record_api.unwrap();
    let c = Client::new();
    let order = json!({ "scope": "orders", "key": "order-2001" });
    let (status, first) = call(&c, api, "POST", Some(TOKEN), order.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["locked"], true);
    let lock = first["token"].as_str().unwrap().to_string();

    let (_, busy) = call(&c, api, "POST", Some(TOKEN), order.clone()).await;
    assert_eq!(busy["locked"], false);
    assert!(busy["retryAfterMs"].as_u64().unwrap() > 0);

    let put = json!({ "scope": "orders", "key": "order-2001", "token": lock, "status": 201, "body": { "status": "paid" } });
    let (status, stored) = call(&c, api, "PUT", Some(TOKEN), put.clone()).await;
    assert_eq!(
        (status, stored),
        (StatusCode::OK, json!({ "stored": true }))
    );

    let (_, cached) = call(&c, api, "POST", Some(TOKEN), order.clone()).await;
    assert_eq!(
        cached,
        json!({ "cached": true, "record": { "status": 201, "body": { "status": "paid" } } })
    );
    // A second PUT with the spent lock is refused, not a silent overwrite.
    let (status, again) = call(&c, api, "PUT", Some(TOKEN), put).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(again["code"], "lock_not_held");
    // Another tenant's token sees nothing of it.
    let (_, bob) = call(&c, api, "POST", Some("tok-bob"), order).await;
    assert_eq!(bob["locked"], true);
    assert_eq!(upstream.calls(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn release_frees_the_key_for_the_next_worker() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(&profile(""), &upstream.url()).await;
    let api = proxy.record_api.unwrap();
    let c = Client::new();
    let doc = json!({ "scope": "payouts", "key": "p-1" });
    let (_, first) = call(&c, api, "POST", Some(TOKEN), doc.clone()).await;
    let lock = first["token"].as_str().unwrap();
    let (status, released) = call(
        &c,
        api,
        "DELETE",
        Some(TOKEN),
        json!({ "scope": "payouts", "key": "p-1", "token": lock }),
    )
    .await;
    assert_eq!(
        (status, released),
        (StatusCode::OK, json!({ "released": true }))
    );
    let (_, next) = call(&c, api, "POST", Some(TOKEN), doc).await;
    assert_eq!(next["locked"], true);
    assert_ne!(next["token"].as_str().unwrap(), lock);
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_expired_lease_frees_the_lock_and_renewal_keeps_it() {
    let upstream = FakeUpstream::echo().await;
    let toml = profile("").replace("lease = \"30s\"", "lease = \"300ms\"");
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let api = proxy.record_api.unwrap();
    let c = Client::new();
    let doc = json!({ "scope": "s", "key": "lease" });
    let (_, first) = call(&c, api, "POST", Some(TOKEN), doc.clone()).await;
    let lock = first["token"].as_str().unwrap().to_string();
    let renew = json!({ "scope": "s", "key": "lease", "token": lock });
    let (_, renewed) = call(&c, api, "POST", Some(TOKEN), renew).await;
    assert_eq!(renewed["locked"], true);
    // Poll with a deadline until the lease passes and another worker may lock.
    let mut next;
    eventually!(
        {
            next = call(&c, api, "POST", Some(TOKEN), doc.clone()).await.1;
            next["locked"] == true
        },
        "lease never expired"
    );
    assert_ne!(next["token"].as_str().unwrap(), lock);
    let late = json!({ "scope": "s", "key": "lease", "token": lock, "body": 1 });
    let (status, _) = call(&c, api, "PUT", Some(TOKEN), late).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a stale worker must not overwrite"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn unauthorized_bad_input_and_rate_limit() {
    let upstream = FakeUpstream::echo().await;
    let toml = profile("").replace("rate_limit = \"100/s\"", "rate_limit = \"3/h\"");
    let proxy = TestProxy::start(&toml, &upstream.url()).await;
    let api = proxy.record_api.unwrap();
    let c = Client::new();
    let doc = json!({ "scope": "s", "key": "k" });
    let (status, body) = call(&c, api, "POST", None, doc.clone()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let (status, _) = call(&c, api, "POST", Some("tok-mallory"), doc.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = call(&c, api, "POST", Some(TOKEN), json!({ "scope": "s" })).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_request"))
    );
    call(&c, api, "POST", Some(TOKEN), doc.clone()).await;
    call(&c, api, "POST", Some(TOKEN), doc.clone()).await;
    let (status, body) = call(&c, api, "POST", Some(TOKEN), doc.clone()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );
    // The limit is per token.
    let (status, _) = call(&c, api, "POST", Some("tok-bob"), doc).await;
    assert_eq!(status, StatusCode::OK);
    proxy.shutdown().await;
}
