//! The embedded durable store, on fjall (an LSM tree with a journal; README "Why fjall").
//! Records live on disk and survive restarts; in-flight claims are on disk too (so the
//! next start can settle the ones a dead process left) and mirrored in a map that
//! carries their waiters. One mutex orders begin, complete and release, as on the
//! memory store; a replay reads without it.
//!
//! - [`layout`]: keys and values.
//! - [`open`]: lock, format check, recovery of claims left by a dead process.
//! - [`sync`]: group commit (`strict`) and the periodic sync (`relaxed`).
//! - [`sweep`]: expiry and the `max_bytes` bound, oldest first.
//! - [`contract`]: the [`Store`] trait on top of the above.

mod contract;
mod layout;
mod open;
mod sweep;
mod sync;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use fjall::{Database, OwnedWriteBatch};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::memory::{waiter, InFlight};
use super::*;
use layout::{ClaimValue, RecordHead};
pub use open::OrphanRecord;
use open::{unreadable, Keyspaces};
use sync::Syncer;

struct State {
    inflight: HashMap<RecordId, InFlight>,
    next_seq: u64,
    /// Every record older than this seq is gone: eviction starts its scan here instead
    /// of walking the tombstones of what it already evicted.
    evict_from: u64,
    bytes: u64,
}

pub struct DiskStore {
    db: Database,
    ks: Keyspaces,
    state: Mutex<State>,
    max_bytes: u64,
    syncer: Syncer,
    records: AtomicU64,
    bytes: AtomicU64,
    evicted_early: AtomicU64,
    lease_lost: AtomicU64,
    /// False after a write failed (a full disk, say) until one succeeds again.
    healthy: AtomicBool,
    background: TaskTracker,
}

impl DiskStore {
    /// Opens (or creates) the store at `path`; refuses a path another process holds.
    pub fn open(
        path: &Path,
        max_bytes: u64,
        strict: bool,
        orphan: OrphanRecord,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, String> {
        let opened = open::open(path, &orphan)?;
        let syncer = Syncer::start(opened.db.clone(), strict)?;
        let now = Instant::now();
        let wall = layout::now_ms();
        let inflight = opened
            .leased
            .into_iter()
            .map(|(id, c)| {
                let left = Duration::from_millis(c.lease_until_ms.saturating_sub(wall));
                (id, in_flight(c.fingerprint, c.token, Some(now + left)))
            })
            .collect();
        let store = Arc::new(DiskStore {
            db: opened.db,
            ks: opened.ks,
            state: Mutex::new(State {
                inflight,
                next_seq: opened.next_seq,
                evict_from: 0,
                bytes: opened.bytes,
            }),
            max_bytes,
            syncer,
            records: AtomicU64::new(opened.records),
            bytes: AtomicU64::new(opened.bytes),
            evicted_early: AtomicU64::new(0),
            lease_lost: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            background: TaskTracker::new(),
        });
        // Not on `background`: that tracker is drained before `stop` fires.
        tokio::spawn(sweep::run(store.clone(), stop));
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Each critical section leaves the map whole: a poisoned one is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits `batch` and takes its sync ticket; a failure marks the store unhealthy.
    fn commit(&self, batch: OwnedWriteBatch) -> Result<u64, StoreError> {
        match batch.commit() {
            Ok(()) => {
                self.healthy.store(true, Ordering::Relaxed);
                Ok(self.syncer.ticket())
            }
            Err(e) => {
                self.healthy.store(false, Ordering::Relaxed);
                tracing::error!(error = %e, "the disk store could not write");
                Err(StoreError::Unavailable(format!("disk store: {e}")))
            }
        }
    }

    /// The completed record for `id`, if one is there and has not expired.
    fn live_record(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        let Some(v) = self.ks.records.get(id.0).map_err(unreadable)? else {
            return Ok(None);
        };
        let head = layout::parse_record(&v)?;
        if head.expires_ms <= layout::now_ms() {
            return Ok(None);
        }
        let encoded = Bytes::copy_from_slice(&v[layout::RECORD_BODY_AT..]);
        Encoded::from_stored(encoded).decode().map(Some)
    }

    async fn begin_now(
        self: Arc<Self>,
        id: RecordId,
        fingerprint: Fingerprint,
        lease: Option<Duration>,
        if_orphaned: Option<Duration>,
    ) -> Result<Begin, StoreError> {
        // A record only exists once completed: no lock needed to replay it, except in
        // `strict`, where a record is not replayed before its sync (the map says so).
        if !self.syncer.strict() {
            if let Some(record) = self.live_record(&id)? {
                return Ok(Begin::Completed(record));
            }
        }
        let (token, ticket) = match self.claim_locked(id, fingerprint, lease, if_orphaned)? {
            Ok(claimed) => claimed,
            Err(found) => return Ok(found),
        };
        if let Err(e) = self.syncer.durable(ticket).await {
            // Not on disk: the request must not run. Free the key again.
            let _ = self.clone().release_now(id, token);
            return Err(e);
        }
        Ok(Begin::Claimed(Claim::new(self.clone(), id, token, lease)))
    }

    /// Under the lock: what is there for `id`, or a new claim (its token and sync ticket).
    #[allow(clippy::type_complexity)]
    fn claim_locked(
        &self,
        id: RecordId,
        fingerprint: Fingerprint,
        lease: Option<Duration>,
        if_orphaned: Option<Duration>,
    ) -> Result<Result<(Token, u64), Begin>, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        match state.inflight.get(&id) {
            Some(f) if !f.lapsed(now) => {
                return Ok(Err(Begin::InFlight {
                    fingerprint: f.fingerprint,
                    waiter: waiter(f.wake.subscribe(), f.expires),
                    lease_left: f.expires.map(|e| e.saturating_duration_since(now)),
                }))
            }
            Some(_) => {
                if let Some(old) = state.inflight.remove(&id) {
                    old.wake.send_replace(Some(Woke::LeaseExpired));
                }
            }
            None => {}
        }
        // Completed between the first look and the lock.
        if let Some(record) = self.live_record(&id)? {
            return Ok(Err(Begin::Completed(record)));
        }
        let token = Token::random()?;
        let claim = ClaimValue {
            token,
            fingerprint,
            lease_until_ms: lease.map_or(0, |l| layout::now_ms() + layout::ms(l)),
            if_orphaned,
        };
        let mut batch = self.db.batch();
        batch.insert(&self.ks.claims, id.0, layout::claim_value(&claim));
        let ticket = self.commit(batch)?;
        let expires = lease.map(|l| now + l);
        state
            .inflight
            .insert(id, in_flight(fingerprint, token, expires));
        Ok(Ok((token, ticket)))
    }

    /// Takes the claim out of the map if `token` owns it and its lease holds.
    fn take_owned(
        &self,
        state: &mut State,
        id: RecordId,
        token: Token,
    ) -> Result<InFlight, StoreError> {
        let now = Instant::now();
        let owned = state
            .inflight
            .get(&id)
            .is_some_and(|f| f.token == token && !f.lapsed(now));
        match owned.then(|| state.inflight.remove(&id)).flatten() {
            Some(f) => Ok(f),
            None => {
                self.lease_lost.fetch_add(1, Ordering::Relaxed);
                Err(StoreError::LeaseLost)
            }
        }
    }

    async fn complete_now(
        self: Arc<Self>,
        id: RecordId,
        token: Token,
        encoded: Encoded,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (claim, ticket) = self.complete_locked(id, token, encoded, ttl)?;
        let durable = self.syncer.durable(ticket).await;
        let claim = match claim {
            Some(claim) => claim,
            // Strict: the claim stayed in the map until now, so no duplicate replayed
            // the record before it was on disk.
            None => {
                let mut state = self.lock();
                match state.inflight.remove(&id) {
                    Some(held) if held.token == token => held,
                    Some(other) => {
                        state.inflight.insert(id, other);
                        return durable;
                    }
                    None => return durable,
                }
            }
        };
        // Waiters replay it either way: it is in the journal, and a failed sync marks
        // the store unhealthy for what comes next.
        claim.wake.send_replace(Some(Woke::Completed));
        durable
    }

    /// Under the lock: writes the record, frees the claim, keeps `max_bytes`.
    fn complete_locked(
        &self,
        id: RecordId,
        token: Token,
        encoded: Encoded,
        ttl: Duration,
    ) -> Result<(Option<InFlight>, u64), StoreError> {
        let mut state = self.lock();
        let claim = self.take_owned(&mut state, id, token)?;
        let mut batch = self.db.batch();
        let replaced = self.unindex(&mut batch, &id)?;
        let head = RecordHead {
            expires_ms: layout::now_ms().saturating_add(layout::ms(ttl)),
            seq: state.next_seq,
        };
        let size = encoded.weight() + layout::RECORD_OVERHEAD;
        batch.insert(
            &self.ks.records,
            id.0,
            layout::record_value(&head, encoded.as_bytes()),
        );
        batch.insert(&self.ks.expiry, layout::index_key(head.expires_ms, &id), []);
        batch.insert(
            &self.ks.age,
            layout::index_key(head.seq, &id),
            layout::size_value(size),
        );
        batch.remove(&self.ks.claims, id.0);
        let ticket = match self.commit(batch) {
            Ok(t) => t,
            Err(e) => {
                state.inflight.insert(id, claim);
                return Err(e);
            }
        };
        state.next_seq += 1;
        self.account(
            &mut state,
            size as i64 - replaced as i64,
            i64::from(replaced == 0),
        );
        sweep::evict_over_bound(self, &mut state);
        if self.syncer.strict() {
            // Until its sync, a duplicate sees the request in flight and waits.
            let pending = InFlight {
                expires: None,
                ..claim
            };
            state.inflight.insert(id, pending);
            return Ok((None, ticket));
        }
        Ok((Some(claim), ticket))
    }

    /// Removes the index entries of the record `id` holds now (an expired one that is
    /// being replaced); returns its size, 0 if there was none.
    fn unindex(&self, batch: &mut OwnedWriteBatch, id: &RecordId) -> Result<u64, StoreError> {
        let Some(v) = self.ks.records.get(id.0).map_err(unreadable)? else {
            return Ok(0);
        };
        let head = layout::parse_record(&v)?;
        let size = (v.len() - layout::RECORD_BODY_AT) as u64 + layout::RECORD_OVERHEAD;
        batch.remove(&self.ks.expiry, layout::index_key(head.expires_ms, id));
        batch.remove(&self.ks.age, layout::index_key(head.seq, id));
        Ok(size)
    }

    /// Moves the byte and record counts by the given deltas.
    fn account(&self, state: &mut State, bytes: i64, records: i64) {
        state.bytes = state.bytes.saturating_add_signed(bytes);
        self.bytes.store(state.bytes, Ordering::Relaxed);
        if records >= 0 {
            self.records.fetch_add(records as u64, Ordering::Relaxed);
        } else {
            self.records
                .fetch_sub(records.unsigned_abs(), Ordering::Relaxed);
        }
    }

    fn release_now(self: Arc<Self>, id: RecordId, token: Token) -> Result<(), StoreError> {
        let mut state = self.lock();
        let claim = self.take_owned(&mut state, id, token)?;
        let mut batch = self.db.batch();
        batch.remove(&self.ks.claims, id.0);
        // A release that fails to reach the disk leaves a claim the next start settles.
        let written = self.commit(batch).map(drop);
        drop(state);
        claim.wake.send_replace(Some(Woke::Released));
        written
    }

    fn renew_now(&self, id: RecordId, token: Token, lease: Duration) -> Result<(), StoreError> {
        let mut state = self.lock();
        let mut claim = self.take_owned(&mut state, id, token)?;
        claim.expires = Some(Instant::now() + lease);
        let value = ClaimValue {
            token,
            fingerprint: claim.fingerprint,
            lease_until_ms: layout::now_ms() + layout::ms(lease),
            if_orphaned: None,
        };
        state.inflight.insert(id, claim);
        let mut batch = self.db.batch();
        batch.insert(&self.ks.claims, id.0, layout::claim_value(&value));
        self.commit(batch).map(drop)
    }
}

impl DiskStore {
    /// Moves the write buffers (memtables) to tables and syncs: the next start replays
    /// an empty journal, so it is quick and its memory is what the store needs, not what
    /// the last run left in its buffers.
    pub fn flush_now(&self) -> Result<(), StoreError> {
        for keyspace in [
            &self.ks.records,
            &self.ks.claims,
            &self.ks.expiry,
            &self.ks.age,
            &self.ks.meta,
        ] {
            keyspace.rotate_memtable_and_wait().map_err(unreadable)?;
        }
        self.db
            .persist(fjall::PersistMode::SyncAll)
            .map_err(unreadable)
    }
}

fn in_flight(fingerprint: Fingerprint, token: Token, expires: Option<Instant>) -> InFlight {
    let (wake, _) = watch::channel(None);
    InFlight {
        fingerprint,
        token,
        expires,
        wake,
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        self.syncer.stop();
    }
}
