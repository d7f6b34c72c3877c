//! The accept loop: connection limits, optional TLS, HTTP/1.1 and HTTP/2 (h2c by prior
//! knowledge on plain TCP, ALPN on TLS), and graceful drain. What happens on one
//! connection (deadlines, protocol, idle close) is in [`conn`].

mod activity;
pub mod admin;
mod conn;
pub mod http1;
mod io;
pub mod tls;
pub mod workers;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::proxy::{ConnInfo, Proxy};

/// Open client connections against `server.max_connections`, shared with `/readyz`.
#[derive(Debug)]
pub struct Connections {
    permits: Arc<Semaphore>,
    max: usize,
    refused: AtomicU64,
}

impl Connections {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Connections {
            permits: Arc::new(Semaphore::new(max)),
            max,
            refused: AtomicU64::new(0),
        })
    }

    /// Every slot is taken: a new connection would be closed at once.
    pub fn saturated(&self) -> bool {
        self.permits.available_permits() == 0
    }

    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Connections closed at accept because every slot was taken.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Accepts one connection, or `None` once `stop` fires. Accept errors (EMFILE when file
/// descriptors run out, say) back off, doubling up to a second, instead of spinning.
pub async fn accept(
    listener: &TcpListener,
    name: &'static str,
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return None,
        };
        match accepted {
            Ok(a) => return Some(a),
            Err(e) => {
                tracing::warn!(listener = name, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return None,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Accepts until `stop` fires, then lets open connections finish within `grace`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Proxy,
    config: ServerConfig,
    connections: Arc<Connections>,
    stop: CancellationToken,
) {
    let handler = Handler::new(tls, proxy, &config, stop.clone());
    while let Some((stream, peer, permit)) = admit(&listener, &connections, &stop).await {
        handler.spawn(stream, peer, permit);
    }
    drop(listener);
    handler.drain(config.shutdown_grace).await;
}

/// The next accepted connection that got a `max_connections` slot; one over the limit is
/// closed at once, so its client learns now instead of hanging.
pub async fn admit(
    listener: &TcpListener,
    connections: &Connections,
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    loop {
        let (stream, peer) = accept(listener, "proxy", stop).await?;
        match connections.permits.clone().try_acquire_owned() {
            Ok(permit) => return Some((stream, peer, permit)),
            Err(_) => {
                connections.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "connection refused: server.max_connections reached");
            }
        }
    }
}

/// Serves admitted connections on the current runtime and tracks them for the drain.
pub struct Handler {
    settings: Arc<conn::Settings>,
    tls: Option<TlsAcceptor>,
    proxy: Proxy,
    stop: CancellationToken,
    open: TaskTracker,
}

impl Handler {
    pub fn new(
        tls: Option<TlsAcceptor>,
        proxy: Proxy,
        config: &ServerConfig,
        stop: CancellationToken,
    ) -> Self {
        Handler {
            settings: Arc::new(conn::Settings::new(config)),
            tls,
            proxy,
            stop,
            open: TaskTracker::new(),
        }
    }

    /// Serves one connection; `slot` (its `max_connections` permit) is held until it ends.
    pub fn spawn(&self, stream: TcpStream, peer: SocketAddr, slot: impl Send + 'static) {
        let _ = stream.set_nodelay(true);
        let info = ConnInfo::new(peer, self.tls.is_some());
        let conn = conn::Conn::new(
            self.settings.clone(),
            self.proxy.clone(),
            info,
            self.stop.clone(),
        );
        let tls = self.tls.clone();
        self.open.spawn(async move {
            conn.serve(stream, tls).await;
            drop(slot);
        });
    }

    /// Lets the open connections finish, at most `grace`.
    pub async fn drain(self, grace: Duration) {
        self.open.close();
        if tokio::time::timeout(grace, self.open.wait()).await.is_err() {
            tracing::warn!("shutdown grace passed with connections still open");
        }
    }
}
