//! Group commit: many writers, one fsync. Each write takes a ticket after its batch is
//! in the journal; one thread syncs the journal up to the newest ticket it saw and
//! publishes how far it got, so every writer that arrived meanwhile shares that fsync.
//! In `relaxed` mode nobody waits for tickets and the thread syncs about every second.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use fjall::{Database, PersistMode};
use tokio::sync::watch;

use super::super::StoreError;

/// How often `relaxed` syncs: what a machine crash may lose at most.
pub const RELAXED_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Default)]
struct Synced {
    upto: u64,
    failed: bool,
}

#[derive(Default)]
struct State {
    written: u64,
    stop: bool,
}

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    synced: watch::Sender<Synced>,
    strict: bool,
}

#[derive(Clone)]
pub struct Syncer {
    inner: Arc<Inner>,
}

impl Syncer {
    pub fn start(db: Database, strict: bool) -> Result<Syncer, String> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            synced: watch::Sender::new(Synced::default()),
            strict,
        });
        let thread_inner = inner.clone();
        std::thread::Builder::new()
            .name("idemgate-fsync".into())
            .spawn(move || run(&thread_inner, &db))
            .map_err(|e| format!("cannot start the disk store's sync thread: {e}"))?;
        Ok(Syncer { inner })
    }

    /// Called right after a batch was committed to the journal, under the store's lock
    /// (so tickets follow commit order).
    pub fn ticket(&self) -> u64 {
        let mut state = self.inner.lock();
        state.written += 1;
        if self.inner.strict {
            self.inner.wake.notify_one();
        }
        state.written
    }

    /// Strict: returns once the journal is synced past `ticket`. Relaxed: at once.
    pub async fn durable(&self, ticket: u64) -> Result<(), StoreError> {
        if !self.inner.strict {
            return Ok(());
        }
        let mut rx = self.inner.synced.subscribe();
        let synced = rx
            .wait_for(|s| s.failed || s.upto >= ticket)
            .await
            .map(|s| *s)
            .unwrap_or(Synced {
                upto: 0,
                failed: true,
            });
        if synced.upto >= ticket {
            Ok(())
        } else {
            Err(StoreError::Unavailable(
                "the disk store could not sync its journal".into(),
            ))
        }
    }

    pub fn strict(&self) -> bool {
        self.inner.strict
    }

    /// A sync failed: the journal cannot be trusted to reach the disk any more.
    pub fn failed(&self) -> bool {
        self.inner.synced.borrow().failed
    }

    /// Syncs what was written and stops the thread.
    pub fn stop(&self) {
        let mut state = self.inner.lock();
        state.stop = true;
        self.inner.wake.notify_one();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a counter update: a poisoned state is whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn run(inner: &Inner, db: &Database) {
    let mut synced = 0;
    let mut last = std::time::Instant::now();
    loop {
        let (target, stop) = {
            let mut state = inner.lock();
            // Strict: as soon as there is something to sync. Relaxed: at most once a
            // second (an fsync holds fjall's journal, and every write waits on it).
            let due = |s: &State| {
                s.stop || (s.written > synced && (inner.strict || last.elapsed() >= RELAXED_EVERY))
            };
            while !due(&state) {
                state = if inner.strict {
                    inner.wake.wait(state).unwrap_or_else(|p| p.into_inner())
                } else {
                    let left = RELAXED_EVERY.saturating_sub(last.elapsed());
                    let waited = inner.wake.wait_timeout(state, left.max(RELAXED_EVERY / 10));
                    waited.map(|w| w.0).unwrap_or_else(|p| p.into_inner().0)
                };
            }
            (state.written, state.stop)
        };
        last = std::time::Instant::now();
        if target > synced {
            match db.persist(PersistMode::SyncData) {
                Ok(()) => {
                    synced = target;
                    inner.synced.send_replace(Synced {
                        upto: target,
                        failed: false,
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "the disk store could not sync its journal");
                    inner.synced.send_modify(|s| s.failed = true);
                    return;
                }
            }
        }
        if stop {
            return;
        }
    }
}
