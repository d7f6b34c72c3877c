//! Memtable rotation, driven from our side.
//!
//! fjall 3.1's writers ask its workers to rotate a full memtable by sending a message on
//! every write past the memtable's limit. Under a burst of writes those requests fill the
//! workers' bounded channel, and a worker that then rotates blocks sending the flush on
//! that same channel: once every worker does, nobody receives and the store hangs
//! (fjall-rs/fjall#323; 3 of 8 runs of `tests/store_disk_burst.rs` hung this way, 0 of 10
//! since).
//!
//! So every write goes through a [`Batch`] that counts the bytes it adds to each
//! keyspace the way fjall does, and a thread of ours rotates a
//! keyspace once seven eighths of its limit are written. Its memtable does not reach
//! fjall's limit unless that thread falls behind or one write is larger than the last
//! eighth, so writers do not send, and the workers' channel carries only flushes and
//! compactions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use fjall::{Database, OwnedWriteBatch, UserKey, UserValue};

use super::open::{Keyspaces, INDEX_MEMTABLE, RECORDS_MEMTABLE};

/// The keyspaces, to count writes by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Records,
    Claims,
    Expiry,
    Age,
    Meta,
}

const SPACES: usize = 5;
const ALL: [Space; SPACES] = [
    Space::Records,
    Space::Claims,
    Space::Expiry,
    Space::Age,
    Space::Meta,
];

/// What fjall adds to an item's key and value when it sizes a memtable: the item's
/// in-memory header, 64 bytes in fjall 3.1 (a unit test holds us to it).
const ITEM_OVERHEAD: u64 = 64;

impl Space {
    /// Written bytes after which we rotate: seven eighths of fjall's own limit, so a
    /// rotation that waits behind a busy journal still lands before fjall would ask for
    /// one. Earlier is slower: more, smaller tables to flush and compact (at three
    /// quarters, disk-store misses ran 5% slower than with fjall rotating at its limit;
    /// at seven eighths, 2%; at half, the burst test took 10-50% longer).
    fn rotate_at(self) -> u64 {
        match self {
            Space::Records => RECORDS_MEMTABLE / 8 * 7,
            _ => INDEX_MEMTABLE / 8 * 7,
        }
    }
}

/// A write batch that knows how many bytes it adds to each keyspace's memtable.
pub struct Batch<'a> {
    inner: OwnedWriteBatch,
    ks: &'a Keyspaces,
    grew: [u64; SPACES],
}

impl<'a> Batch<'a> {
    pub fn new(db: &Database, ks: &'a Keyspaces) -> Self {
        Batch {
            inner: db.batch(),
            ks,
            grew: [0; SPACES],
        }
    }

    pub fn insert(&mut self, space: Space, key: impl Into<UserKey>, value: impl Into<UserValue>) {
        let (key, value) = (key.into(), value.into());
        self.grew[space as usize] += (key.len() + value.len()) as u64 + ITEM_OVERHEAD;
        self.inner.insert(self.ks.get(space), key, value);
    }

    pub fn remove(&mut self, space: Space, key: impl Into<UserKey>) {
        let key = key.into();
        self.grew[space as usize] += key.len() as u64 + ITEM_OVERHEAD;
        self.inner.remove(self.ks.get(space), key);
    }

    /// Commits the batch; returns what it added to each keyspace, for [`Rotator::grew`].
    pub fn commit(self) -> fjall::Result<Grew> {
        self.inner.commit()?;
        Ok(Grew(self.grew))
    }
}

/// Bytes a committed batch added to each keyspace's memtable.
pub struct Grew([u64; SPACES]);

#[derive(Default)]
struct Due {
    spaces: [bool; SPACES],
    stop: bool,
}

struct Inner {
    /// Bytes written to each keyspace since we last rotated it.
    written: [AtomicU64; SPACES],
    due: Mutex<Due>,
    wake: Condvar,
}

/// The thread that rotates memtables; see the module's docs.
pub struct Rotator {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Rotator {
    /// Rotates every keyspace first: the journal a crash left was replayed into the
    /// memtables, and so was the recovery of its claims, neither of them counted.
    pub fn start(ks: Keyspaces) -> Result<Rotator, String> {
        for space in ALL {
            ks.get(space)
                .rotate_memtable()
                .map_err(|e| format!("the disk store cannot rotate its write buffers: {e}"))?;
        }
        let inner = Arc::new(Inner {
            written: Default::default(),
            due: Mutex::new(Due::default()),
            wake: Condvar::new(),
        });
        let thread_inner = inner.clone();
        let thread = std::thread::Builder::new()
            .name("idemgate-rotate".into())
            .spawn(move || run(&thread_inner, &ks))
            .map_err(|e| format!("cannot start the disk store's rotation thread: {e}"))?;
        Ok(Rotator {
            inner,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Counts a committed batch; a keyspace that crosses its mark is due a rotation.
    pub fn grew(&self, grew: &Grew) {
        for space in ALL {
            let added = grew.0[space as usize];
            if added == 0 {
                continue;
            }
            let before = self.inner.written[space as usize].fetch_add(added, Ordering::AcqRel);
            let mark = space.rotate_at();
            if before < mark && before + added >= mark {
                self.inner.lock().spaces[space as usize] = true;
                self.inner.wake.notify_one();
            }
        }
    }

    /// Stops the thread and waits for it: a rotation after the database is dropped
    /// would queue a flush nobody runs, and its keyspace handle would keep the store's
    /// lock for the life of the process.
    pub fn stop(&self) {
        self.inner.lock().stop = true;
        self.inner.wake.notify_one();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!("the disk store's rotation thread panicked");
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Due> {
        // Every critical section sets or takes flags: a poisoned state is whole.
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn run(inner: &Inner, ks: &Keyspaces) {
    loop {
        let spaces = {
            let mut due = inner.lock();
            while !due.stop && !due.spaces.contains(&true) {
                due = inner.wake.wait(due).unwrap_or_else(|p| p.into_inner());
            }
            if due.stop {
                return;
            }
            std::mem::take(&mut due.spaces)
        };
        for space in ALL.into_iter().filter(|s| spaces[*s as usize]) {
            // Reset before rotating: a write in between lands in the old memtable and
            // is counted for the new one, which only brings its rotation forward.
            inner.written[space as usize].store(0, Ordering::Release);
            if let Err(e) = ks.get(space).rotate_memtable() {
                tracing::warn!(error = %e, ?space, "the disk store could not rotate a write buffer");
            }
        }
    }
}

#[cfg(test)]
mod tests;
