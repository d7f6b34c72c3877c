//! SIGHUP: re-read the config file and swap routes and idempotency settings atomically.
//! Requests in flight keep the snapshot they started with; records survive because the
//! store is not touched. Listeners, upstream and store changes need a restart: they are
//! reported and the running values kept.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::proxy::Proxy;

/// Applies `new` on top of the running config; returns what was left for a restart.
pub fn apply(proxy: &Proxy, new: Config) -> Vec<&'static str> {
    let old = proxy.config();
    let mut needs_restart = Vec::new();
    let mut server = old.server.clone();
    server.max_request_body = new.server.max_request_body;
    server.body_read_timeout = new.server.body_read_timeout;
    if server != new.server {
        needs_restart.push("server (listeners, TLS, connection limits, timeouts)");
    }
    if old.upstream != new.upstream {
        needs_restart.push("upstream");
    }
    if old.store != new.store {
        needs_restart.push("store");
    }
    if old.record_api != new.record_api {
        needs_restart.push("record_api");
    }
    let merged = Config {
        server,
        upstream: old.upstream.clone(),
        store: old.store.clone(),
        idempotency: new.idempotency,
        routes: new.routes,
        record_api: old.record_api.clone(),
    };
    proxy.swap_config(Arc::new(merged));
    needs_restart
}

/// Waits for SIGHUP and sends each valid re-read config; an invalid file is logged with
/// all its errors and nothing is sent, so the running config stays.
///
/// Call it before announcing readiness: the SIGHUP handler is installed synchronously,
/// so a reload sent right after start-up is never the default (fatal) SIGHUP.
pub fn watch_sighup(path: PathBuf) -> Option<mpsc::UnboundedReceiver<Config>> {
    use tokio::signal::unix::{signal, SignalKind};
    let hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP: reload disabled");
            return None;
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(reread_on_hup(path, hup, tx));
    Some(rx)
}

async fn reread_on_hup(
    path: PathBuf,
    mut hup: tokio::signal::unix::Signal,
    tx: mpsc::UnboundedSender<Config>,
) {
    while hup.recv().await.is_some() {
        tracing::info!(config = %path.display(), "SIGHUP received: reloading");
        match crate::config::load(&path) {
            Ok(config) => {
                if tx.send(config).is_err() {
                    return;
                }
            }
            Err(e) => tracing::error!(errors = %e, "reload failed: keeping the running config"),
        }
    }
}

/// Applies reloads as they arrive, for as long as the proxy runs.
pub async fn apply_all(proxy: Proxy, mut rx: mpsc::UnboundedReceiver<Config>) {
    while let Some(config) = rx.recv().await {
        let routes = config.routes.len();
        let needs_restart = apply(&proxy, config);
        tracing::info!(routes, "config reloaded");
        if !needs_restart.is_empty() {
            tracing::warn!(
                unchanged = needs_restart.join(", "),
                "reload kept the running values of settings that need a restart"
            );
        }
    }
}
