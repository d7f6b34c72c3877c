//! The admin listener: liveness, readiness (503 while draining or while the store does
//! not answer) and Prometheus metrics. Plain HTTP/1.1, never exposed with the proxy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{full, Body};

/// What the admin endpoints report on.
#[derive(Clone, Default)]
pub struct AdminState {
    pub draining: Arc<AtomicBool>,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    pub connections: Option<Arc<super::Connections>>,
    pub store: Option<Arc<dyn crate::store::Store>>,
}

impl AdminState {
    /// `None` when ready, else why not.
    fn not_ready(&self) -> Option<&'static str> {
        if self.draining.load(Ordering::Acquire) {
            return Some("draining\n");
        }
        if self.store.as_ref().is_some_and(|s| !s.ready()) {
            return Some("store unavailable\n");
        }
        if self.connections.as_ref().is_some_and(|c| c.saturated()) {
            return Some("saturated: server.max_connections reached\n");
        }
        None
    }
}

pub async fn serve(listener: TcpListener, state: AdminState, stop: CancellationToken) {
    super::http1::serve(listener, "admin", stop, move |req| {
        let answer = respond(&state, req);
        async move { answer }
    })
    .await;
}

fn respond(state: &AdminState, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match state.not_ready() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, why),
        },
        "/metrics" => match &state.metrics {
            Some(m) => {
                let mut resp = Response::new(full(m.render()));
                let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
                resp
            }
            None => text(StatusCode::NOT_FOUND, "metrics disabled\n"),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
