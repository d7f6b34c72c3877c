//! The plain HTTP/1.1 accept loop behind the small side listeners (admin, record API,
//! demo API): no TLS, no HTTP/2. On `stop` it stops accepting, asks open connections to
//! close after their current answer, and returns once they have (at most a second).

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::Body;

/// Side listeners answer small documents; a client gets this long to send a head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves `handler` on every connection `listener` accepts until `stop` fires.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    name: &'static str,
    stop: CancellationToken,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let open = TaskTracker::new();
    while let Some((stream, _)) = super::accept(&listener, name, &stop).await {
        let handler = handler.clone();
        let stop = stop.clone();
        open.spawn(async move {
            let service = service_fn(move |req| {
                let answer = handler(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
        });
    }
    open.close();
    open.wait().await;
}
