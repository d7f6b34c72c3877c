//! Answers built from a record: the recorded status, headers (less
//! `replay_drop_headers`) and body, a fresh `Date` (hyper's), and `replayed_header: true`.

use http::{header, HeaderValue, Response};

use crate::body::{full, Body};
use crate::config::{DuplicateResponse, Policy};
use crate::error::ProxyError;
use crate::store::Record;

pub fn replay(record: &Record, policy: &Policy) -> Response<Body> {
    let Some(body) = &record.body else {
        return ProxyError::NotRetained.into_response();
    };
    let mut resp = respond(record, body.clone());
    let headers = resp.headers_mut();
    for name in &policy.replay_drop_headers {
        headers.remove(name);
    }
    mark_replayed(&mut resp, policy);
    resp
}

/// The response the first request itself gets: exactly what was recorded.
pub fn respond(record: &Record, body: bytes::Bytes) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = record.status;
    let headers = resp.headers_mut();
    for (name, value) in &record.headers {
        headers.append(name.clone(), value.clone());
    }
    resp
}

/// A route's fixed answer to duplicates (webhook providers only need a 2xx).
pub fn duplicate(d: &DuplicateResponse, policy: &Policy) -> Response<Body> {
    let mut resp = Response::new(full(d.body.clone()));
    *resp.status_mut() = d.status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, d.content_type.clone());
    mark_replayed(&mut resp, policy);
    resp
}

/// The fresh `Date` is hyper's: records never keep one, and the server adds the current
/// one (cached per second) to every answer, so it is not formatted here per replay.
fn mark_replayed(resp: &mut Response<Body>, policy: &Policy) {
    let headers = resp.headers_mut();
    headers.insert(
        policy.replayed_header.clone(),
        HeaderValue::from_static("true"),
    );
}
