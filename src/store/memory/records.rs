//! The memory store's completed records: a slab of slots, a hash index of slot numbers,
//! and a list through the slots in completion order.
//!
//! Built for what a record costs the process, not for generality. moka, which held them
//! before, spent ~350 bytes of bookkeeping on each (key and value boxes, LRU and timer
//! nodes); a slot is one 80-byte array element plus an 8-byte index entry, so 1M records
//! of 1 KiB need about 1.36× their body bytes instead of 1.64× (README, Performance).
//! Everything here runs under the store's one mutex, so none of it needs to be
//! concurrent, and nothing here may stall it: slots live in fixed chunks (growing never
//! copies them) and the index keeps each slot's hash (growing never reads the slots).
//!
//! - Eviction takes the oldest record first (SPEC: "oldest evicted first"): the head of
//!   the completion list, unlinked in O(1).
//! - Expiry is checked on every read, so an expired record never replays; its memory is
//!   reclaimed by a clock hand that visits a few slots on every insert, and by the
//!   caller's periodic [`Records::sweep`].

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use hashbrown::HashTable;
use tokio::time::Instant;

use super::super::{Encoded, RecordId};

/// No slot: the end of a list.
const NIL: u32 = u32::MAX;

/// Slots a chunk holds; chunks are allocated whole and never moved.
const CHUNK: usize = 4096;

/// Slots the clock hand visits on each insert: enough that expired records are freed
/// well before a full store must evict live ones for them, few enough that an insert
/// stays cheap (a pass over consecutive slots).
const SWEEP_PER_INSERT: usize = 32;

struct Slot {
    id: RecordId,
    /// `None`: a free slot, linked through `next` in the free list.
    encoded: Option<Encoded>,
    /// Microseconds after the store's epoch, on the tokio clock (tests pause it).
    expires_us: u64,
    /// Neighbours in completion order (or the next free slot).
    prev: u32,
    next: u32,
}

/// A slot number and the low half of its record's hash, from which the table's hash is
/// rebuilt (see [`Records::table_hash`]).
#[derive(Clone, Copy)]
struct Entry {
    slot: u32,
    hash: u32,
}

pub(super) struct Records {
    chunks: Vec<Vec<Slot>>,
    /// Slots ever used (the next fresh slot number).
    used: usize,
    index: HashTable<Entry>,
    /// Keyed per process: ids come from client input, so bucket choice must not be
    /// predictable.
    hasher: RandomState,
    free: u32,
    oldest: u32,
    newest: u32,
    len: u64,
    /// The sum of the live records' weights, bounded by `max_bytes`.
    bytes: u64,
    max_bytes: u64,
    /// What a slot costs beyond its encoded bytes, added to each record's weight.
    overhead: u64,
    epoch: Instant,
    hand: usize,
    evicted_early: u64,
}

impl Records {
    pub(super) fn new(max_bytes: u64, overhead: u64) -> Self {
        Records {
            chunks: Vec::new(),
            used: 0,
            index: HashTable::new(),
            hasher: RandomState::new(),
            free: NIL,
            oldest: NIL,
            newest: NIL,
            len: 0,
            bytes: 0,
            max_bytes,
            overhead,
            epoch: Instant::now(),
            hand: 0,
            evicted_early: 0,
        }
    }

    pub(super) fn len(&self) -> u64 {
        self.len
    }

    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Records evicted for space while their ttl still ran.
    pub(super) fn evicted_early(&self) -> u64 {
        self.evicted_early
    }

    /// Microseconds since the epoch, rounded down: for "now".
    fn us(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// Microseconds since the epoch, rounded up: for an expiry, so that a record never
    /// stops replaying before its ttl (and at most 1 µs after it).
    fn us_up(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos.div_ceil(1_000)).unwrap_or(u64::MAX)
    }

    fn weight(&self, encoded: &Encoded) -> u64 {
        encoded.weight() + self.overhead
    }

    fn slot(&self, s: u32) -> &Slot {
        let s = s as usize;
        &self.chunks[s / CHUNK][s % CHUNK]
    }

    fn slot_mut(&mut self, s: u32) -> &mut Slot {
        let s = s as usize;
        &mut self.chunks[s / CHUNK][s % CHUNK]
    }

    fn hash32(&self, id: &RecordId) -> u32 {
        self.hasher.hash_one(id) as u32
    }

    /// The table's 64-bit hash from 32 bits: hashbrown takes a bucket from the low bits
    /// and a tag from the top 7, which here are the 32 bits' own top bits.
    fn table_hash(hash: u32) -> u64 {
        (u64::from(hash) << 32) | u64::from(hash)
    }

    fn find(&self, id: &RecordId) -> Option<u32> {
        let hash = self.hash32(id);
        self.index
            .find(Self::table_hash(hash), |e| {
                e.hash == hash && self.slot(e.slot).id == *id
            })
            .map(|e| e.slot)
    }

    /// The record, if it is held and has not expired. An expired one is freed on the way,
    /// so that a claim which follows leaves the id empty after this one probe of the index
    /// (each probe past the caches costs a miss a few per cent on a full store).
    pub(super) fn get_live(&mut self, id: &RecordId, now: Instant) -> Option<&Encoded> {
        let s = self.find(id)?;
        if self.slot(s).expires_us <= self.us(now) {
            self.free_slot(s);
            return None;
        }
        self.slot(s).encoded.as_ref()
    }

    pub(super) fn remove(&mut self, id: &RecordId) {
        if let Some(s) = self.find(id) {
            self.free_slot(s);
        }
    }

    /// Holds `encoded` under `id` until `expires`, in place of any record there, then
    /// evicts the oldest records until the bound holds again.
    pub(super) fn insert(
        &mut self,
        id: RecordId,
        encoded: Encoded,
        expires: Instant,
        now: Instant,
    ) {
        self.remove(&id);
        self.insert_new(id, encoded, expires, now);
    }

    /// [`Records::insert`] for an id known to hold no record: one probe fewer.
    pub(super) fn insert_new(
        &mut self,
        id: RecordId,
        encoded: Encoded,
        expires: Instant,
        now: Instant,
    ) {
        let weight = self.weight(&encoded);
        if weight > self.max_bytes {
            // It could never be held: keeping it would first evict every other record.
            self.evicted_early += 1;
            return;
        }
        self.bytes += weight;
        let slot = Slot {
            id,
            encoded: Some(encoded),
            expires_us: self.us_up(expires),
            prev: self.newest,
            next: NIL,
        };
        let s = self.take_free(slot);
        match self.newest {
            NIL => self.oldest = s,
            n => self.slot_mut(n).next = s,
        }
        self.newest = s;
        self.len += 1;
        let hash = self.hash32(&id);
        self.index
            .insert_unique(Self::table_hash(hash), Entry { slot: s, hash }, |e| {
                Self::table_hash(e.hash)
            });
        self.sweep(now, SWEEP_PER_INSERT);
        self.evict(now);
    }

    /// Frees the expired records among the next `budget` slots of the clock hand.
    pub(super) fn sweep(&mut self, now: Instant, budget: usize) {
        let now_us = self.us(now);
        for _ in 0..budget.min(self.used) {
            // A compare, not a division per slot visited: this loop, with `% used`, was
            // 2.8% of a new-key request's CPU in a profile.
            self.hand += 1;
            if self.hand >= self.used {
                self.hand = 0;
            }
            let s = self.hand as u32;
            let slot = self.slot(s);
            if slot.encoded.is_some() && slot.expires_us <= now_us {
                self.free_slot(s);
            }
        }
    }

    fn evict(&mut self, now: Instant) {
        let now_us = self.us(now);
        while self.bytes > self.max_bytes && self.oldest != NIL {
            let s = self.oldest;
            if self.slot(s).expires_us > now_us {
                self.evicted_early += 1;
            }
            self.free_slot(s);
        }
    }

    fn take_free(&mut self, slot: Slot) -> u32 {
        match self.free {
            NIL => {
                if self.used % CHUNK == 0 {
                    self.chunks.push(Vec::with_capacity(CHUNK));
                }
                if let Some(chunk) = self.chunks.last_mut() {
                    chunk.push(slot);
                }
                self.used += 1;
                (self.used - 1) as u32
            }
            s => {
                self.free = self.slot(s).next;
                *self.slot_mut(s) = slot;
                s
            }
        }
    }

    /// Unlinks slot `s` from the index and the completion list and frees its record.
    fn free_slot(&mut self, s: u32) {
        let hash = self.hash32(&self.slot(s).id);
        if let Ok(entry) = self
            .index
            .find_entry(Self::table_hash(hash), |e| e.slot == s)
        {
            entry.remove();
        }
        let slot = self.slot_mut(s);
        let Some(encoded) = slot.encoded.take() else {
            return;
        };
        let (prev, next) = (slot.prev, slot.next);
        self.bytes = self.bytes.saturating_sub(self.weight(&encoded));
        match prev {
            NIL => self.oldest = next,
            p => self.slot_mut(p).next = next,
        }
        match next {
            NIL => self.newest = prev,
            n => self.slot_mut(n).prev = prev,
        }
        self.slot_mut(s).next = self.free;
        self.free = s;
        self.len -= 1;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;

    fn id(n: u8) -> RecordId {
        RecordId([n; 32])
    }

    fn bytes(len: usize) -> Encoded {
        Encoded::from_stored(Bytes::from(vec![b'r'; len]))
    }

    const LATER: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn the_oldest_record_goes_first_and_counts_as_early() {
        let mut r = Records::new(250, 0);
        let now = Instant::now();
        for n in 0..3 {
            r.insert(id(n), bytes(100), now + LATER, now);
        }
        assert_eq!((r.len(), r.bytes(), r.evicted_early()), (2, 200, 1));
        assert!(r.get_live(&id(0), now).is_none());
        assert!(r.get_live(&id(1), now).is_some() && r.get_live(&id(2), now).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_heavier_than_the_bound_is_not_kept_and_evicts_nothing() {
        let mut r = Records::new(250, 0);
        let now = Instant::now();
        r.insert(id(1), bytes(100), now + LATER, now);
        r.insert(id(2), bytes(300), now + LATER, now);
        assert_eq!((r.len(), r.bytes(), r.evicted_early()), (1, 100, 1));
        assert!(r.get_live(&id(1), now).is_some() && r.get_live(&id(2), now).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_replays_until_its_full_ttl() {
        let mut r = Records::new(1 << 20, 0);
        tokio::time::advance(Duration::from_micros(300)).await;
        let now = Instant::now();
        r.insert(id(1), bytes(1), now + Duration::from_millis(5), now);
        tokio::time::advance(Duration::from_micros(4_900)).await;
        assert!(r.get_live(&id(1), Instant::now()).is_some());
        tokio::time::advance(Duration::from_micros(100)).await;
        assert!(r.get_live(&id(1), Instant::now()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_replaced_under_its_id_is_counted_once() {
        let mut r = Records::new(1000, 10);
        let now = Instant::now();
        r.insert(id(1), bytes(100), now + LATER, now);
        r.insert(id(1), bytes(50), now + LATER, now);
        assert_eq!((r.len(), r.bytes()), (1, 60));
        assert_eq!(r.get_live(&id(1), now).map(Encoded::weight), Some(50));
    }

    #[tokio::test(start_paused = true)]
    async fn expired_records_stop_replaying_and_the_sweep_frees_them() {
        let mut r = Records::new(1 << 20, 0);
        let now = Instant::now();
        for n in 0..100 {
            let ttl = if n % 2 == 0 {
                Duration::from_secs(1)
            } else {
                LATER
            };
            r.insert(id(n), bytes(10), now + ttl, now);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        let later = Instant::now();
        assert!(r.get_live(&id(0), later).is_none());
        assert!(r.get_live(&id(1), later).is_some());
        r.sweep(later, 100);
        assert_eq!((r.len(), r.bytes()), (50, 500));
        // Nothing expired was counted as evicted early, and freed slots are reused.
        assert_eq!(r.evicted_early(), 0);
        r.insert(id(200), bytes(10), later + LATER, later);
        assert_eq!(r.used, 100);
    }

    /// A claim's begin looks its id up once, and its complete then adds the record
    /// without looking again: the lookup must have freed an expired record.
    #[tokio::test(start_paused = true)]
    async fn an_expired_record_looked_up_is_freed_so_its_id_takes_a_new_one() {
        let mut r = Records::new(1 << 20, 0);
        let now = Instant::now();
        r.insert(id(1), bytes(10), now + Duration::from_secs(1), now);
        tokio::time::advance(Duration::from_secs(2)).await;
        let later = Instant::now();
        assert!(r.get_live(&id(1), later).is_none());
        assert_eq!((r.len(), r.bytes()), (0, 0));
        r.insert_new(id(1), bytes(20), later + LATER, later);
        assert_eq!(r.get_live(&id(1), later).map(Encoded::weight), Some(20));
        assert_eq!((r.len(), r.bytes(), r.evicted_early()), (1, 20, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn records_across_chunks_are_found_evicted_and_reused() {
        let mut r = Records::new(1 << 30, 0);
        let now = Instant::now();
        let id = |n: u32| {
            let mut b = [0; 32];
            b[..4].copy_from_slice(&n.to_le_bytes());
            RecordId(b)
        };
        let n = 3 * CHUNK as u32 + 5;
        for i in 0..n {
            r.insert(id(i), bytes(1), now + LATER, now);
        }
        assert!((0..n).all(|i| r.get_live(&id(i), now).is_some()));
        r.max_bytes = CHUNK as u64;
        r.insert(id(n), bytes(1), now + LATER, now);
        assert_eq!(r.len(), CHUNK as u64);
        assert!(r.get_live(&id(n - CHUNK as u32), now).is_none());
        assert!(r.get_live(&id(n - CHUNK as u32 + 1), now).is_some());
        // The evicted slots are taken again before a fresh one.
        assert_eq!(r.used, n as usize + 1);
        r.insert(id(n + 1), bytes(1), now + LATER, now);
        assert_eq!(r.used, n as usize + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_after_removals_keeps_completion_order() {
        let mut r = Records::new(1 << 20, 0);
        let now = Instant::now();
        for n in 0..5 {
            r.insert(id(n), bytes(10), now + LATER, now);
        }
        r.remove(&id(0));
        r.remove(&id(2));
        r.remove(&id(4));
        r.max_bytes = 10;
        r.insert(id(9), bytes(10), now + LATER, now);
        assert_eq!(r.len(), 1);
        assert!(r.get_live(&id(9), now).is_some());
        assert_eq!(r.evicted_early(), 2);
    }
}
