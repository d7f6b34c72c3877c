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
mod tests;
