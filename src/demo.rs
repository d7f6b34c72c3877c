//! `idemgate demo`: a tiny orders API that gives every created order a new id, with the
//! proxy in front of it using `proxy.toml.example`'s routes, so a newcomer can watch a
//! retry replay instead of creating a second order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::body::{full, Body};

const EXAMPLE: &str = include_str!("../proxy.toml.example");

/// Starts the demo API on a free loopback port and returns its URL.
pub async fn start_api() -> std::io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let orders = Arc::new(AtomicU64::new(0));
    // Runs for the life of the process, like the demo itself.
    let forever = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::server::http1::serve(
        listener,
        "demo API",
        forever,
        move |req| {
            let orders = orders.clone();
            async move { api(req, &orders).await }
        },
    ));
    Ok(format!("http://{addr}"))
}

async fn api(req: Request<Incoming>, orders: &AtomicU64) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let input: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let segments: Vec<&str> = parts.uri.path().trim_matches('/').split('/').collect();
    let (status, doc) = match (&parts.method, segments.as_slice()) {
        (&Method::POST, ["v1", "orders"]) => {
            let n = orders.fetch_add(1, Ordering::SeqCst) + 1;
            (
                StatusCode::CREATED,
                serde_json::json!({ "id": format!("ord_{n}"), "order": input }),
            )
        }
        (&Method::GET, ["v1", "orders"]) => (
            StatusCode::OK,
            serde_json::json!({ "orders_created": orders.load(Ordering::SeqCst) }),
        ),
        (&Method::POST, ["v1", "orders", id, "refund"]) => {
            (StatusCode::OK, serde_json::json!({ "refunded": id }))
        }
        (&Method::POST, ["webhooks", "stripe"]) => (
            StatusCode::OK,
            serde_json::json!({ "received": input["id"] }),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "not found" }),
        ),
    };
    let mut resp = Response::new(full(Bytes::from(doc.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The example config pointed at the demo API.
pub fn config(api_url: &str) -> Result<crate::config::Config, String> {
    let text = EXAMPLE.replace("http://127.0.0.1:3000", api_url);
    crate::config::parse(&text).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        format!("proxy.toml.example is invalid: {}", lines.join("; "))
    })
}

pub fn instructions(proxy: &str) -> String {
    format!(
        r#"idemgate demo: an orders API behind the proxy at http://{proxy}

Create an order, then retry with the same key: the second answer is a replay
(Idempotent-Replayed: true) with the same order id, and no second order exists.

  curl -i -X POST http://{proxy}/v1/orders -H 'Idempotency-Key: order-123' -d '{{"sku":"tea","qty":1}}'
  curl -i -X POST http://{proxy}/v1/orders -H 'Idempotency-Key: order-123' -d '{{"sku":"tea","qty":1}}'
  curl -s http://{proxy}/v1/orders

Reuse the key with a different body: 422 idempotency_key_mismatch.

  curl -i -X POST http://{proxy}/v1/orders -H 'Idempotency-Key: order-123' -d '{{"sku":"coffee","qty":9}}'

Webhook deliveries are deduplicated by the event id in the body:

  curl -i -X POST http://{proxy}/webhooks/stripe -d '{{"id":"evt_1","type":"charge.succeeded"}}'
  curl -i -X POST http://{proxy}/webhooks/stripe -d '{{"id":"evt_1","type":"charge.succeeded"}}'

Press Ctrl-C to stop.
"#
    )
}
