//! Stage 6-8: forward a claimed request and record its outcome. The exchange runs as a
//! task of its own, so a client that disconnects does not cancel it: the work finishes,
//! is recorded, and the client's retry replays it.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, response, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::forward::{Upstream, UpstreamFailure};
use super::headers;
use super::replay;
use crate::body::{self, full, Body, Prefixed};
use crate::config::Policy;
use crate::error::ProxyError;
use crate::store::{Claim, Encoded, Fingerprint, Record, StoreError};

/// What the detached exchange reports back to the handler.
pub struct Outcome {
    pub response: Response<Body>,
    pub upstream_error: bool,
    pub elapsed: Duration,
}

pub struct Exchange {
    /// Held for as long as the exchange runs, client or no client.
    pub _inflight: crate::metrics::GaugeGuard,
    pub upstream: Upstream,
    pub policy: Arc<Policy>,
    pub fingerprint: Fingerprint,
    pub claim: Claim,
}

/// Starts the exchange on `tasks` and returns where its answer will arrive.
pub fn spawn(
    tasks: &tokio_util::task::TaskTracker,
    ex: Exchange,
    request: Request<Bytes>,
) -> oneshot::Receiver<Outcome> {
    let (tx, rx) = oneshot::channel();
    // Boxed before it is spawned: its state (~3.9 KB) would otherwise be copied on each
    // move into the task and again as the task finishes.
    tasks.spawn(Box::pin(async move {
        // The lease is renewed while the upstream works, and no longer once the record is
        // being written: a renewal that reached the store after the completion would find
        // the lock gone and count a lost lease.
        let renewing = ex.claim.keep_alive();
        let (outcome, unrecorded) = tokio::select! {
            biased;
            done = ex.run(request.map(full)) => done,
            never = renewing => match never {},
        };
        if let Some(Unrecorded(ex, record)) = unrecorded {
            ex.complete(record).await;
        }
        // The client may be gone; the record is what matters then.
        let _ = tx.send(outcome);
    }));
    rx
}

/// A record to write before the answer leaves.
struct Unrecorded(Exchange, Record);

impl Exchange {
    async fn run(self, req: Request<Body>) -> (Outcome, Option<Unrecorded>) {
        let started = Instant::now();
        let deadline = started + self.upstream.timeout;
        // The stages after the upstream's answer are boxed: inline, their state made the
        // spawned task ~7 KB, copied on every spawn (~6% of a new key's CPU).
        let (response, upstream_error, unrecorded) = match self.upstream.send(req).await {
            Err(failure) => {
                let (response, unrecorded) = self.failed(failure);
                (response, true, unrecorded)
            }
            Ok(resp) => Box::pin(self.received(resp, deadline)).await,
        };
        let outcome = Outcome {
            response,
            upstream_error,
            elapsed: started.elapsed(),
        };
        (outcome, unrecorded)
    }

    async fn received(
        self,
        resp: Response<Incoming>,
        deadline: Instant,
    ) -> (Response<Body>, bool, Option<Unrecorded>) {
        let (mut parts, incoming) = resp.into_parts();
        headers::to_client(&mut parts);
        if !self.policy.store_statuses.contains(parts.status) {
            // Not a status to keep: free the key now so a retry runs again.
            self.claim.release();
            let body = body::Deadline::new(incoming, deadline).boxed();
            return (Response::from_parts(parts, body), false, None);
        }
        let limit = self.policy.max_stored_response;
        match read_up_to(incoming, limit, deadline).await {
            Read::Whole(bytes) => {
                let record = self.record(&parts, Some(bytes.clone()));
                let response = replay::respond(&record, bytes);
                (response, false, Some(Unrecorded(self, record)))
            }
            Read::TooLarge(prefix, rest) => {
                // The work ran; keep that fact (status and headers) and stream the body.
                let record = self.record(&parts, None);
                parts.headers.remove(header::CONTENT_LENGTH);
                let body = body::Deadline::new(Prefixed::new(prefix, rest), deadline).boxed();
                let response = Response::from_parts(parts, body);
                (response, false, Some(Unrecorded(self, record)))
            }
            Read::Failed(failure) => {
                let (response, unrecorded) = self.failed(failure);
                (response, true, unrecorded)
            }
        }
    }

    /// SPEC §3 step 8: a refused connection never ran upstream, so the key is freed; an
    /// unknown outcome is recorded when its status is one to keep (at-most-once).
    fn failed(self, failure: UpstreamFailure) -> (Response<Body>, Option<Unrecorded>) {
        tracing::warn!(error = ?failure, record = %self.claim.id().short(), "upstream exchange failed");
        let error = ProxyError::from(failure.clone());
        if !(failure.outcome_unknown() && self.policy.store_statuses.contains(error.status())) {
            self.claim.release();
            return (error.into_response(), None);
        }
        let (parts, bytes) = error.to_parts();
        let record = self.record(&parts, Some(bytes.clone()));
        let response = replay::respond(&record, bytes);
        (response, Some(Unrecorded(self, record)))
    }

    fn record(&self, parts: &response::Parts, body: Option<Bytes>) -> Record {
        record_of(self.fingerprint, parts, body)
    }

    async fn complete(self, record: Record) {
        let id = self.claim.id().short();
        let stored = match record.encode() {
            Ok(encoded) => self.claim.complete(encoded, self.policy.ttl).await,
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            tracing::error!(record = %id, error = %e, "could not record the response");
        }
    }
}

enum Read {
    Whole(Bytes),
    TooLarge(Bytes, Incoming),
    Failed(UpstreamFailure),
}

/// Reads the response body until it ends, passes `limit`, or the exchange deadline.
async fn read_up_to(mut body: Incoming, limit: u64, deadline: Instant) -> Read {
    let mut buf = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Read::Failed(UpstreamFailure::Timeout),
            Ok(None) => return Read::Whole(buf.freeze()),
            Ok(Some(Err(e))) => {
                return Read::Failed(UpstreamFailure::Reset(format!("response body: {e}")))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() as u64 > limit {
                return Read::TooLarge(buf.freeze(), body);
            }
        }
    }
}

fn record_of(fingerprint: Fingerprint, parts: &response::Parts, body: Option<Bytes>) -> Record {
    let headers = parts
        .headers
        .iter()
        .filter(|(n, _)| **n != header::CONTENT_LENGTH && **n != header::DATE)
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    Record {
        fingerprint,
        status: parts.status,
        headers,
        body,
    }
}

/// What a request in flight when its idemgate process died is recorded as, at the next
/// start of a store that outlives the process: the 502 of an upstream exchange whose
/// outcome is unknown (SPEC §3 step 8).
pub fn unknown_outcome_record(fingerprint: Fingerprint) -> Result<Encoded, StoreError> {
    let why = "idemgate stopped before the upstream answered; the outcome is unknown";
    let (parts, bytes) = ProxyError::UpstreamUnavailable(why.into()).to_parts();
    record_of(fingerprint, &parts, Some(bytes)).encode()
}
