//! Serving threads: one single-threaded runtime per core, each serving the connections
//! handed to it and holding its own upstream pool.
//!
//! Why: on a work-stealing runtime a request's client task, its upstream connection
//! task and the detached exchange land on different threads, and every hand-over is a
//! futex wake-up (about 1.6 per request, measured). Here a connection, its upstream
//! exchange and the record it writes stay on one thread. The store, metrics, config and
//! connection limit are shared. One acceptor hands each new connection to the thread
//! with the fewest open ones: threads accepting on a shared socket took them unevenly
//! (one thread did 72% of the work under wrk).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{admit, Connections, Handler};
use crate::config::{ServerConfig, UpstreamConfig};
use crate::proxy::{Proxy, Upstream};

/// What every serving thread shares.
pub struct Shared {
    pub tls: Option<TlsAcceptor>,
    pub proxy: Proxy,
    pub upstream: UpstreamConfig,
    pub server: ServerConfig,
    pub connections: Arc<Connections>,
    pub stop: CancellationToken,
    /// Detached upstream exchanges and the store's releases: a thread keeps running
    /// until both are done, since their tasks live on its runtime.
    pub tasks: TaskTracker,
    pub background: TaskTracker,
}

/// A connection on its way to a serving thread.
struct Admitted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: Slot,
}

/// Holds the connection's `max_connections` permit and its place in its thread's count
/// until the connection ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Lane {
    tx: mpsc::UnboundedSender<Admitted>,
    open: Arc<AtomicUsize>,
    stopped: oneshot::Receiver<()>,
}

/// The serving threads, fed by [`Workers::accept`].
pub struct Workers {
    lanes: Vec<Lane>,
    connections: Arc<Connections>,
    stop: CancellationToken,
}

impl Workers {
    pub fn start(count: usize, shared: Shared) -> Result<Workers, String> {
        let shared = Arc::new(shared);
        let mut lanes = Vec::with_capacity(count);
        for n in 0..count.max(1) {
            let upstream = Upstream::new(&shared.upstream)?;
            let (tx, rx) = mpsc::unbounded_channel();
            let (done, stopped) = oneshot::channel();
            let thread_shared = shared.clone();
            // Built here, so a runtime that cannot start stops the start.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start a serving thread's runtime: {e}"))?;
            std::thread::Builder::new()
                .name(format!("idemgate-serve-{n}"))
                .spawn(move || serve_thread(runtime, rx, upstream, &thread_shared, done))
                .map_err(|e| format!("cannot start a serving thread: {e}"))?;
            let open = Arc::new(AtomicUsize::new(0));
            lanes.push(Lane { tx, open, stopped });
        }
        Ok(Workers {
            lanes,
            connections: shared.connections.clone(),
            stop: shared.stop.clone(),
        })
    }

    /// Accepts until `stop` fires, then waits for every thread to drain its connections.
    pub async fn accept(self, listener: TcpListener) {
        while let Some((stream, peer, permit)) =
            admit(&listener, &self.connections, &self.stop).await
        {
            // A thread that stopped (it cannot, short of a bug) takes no more connections.
            let live = self.lanes.iter().filter(|l| !l.tx.is_closed());
            let Some(lane) = live.min_by_key(|l| l.open.load(Ordering::Relaxed)) else {
                tracing::error!("every serving thread stopped: no longer accepting");
                break;
            };
            let stream = match stream.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot hand a connection over");
                    continue;
                }
            };
            lane.open.fetch_add(1, Ordering::Relaxed);
            let slot = Slot {
                _permit: permit,
                open: lane.open.clone(),
            };
            if lane.tx.send(Admitted { stream, peer, slot }).is_err() {
                tracing::error!(%peer, "a serving thread stopped; connection closed");
            }
        }
        drop(listener);
        for lane in self.lanes {
            drop(lane.tx);
            let _ = lane.stopped.await;
        }
    }
}

fn serve_thread(
    runtime: tokio::runtime::Runtime,
    mut rx: mpsc::UnboundedReceiver<Admitted>,
    upstream: Upstream,
    shared: &Shared,
    done: oneshot::Sender<()>,
) {
    runtime.block_on(async move {
        let proxy = shared.proxy.with_upstream(upstream);
        let handler = Handler::new(
            shared.tls.clone(),
            proxy,
            &shared.server,
            shared.stop.clone(),
        );
        while let Some(Admitted { stream, peer, slot }) = rx.recv().await {
            match TcpStream::from_std(stream) {
                Ok(stream) => handler.spawn(stream, peer, slot),
                Err(e) => tracing::warn!(%peer, error = %e, "cannot take a connection over"),
            }
        }
        handler.drain(shared.server.shutdown_grace).await;
        let _ = done.send(());
        // The caller bounds these waits by `shutdown_grace`; this thread only has to
        // keep driving the tasks that live on its runtime until then.
        shared.tasks.wait().await;
        shared.background.wait().await;
    });
}
