//! idemgate: a reverse proxy that makes the unsafe endpoints of an HTTP API safe to
//! retry, by enforcing idempotency keys on the routes its config lists.
//!
//! # Layout
//!
//! - [`config`]: the TOML file, read with spans, validated into typed values.
//! - [`server`]: accept loop (TLS, HTTP/1.1 + HTTP/2, limits, drain), the serving threads
//!   (one single-threaded runtime per core) and the admin listener.
//! - [`proxy`]: the request pipeline: pass-through streaming, and on enforced routes
//!   route → key → body → fingerprint → store → replay | wait | forward and record.
//! - [`reload`]: SIGHUP swaps routes and idempotency settings atomically.
//! - [`record_api`]: lock / store / release records for workers that are not HTTP requests.
//! - [`error`]: the one mapping from failures to problem+json responses.
//! - [`metrics`]: Prometheus series for the admin listener.
//! - [`body`]: the body type shared by every stage.
//! - [`store`]: the store contract (records, claims) and its backends: memory, Redis, disk.
//! - [`demo`]: the built-in orders API behind `idemgate demo`.
//! - [`telemetry`]: logging set-up.
//!
//! [`run`] wires them together; the shutdown signal is passed in as a future so tests
//! and the binary stop the proxy the same way.

pub mod body;
pub mod config;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod proxy;
pub mod record_api;
pub mod reload;
pub mod server;
pub mod store;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use config::Config;
use proxy::{Proxy, Upstream};
use server::admin::AdminState;

/// The sockets idemgate serves on, bound before [`run`] so callers can learn the ports.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: Option<TcpListener>,
    pub record_api: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let proxy = TcpListener::bind(config.server.listen).await?;
        let admin = match config.server.admin_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let record_api = match &config.record_api {
            Some(api) => Some(TcpListener::bind(api.listen).await?),
            None => None,
        };
        Ok(Listeners {
            proxy,
            admin,
            record_api,
        })
    }

    pub fn proxy_addr(&self) -> std::io::Result<SocketAddr> {
        self.proxy.local_addr()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn record_api_addr(&self) -> Option<SocketAddr> {
        self.record_api.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Runs the proxy until `shutdown` completes, then drains: stop accepting, let in-flight
/// exchanges finish and be recorded within `server.shutdown_grace`, return.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    run_with_reloads(config, listeners, shutdown, Options::default()).await
}

/// How [`run_with_reloads`] serves, beyond the config.
#[derive(Default)]
pub struct Options {
    /// Configs to apply as they arrive ([`reload::apply`]).
    pub reloads: Option<tokio::sync::mpsc::UnboundedReceiver<Config>>,
    /// Serve the proxy listener on this many single-threaded runtimes
    /// ([`server::workers`]); `None` serves on the caller's runtime.
    pub threads: Option<usize>,
    /// Log "idemgate listening" once the store is open (the binary's readiness line).
    pub announce: Option<Option<std::path::PathBuf>>,
}

/// [`run`], also applying every config that arrives on `reloads` ([`reload::apply`]).
///
/// Shutdown is one tree: the proxy listener stops first and its connections drain, then
/// the detached upstream exchanges get what is left of `shutdown_grace` to be recorded,
/// then the side listeners (admin, record API with its lease timers) stop and are joined.
pub async fn run_with_reloads(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    options: Options,
) -> Result<(), String> {
    let Options {
        reloads,
        threads,
        announce,
    } = options;
    let config = Arc::new(config);
    let upstream = Upstream::new(&config.upstream)?;
    let tls = match &config.server.tls {
        Some(files) => Some(server::tls::acceptor(files)?),
        None => None,
    };
    let root = CancellationToken::new();
    let (proxy_stop, side_stop) = (root.child_token(), CancellationToken::new());
    let side = TaskTracker::new();
    let tasks = TaskTracker::new();
    let store = build_store(&config, side_stop.clone())?;
    if let Some(config_path) = announce {
        announce_listening(&config, &listeners, config_path);
    }
    let store_handle = store.clone();
    let connections = server::Connections::new(config.server.max_connections);
    let metrics = metrics::Metrics::new(store.clone(), connections.clone());
    if let (Some(listener), Some(api)) = (listeners.record_api, &config.record_api) {
        let api = record_api::RecordApi::new(api.clone(), store.clone(), side_stop.clone());
        side.spawn(api.serve(listener));
    }
    let proxy = Proxy::new(
        config.clone(),
        upstream,
        store,
        metrics.clone(),
        tasks.clone(),
    );
    if let Some(rx) = reloads {
        tokio::spawn(reload::apply_all(proxy.clone(), rx));
    }
    let admin_state = AdminState {
        draining: Default::default(),
        metrics: Some(metrics),
        connections: Some(connections.clone()),
        store: Some(store_handle.clone()),
    };
    if let Some(admin) = listeners.admin {
        side.spawn(server::admin::serve(
            admin,
            admin_state.clone(),
            side_stop.clone(),
        ));
    }
    let serving = match threads {
        None => tokio::spawn(server::serve(
            listeners.proxy,
            tls,
            proxy,
            config.server.clone(),
            connections,
            proxy_stop,
        )),
        Some(count) => {
            let shared = server::workers::Shared {
                tls,
                proxy,
                upstream: config.upstream.clone(),
                server: config.server.clone(),
                connections,
                stop: proxy_stop,
                tasks: tasks.clone(),
                background: store_handle.background().clone(),
            };
            let workers = server::workers::Workers::start(count, shared)?;
            tokio::spawn(workers.accept(listeners.proxy))
        }
    };
    shutdown.await;
    tracing::info!("shutting down: draining connections");
    admin_state.draining.store(true, Ordering::Release);
    root.cancel();
    let _ = serving.await;
    tasks.close();
    if tokio::time::timeout(config.server.shutdown_grace, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace passed with upstream exchanges still running");
    }
    // Releases of dropped claims: let them reach the store.
    let background = store_handle.background();
    background.close();
    if tokio::time::timeout(config.server.shutdown_grace, background.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace passed with store releases still pending");
    }
    side_stop.cancel();
    side.close();
    side.wait().await;
    let _ = tokio::task::spawn_blocking(move || store_handle.flush()).await;
    Ok(())
}

fn build_store(config: &Config, stop: CancellationToken) -> Result<Arc<dyn store::Store>, String> {
    match config.store.backend {
        config::Backend::Memory => Ok(store::MemoryStore::new(config.store.max_bytes)),
        config::Backend::Disk => {
            let path = config
                .store
                .path
                .as_deref()
                .ok_or("store.path is required when backend = \"disk\"")?;
            let strict = config.store.durability == config::Durability::Strict;
            let orphan = Box::new(proxy::unknown_outcome_record);
            Ok(store::disk::DiskStore::open(
                path,
                config.store.max_bytes,
                strict,
                orphan,
                stop,
            )?)
        }
        config::Backend::Redis => {
            // rediss:// goes through rustls with the ring provider, as the rest of the crate.
            let _ = rustls::crypto::ring::default_provider().install_default();
            Ok(store::redis::RedisStore::start(&config.store, stop)?)
        }
    }
}

/// What the binary runs: bind, log the addresses, run until SIGTERM or SIGINT.
pub async fn serve_until_signalled(
    config: Config,
    config_path: Option<std::path::PathBuf>,
) -> Result<(), String> {
    let listeners = Listeners::bind(&config)
        .await
        .map_err(|e| format!("cannot bind {}: {e}", config.server.listen))?;
    let reloads = config_path.clone().and_then(reload::watch_sighup);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let options = Options {
        reloads,
        threads: Some(threads),
        announce: Some(config_path),
    };
    run_with_reloads(config, listeners, signals::terminate(), options).await
}

fn announce_listening(
    config: &Config,
    listeners: &Listeners,
    config_path: Option<std::path::PathBuf>,
) {
    let proxy_addr = listeners
        .proxy_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(
        listen = %proxy_addr,
        admin = listeners.admin_addr().map(|a| a.to_string()).unwrap_or_default(),
        record_api = listeners.record_api_addr().map(|a| a.to_string()).unwrap_or_default(),
        upstream = %config.upstream.url,
        config = ?config_path,
        "idemgate listening"
    );
}

mod signals {
    /// Completes on SIGTERM or SIGINT.
    pub async fn terminate() {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return std::future::pending().await;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
    }
}
