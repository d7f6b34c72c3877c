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
use tokio_util::task::TaskTracker;

use crate::body::{full, Body};
use crate::config::RecordApiConfig;
use crate::error::ProxyError;
use crate::store::{Begin, Claim, Fingerprint, Record, RecordId, Store};

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

struct Held {
    id: RecordId,
    claim: Claim,
    expires: Instant,
}

pub struct RecordApi {
    config: RecordApiConfig,
    store: Arc<dyn Store>,
    locks: Mutex<HashMap<String, Held>>,
    windows: Mutex<HashMap<String, (Instant, u32)>>,
    /// Lease timers: they end with the listener, and [`RecordApi::serve`] joins them.
    leases: TaskTracker,
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

fn random_token() -> Result<String, ProxyError> {
    let mut buf = [0u8; 16];
    getrandom::fill(&mut buf).map_err(|_| ProxyError::StoreUnavailable)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
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
            locks: Mutex::default(),
            windows: Mutex::default(),
            leases: TaskTracker::new(),
            stop,
        })
    }

    /// Serves until the `stop` given to [`RecordApi::new`] fires, then joins the leases.
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
        self.leases.close();
        self.leases.wait().await;
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
            Method::DELETE => self.release(id, &call),
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
            .any(|t| constant_time_eq(t.as_bytes(), given.as_bytes()));
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
        if let Some(token) = &call.token {
            return self.renew(id, token);
        }
        let begin = self
            .store
            .clone()
            .begin(id, NO_FINGERPRINT)
            .await
            .map_err(|_| ProxyError::StoreUnavailable)?;
        match begin {
            Begin::Claimed(claim) => {
                let token = random_token()?;
                let expires = Instant::now() + self.config.lease;
                lock(&self.locks).insert(token.clone(), Held { id, claim, expires });
                self.leases.spawn(self.clone().expire(token.clone()));
                let lease_ms = self.config.lease.as_millis() as u64;
                Ok(json(
                    StatusCode::OK,
                    serde_json::json!({ "locked": true, "token": token, "leaseMs": lease_ms }),
                ))
            }
            Begin::InFlight { .. } => {
                let retry = self
                    .remaining(id)
                    .min(Duration::from_secs(1))
                    .max(Duration::from_millis(50));
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

    /// A POST that names its lock token extends the lease.
    fn renew(&self, id: RecordId, token: &str) -> Result<Response<Body>, ProxyError> {
        let mut locks = lock(&self.locks);
        let held = locks
            .get_mut(token)
            .filter(|h| h.id == id)
            .ok_or(ProxyError::LockNotHeld)?;
        held.expires = Instant::now() + self.config.lease;
        let lease_ms = self.config.lease.as_millis() as u64;
        Ok(json(
            StatusCode::OK,
            serde_json::json!({ "locked": true, "token": token, "leaseMs": lease_ms }),
        ))
    }

    fn remaining(&self, id: RecordId) -> Duration {
        let now = Instant::now();
        lock(&self.locks)
            .values()
            .find(|h| h.id == id)
            .map(|h| h.expires.saturating_duration_since(now))
            .unwrap_or(Duration::ZERO)
    }

    /// Frees the lock when its lease passes without completion or renewal.
    async fn expire(self: Arc<Self>, token: String) {
        loop {
            let Some(expires) = lock(&self.locks).get(&token).map(|h| h.expires) else {
                return;
            };
            tokio::select! {
                _ = tokio::time::sleep_until(expires) => {}
                _ = self.stop.cancelled() => return,
            }
            let mut locks = lock(&self.locks);
            if locks
                .get(&token)
                .is_some_and(|h| h.expires <= Instant::now())
            {
                if let Some(held) = locks.remove(&token) {
                    tracing::warn!(record = %held.id.short(), "record API lease expired: lock freed");
                }
                return;
            }
        }
    }

    fn take(&self, id: RecordId, call: &Call) -> Result<Held, ProxyError> {
        let token = call.token.as_deref().ok_or(ProxyError::LockNotHeld)?;
        let mut locks = lock(&self.locks);
        match locks.get(token) {
            Some(h) if h.id == id => locks.remove(token).ok_or(ProxyError::LockNotHeld),
            _ => Err(ProxyError::LockNotHeld),
        }
    }

    async fn complete(&self, id: RecordId, call: Call) -> Result<Response<Body>, ProxyError> {
        let status = StatusCode::from_u16(call.status.unwrap_or(200))
            .ok()
            .filter(|s| (100..=599).contains(&s.as_u16()))
            .ok_or_else(|| {
                ProxyError::BadRequest("status must be an HTTP status (100-599)".into())
            })?;
        let held = self.take(id, &call)?;
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
            expires_at: Instant::now() + self.config.ttl,
        };
        held.claim
            .complete(record)
            .await
            .map_err(|_| ProxyError::LockNotHeld)?;
        Ok(json(StatusCode::OK, serde_json::json!({ "stored": true })))
    }

    fn release(&self, id: RecordId, call: &Call) -> Result<Response<Body>, ProxyError> {
        drop(self.take(id, call)?);
        Ok(json(
            StatusCode::OK,
            serde_json::json!({ "released": true }),
        ))
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
