//! The life of a request on an enforced route (SPEC §3), one line per stage:
//! route → key → body → fingerprint → begin on the store → replay | wait | forward and record.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;

use super::outcome::{Outcome, Report};
use super::record::{self, Exchange};
use super::{buffer, fingerprint, headers, key, replay, ConnInfo, Proxy};
use crate::body::Body;
use crate::config::{Concurrent, Config, KeySource, OnStoreError, Route};
use crate::error::ProxyError;
use crate::store::{Begin, Fingerprint, RecordId, StoreError, Woke};

/// What a client is told to wait before retrying a request that is still in flight.
const RETRY_AFTER: Duration = Duration::from_secs(1);

type Handled = (Response<Body>, Report);

fn refuse(e: ProxyError, record: Option<RecordId>) -> Handled {
    let report = Report::new(Outcome::of_error(&e), record, None);
    (e.into_response(), report)
}

pub async fn handle(
    proxy: &Proxy,
    config: &Config,
    route: &Route,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> Handled {
    let policy = &route.policy;
    let missing = || {
        refuse(
            ProxyError::KeyMissing {
                source: route.key.location(),
            },
            None,
        )
    };
    let header_key = match &route.key {
        KeySource::Header(name) => match key::from_header(req.headers(), name, policy) {
            // Boxed here and below: paths most requests never take, whose state would
            // otherwise be carried (and copied) by every request's future.
            Ok(None) if !policy.required => return Box::pin(proxy.passthrough(req, conn)).await,
            Ok(None) => return missing(),
            Ok(found) => found,
            Err(e) => return refuse(e, None),
        },
        KeySource::JsonPointer(_) => None,
    };
    let (parts, body) = req.into_parts();
    let server = &config.server;
    let limits = (server.max_request_body, server.body_read_timeout);
    let body = match buffer::read(body, &parts.headers, limits.0, limits.1).await {
        Ok(b) => b,
        Err(e) => return refuse(e, None),
    };
    let key = match (header_key, &route.key) {
        (Some(k), _) => k,
        (None, KeySource::JsonPointer(pointer)) => match key::from_json(&body, pointer, policy) {
            Ok(Some(k)) => k,
            Ok(None) if !policy.required => {
                return Box::pin(proxy.forward_unrecorded(parts, body, conn)).await
            }
            Ok(None) => return missing(),
            Err(e) => return refuse(e, None),
        },
        (None, KeySource::Header(_)) => return missing(),
    };
    let id = fingerprint::record_id(policy, &parts.headers, &key);
    let fp = fingerprint::fingerprint(policy, &parts, &body);
    let request = Request::from_parts(parts, body);
    decide(proxy, config, route, id, fp, request, conn).await
}

/// Step 5 onwards: one atomic step on the store, then replay, wait or run. A waiter
/// that wakes goes round again, fingerprint check included, unless it was handed the
/// record, which it replays after the same check.
async fn decide(
    proxy: &Proxy,
    config: &Config,
    route: &Route,
    id: RecordId,
    fp: Fingerprint,
    request: Request<Bytes>,
    conn: ConnInfo,
) -> Handled {
    let policy = &route.policy;
    let mismatch = ProxyError::Mismatch {
        status: policy.mismatch_status,
    };
    let deadline = tokio::time::Instant::now() + policy.wait_timeout;
    let mut waited = false;
    loop {
        let store = proxy.inner.store.clone();
        let lease = store.claim_lease();
        // Should this process die mid-exchange, the outcome is unknown (SPEC §3 step 8).
        let if_orphaned = policy
            .store_statuses
            .contains(http::StatusCode::BAD_GATEWAY)
            .then_some(policy.ttl);
        let begin = match store.begin_request(id, fp, lease, if_orphaned).await {
            Ok(b) => b,
            // A duplicate is in flight somewhere: never pass this one around the store.
            Err(_) if waited => return refuse(ProxyError::StoreUnavailable, Some(id)),
            Err(e) => {
                let request = upstream(proxy, request, conn);
                return Box::pin(store_failed(proxy, config, e, request, id)).await;
            }
        };
        match begin {
            Begin::Claimed(claim) => {
                let request = upstream(proxy, request, conn);
                return run(proxy, route, fp, claim, request).await;
            }
            Begin::Completed(rec) if rec.fingerprint != fp => return refuse(mismatch, Some(id)),
            Begin::InFlight { fingerprint, .. } if fingerprint != fp => {
                return refuse(mismatch, Some(id))
            }
            Begin::Completed(rec) => return answer_from(route, &rec, id, waited),
            Begin::InFlight { waiter, .. } => {
                let busy = ProxyError::InProgress {
                    retry_after: RETRY_AFTER,
                };
                if policy.concurrent == Concurrent::Reject {
                    return refuse(busy, Some(id));
                }
                let _waiting = proxy.inner.metrics.waiting(&route.name);
                match tokio::time::timeout_at(deadline, waiter.wait()).await {
                    Err(_) => return refuse(busy, Some(id)),
                    Ok(Woke::Recorded(rec)) if rec.fingerprint != fp => {
                        return refuse(mismatch, Some(id))
                    }
                    Ok(Woke::Recorded(rec)) => return answer_from(route, &rec, id, true),
                    // Completed, released, lapsed or a failed poll: begin again decides,
                    // fingerprint included (a store still down then answers 503).
                    Ok(woke) => {
                        if let Woke::Failed(e) = woke {
                            tracing::warn!(record = %id.short(), error = %e, "waiting on the store failed; asking again");
                        }
                        waited = true;
                    }
                }
            }
        }
    }
}

/// A replay of `rec` (or the route's fixed duplicate answer).
fn answer_from(route: &Route, rec: &crate::store::Record, id: RecordId, waited: bool) -> Handled {
    let policy = &route.policy;
    let response = match &route.duplicate_response {
        Some(d) => replay::duplicate(d, policy),
        None => replay::replay(rec, policy),
    };
    let outcome = if waited {
        Outcome::Coalesced
    } else {
        Outcome::Replayed
    };
    (response, Report::new(outcome, Some(id), None))
}

/// The request's head rewritten for the upstream: only once it is to be sent, since a
/// replay or a wait never needs it.
fn upstream(proxy: &Proxy, request: Request<Bytes>, conn: ConnInfo) -> Request<Bytes> {
    let (mut parts, body) = request.into_parts();
    headers::to_upstream(&mut parts, &conn, &proxy.upstream.base);
    Request::from_parts(parts, body)
}

async fn run(
    proxy: &Proxy,
    route: &Route,
    fp: Fingerprint,
    claim: crate::store::Claim,
    request: Request<Bytes>,
) -> Handled {
    let id = claim.id();
    let exchange = Exchange {
        _inflight: proxy.inner.metrics.inflight(&route.name),
        upstream: proxy.upstream.clone(),
        policy: Arc::clone(&route.policy),
        fingerprint: fp,
        claim,
    };
    match record::spawn(&proxy.inner.tasks, exchange, request).await {
        Ok(done) => {
            let outcome = if done.upstream_error {
                Outcome::UpstreamError
            } else {
                Outcome::Forwarded
            };
            let report = Report::new(outcome, Some(id), Some(done.elapsed));
            (done.response, report)
        }
        Err(_) => refuse(
            ProxyError::UpstreamUnavailable("the upstream exchange was aborted".into()),
            Some(id),
        ),
    }
}

async fn store_failed(
    proxy: &Proxy,
    config: &Config,
    e: StoreError,
    request: Request<Bytes>,
    id: RecordId,
) -> Handled {
    tracing::error!(record = %id.short(), error = %e, "store failed");
    // Only an unreachable store may be passed over; an unreadable record is never
    // taken as absent (that would run a duplicate).
    let pass =
        matches!(e, StoreError::Unavailable(_)) && config.store.on_error == OnStoreError::Pass;
    if !pass {
        return refuse(ProxyError::StoreUnavailable, Some(id));
    }
    let (parts, body) = request.into_parts();
    let (response, mut report) = proxy
        .send_prepared(Request::from_parts(parts, crate::body::full(body)))
        .await;
    report.outcome = Some(Outcome::StoreError);
    report.record = Some(id);
    (response, report)
}
