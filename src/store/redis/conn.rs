//! Connections to Redis (one node through a reconnecting manager, or a Cluster), TLS
//! roots, and the background health check behind `/readyz`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::ConnectionLike;
use ::redis::{Cmd, Pipeline, RedisFuture, Value};

use super::RedisStore;

/// Longest Redis may take to answer a command before the store counts as unavailable.
/// A store call is one command, or three when its script must be loaded again (after a
/// restart or `SCRIPT FLUSH`); each is bounded.
pub(super) const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// One node, through a reconnecting manager, or a Cluster.
#[derive(Clone)]
pub(super) enum Conn {
    Single(::redis::aio::ConnectionManager),
    Cluster(::redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

pub(super) fn tls_roots(pem: &[u8]) -> ::redis::TlsCertificates {
    ::redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    }
}

/// Without TCP_NODELAY, a call written while another waits for its answer sits in the
/// kernel until that answer's ACK comes back (redis-rs leaves Nagle on).
pub(super) fn nodelay() -> ::redis::io::tcp::TcpSettings {
    ::redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

pub(super) fn manager_config() -> ::redis::aio::ConnectionManagerConfig {
    ::redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(OP_TIMEOUT))
        .set_response_timeout(Some(OP_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1))
}

impl RedisStore {
    pub(super) async fn connect_cluster(self: Arc<Self>) {
        loop {
            let mut builder = ::redis::cluster::ClusterClient::builder(self.urls.clone())
                .connection_timeout(OP_TIMEOUT)
                .response_timeout(OP_TIMEOUT)
                .tcp_settings(nodelay());
            if let Some(roots) = &self.roots {
                builder = builder.certs(tls_roots(roots));
            }
            let built = builder.build();
            let connected = match built {
                Ok(client) => client.get_async_connection().await,
                Err(e) => Err(e),
            };
            match connected {
                Ok(conn) => {
                    self.conn.store(Some(Arc::new(Conn::Cluster(conn))));
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach the Redis Cluster yet; retrying")
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// `/readyz` reads the flag this sets: a probe never waits on Redis.
    pub(super) async fn check_health(self: Arc<Self>) {
        let (mut warned, mut first) = (false, true);
        loop {
            let answer = match self.conn() {
                Ok(mut conn) => {
                    let ping = ::redis::cmd("PING");
                    let answer = ping.query_async::<String>(&mut conn);
                    match tokio::time::timeout(OP_TIMEOUT, answer).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("no answer within {OP_TIMEOUT:?}")),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            let ok = answer.is_ok();
            if ok && !self.ready.load(Ordering::Acquire) {
                // Before `ready` says so: a request let through by it finds fresh threads.
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
            let changed = self.ready.swap(ok, Ordering::AcqRel) != ok;
            if changed || std::mem::take(&mut first) {
                match &answer {
                    Ok(()) => tracing::info!("store ready"),
                    Err(e) => tracing::warn!(error = %e, "store not ready"),
                }
            }
            if ok && !warned {
                warned = true;
                self.warn_on_eviction().await;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Eviction silently forgets records (a retry then runs again): say so at start.
    async fn warn_on_eviction(&self) {
        let Ok(mut conn) = self.conn() else { return };
        let mut cmd = ::redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        let get = cmd.query_async::<Vec<String>>(&mut conn);
        match tokio::time::timeout(OP_TIMEOUT, get).await {
            Ok(Ok(v)) if v.get(1).is_some_and(|p| p != "noeviction") => tracing::warn!(
                policy = %v[1],
                "Redis maxmemory-policy is not noeviction: evicted records let retries run again"
            ),
            Ok(Ok(_)) => {}
            _ => tracing::info!("could not read Redis maxmemory-policy (CONFIG may be disabled)"),
        }
    }
}
