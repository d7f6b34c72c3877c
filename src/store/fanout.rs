//! Waiters on one in-flight claim, woken one thread at a time.
//!
//! Why: each serving thread runs its own single-threaded runtime, and a task woken from
//! another thread costs that runtime an eventfd write and a turn on its queue's lock. A
//! storm's waiters woken one by one from the completing thread cost one of each per
//! waiter (strace of the storm row: ~500 eventfd writes in a row, the other thread
//! contending for its queue meanwhile). So the waiters of one claim on one thread share a
//! relay task: the completion wakes each thread's relay once, and the relay wakes its own
//! thread's waiters, which costs no system call.
//!
//! The relay alone waits on the claim's channel and its lease, so a waiter holds no timer
//! of its own for the lease either. Correctness never depends on which thread anything
//! runs on: a group is only a shared copy of one claim's outcome.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::{RecordId, Token, Waiter, Woke};

/// One claim's waiters on one thread.
#[derive(Default)]
struct Group {
    woke: OnceLock<Woke>,
    notify: Notify,
}

struct Groups {
    live: HashMap<(RecordId, Token), Weak<Group>>,
    /// Dead entries are swept when the map reaches this size, which then doubles, so
    /// sweeping stays linear in the number of claims waited on.
    sweep_at: usize,
}

thread_local! {
    static GROUPS: RefCell<Groups> = RefCell::new(Groups {
        live: HashMap::new(),
        sweep_at: 64,
    });
}

/// A claim's outcome channel, made when its first waiter subscribes. Most claims are
/// never waited on, and a channel costs an allocation plus, on each send and on drop, a
/// pass over its eight notify lists, each behind a lock (2.6% of a new-key request's CPU
/// in a profile).
#[derive(Default)]
pub(super) struct Wake(Option<watch::Sender<Option<Woke>>>);

impl Wake {
    pub(super) fn subscribe(&mut self) -> watch::Receiver<Option<Woke>> {
        self.0
            .get_or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Someone is still waiting for this claim's outcome.
    pub(super) fn waited(&self) -> bool {
        self.0.as_ref().is_some_and(|tx| tx.receiver_count() > 0)
    }

    pub(super) fn send(&self, woke: Woke) {
        if let Some(tx) = &self.0 {
            tx.send_replace(Some(woke));
        }
    }
}

/// Wakes on the holder's complete or release, or when its lease would end (then the
/// caller's next `begin` finds out whether it was renewed).
pub(super) fn waiter(
    id: RecordId,
    token: Token,
    rx: watch::Receiver<Option<Woke>>,
    expires: Option<Instant>,
) -> Waiter {
    // Outside a runtime (nothing to run a relay on), the waiter waits by itself.
    if tokio::runtime::Handle::try_current().is_err() {
        return Waiter::new(wait(rx, expires));
    }
    let group = join(id, token, rx, expires);
    Waiter::new(async move {
        loop {
            let notified = group.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(woke) = group.woke.get() {
                return woke.clone();
            }
            notified.await;
        }
    })
}

/// This thread's group for the claim, started (with its relay) by the first waiter.
fn join(
    id: RecordId,
    token: Token,
    rx: watch::Receiver<Option<Woke>>,
    expires: Option<Instant>,
) -> Arc<Group> {
    GROUPS.with(|groups| {
        let mut groups = groups.borrow_mut();
        // A group that already woke is never joined: its outcome may be stale for this
        // waiter (a lease that ended and was renewed since keeps its token), and joining it
        // would wake at once, with no yield, for as long as another waiter holds it.
        let found = groups.live.get(&(id, token)).and_then(Weak::upgrade);
        if let Some(group) = found.filter(|g| g.woke.get().is_none()) {
            return group;
        }
        if groups.live.len() >= groups.sweep_at {
            groups.live.retain(|_, g| g.strong_count() > 0);
            groups.sweep_at = (groups.live.len() * 2).max(64);
        }
        let group = Arc::new(Group::default());
        groups.live.insert((id, token), Arc::downgrade(&group));
        let relay = group.clone();
        tokio::spawn(async move {
            let _ = relay.woke.set(wait(rx, expires).await);
            relay.notify.notify_waiters();
        });
        group
    })
}

async fn wait(mut rx: watch::Receiver<Option<Woke>>, expires: Option<Instant>) -> Woke {
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
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::time::Duration;

    use super::*;

    fn claim(n: u8) -> (RecordId, Token) {
        (RecordId([n; 32]), Token([n; 16]))
    }

    /// Waiters on two single-threaded runtimes (as the serving threads are), woken by one
    /// send from a third thread: every one learns why, including one that joins after.
    #[test]
    fn every_waiter_on_every_thread_wakes_with_the_outcome() {
        let (id, token) = claim(1);
        let (tx, rx) = watch::channel(None);
        let ready = Arc::new(Barrier::new(3));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (rx, ready) = (rx.clone(), ready.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap(); // ok: test
                    rt.block_on(async move {
                        let waiters: Vec<_> = (0..100)
                            .map(|_| tokio::spawn(waiter(id, token, rx.clone(), None).wait()))
                            .collect();
                        // One waiter gives up early; the others still wake.
                        let quitter = waiter(id, token, rx.clone(), None);
                        drop(quitter);
                        tokio::task::yield_now().await;
                        ready.wait();
                        let mut woke = Vec::new();
                        for w in waiters {
                            woke.push(w.await.unwrap()); // ok: test
                        }
                        let late = waiter(id, token, rx, None).wait().await;
                        (woke, late)
                    })
                })
            })
            .collect();
        ready.wait();
        tx.send_replace(Some(Woke::Completed));
        for t in threads {
            let (woke, late) = t.join().unwrap(); // ok: test
            assert_eq!(woke.len(), 100);
            assert!(woke.iter().all(|w| *w == Woke::Completed), "{woke:?}");
            assert_eq!(late, Woke::Completed);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_that_ends_wakes_the_group_and_a_dropped_sender_releases() {
        let (id, token) = claim(2);
        let (_tx, rx) = watch::channel(None);
        let at = Instant::now() + Duration::from_secs(5);
        let a = tokio::spawn(waiter(id, token, rx.clone(), Some(at)).wait());
        let b = tokio::spawn(waiter(id, token, rx, Some(at)).wait());
        assert_eq!(a.await.unwrap(), Woke::LeaseExpired); // ok: test
        assert_eq!(b.await.unwrap(), Woke::LeaseExpired); // ok: test

        let (id, token) = claim(3);
        let (tx, rx) = watch::channel(None);
        let c = tokio::spawn(waiter(id, token, rx, None).wait());
        drop(tx);
        assert_eq!(c.await.unwrap(), Woke::Released); // ok: test
    }

    /// A lease that ended and was renewed keeps its token: a waiter that asks again gets a
    /// group of its own, not the one that already woke (which would wake it at once, again
    /// and again, for as long as another waiter still held that group).
    #[tokio::test(start_paused = true)]
    async fn after_a_lease_ends_a_waiter_asking_again_waits_afresh() {
        let (id, token) = claim(6);
        let (tx, rx) = watch::channel(None);
        let first_end = Instant::now() + Duration::from_secs(5);
        let a = waiter(id, token, rx.clone(), Some(first_end));
        let _b_not_yet_run = waiter(id, token, rx.clone(), Some(first_end));
        assert_eq!(a.wait().await, Woke::LeaseExpired);
        let renewed_end = Instant::now() + Duration::from_secs(5);
        let again = tokio::spawn(waiter(id, token, rx, Some(renewed_end)).wait());
        tokio::task::yield_now().await;
        assert!(!again.is_finished());
        tx.send_replace(Some(Woke::Completed));
        assert_eq!(again.await.unwrap(), Woke::Completed); // ok: test
    }

    /// Two claims on one id (the first completed, a new one taken) never share a group.
    #[tokio::test]
    async fn a_new_claim_on_the_same_id_gets_its_own_group() {
        let (id, first) = claim(4);
        let (tx1, rx1) = watch::channel(None);
        let w1 = waiter(id, first, rx1.clone(), None);
        // Still waiting, so the first claim's group is still alive.
        let _w1_too = waiter(id, first, rx1, None);
        tx1.send_replace(Some(Woke::Released));
        assert_eq!(w1.wait().await, Woke::Released);
        let (tx2, rx2) = watch::channel(None);
        let w2 = tokio::spawn(waiter(id, Token([9; 16]), rx2, None).wait());
        tokio::task::yield_now().await;
        assert!(!w2.is_finished());
        tx2.send_replace(Some(Woke::Completed));
        assert_eq!(w2.await.unwrap(), Woke::Completed); // ok: test
    }

    #[test]
    fn outside_a_runtime_a_waiter_waits_by_itself() {
        let (id, token) = claim(5);
        let (tx, rx) = watch::channel(None);
        let w = waiter(id, token, rx, None);
        tx.send_replace(Some(Woke::Completed));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(); // ok: test
        assert_eq!(rt.block_on(w.wait()), Woke::Completed);
    }
}
