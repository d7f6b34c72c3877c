//! Each ready config in `deploy/profiles/` (SPEC §9), exercised on what makes it different.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Response, StatusCode};
use idemgate::body::full;
use support::*;

fn profile(name: &str) -> String {
    let path = format!("{}/deploy/profiles/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.replace("http://127.0.0.1:3000", "{upstream}")
}

#[test]
fn every_profile_loads() {
    std::env::set_var("IDEMGATE_RECORD_TOKEN", "tok-alice");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/profiles");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if let Err(e) = idemgate::config::load(&path) {
            panic!("{e}");
        }
        n += 1;
    }
    assert_eq!(n, 7, "one file per SPEC §9 row");
}

#[tokio::test]
async fn ietf_draft_requires_keys_and_rejects_concurrent_duplicates() {
    let (upstream, gate) = gated_echo().await;
    let proxy = TestProxy::start(&profile("ietf-draft"), &upstream.url()).await;
    let c = Client::new();
    let url = proxy.url("/payments");
    let missing = c.post(&url, &[], "x").await;
    assert_eq!(
        (missing.status, missing.code()),
        (StatusCode::BAD_REQUEST, "idempotency_key_missing".into())
    );
    let first = spawn_post(&c, &url, &[("idempotency-key", "\"8e03978e\"")], "x");
    gate.entered().await;
    let busy = c.post(&url, &[("idempotency-key", "8e03978e")], "x").await;
    assert_eq!(
        (busy.status, busy.code()),
        (
            StatusCode::CONFLICT,
            "idempotency_request_in_progress".into()
        )
    );
    assert!(busy.header("retry-after").is_some());
    gate.open();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    let other = c.post(&url, &[("idempotency-key", "8e03978e")], "y").await;
    assert_eq!(
        (other.status, other.code()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_mismatch".into()
        )
    );
    assert_eq!(upstream.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn sellvik_mismatch_is_409_and_patch_is_untouched() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(&profile("sellvik"), &upstream.url()).await;
    let c = Client::new();
    let url = proxy.url("/api/v1/store/checkout");
    let key = [("idempotency-key", "cart-1")];
    let first = c.post(&url, &key, r#"{"cart":1}"#).await;
    let again = c.post(&url, &key, r#"{"cart":1}"#).await;
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let other = c.post(&url, &key, r#"{"cart":2}"#).await;
    assert_eq!(
        (other.status, other.code()),
        (StatusCode::CONFLICT, "idempotency_key_mismatch".into())
    );
    let patch = proxy.url("/api/v1/admin/products/7");
    c.send(request("PATCH", &patch, &key, "full state")).await;
    c.send(request("PATCH", &patch, &key, "full state")).await;
    assert_eq!(upstream.calls(), 3, "PATCH is not enforced");
    proxy.shutdown().await;
}

#[tokio::test]
async fn salesly_scopes_by_api_key_and_fingerprints_method_and_path() {
    let upstream = FakeUpstream::buffered(|seen, n| async move {
        if seen.body.starts_with(b"fail") {
            return Response::builder()
                .status(500)
                .body(full(format!("boom {n}")))
                .unwrap();
        }
        echo_response(&seen, n)
    })
    .await;
    let proxy = TestProxy::start(&profile("salesly"), &upstream.url()).await;
    let c = Client::new();
    let contacts = proxy.url("/api/v1/developers/contacts");
    let acme = [("idempotency-key", "550e8400"), ("x-api-key", "acme")];
    let globex = [("idempotency-key", "550e8400"), ("x-api-key", "globex")];
    let a = c.post(&contacts, &acme, r#"{"name":"ACME"}"#).await;
    let g = c.post(&contacts, &globex, r#"{"name":"Globex"}"#).await;
    assert_eq!(a.json()["body"], r#"{"name":"ACME"}"#);
    assert_eq!(
        g.json()["body"],
        r#"{"name":"Globex"}"#,
        "accounts share no keys"
    );
    // Method + path match: another body with the same key replays.
    let other_body = c.post(&contacts, &acme, r#"{"name":"changed"}"#).await;
    assert_eq!(other_body.body, a.body);
    assert_eq!(other_body.header("idempotent-replayed"), Some("true"));
    let other_path = c
        .post(&proxy.url("/api/v1/developers/deals"), &acme, "{}")
        .await;
    assert_eq!(
        (other_path.status, other_path.code()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_mismatch".into()
        )
    );
    let put = c.send(request("PUT", &contacts, &acme, "{}")).await;
    assert_eq!(
        put.code(),
        "idempotency_key_mismatch",
        "method is part of the match"
    );
    // Failed requests are not cached.
    let fail = [("idempotency-key", "f-1"), ("x-api-key", "acme")];
    assert_eq!(
        c.post(&contacts, &fail, "fail").await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(c.post(&contacts, &fail, "fail").await.body, "boom 4");
    assert_eq!(upstream.calls(), 4);
    proxy.shutdown().await;
}

#[tokio::test]
async fn salesbricks_stores_every_status_with_its_own_header() {
    let (upstream, gate) = gated_echo().await;
    gate.open();
    let failing = FakeUpstream::buffered(|_, n| async move {
        Response::builder()
            .status(500)
            .body(full(format!("failure {n}")))
            .unwrap()
    })
    .await;
    const KEY: &str = "x-salesbricks-idempotent-operation-key";
    let c = Client::new();
    let proxy = TestProxy::start(&profile("salesbricks"), &failing.url()).await;
    let url = proxy.url("/api/v1/usage");
    assert_eq!(
        c.post(&url, &[(KEY, "u-1")], "usage").await.body,
        "failure 1"
    );
    let replay = c.post(&url, &[(KEY, "u-1")], "usage").await;
    assert_eq!(
        (replay.status, replay.body.clone()),
        (StatusCode::INTERNAL_SERVER_ERROR, "failure 1".into())
    );
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let other = c.post(&url, &[(KEY, "u-1")], "other usage").await;
    assert_eq!(
        (other.status, other.code()),
        (StatusCode::BAD_REQUEST, "idempotency_key_mismatch".into())
    );
    assert_eq!(failing.calls(), 1);
    proxy.shutdown().await;

    let proxy = TestProxy::start(&profile("salesbricks"), &upstream.url()).await;
    let url = proxy.url("/api/v1/usage");
    gate.close();
    let first = spawn_post(&c, &url, &[(KEY, "u-2")], "usage");
    gate.entered().await;
    let busy = c.post(&url, &[(KEY, "u-2")], "usage").await;
    assert_eq!(
        (busy.status, busy.code()),
        (
            StatusCode::CONFLICT,
            "idempotency_request_in_progress".into()
        )
    );
    gate.open();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    let ignored = c.post(&url, &[("idempotency-key", "u-3")], "x").await;
    c.post(&url, &[("idempotency-key", "u-3")], "x").await;
    assert_eq!(ignored.status, StatusCode::CREATED);
    assert_eq!(
        upstream.calls(),
        3,
        "the standard header is not Salesbricks' key"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn svix_enforces_post_only_for_twelve_hours() {
    let text = profile("svix");
    let config = support::config(&text, "http://127.0.0.1:1");
    assert_eq!(
        config.routes[0].policy.ttl,
        std::time::Duration::from_secs(12 * 3600)
    );
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(&text, &upstream.url()).await;
    let c = Client::new();
    let url = proxy.url("/api/v1/app/app_1/msg");
    let key = [("idempotency-key", "fd56a56b")];
    let first = c.post(&url, &key, r#"{"eventType":"invoice.paid"}"#).await;
    let again = c.post(&url, &key, r#"{"eventType":"invoice.paid"}"#).await;
    assert_eq!(
        (again.status, again.body.clone()),
        (first.status, first.body.clone())
    );
    c.send(request("PUT", &url, &key, "x")).await;
    c.send(request("PUT", &url, &key, "x")).await;
    assert_eq!(upstream.calls(), 3);
    proxy.shutdown().await;
}

#[tokio::test]
async fn syllecta_webhooks_answer_duplicates_without_hitting_the_callback() {
    let upstream = FakeUpstream::echo().await;
    let proxy = TestProxy::start(&profile("syllecta-webhooks"), &upstream.url()).await;
    let c = Client::new();
    let stripe = proxy.url("/webhooks/stripe");
    let event = r#"{"id":"evt_1","type":"invoice.paid"}"#;
    assert_eq!(
        c.post(&stripe, &[], event).await.status,
        StatusCode::CREATED
    );
    let dup = c.post(&stripe, &[], event).await;
    assert_eq!(
        (dup.status, dup.body.clone()),
        (StatusCode::OK, r#"{"ok":true,"cached":true}"#.into())
    );
    assert_eq!(dup.header("content-type"), Some("application/json"));
    let shopify = proxy.url("/webhooks/shopify");
    let id = [("x-request-id", "b54557e4")];
    assert_eq!(
        c.post(&shopify, &id, "{}").await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        c.post(&shopify, &id, "{}").await.body,
        r#"{"ok":true,"cached":true}"#
    );
    let missing = c.post(&stripe, &[], r#"{"type":"invoice.paid"}"#).await;
    assert_eq!(
        (missing.status, missing.code()),
        (StatusCode::BAD_REQUEST, "idempotency_key_missing".into())
    );
    assert_eq!(upstream.calls(), 2);
    proxy.shutdown().await;
}
