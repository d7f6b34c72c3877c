//! The request pipeline. A request that matches no enforced route is streamed through
//! untouched; one that does goes through the stages in [`enforce`], one file per stage.

mod buffer;
mod enforce;
pub mod fingerprint;
pub mod forward;
pub mod headers;
pub mod key;
pub mod outcome;
mod pool;
mod record;
mod replay;

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

use bytes::Bytes;

use crate::body::{self, Body};
use crate::config::Config;
use crate::error::ProxyError;
use crate::store::Store;
pub use forward::Upstream;
pub use headers::ConnInfo;
use outcome::{Outcome, Report};
pub use record::unknown_outcome_record;

/// Everything a request needs; cheap to clone into every connection.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
    /// The upstream connection pool; each serving thread has its own (see
    /// [`Proxy::with_upstream`]), so an exchange never hops threads.
    upstream: Upstream,
}

struct Inner {
    /// Swapped whole on reload, so a request sees one consistent config.
    config: ArcSwap<Config>,
    store: Arc<dyn Store>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Upstream exchanges detached from their client connection.
    tasks: TaskTracker,
}

impl Proxy {
    pub fn new(
        config: Arc<Config>,
        upstream: Upstream,
        store: Arc<dyn Store>,
        metrics: Arc<crate::metrics::Metrics>,
        tasks: TaskTracker,
    ) -> Self {
        Proxy {
            inner: Arc::new(Inner {
                config: ArcSwap::new(config),
                store,
                metrics,
                tasks,
            }),
            upstream,
        }
    }

    /// The same proxy (config, store, metrics, reloads) over another upstream pool.
    pub fn with_upstream(&self, upstream: Upstream) -> Self {
        Proxy {
            inner: self.inner.clone(),
            upstream,
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.inner.config.load_full()
    }

    pub fn swap_config(&self, config: Arc<Config>) {
        self.inner.config.store(config);
    }

    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let config = self.inner.config.load_full();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let route = config.route(&method, &path);
        let (response, report) = match route {
            // Boxed: the enforced path's state is large, and a pass-through request would
            // otherwise carry (and copy) it too.
            Some(route) => Box::pin(enforce::handle(self, &config, route, req, conn)).await,
            None => self.passthrough(req, conn).await,
        };
        let route_name = route.map(|r| &*r.name).unwrap_or("");
        log_request(&method, &path, route_name, &response, &report);
        self.inner.metrics.observe(route_name, &report);
        response
    }

    /// Streams the request to the upstream and the response back, buffering nothing.
    async fn passthrough(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> (Response<Body>, Report) {
        let (mut parts, incoming) = req.into_parts();
        headers::to_upstream(&mut parts, &conn, &self.upstream.base);
        let (incoming, client_failed) = body::ClientBody::new(incoming);
        let (response, mut report) = self
            .send_prepared(Request::from_parts(parts, body::stream(incoming)))
            .await;
        let upstream_failed = report.outcome == Some(Outcome::UpstreamError);
        if upstream_failed && client_failed.load(std::sync::atomic::Ordering::Acquire) {
            // The upload broke, not the upstream: the client's request was malformed.
            let e = ProxyError::BadRequest("the request body is malformed".into());
            report.outcome = Some(Outcome::BadRequest);
            return (e.into_response(), report);
        }
        (response, report)
    }

    /// An enforced route's request that turned out to carry no key: forwarded as is.
    async fn forward_unrecorded(
        &self,
        mut parts: http::request::Parts,
        body: Bytes,
        conn: ConnInfo,
    ) -> (Response<Body>, Report) {
        headers::to_upstream(&mut parts, &conn, &self.upstream.base);
        self.send_prepared(Request::from_parts(parts, body::full(body)))
            .await
    }

    async fn send_prepared(&self, req: Request<Body>) -> (Response<Body>, Report) {
        let started = tokio::time::Instant::now();
        let result = self.upstream.send(req).await;
        let mut report = Report::new(Outcome::Passthrough, None, Some(started.elapsed()));
        let response = match result {
            Ok(resp) => {
                let (mut parts, incoming) = resp.into_parts();
                headers::to_client(&mut parts);
                Response::from_parts(parts, body::stream(incoming))
            }
            Err(failure) => {
                tracing::warn!(error = ?failure, "upstream exchange failed");
                report.outcome = Some(Outcome::UpstreamError);
                ProxyError::from(failure).into_response()
            }
        };
        (response, report)
    }
}

fn log_request(
    method: &http::Method,
    path: &str,
    route: &str,
    response: &Response<Body>,
    report: &Report,
) {
    let record = report.record.map(|r| r.short()).unwrap_or_default();
    crate::telemetry::request_line(&crate::telemetry::RequestLine {
        method: method.as_str(),
        path,
        route,
        outcome: report.outcome.map(Outcome::as_str).unwrap_or(""),
        status: response.status().as_u16(),
        record: &record,
        upstream: report.upstream_latency,
    });
}
