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

use ::redis::aio::ConnectionLike;
use ::redis::{Cmd, Pipeline, RedisFuture, Script, Value};
use arc_swap::ArcSwapOption;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::config::StoreConfig;

const BEGIN: &str = r#"
local rec = redis.call('GET', KEYS[1])
if rec then return {1, rec} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0} end
local holder = redis.call('GET', KEYS[2])
if not holder then return {3} end
return {2, holder, redis.call('PTTL', KEYS[2])}
"#;
const RENEW: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 32) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;
const COMPLETE: &str = r#"
local v = redis.call('GET', KEYS[2])
if not v or string.sub(v, 1, 32) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"#;
const RELEASE: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 32) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"#;

/// How often a waiter re-checks the holder when no message arrives.
const WAIT_POLL: Duration = Duration::from_millis(250);
/// Longest any one store call may take before the store counts as unavailable.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// One node (a reconnecting manager) or a Cluster connection.
#[derive(Clone)]
enum Conn {
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

struct Scripts {
    begin: Script,
    renew: Script,
    complete: Script,
    release: Script,
}

pub struct RedisStore {
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
            conn: ArcSwapOption::empty(),
            roots,
            channel: format!("{}events", config.prefix),
            prefix: config.prefix.clone(),
            urls,
            lease: config.lock_lease,
            scripts: Scripts {
                begin: Script::new(BEGIN),
                renew: Script::new(RENEW),
                complete: Script::new(COMPLETE),
                release: Script::new(RELEASE),
            },
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
        match &self.roots {
            Some(roots) => ::redis::Client::build_with_tls(url, tls_roots(roots)),
            None => ::redis::Client::open(url),
        }
    }

    fn conn(&self) -> Result<Conn, StoreError> {
        self.conn
            .load_full()
            .map(|c| (*c).clone())
            .ok_or_else(|| unavailable("not connected yet"))
    }

    fn keys(&self, id: RecordId) -> (String, String) {
        let record = format!("{}{{{}}}", self.prefix, id.hex());
        let lock = format!("{record}:lock");
        (record, lock)
    }

    async fn run(&self, invocation: &::redis::ScriptInvocation<'_>) -> Result<Value, StoreError> {
        let mut conn = self.conn()?;
        match tokio::time::timeout(OP_TIMEOUT, invocation.invoke_async(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable(format!("no answer within {OP_TIMEOUT:?}"))),
        }
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
        let (record, lock) = self.keys(id);
        let token = Token::random()?;
        let value = format!("{}{}", token.hex(), hex(&fp.0));
        let lease_ms = lease.as_millis().max(1) as u64;
        let mut call = self.scripts.begin.key(&record);
        call.key(&lock).arg(&value).arg(lease_ms);
        let answer = self.run(&call).await?;
        let items = match answer {
            Value::Array(items) => items,
            other => return Err(StoreError::Corrupt(format!("unexpected answer {other:?}"))),
        };
        match items.as_slice() {
            [Value::Int(0)] => Ok(Some(Begin::Claimed(Claim::new(
                self.clone(),
                id,
                token,
                Some(lease),
            )))),
            [Value::Int(1), Value::BulkString(bytes)] => Encoded::from_stored(bytes.clone().into())
                .decode()
                .map(|r| Some(Begin::Completed(r))),
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

    /// Waits for a message about `id`, re-checking the lock every [`WAIT_POLL`].
    async fn wait(self: Arc<Self>, id: RecordId) -> Woke {
        let mut rx = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            waiters
                .entry(id)
                .or_insert_with(|| watch::channel(None).0)
                .subscribe()
        };
        let _unregister = Unregister {
            store: &self,
            id,
            rx: rx.clone(),
        };
        let (_, lock) = self.keys(id);
        loop {
            // Subscribed first, then checked: a completion in between is not missed.
            let mut conn = match self.conn() {
                Ok(c) => c,
                Err(e) => return Woke::Failed(e),
            };
            let mut cmd = ::redis::cmd("EXISTS");
            cmd.arg(&lock);
            let exists = tokio::time::timeout(OP_TIMEOUT, cmd.query_async::<i64>(&mut conn)).await;
            match exists {
                Ok(Ok(0)) => return Woke::LeaseExpired,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Woke::Failed(unavailable(e)),
                Err(_) => return Woke::Failed(unavailable("no answer")),
            }
            let woke = tokio::time::timeout(WAIT_POLL, rx.wait_for(Option::is_some))
                .await
                .map(|r| r.map(|w| w.clone()));
            match woke {
                Ok(Ok(woke)) => return woke.unwrap_or(Woke::Released),
                // The channel is gone (delivered to someone else): poll, never spin.
                Ok(Err(_)) => tokio::time::sleep(WAIT_POLL).await,
                Err(_) => {}
            }
        }
    }

    /// Delivers `events` messages (`<hex id>:c` or `:r`) to local waiters; reconnects
    /// with back-off. The waiters' own polling covers any gap.
    async fn subscribe(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if let Err(e) = self.listen().await {
                tracing::debug!(error = %e, "store subscription lost; reconnecting");
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn listen(&self) -> ::redis::RedisResult<()> {
        use futures_util::StreamExt;
        let client = self.client(&self.urls[0])?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&self.channel).await?;
        let mut messages = pubsub.on_message();
        loop {
            let msg = tokio::select! {
                m = messages.next() => m,
                _ = self.stop.cancelled() => return Ok(()),
            };
            let Some(msg) = msg else { return Ok(()) };
            self.deliver(msg.get_payload_bytes());
        }
    }

    fn deliver(&self, payload: &[u8]) {
        let Some((id, kind)) = std::str::from_utf8(payload)
            .ok()
            .and_then(|p| p.split_once(':'))
        else {
            return;
        };
        let Some(id) = parse_id(id) else { return };
        let woke = if kind == "c" {
            Woke::Completed
        } else {
            Woke::Released
        };
        let tx = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(tx) = tx {
            tx.send_replace(Some(woke));
        }
    }

    async fn connect_cluster(self: Arc<Self>) {
        loop {
            let mut builder = ::redis::cluster::ClusterClient::builder(self.urls.clone())
                .connection_timeout(OP_TIMEOUT)
                .response_timeout(OP_TIMEOUT);
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
    async fn check_health(self: Arc<Self>) {
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

/// Drops a waiter's registration when it is the last one on its own channel (a newer
/// channel for the same id, made after this one was delivered, is left alone).
struct Unregister<'a> {
    store: &'a RedisStore,
    id: RecordId,
    rx: watch::Receiver<Option<Woke>>,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        let mut waiters = self.store.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let ours_and_last = waiters.get(&self.id).is_some_and(|tx| {
            // This guard and the waiter's own receiver are the last two.
            self.rx.same_channel(&tx.subscribe()) && tx.receiver_count() <= 3
        });
        if ours_and_last {
            waiters.remove(&self.id);
        }
    }
}

fn tls_roots(pem: &[u8]) -> ::redis::TlsCertificates {
    ::redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    }
}

fn manager_config() -> ::redis::aio::ConnectionManagerConfig {
    ::redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(OP_TIMEOUT))
        .set_response_timeout(Some(OP_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1))
}

fn parse_id(hex_id: &str) -> Option<RecordId> {
    let bytes = hex_id.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut id = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        id[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(RecordId(id))
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
            let (_, lock) = self.keys(id);
            let lease_ms = lease.as_millis().max(1) as u64;
            let mut call = self.scripts.renew.key(&lock);
            call.arg(token.hex()).arg(lease_ms);
            let answer = self.run(&call).await?;
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
            let (key, lock) = self.keys(id);
            let ttl_ms = ttl.as_millis().max(1) as u64;
            let message = format!("{}:c", id.hex());
            let mut call = self.scripts.complete.key(&key);
            call.key(&lock)
                .arg(token.hex())
                .arg(record.as_bytes().as_ref());
            call.arg(ttl_ms).arg(&self.channel).arg(&message);
            let answer = self.run(&call).await?;
            self.owned(answer)
        })
    }

    fn release(
        self: Arc<Self>,
        id: RecordId,
        token: Token,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            let (_, lock) = self.keys(id);
            let message = format!("{}:r", id.hex());
            let mut call = self.scripts.release.key(&lock);
            call.arg(token.hex()).arg(&self.channel).arg(&message);
            let answer = self.run(&call).await?;
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
