//! Keeping the disk store within its bounds: expired records swept every second (and
//! their space compacted away once they are most of the data), leases of record-API
//! workers that died released, and `max_bytes` held by evicting the oldest records.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::layout::{self, index_key};
use super::open::{unreadable, Keyspaces};
use super::rotate::Space;
use super::{DiskStore, State};
use crate::store::{RecordId, StoreError, Woke};

const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Expired entries removed per batch, so the lock is never held for long.
const BATCH: usize = 1024;
/// Compact once this many swept bytes (and at least half the live bytes) are garbage.
const COMPACT_AFTER: u64 = 8 << 20;

pub async fn run(store: Arc<DiskStore>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    let mut garbage = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        release_lapsed(&store);
        // A bound lowered under what the store holds is met a batch at a time.
        loop {
            let (before, after) = {
                let mut state = store.lock();
                let before = state.bytes;
                evict_over_bound(&store, &mut state);
                (before, state.bytes)
            };
            if after <= store.max_bytes || after == before {
                break;
            }
            tokio::task::yield_now().await;
        }
        loop {
            match expire(&store) {
                Ok((count, bytes)) => {
                    garbage += bytes;
                    if count < BATCH {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the disk store's expiry sweep failed");
                    break;
                }
            }
        }
        let live = store.lock().bytes;
        if garbage >= COMPACT_AFTER && garbage >= live / 2 {
            garbage = 0;
            let ks = store.ks.clone();
            let compacted = tokio::task::spawn_blocking(move || compact(&ks)).await;
            if let Ok(Err(e)) = compacted {
                tracing::warn!(error = %e, "the disk store could not compact");
            }
        }
    }
}

/// Flushes every memtable (tombstones still in memory hide nothing on disk, and a
/// journal is only dropped once all of them are flushed), then merges the records'
/// tables so the deleted values are gone from disk.
fn compact(ks: &Keyspaces) -> fjall::Result<()> {
    for keyspace in [&ks.records, &ks.claims, &ks.expiry, &ks.age] {
        keyspace.rotate_memtable_and_wait()?;
    }
    for keyspace in [&ks.records, &ks.expiry, &ks.age] {
        keyspace.major_compact()?;
    }
    // The replaced tables are deleted once no table version refers to them, which
    // fjall settles when a memtable rotates: write a mark and rotate one.
    ks.meta
        .insert(layout::COMPACTED_KEY, layout::now_ms().to_le_bytes())?;
    ks.meta.rotate_memtable_and_wait()
}

/// Removes up to [`BATCH`] expired records; returns how many and their bytes.
fn expire(store: &DiskStore) -> Result<(usize, u64), StoreError> {
    let end = index_key(layout::now_ms(), &RecordId([0; 32]));
    let mut due = Vec::with_capacity(BATCH);
    for entry in store.ks.expiry.range(..end).take(BATCH) {
        due.push(entry.key().map_err(unreadable)?);
    }
    if due.is_empty() {
        return Ok((0, 0));
    }
    let mut state = store.lock();
    let mut batch = store.batch();
    let (mut records, mut bytes) = (0i64, 0i64);
    for key in &due {
        // Every entry scanned is removed, so a damaged one cannot stop the sweep.
        batch.remove(Space::Expiry, key.clone());
        let Ok((expires, id)) = layout::parse_index_key(key) else {
            tracing::warn!("the disk store's expiry index held a damaged entry: removed");
            continue;
        };
        let Some(v) = store.ks.records.get(id.0).map_err(unreadable)? else {
            continue;
        };
        let Ok(head) = layout::parse_record(&v) else {
            continue; // damaged: left for a replay to report
        };
        if head.expires_ms != expires {
            continue; // replaced since: this index entry was stale
        }
        let id = &id;
        batch.remove(Space::Records, id.0);
        batch.remove(Space::Age, index_key(head.seq, id));
        records += 1;
        bytes += (v.len() - layout::RECORD_BODY_AT) as i64 + layout::RECORD_OVERHEAD as i64;
    }
    store.commit(batch)?;
    state.account(-bytes, -records);
    Ok((due.len(), bytes.unsigned_abs()))
}

/// Frees claims whose lease ended (their holder stopped renewing) and wakes their waiters.
fn release_lapsed(store: &DiskStore) {
    let now = Instant::now();
    let mut state = store.lock();
    let lapsed: Vec<RecordId> = state
        .inflight
        .iter()
        .filter(|(_, f)| f.lapsed(now))
        .map(|(id, _)| *id)
        .collect();
    if lapsed.is_empty() {
        return;
    }
    let mut batch = store.batch();
    for id in lapsed {
        if let Some(f) = state.inflight.remove(&id) {
            f.wake.send(Woke::LeaseExpired);
        }
        batch.remove(Space::Claims, id.0);
    }
    let _ = store.commit(batch);
}

/// Evicts the oldest records until the store is within `max_bytes`, at most [`BATCH`]
/// at a time (the sweep finishes a larger excess). Called with the lock held.
pub(super) fn evict_over_bound(store: &DiskStore, state: &mut State) {
    if state.bytes <= store.max_bytes {
        return;
    }
    if let Err(e) = evict(store, state) {
        tracing::warn!(error = %e, "the disk store could not evict to stay within max_bytes");
    }
}

fn evict(store: &DiskStore, state: &mut State) -> Result<(), StoreError> {
    let now = layout::now_ms();
    let mut over = state.bytes - store.max_bytes;
    let mut batch = store.batch();
    let (mut records, mut bytes, mut early) = (0i64, 0i64, 0u64);
    let mut next_from = state.evict_from;
    let from = index_key(state.evict_from, &RecordId([0; 32]));
    for entry in store.ks.age.range(from..).take(BATCH) {
        if over == 0 {
            break;
        }
        let (k, v) = entry.into_inner().map_err(unreadable)?;
        // Every entry scanned is removed, so a damaged one cannot stop eviction.
        batch.remove(Space::Age, k.clone());
        let (Ok((seq, id)), Ok(size)) = (layout::parse_index_key(&k), layout::parse_size(&v))
        else {
            tracing::warn!("the disk store's age index held a damaged entry: removed");
            continue;
        };
        next_from = seq + 1;
        let Some(rv) = store.ks.records.get(id.0).map_err(unreadable)? else {
            continue;
        };
        match layout::parse_record(&rv) {
            // The record this entry was written for, not a newer one under the same id.
            Ok(head) if head.seq == seq => {
                batch.remove(Space::Expiry, index_key(head.expires_ms, &id));
                early += u64::from(head.expires_ms > now);
            }
            Ok(_) => continue,
            Err(_) => {}
        }
        batch.remove(Space::Records, id.0);
        records += 1;
        bytes += size as i64;
        over = over.saturating_sub(size);
    }
    store.commit(batch)?;
    state.evict_from = next_from;
    state.account(-bytes, -records);
    store.evicted_early.fetch_add(early, Ordering::Relaxed);
    Ok(())
}
