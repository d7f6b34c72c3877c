//! The record API (SPEC §8): the proxy's store and semantics for workers that are not
//! HTTP requests. A worker locks (scope, key), does its work, and stores the result; a
//! second worker finds the result cached, or the lock held. Each bearer token is a tenant:
//! its records are hashed with it, so two tokens never see each other's records.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::body::{full, Body};
use crate::config::RecordApiConfig;
use crate::error::ProxyError;
use crate::store::{Begin, Fingerprint, Record, RecordId, Store, StoreError, Token};

/// Record API requests carry small JSON documents; anything larger is refused.
const MAX_BODY: usize = 1 << 20;
/// The record API has no request fingerprint: a (scope, key) is the whole identity.
const NO_FINGERPRINT: Fingerprint = Fingerprint([0; 32]);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Call {
    scope: String,
    key: String,
    token: Option<String>,
    status: Option<u16>,
    body: Option<serde_json::Value>,
}

pub struct RecordApi {
    config: RecordApiConfig,
    store: Arc<dyn Store>,
    windows: Mutex<HashMap<String, (Instant, u32)>>,
    stop: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single map operation: a poisoned map is still whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn json(status: StatusCode, doc: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from(doc.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

impl RecordApi {
    pub fn new(
        config: RecordApiConfig,
        store: Arc<dyn Store>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(RecordApi {
            config,
            store,
            windows: Mutex::default(),
            stop,
        })
    }

    /// Serves until the `stop` given to [`RecordApi::new`] fires. Leases live in the
    /// store, so a lock taken here can be renewed or completed through any replica.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let api = self.clone();
        crate::server::http1::serve(listener, "record API", self.stop.clone(), move |req| {
            let api = api.clone();
            async move {
                api.handle(req)
                    .await
                    .unwrap_or_else(ProxyError::into_response)
            }
        })
        .await;
    }

    async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ProxyError> {
        if req.uri().path() != "/v1/record" {
            return Ok(json(
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": "not found" }),
            ));
        }
        let tenant = self.authorize(req.headers())?;
        self.admit(&tenant)?;
        let method = req.method().clone();
        let call = read_call(req.into_body()).await?;
        let id = record_id(&tenant, &call.scope, &call.key);
        match method {
            Method::POST => self.begin(id, call).await,
            Method::PUT => self.complete(id, call).await,
            Method::DELETE => self.release(id, &call).await,
            _ => Ok(json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({ "error": "use POST, PUT or DELETE" }),
            )),
        }
    }

    fn authorize(&self, headers: &http::HeaderMap) -> Result<String, ProxyError> {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ProxyError::Unauthorized)?;
        let known = self
            .config
            .tokens
            .iter()
            .any(|t| constant_time_eq(t.expose().as_bytes(), given.as_bytes()));
        if known {
            Ok(given.to_string())
        } else {
            Err(ProxyError::Unauthorized)
        }
    }

    /// Fixed window per token: `count` calls per `per`.
    fn admit(&self, tenant: &str) -> Result<(), ProxyError> {
        let Some(limit) = &self.config.rate_limit else {
            return Ok(());
        };
        let now = Instant::now();
        let mut windows = lock(&self.windows);
        let (start, used) = windows.entry(tenant.to_string()).or_insert((now, 0));
        if now.duration_since(*start) >= limit.per {
            (*start, *used) = (now, 0);
        }
        if *used >= limit.count {
            let retry_after = limit.per.saturating_sub(now.duration_since(*start));
            return Err(ProxyError::RateLimited { retry_after });
        }
        *used += 1;
        Ok(())
    }

    async fn begin(
        self: &Arc<Self>,
        id: RecordId,
        call: Call,
    ) -> Result<Response<Body>, ProxyError> {
        let lease = self.config.lease;
        let lease_ms = lease.as_millis() as u64;
        if let Some(token) = &call.token {
            // A POST that names its lock token extends the lease, through any replica.
            self.store
                .clone()
                .renew(id, parse_token(token)?, lease)
                .await
                .map_err(store_error)?;
            return Ok(json(
                StatusCode::OK,
                serde_json::json!({ "locked": true, "token": token, "leaseMs": lease_ms }),
            ));
        }
        let begin = self
            .store
            .clone()
            .begin(id, NO_FINGERPRINT, Some(lease))
            .await;
        match begin.map_err(store_error)? {
            Begin::Claimed(claim) => {
                // The lease in the store is the lock; the worker renews it by token.
                let token = claim.detach().hex();
                Ok(json(
                    StatusCode::OK,
                    serde_json::json!({ "locked": true, "token": token, "leaseMs": lease_ms }),
                ))
            }
            Begin::InFlight { lease_left, .. } => {
                let retry = lease_left
                    .unwrap_or(Duration::from_secs(1))
                    .clamp(Duration::from_millis(50), Duration::from_secs(1));
                Ok(json(
                    StatusCode::OK,
                    serde_json::json!({ "locked": false, "retryAfterMs": retry.as_millis() as u64 }),
                ))
            }
            Begin::Completed(record) => {
                let body = record
                    .body
                    .as_ref()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                    .unwrap_or(serde_json::Value::Null);
                let doc = serde_json::json!({ "cached": true, "record": { "status": record.status.as_u16(), "body": body } });
                Ok(json(StatusCode::OK, doc))
            }
        }
    }

    async fn complete(&self, id: RecordId, call: Call) -> Result<Response<Body>, ProxyError> {
        let status = StatusCode::from_u16(call.status.unwrap_or(200))
            .ok()
            .filter(|s| (100..=599).contains(&s.as_u16()))
            .ok_or_else(|| {
                ProxyError::BadRequest("status must be an HTTP status (100-599)".into())
            })?;
        let token = parse_token(call.token.as_deref().unwrap_or_default())?;
        let body = serde_json::to_vec(&call.body.unwrap_or(serde_json::Value::Null))
            .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        let record = Record {
            fingerprint: NO_FINGERPRINT,
            status,
            headers: vec![(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            )],
            body: Some(Bytes::from(body)),
        };
        let encoded = record.encode().map_err(store_error)?;
        let store = self.store.clone();
        store
            .complete(id, token, encoded, self.config.ttl)
            .await
            .map_err(store_error)?;
        Ok(json(StatusCode::OK, serde_json::json!({ "stored": true })))
    }

    async fn release(&self, id: RecordId, call: &Call) -> Result<Response<Body>, ProxyError> {
        let token = parse_token(call.token.as_deref().unwrap_or_default())?;
        self.store
            .clone()
            .release(id, token)
            .await
            .map_err(store_error)?;
        Ok(json(
            StatusCode::OK,
            serde_json::json!({ "released": true }),
        ))
    }
}

/// A token the store never made cannot hold a lock.
fn parse_token(token: &str) -> Result<Token, ProxyError> {
    Token::from_hex(token).ok_or(ProxyError::LockNotHeld)
}

fn store_error(e: StoreError) -> ProxyError {
    match e {
        StoreError::LeaseLost => ProxyError::LockNotHeld,
        StoreError::Unavailable(_) | StoreError::Corrupt(_) => ProxyError::StoreUnavailable,
    }
}

async fn read_call(body: Incoming) -> Result<Call, ProxyError> {
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|_| ProxyError::BodyTooLarge {
            limit: MAX_BODY as u64,
        })?
        .to_bytes();
    let call: Call = serde_json::from_slice(&bytes)
        .map_err(|e| ProxyError::BadRequest(format!("expected {{\"scope\",\"key\",…}}: {e}")))?;
    if call.scope.is_empty() || call.key.is_empty() {
        return Err(ProxyError::BadRequest(
            "scope and key must not be empty".into(),
        ));
    }
    Ok(call)
}

fn record_id(tenant: &str, scope: &str, key: &str) -> RecordId {
    let mut h = blake3::Hasher::new();
    h.update(b"idemgate record-api v1");
    for part in [tenant, scope, key] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    RecordId(*h.finalize().as_bytes())
}

/// Token comparison whose time does not depend on where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
