//! The request pipeline. A request that matches no enforced route is streamed through
//! untouched; one that does goes through the stages in [`enforce`], one file per stage.

mod enforce;
pub mod forward;
pub mod headers;

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

use crate::body::{self, Body};
use crate::config::Config;
use crate::error::ProxyError;
pub use forward::Upstream;
pub use headers::ConnInfo;

/// Everything a request needs; cheap to clone into every connection.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    /// Swapped whole on reload, so a request sees one consistent config.
    config: ArcSwap<Config>,
    upstream: Upstream,
    /// Upstream exchanges detached from their client connection.
    tasks: TaskTracker,
}

impl Proxy {
    pub fn new(config: Arc<Config>, upstream: Upstream, tasks: TaskTracker) -> Self {
        Proxy {
            inner: Arc::new(Inner {
                config: ArcSwap::new(config),
                upstream,
                tasks,
            }),
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
        match config.route(req.method(), req.uri().path()) {
            Some(route) => enforce::handle(self, route, req, conn).await,
            None => self.passthrough(req, conn).await,
        }
    }

    /// Streams the request to the upstream and the response back, buffering nothing.
    async fn passthrough(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let (mut parts, incoming) = req.into_parts();
        headers::to_upstream(&mut parts, &conn, &self.inner.upstream.base);
        let upstream_req = Request::from_parts(parts, body::stream(incoming));
        match self.inner.upstream.send(upstream_req).await {
            Ok(resp) => {
                let (mut parts, incoming) = resp.into_parts();
                headers::to_client(&mut parts);
                Response::from_parts(parts, body::stream(incoming))
            }
            Err(failure) => {
                tracing::warn!(error = ?failure, "upstream exchange failed");
                ProxyError::from(failure).into_response()
            }
        }
    }
}
