//! The embedded store: completed records in moka (LRU, weighed by bytes, bounded by
//! `store.max_bytes`), in-flight claims in a map beside it that eviction never touches.
//! One mutex orders begin and complete, so no request sees an id half-way between
//! in-flight and completed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::policy::{EvictionPolicy, Expiry};
use moka::sync::Cache;
use tokio::sync::watch;

use super::*;

struct InFlight {
    fingerprint: Fingerprint,
    owner: u64,
    /// Dropped on complete or release: every waiter's receiver wakes.
    _wake: watch::Sender<()>,
    wake_rx: watch::Receiver<()>,
}

struct RecordExpiry;

impl Expiry<RecordId, Arc<Record>> for RecordExpiry {
    fn expire_after_create(
        &self,
        _: &RecordId,
        record: &Arc<Record>,
        _: Instant,
    ) -> Option<Duration> {
        Some(
            record
                .expires_at
                .saturating_duration_since(tokio::time::Instant::now()),
        )
    }
}

pub struct MemoryStore {
    inflight: Mutex<HashMap<RecordId, InFlight>>,
    records: Cache<RecordId, Arc<Record>>,
    max_bytes: u64,
    bytes: Arc<AtomicU64>,
    evicted_early: Arc<AtomicU64>,
    next_owner: AtomicU64,
}

impl MemoryStore {
    pub fn new(max_bytes: u64) -> Arc<Self> {
        let bytes = Arc::new(AtomicU64::new(0));
        let evicted_early = Arc::new(AtomicU64::new(0));
        let (b, e) = (bytes.clone(), evicted_early.clone());
        let records = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &RecordId, r: &Arc<Record>| u32::try_from(r.weight()).unwrap_or(u32::MAX))
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(RecordExpiry)
            .eviction_listener(move |_, r: Arc<Record>, cause| {
                b.fetch_sub(r.weight(), Ordering::AcqRel);
                let early = matches!(cause, RemovalCause::Size)
                    && r.expires_at > tokio::time::Instant::now();
                if early {
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
            next_owner: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RecordId, InFlight>> {
        // A panic while holding the lock cannot leave the map inconsistent (every
        // critical section is a single insert or remove), so poisoning is ignored.
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin_locked(self: &Arc<Self>, id: RecordId, fingerprint: Fingerprint) -> Begin {
        let mut inflight = self.lock();
        if let Some(f) = inflight.get(&id) {
            let waiter = Waiter(f.wake_rx.clone());
            return Begin::InFlight {
                fingerprint: f.fingerprint,
                waiter,
            };
        }
        if let Some(record) = self.records.get(&id) {
            if record.expires_at > tokio::time::Instant::now() {
                return Begin::Completed(record);
            }
            self.records.invalidate(&id);
        }
        let owner = self.next_owner.fetch_add(1, Ordering::Relaxed);
        let (wake, wake_rx) = watch::channel(());
        inflight.insert(
            id,
            InFlight {
                fingerprint,
                owner,
                _wake: wake,
                wake_rx,
            },
        );
        let store: Arc<dyn Store> = self.clone();
        Begin::Claimed(Claim::new(store, id, owner))
    }
}

impl Store for MemoryStore {
    fn begin(
        self: Arc<Self>,
        id: RecordId,
        fingerprint: Fingerprint,
    ) -> BoxFuture<'static, Result<Begin, StoreError>> {
        let result = self.begin_locked(id, fingerprint);
        Box::pin(async move { Ok(result) })
    }

    fn complete(
        &self,
        id: RecordId,
        owner: u64,
        record: Record,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut inflight = self.lock();
        let owned = inflight.get(&id).is_some_and(|f| f.owner == owner);
        let result = if owned {
            let weight = record.weight();
            self.bytes.fetch_add(weight, Ordering::AcqRel);
            self.records.insert(id, Arc::new(record));
            if self.bytes.load(Ordering::Acquire) > self.max_bytes {
                // moka evicts lazily; settle now so the bound holds whenever the lock is free.
                self.records.run_pending_tasks();
            }
            // Insert before removing the claim: there is no moment with neither.
            inflight.remove(&id);
            Ok(())
        } else {
            Err(StoreError("claim no longer owned".into()))
        };
        drop(inflight);
        Box::pin(async move { result })
    }

    fn release(&self, id: RecordId, owner: u64) {
        let mut inflight = self.lock();
        if inflight.get(&id).is_some_and(|f| f.owner == owner) {
            inflight.remove(&id);
        }
    }

    fn stats(&self) -> StoreStats {
        let inflight = self.lock();
        StoreStats {
            records: self.records.entry_count(),
            bytes: self.bytes.load(Ordering::Acquire),
            inflight: inflight.len() as u64,
            evicted_before_ttl: self.evicted_early.load(Ordering::Relaxed),
            lease_lost: 0,
        }
    }
}
