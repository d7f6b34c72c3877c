//! The embedded durable store, on fjall (an LSM tree with a journal; README "Why fjall").
//! Records live on disk and survive restarts; in-flight claims are on disk too (so the
//! next start can settle the ones a dead process left) and mirrored in a map that
//! carries their waiters. One mutex orders begin, complete and release, as on the
//! memory store; a replay reads without it.
//!
//! - [`layout`]: keys and values.
//! - [`open`]: lock, format check, recovery of claims left by a dead process.
//! - [`rotate`]: write batches that count their bytes; memtable rotation on our thread.
//! - [`sync`]: group commit (`strict`) and the periodic sync (`relaxed`).
//! - [`sweep`]: expiry and the `max_bytes` bound, oldest first.
//! - [`contract`]: the [`Store`] trait on top of the above.

mod contract;
mod layout;
mod open;
mod rotate;
mod sweep;
mod sync;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use fjall::Database;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::memory::InFlight;
use super::*;
use layout::{ClaimValue, RecordHead};
pub use open::OrphanRecord;
use open::{unreadable, Keyspaces};
use rotate::{Batch, Rotator, Space};
use sync::Syncer;

impl State {
    /// Moves the byte and record counts by the given deltas.
    fn account(&mut self, bytes: i64, records: i64) {
        self.bytes = self.bytes.saturating_add_signed(bytes);
        self.records = self.records.saturating_add_signed(records);
    }
}

struct State {
    inflight: HashMap<RecordId, InFlight>,
    next_seq: u64,
    /// Every record older than this seq is gone: eviction starts its scan here instead
    /// of walking the tombstones of what it already evicted.
    evict_from: u64,
    bytes: u64,
    records: u64,
}

pub struct DiskStore {
    db: Database,
    ks: Keyspaces,
    state: Mutex<State>,
    max_bytes: u64,
    syncer: Syncer,
    rotator: Rotator,
    evicted_early: AtomicU64,
    lease_lost: AtomicU64,
    /// Records written so far: unchanged between a look and the lock, the look still
    /// holds, and the claim need not read the record again.
    written: AtomicU64,
    /// False after a write failed (a full disk, say). fjall refuses every write after a
    /// failed journal write, so in practice it stays false until a restart.
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
        let rotator = Rotator::start(opened.ks.clone())?;
        let now = Instant::now();
        let wall = layout::now_ms();
        let inflight = opened
            .leased
            .into_iter()
            .map(|(id, c)| {
                let left = Duration::from_millis(c.lease_until_ms.saturating_sub(wall));
                (id, InFlight::new(c.fingerprint, c.token, Some(now + left)))
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
                records: opened.records,
            }),
            max_bytes,
            syncer,
            rotator,
            evicted_early: AtomicU64::new(0),
            lease_lost: AtomicU64::new(0),
            written: AtomicU64::new(0),
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

    fn batch(&self) -> Batch<'_> {
        Batch::new(&self.db, &self.ks)
    }

    /// Commits `batch` and takes its sync ticket; a failure marks the store unhealthy.
    fn commit(&self, batch: Batch<'_>) -> Result<u64, StoreError> {
        match batch.commit() {
            Ok(grew) => {
                self.rotator.grew(&grew);
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
    fn look(&self, id: &RecordId) -> Result<Look, StoreError> {
        let Some(v) = self.ks.records.get(id.0).map_err(unreadable)? else {
            return Ok(Look::Absent);
        };
        let head = layout::parse_record(&v)?;
        if head.expires_ms <= layout::now_ms() {
            return Ok(Look::Expired);
        }
        let encoded = Bytes::copy_from_slice(&v[layout::RECORD_BODY_AT..]);
        Encoded::from_stored(encoded).decode().map(Look::Live)
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
        let mut seen = None;
        if !self.syncer.strict() {
            let written = self.written.load(Ordering::Acquire);
            match self.look(&id)? {
                Look::Live(record) => return Ok(Begin::Completed(record)),
                look => seen = Some((written, look)),
            }
        }
        let claimed = self.claim_locked(id, fingerprint, lease, if_orphaned, seen)?;
        let (token, ticket) = match claimed {
            Ok(claimed) => claimed,
            Err(found) => return Ok(found),
        };
        // The guard exists before the wait: should the caller go away meanwhile (a client
        // that disconnects), dropping it releases the claim.
        let claim = Claim::new(self.clone(), id, token, lease);
        // Not on disk: the request must not run; dropping the guard frees the key.
        self.syncer.durable(ticket).await?;
        Ok(Begin::Claimed(claim))
    }

    /// Under the lock: what is there for `id`, or a new claim (its token and sync ticket).
    #[allow(clippy::type_complexity)]
    fn claim_locked(
        &self,
        id: RecordId,
        fingerprint: Fingerprint,
        lease: Option<Duration>,
        if_orphaned: Option<Duration>,
        seen: Option<(u64, Look)>,
    ) -> Result<Result<(Token, u64), Begin>, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        match state.inflight.get_mut(&id) {
            Some(f) if !f.lapsed(now) => {
                return Ok(Err(Begin::InFlight {
                    fingerprint: f.fingerprint,
                    waiter: super::fanout::waiter(id, f.token, f.wake.subscribe(), f.expires),
                    lease_left: f.expires.map(|e| e.saturating_duration_since(now)),
                }))
            }
            Some(_) => {
                if let Some(old) = state.inflight.remove(&id) {
                    old.wake.send(Woke::LeaseExpired);
                }
            }
            None => {}
        }
        // Completed between the first look and the lock? Only if a record was written.
        let look = match seen {
            Some((written, look)) if written == self.written.load(Ordering::Acquire) => look,
            _ => self.look(&id)?,
        };
        let record_absent = match look {
            Look::Live(record) => return Ok(Err(Begin::Completed(record))),
            Look::Absent => true,
            Look::Expired => false,
        };
        let token = Token::random()?;
        let claim = ClaimValue {
            token,
            fingerprint,
            lease_until_ms: lease.map_or(0, |l| layout::now_ms().saturating_add(layout::ms(l))),
            if_orphaned,
        };
        let mut batch = self.batch();
        batch.insert(Space::Claims, id.0, layout::claim_value(&claim));
        let ticket = self.commit(batch)?;
        let expires = lease.map(|l| now + l);
        let mut claimed = InFlight::new(fingerprint, token, expires);
        claimed.record_absent = record_absent;
        state.inflight.insert(id, claimed);
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
        match claim {
            Completed::Done(claim) => {
                claim.wake.send(Woke::Completed);
                self.syncer.durable(ticket).await
            }
            Completed::Syncing(pending) => {
                // The rest runs on its own, so a caller that goes away cannot leave the
                // key looking in flight.
                let store = self.clone();
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.background.spawn(async move {
                    let durable = store.syncer.durable(ticket).await;
                    store.finish_pending(id, pending);
                    let _ = tx.send(durable);
                });
                rx.await
                    .unwrap_or_else(|_| Err(StoreError::Unavailable("disk store stopped".into())))
            }
        }
    }

    /// Strict: the record is synced (or the sync failed: it is in the journal, and the
    /// store is unhealthy for what comes next); waiters may replay it now.
    fn finish_pending(&self, id: RecordId, pending: Token) {
        let mut state = self.lock();
        if state.inflight.get(&id).is_some_and(|f| f.token == pending) {
            if let Some(held) = state.inflight.remove(&id) {
                held.wake.send(Woke::Completed);
            }
        }
    }

    /// Under the lock: writes the record, frees the claim, keeps `max_bytes`.
    fn complete_locked(
        &self,
        id: RecordId,
        token: Token,
        encoded: Encoded,
        ttl: Duration,
    ) -> Result<(Completed, u64), StoreError> {
        let mut state = self.lock();
        let claim = self.take_owned(&mut state, id, token)?;
        let mut batch = self.batch();
        // Nothing was there when claimed, and only this claim could have written since.
        let replaced = match claim.record_absent {
            true => Ok(0),
            false => self.ks.unindex(&mut batch, &id),
        };
        let replaced = match replaced {
            Ok(r) => r,
            Err(e) => {
                state.inflight.insert(id, claim);
                return Err(e);
            }
        };
        let head = RecordHead {
            expires_ms: layout::now_ms().saturating_add(layout::ms(ttl)),
            seq: state.next_seq,
        };
        let size = self.ks.put_record(&mut batch, &id, &head, &encoded);
        batch.remove(Space::Claims, id.0);
        let ticket = match self.commit(batch) {
            Ok(t) => t,
            Err(e) => {
                state.inflight.insert(id, claim);
                return Err(e);
            }
        };
        state.next_seq += 1;
        self.written.fetch_add(1, Ordering::Release);
        state.account(size as i64 - replaced as i64, i64::from(replaced == 0));
        sweep::evict_over_bound(self, &mut state);
        if self.syncer.strict() {
            // Until its sync, a duplicate sees the request in flight and waits. The entry
            // gets a token of its own: the owner's renew, release or second complete is
            // refused (LeaseLost), as once the claim is spent.
            let pending = Token::random()?;
            let held = InFlight {
                token: pending,
                expires: None,
                ..claim
            };
            state.inflight.insert(id, held);
            return Ok((Completed::Syncing(pending), ticket));
        }
        Ok((Completed::Done(claim), ticket))
    }

    fn release_now(self: Arc<Self>, id: RecordId, token: Token) -> Result<(), StoreError> {
        let mut state = self.lock();
        let claim = self.take_owned(&mut state, id, token)?;
        let mut batch = self.batch();
        batch.remove(Space::Claims, id.0);
        // A release that fails to reach the disk leaves a claim the next start settles.
        let written = self.commit(batch).map(drop);
        drop(state);
        claim.wake.send(Woke::Released);
        written
    }

    fn renew_now(&self, id: RecordId, token: Token, lease: Duration) -> Result<(), StoreError> {
        let mut state = self.lock();
        let mut claim = self.take_owned(&mut state, id, token)?;
        claim.expires = Some(Instant::now() + lease);
        let value = ClaimValue {
            token,
            fingerprint: claim.fingerprint,
            lease_until_ms: layout::now_ms().saturating_add(layout::ms(lease)),
            if_orphaned: None,
        };
        state.inflight.insert(id, claim);
        let mut batch = self.batch();
        batch.insert(Space::Claims, id.0, layout::claim_value(&value));
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

/// What a completed claim leaves in the map until its waiters may be woken.
enum Completed {
    /// Relaxed: out of the map; wake its waiters.
    Done(InFlight),
    /// Strict: still in the map under this token until its record is synced.
    Syncing(Token),
}

/// What a read of `id`'s record found.
enum Look {
    Absent,
    Expired,
    Live(Record),
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        self.syncer.stop();
        self.rotator.stop();
    }
}
