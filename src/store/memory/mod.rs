//! The embedded store: completed records in [`records`] (weighed by their encoded bytes,
//! bounded by `store.max_bytes`, oldest evicted first), in-flight claims in a map beside
//! them that eviction never touches. One mutex orders begin, complete and release, so no
//! request sees an id half-way between in-flight and completed.

mod records;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::*;
use records::Records;

pub(super) struct InFlight {
    pub(super) fingerprint: Fingerprint,
    pub(super) token: Token,
    /// `None`: held for as long as this process lives (proxy claims).
    pub(super) expires: Option<Instant>,
    /// Every waiter's receiver learns why it woke.
    pub(super) wake: fanout::Wake,
    /// No record at all was under the id when it was claimed (the memory store frees an
    /// expired one as it looks), so completing it replaces none (an unknown is `false`).
    pub(super) record_absent: bool,
}

impl InFlight {
    pub(super) fn new(fingerprint: Fingerprint, token: Token, expires: Option<Instant>) -> Self {
        InFlight {
            fingerprint,
            token,
            expires,
            wake: fanout::Wake::default(),
            record_absent: false,
        }
    }

    pub(super) fn lapsed(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// What a record costs the process beyond its encoded bytes (its slot and index entry,
/// the allocation's rounding to a size class), so that `max_bytes` bounds the process's
/// memory rather than just the payload. A 1 KiB record costs ~265 bytes beyond its
/// encoding; through the binary, 100k of them under a 32 MiB bound grew the process by
/// 30 MiB at 384 (tests/store_memory.rs).
const ENTRY_OVERHEAD: u64 = 384;

struct State {
    inflight: HashMap<RecordId, InFlight>,
    records: Records,
}

pub struct MemoryStore {
    state: Mutex<State>,
    lease_lost: AtomicU64,
    /// Counts begins, to sweep lapsed leases now and then.
    begins: AtomicU64,
    background: TaskTracker,
}

/// Lapsed leases and expired records are swept every this many begins, so locks
/// abandoned by record-API workers that died do not pile up (each id's own next begin
/// also frees it), and expired records are freed while no new ones arrive.
const SWEEP_EVERY: u64 = 1024;

pub(super) fn sweep_lapsed(inflight: &mut HashMap<RecordId, InFlight>, now: Instant) {
    inflight.retain(|_, f| {
        let lapsed = f.lapsed(now);
        if lapsed {
            f.wake.send(Woke::LeaseExpired);
        }
        !lapsed
    });
}

impl MemoryStore {
    pub fn new(max_bytes: u64) -> Arc<Self> {
        Arc::new(MemoryStore {
            state: Mutex::new(State {
                inflight: HashMap::new(),
                records: Records::new(max_bytes, ENTRY_OVERHEAD),
            }),
            lease_lost: AtomicU64::new(0),
            begins: AtomicU64::new(0),
            background: TaskTracker::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the maps whole between steps: a poisoned state is
        // still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin_now(
        self: &Arc<Self>,
        id: RecordId,
        fingerprint: Fingerprint,
        lease: Option<Duration>,
    ) -> Result<Begin, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        let State { inflight, records } = &mut *state;
        if self.begins.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == 0 {
            sweep_lapsed(inflight, now);
            records.sweep(now, SWEEP_EVERY as usize);
        }
        match inflight.get_mut(&id) {
            Some(f) if f.lapsed(now) => {
                if let Some(old) = inflight.remove(&id) {
                    old.wake.send(Woke::LeaseExpired);
                }
            }
            Some(f) => {
                return Ok(Begin::InFlight {
                    fingerprint: f.fingerprint,
                    waiter: fanout::waiter(id, f.token, f.wake.subscribe(), f.expires),
                    lease_left: f.expires.map(|e| e.saturating_duration_since(now)),
                })
            }
            None => {}
        }
        if let Some(encoded) = records.get_live(&id, now).cloned() {
            drop(state);
            return encoded.decode().map(Begin::Completed);
        }
        let token = Token::random()?;
        let mut claim = InFlight::new(fingerprint, token, lease.map(|l| now + l));
        // No record is left under the id, and only this claim's complete can add one.
        claim.record_absent = true;
        inflight.insert(id, claim);
        drop(state);
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
        let mut state = self.lock();
        let claim = self.take_owned(&mut state.inflight, id, token)?;
        let now = Instant::now();
        // Waiters (no new one can join: the claim is gone) are handed the record, decoded
        // once here rather than looked up and decoded by each of them; a miss nobody waits
        // on keeps no copy.
        let kept = claim.wake.waited().then(|| encoded.clone());
        if claim.record_absent {
            state.records.insert_new(id, encoded, now + ttl, now);
        } else {
            state.records.insert(id, encoded, now + ttl, now);
        }
        drop(state);
        let woke = match kept.map(|k| k.decode()) {
            Some(Ok(record)) => Woke::Recorded(Arc::new(record)),
            _ => Woke::Completed,
        };
        claim.wake.send(woke);
        Ok(())
    }
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
        let mut state = self.lock();
        let result = match self.take_owned(&mut state.inflight, id, token) {
            Ok(mut f) => {
                f.expires = Some(Instant::now() + lease);
                state.inflight.insert(id, f);
                Ok(())
            }
            Err(e) => Err(e),
        };
        drop(state);
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
        let mut state = self.lock();
        let result = self.take_owned(&mut state.inflight, id, token).map(|f| {
            f.wake.send(Woke::Released);
        });
        drop(state);
        ready(result)
    }

    fn stats(&self) -> StoreStats {
        let state = self.lock();
        StoreStats {
            records: state.records.len(),
            bytes: state.records.bytes(),
            inflight: state.inflight.len() as u64,
            evicted_before_ttl: state.records.evicted_early(),
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
