//! The shared store on Redis 6+ / Valkey, one node or a Cluster. Every replica of the
//! proxy sees the same records, so a retry that a balancer sends elsewhere still replays.
//!
//! Keys hold only the record id's hash (`{prefix}{<hex id>}` for the record and the same
//! plus `:lock` for an in-flight lease; the braces are a hash tag, so both share a
//! Cluster slot). A claim is `SET NX PX` with the owner's token; renew, complete and
//! release are Lua scripts that act only if the token still matches, and complete and
//! release publish on `{prefix}events` so that waiters on any replica wake at once. A
//! waiter also polls (bounded), which catches a dead holder's lease ending.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::Value;
use arc_swap::ArcSwapOption;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use waiters::WAITING_MS;

use super::*;
use crate::config::StoreConfig;

mod conn;
mod keys;
mod pipe;
mod resp;
mod run;
mod scripts;
mod waiters;

use conn::{manager_config, nodelay, tls_roots, Conn};
use keys::Keys;
use scripts::{Arg, Call, Scripts};
use waiters::parse_id;

/// Tells stores apart in each thread's own connections (an address could be reused).
static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(0);

pub struct RedisStore {
    id: u64,
    /// Bumped when the health check sees Redis come back: threads then remake their
    /// own connections, which may have broken meanwhile without being used.
    generation: AtomicU64,
    conn: ArcSwapOption<Conn>,
    urls: Vec<String>,
    /// `store.ca_file`'s PEM bytes: the roots a `rediss://` server must chain to.
    roots: Option<Vec<u8>>,
    prefix: String,
    channel: String,
    lease: Duration,
    scripts: Scripts,
    /// Local waiters by record id; the subscriber task wakes them.
    waiters: Mutex<HashMap<RecordId, watch::Sender<Option<Woke>>>>,
    ready: AtomicBool,
    lease_lost: AtomicU64,
    background: TaskTracker,
    stop: CancellationToken,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// Starts without waiting for Redis: connections are made (and remade) in the
    /// background, and calls fail as `Unavailable` until one exists.
    pub fn start(config: &StoreConfig, stop: CancellationToken) -> Result<Arc<Self>, String> {
        let urls = config
            .urls
            .as_ref()
            .map(|u| u.list().to_vec())
            .unwrap_or_default();
        if urls.is_empty() {
            return Err("store.url is required for backend = \"redis\"".into());
        }
        let roots = match &config.ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| format!("store.ca_file {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let store = Arc::new(RedisStore {
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            conn: ArcSwapOption::empty(),
            roots,
            channel: format!("{}events", config.prefix),
            prefix: config.prefix.clone(),
            urls,
            lease: config.lock_lease,
            scripts: Scripts::new(),
            waiters: Mutex::default(),
            ready: AtomicBool::new(false),
            lease_lost: AtomicU64::new(0),
            background: TaskTracker::new(),
            stop,
        });
        if store.urls.len() == 1 {
            let client = store
                .client(&store.urls[0])
                .map_err(|e| format!("store.url: {e}"))?;
            let manager = client
                .get_connection_manager_lazy(manager_config())
                .map_err(|e| format!("store.url: {e}"))?;
            store.conn.store(Some(Arc::new(Conn::Single(manager))));
        } else {
            ::redis::cluster::ClusterClient::builder(store.urls.clone())
                .build()
                .map_err(|e| format!("store.url: {e}"))?;
            tokio::spawn(store.clone().connect_cluster());
        }
        tokio::spawn(store.clone().check_health());
        tokio::spawn(store.clone().subscribe());
        Ok(store)
    }

    fn client(&self, url: &str) -> ::redis::RedisResult<::redis::Client> {
        use ::redis::IntoConnectionInfo;
        let info = url.into_connection_info()?.set_tcp_settings(nodelay());
        match &self.roots {
            Some(roots) => ::redis::Client::build_with_tls(info, tls_roots(roots)),
            None => ::redis::Client::open(info),
        }
    }

    /// The connection every runtime shares (health checks, waiters' polls).
    fn conn(&self) -> Result<Conn, StoreError> {
        self.conn
            .load_full()
            .map(|c| (*c).clone())
            .ok_or_else(|| unavailable("not connected yet"))
    }

    fn keys(&self, id: RecordId) -> Keys {
        Keys::new(&self.prefix, id)
    }

    /// A script answered 0: the token no longer owns the lock.
    fn owned(&self, answer: Value) -> Result<(), StoreError> {
        match answer {
            Value::Int(1) => Ok(()),
            _ => {
                self.lease_lost.fetch_add(1, Ordering::Relaxed);
                Err(StoreError::LeaseLost)
            }
        }
    }

    async fn begin_once(
        self: &Arc<Self>,
        id: RecordId,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<Option<Begin>, StoreError> {
        let keys = self.keys(id);
        let token = Token::random()?;
        let mut value = String::with_capacity(2 * (token.0.len() + fp.0.len()));
        push_hex(&mut value, &token.0);
        push_hex(&mut value, &fp.0);
        let lease_ms = lease.as_millis().max(1) as u64;
        let call = Call {
            lua: &self.scripts.begin,
            keys: &[keys.record(), keys.lock(), keys.waiting()],
            args: &[
                Arg::Bytes(value.as_bytes()),
                Arg::Int(lease_ms),
                Arg::Int(WAITING_MS),
            ],
        };
        let answer = self.run(call).await?;
        let mut items = match answer {
            Value::Array(items) => items,
            other => return Err(StoreError::Corrupt(format!("unexpected answer {other:?}"))),
        };
        if let [Value::Int(1), Value::BulkString(bytes)] = items.as_mut_slice() {
            // A replay: the record's bytes are taken, not copied.
            let stored = Encoded::from_stored(std::mem::take(bytes).into());
            return stored.decode().map(|r| Some(Begin::Completed(r)));
        }
        match items.as_slice() {
            [Value::Int(0)] => Ok(Some(Begin::Claimed(Claim::new(
                self.clone(),
                id,
                token,
                Some(lease),
            )))),
            [Value::Int(2), Value::BulkString(holder), Value::Int(ttl)] => {
                let fingerprint = holder_fingerprint(holder)?;
                let lease_left = u64::try_from(*ttl).ok().map(Duration::from_millis);
                let waiter = Waiter::new(self.clone().wait(id));
                Ok(Some(Begin::InFlight {
                    fingerprint,
                    waiter,
                    lease_left,
                }))
            }
            // The lock lapsed between two steps of the script's caller: try again.
            [Value::Int(3)] => Ok(None),
            other => Err(StoreError::Corrupt(format!("unexpected answer {other:?}"))),
        }
    }
}

/// The lock value is the owner's token (32 hex) then the request's fingerprint (64 hex).
fn holder_fingerprint(holder: &[u8]) -> Result<Fingerprint, StoreError> {
    let fp = std::str::from_utf8(holder)
        .ok()
        .and_then(|s| s.get(32..))
        .and_then(parse_id)
        .ok_or_else(|| StoreError::Corrupt("unreadable lock value".into()))?;
    Ok(Fingerprint(fp.0))
}

impl Store for RedisStore {
    fn begin(
        self: Arc<Self>,
        id: RecordId,
        fingerprint: Fingerprint,
        lease: Option<Duration>,
    ) -> BoxFuture<'static, Result<Begin, StoreError>> {
        Box::pin(async move {
            let lease = lease.unwrap_or(self.lease);
            loop {
                if let Some(begin) = self.begin_once(id, fingerprint, lease).await? {
                    return Ok(begin);
                }
            }
        })
    }

    fn renew(
        self: Arc<Self>,
        id: RecordId,
        token: Token,
        lease: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            let keys = self.keys(id);
            let lease_ms = lease.as_millis().max(1) as u64;
            let token = token.hex();
            let call = Call {
                lua: &self.scripts.renew,
                keys: &[keys.lock()],
                args: &[Arg::Bytes(token.as_bytes()), Arg::Int(lease_ms)],
            };
            let answer = self.run(call).await?;
            self.owned(answer)
        })
    }

    fn complete(
        self: Arc<Self>,
        id: RecordId,
        token: Token,
        record: Encoded,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            let keys = self.keys(id);
            let ttl_ms = ttl.as_millis().max(1) as u64;
            let record = record.as_bytes();
            let (token, message) = (token.hex(), keys.message(":c"));
            let call = Call {
                lua: &self.scripts.complete,
                keys: &[keys.record(), keys.lock(), keys.waiting()],
                args: &[
                    Arg::Bytes(token.as_bytes()),
                    Arg::Bytes(record.as_ref()),
                    Arg::Int(ttl_ms),
                    Arg::Bytes(self.channel.as_bytes()),
                    Arg::Bytes(message.as_bytes()),
                ],
            };
            let answer = self.run(call).await?;
            self.owned(answer)
        })
    }

    fn release(
        self: Arc<Self>,
        id: RecordId,
        token: Token,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            let keys = self.keys(id);
            let (token, message) = (token.hex(), keys.message(":r"));
            let call = Call {
                lua: &self.scripts.release,
                keys: &[keys.lock(), keys.waiting()],
                args: &[
                    Arg::Bytes(token.as_bytes()),
                    Arg::Bytes(self.channel.as_bytes()),
                    Arg::Bytes(message.as_bytes()),
                ],
            };
            let answer = self.run(call).await?;
            self.owned(answer)
        })
    }

    fn stats(&self) -> StoreStats {
        // Records live in Redis (its INFO tells their number); this replica counts its own.
        StoreStats {
            lease_lost: self.lease_lost.load(Ordering::Relaxed),
            ..StoreStats::default()
        }
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn claim_lease(&self) -> Option<Duration> {
        Some(self.lease)
    }

    fn background(&self) -> &TaskTracker {
        &self.background
    }
}
