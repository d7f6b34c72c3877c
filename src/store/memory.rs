//! The embedded store: completed records in moka (LRU, weighed by their encoded bytes,
//! bounded by `store.max_bytes`), in-flight claims in a map beside it that eviction never
//! touches. One mutex orders begin, complete and release, so no request sees an id
//! half-way between in-flight and completed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use moka::notification::RemovalCause;
use moka::policy::{EvictionPolicy, Expiry};
use moka::sync::Cache;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::*;

pub(super) struct InFlight {
    pub(super) fingerprint: Fingerprint,
    pub(super) token: Token,
    /// `None`: held for as long as this process lives (proxy claims).
    pub(super) expires: Option<Instant>,
    /// Every waiter's receiver learns why it woke.
    pub(super) wake: watch::Sender<Option<Woke>>,
}

impl InFlight {
    pub(super) fn lapsed(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// What a cached record costs beyond its encoded bytes (its id, the cache entry and its
/// timers, the allocation's rounding), so that `max_bytes` bounds the process's memory
/// rather than just the payload. Measured through the binary (100k 1 KiB records under
/// a 32 MiB bound): a record costs the process ~1.7 KB, up to ~2 KB under load with the
/// serving threads' allocations spread over their own malloc arenas; 256 let the process
/// grow 1.3–1.6× the bound.
const ENTRY_OVERHEAD: u64 = 640;

fn weight(s: &Stored) -> u64 {
    s.encoded.weight() + ENTRY_OVERHEAD
}

/// A completed record and when it stops replaying (on the tokio clock, so tests with
/// paused time see expiry).
struct Stored {
    encoded: Encoded,
    expires_at: Instant,
}

struct StoredExpiry;

impl Expiry<RecordId, Arc<Stored>> for StoredExpiry {
    fn expire_after_create(
        &self,
        _: &RecordId,
        s: &Arc<Stored>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(s.expires_at.saturating_duration_since(Instant::now()))
    }
}

pub struct MemoryStore {
    inflight: Mutex<HashMap<RecordId, InFlight>>,
    records: Cache<RecordId, Arc<Stored>>,
    max_bytes: u64,
    bytes: Arc<AtomicU64>,
    evicted_early: Arc<AtomicU64>,
    lease_lost: AtomicU64,
    /// Counts begins, to sweep lapsed leases now and then.
    begins: AtomicU64,
    background: TaskTracker,
}

/// Lapsed leases are swept every this many begins, so locks abandoned by record-API
/// workers that died do not pile up (each id's own next begin also frees it).
const SWEEP_EVERY: u64 = 1024;

pub(super) fn sweep_lapsed(inflight: &mut HashMap<RecordId, InFlight>, now: Instant) {
    inflight.retain(|_, f| {
        let lapsed = f.lapsed(now);
        if lapsed {
            f.wake.send_replace(Some(Woke::LeaseExpired));
        }
        !lapsed
    });
}

impl MemoryStore {
    pub fn new(max_bytes: u64) -> Arc<Self> {
        let bytes = Arc::new(AtomicU64::new(0));
        let evicted_early = Arc::new(AtomicU64::new(0));
        let (b, e) = (bytes.clone(), evicted_early.clone());
        let records = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &RecordId, s: &Arc<Stored>| u32::try_from(weight(s)).unwrap_or(u32::MAX))
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(StoredExpiry)
            .eviction_listener(move |_, s: Arc<Stored>, cause| {
                b.fetch_sub(weight(&s), Ordering::AcqRel);
                if matches!(cause, RemovalCause::Size) && s.expires_at > Instant::now() {
                    e.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        Arc::new(MemoryStore {
            inflight: Mutex::new(HashMap::new()),
            records,
            max_bytes,
            bytes,
            evicted_early,
            lease_lost: AtomicU64::new(0),
            begins: AtomicU64::new(0),
            background: TaskTracker::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RecordId, InFlight>> {
        // Every critical section is a single insert or remove: a poisoned map is whole.
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin_now(
        self: &Arc<Self>,
        id: RecordId,
        fingerprint: Fingerprint,
        lease: Option<Duration>,
    ) -> Result<Begin, StoreError> {
        let now = Instant::now();
        let mut inflight = self.lock();
        if self.begins.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == 0 {
            sweep_lapsed(&mut inflight, now);
        }
        match inflight.get(&id) {
            Some(f) if f.lapsed(now) => {
                if let Some(old) = inflight.remove(&id) {
                    old.wake.send_replace(Some(Woke::LeaseExpired));
                }
            }
            Some(f) => {
                return Ok(Begin::InFlight {
                    fingerprint: f.fingerprint,
                    waiter: waiter(f.wake.subscribe(), f.expires),
                    lease_left: f.expires.map(|e| e.saturating_duration_since(now)),
                })
            }
            None => {}
        }
        if let Some(stored) = self.records.get(&id) {
            if stored.expires_at > now {
                return stored.encoded.decode().map(Begin::Completed);
            }
            self.records.invalidate(&id);
        }
        let token = Token::random()?;
        let (wake, _) = watch::channel(None);
        let expires = lease.map(|l| now + l);
        inflight.insert(
            id,
            InFlight {
                fingerprint,
                token,
                expires,
                wake,
            },
        );
        drop(inflight);
        Ok(Begin::Claimed(Claim::new(self.clone(), id, token, lease)))
    }

    /// Takes the claim out of the map if `token` owns it and its lease holds.
    fn take_owned(
        &self,
        inflight: &mut HashMap<RecordId, InFlight>,
        id: RecordId,
        token: Token,
    ) -> Result<InFlight, StoreError> {
        let now = Instant::now();
        if inflight.get(&id).is_some_and(|f| f.lapsed(now)) {
            sweep_lapsed(inflight, now);
        }
        let owned = inflight.get(&id).is_some_and(|f| f.token == token);
        match owned.then(|| inflight.remove(&id)).flatten() {
            Some(f) => Ok(f),
            None => {
                self.lease_lost.fetch_add(1, Ordering::Relaxed);
                Err(StoreError::LeaseLost)
            }
        }
    }

    fn complete_now(
        &self,
        id: RecordId,
        token: Token,
        encoded: Encoded,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut inflight = self.lock();
        let claim = self.take_owned(&mut inflight, id, token)?;
        let stored = Arc::new(Stored {
            encoded,
            expires_at: Instant::now() + ttl,
        });
        self.bytes.fetch_add(weight(&stored), Ordering::AcqRel);
        self.records.insert(id, stored);
        if self.bytes.load(Ordering::Acquire) > self.max_bytes {
            // moka evicts lazily; settle now so the bound holds whenever the lock is free.
            self.records.run_pending_tasks();
        }
        claim.wake.send_replace(Some(Woke::Completed));
        Ok(())
    }
}

/// Wakes on the holder's complete or release, or when its lease would end (then the
/// caller's next `begin` finds out whether it was renewed).
pub(super) fn waiter(mut rx: watch::Receiver<Option<Woke>>, expires: Option<Instant>) -> Waiter {
    Waiter::new(async move {
        let woke = rx.wait_for(Option::is_some);
        let lease_end = async {
            match expires {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            w = woke => match w {
                Ok(w) => w.clone().unwrap_or(Woke::Released),
                Err(_) => Woke::Released,
            },
            _ = lease_end => Woke::LeaseExpired,
        }
    })
}

pub(super) fn ready<T: Send + 'static>(v: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(v))
}

impl Store for MemoryStore {
    fn begin(
        self: Arc<Self>,
        id: RecordId,
        fingerprint: Fingerprint,
        lease: Option<Duration>,
    ) -> BoxFuture<'static, Result<Begin, StoreError>> {
        ready(self.begin_now(id, fingerprint, lease))
    }

    fn renew(
        self: Arc<Self>,
        id: RecordId,
        token: Token,
        lease: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let mut inflight = self.lock();
        let result = match self.take_owned(&mut inflight, id, token) {
            Ok(mut f) => {
                f.expires = Some(Instant::now() + lease);
                inflight.insert(id, f);
                Ok(())
            }
            Err(e) => Err(e),
        };
        drop(inflight);
        ready(result)
    }

    fn complete(
        self: Arc<Self>,
        id: RecordId,
        token: Token,
        record: Encoded,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        ready(self.complete_now(id, token, record, ttl))
    }

    fn release(
        self: Arc<Self>,
        id: RecordId,
        token: Token,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let mut inflight = self.lock();
        let result = self.take_owned(&mut inflight, id, token).map(|f| {
            f.wake.send_replace(Some(Woke::Released));
        });
        drop(inflight);
        ready(result)
    }

    fn stats(&self) -> StoreStats {
        let inflight = self.lock().len() as u64;
        StoreStats {
            records: self.records.entry_count(),
            bytes: self.bytes.load(Ordering::Acquire),
            inflight,
            evicted_before_ttl: self.evicted_early.load(Ordering::Relaxed),
            lease_lost: self.lease_lost.load(Ordering::Relaxed),
        }
    }

    fn ready(&self) -> bool {
        true
    }

    fn claim_lease(&self) -> Option<Duration> {
        None
    }

    fn background(&self) -> &TaskTracker {
        &self.background
    }
}
