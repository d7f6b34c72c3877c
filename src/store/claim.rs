//! The right to run the request for a record id. Its holder runs [`Claim::keep_alive`]
//! beside the work, which renews the lease (about every third of it); dropped without
//! [`Claim::complete`] it releases the record so waiters and retries run it again. A
//! drop cannot await the network, so the release runs on the store's tracked background
//! tasks, drained at shutdown; should it fail, the lease is the backstop.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use super::{Encoded, RecordId, Store, StoreError, Token};

pub struct Claim {
    store: Arc<dyn Store>,
    id: RecordId,
    token: Token,
    lease: Option<Duration>,
    done: bool,
}

impl Claim {
    /// Made by a backend's `begin`; `lease` is how long the store keeps it unrenewed.
    pub fn new(store: Arc<dyn Store>, id: RecordId, token: Token, lease: Option<Duration>) -> Self {
        Claim {
            store,
            id,
            token,
            lease,
            done: false,
        }
    }

    /// Renews the lease for as long as it is polled, so the holder runs it beside its
    /// work (`select!`) and a claim costs no task of its own (a renewing task per Redis
    /// miss was ~4% of its instructions). Never finishes; with no lease, never wakes. A
    /// claim with a lease that nobody keeps alive lapses when the lease ends.
    pub fn keep_alive(&self) -> impl Future<Output = Infallible> + Send + 'static {
        let renewal = self
            .lease
            .map(|lease| (self.store.clone(), self.id, self.token, lease));
        async move {
            match renewal {
                Some((store, id, token, lease)) => renew_while_held(store, id, token, lease).await,
                None => std::future::pending().await,
            }
        }
    }

    pub fn id(&self) -> RecordId {
        self.id
    }

    pub fn token(&self) -> Token {
        self.token
    }

    /// Records `record` for `ttl` if the lease is still ours. On any failure but a lost
    /// lease the claim is released, so the key is not left locked.
    pub async fn complete(mut self, record: Encoded, ttl: Duration) -> Result<(), StoreError> {
        let result = self
            .store
            .clone()
            .complete(self.id, self.token, record, ttl)
            .await;
        self.done = !matches!(
            result,
            Err(StoreError::Unavailable(_)) | Err(StoreError::Corrupt(_))
        );
        result
    }

    /// Keeps the record locked after this guard is gone: the record API hands the token
    /// to a worker, and the lease (renewed by the worker) is the lock.
    pub fn detach(mut self) -> Token {
        self.done = true;
        self.token
    }

    /// Explicit release (same as drop), for readability at call sites.
    pub fn release(self) {}
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut release = self.store.clone().release(self.id, self.token);
        // The memory store answers at once; only a network store needs a task.
        let mut cx = Context::from_waker(Waker::noop());
        if release.as_mut().poll(&mut cx) == Poll::Pending {
            self.store.background().spawn(release);
        }
    }
}

async fn renew_while_held(
    store: Arc<dyn Store>,
    id: RecordId,
    token: Token,
    lease: Duration,
) -> Infallible {
    let every = (lease / 3).max(Duration::from_millis(1));
    loop {
        tokio::time::sleep(every).await;
        match store.clone().renew(id, token, lease).await {
            Ok(()) => {}
            Err(StoreError::LeaseLost) => {
                tracing::warn!(record = %id.short(), "lease lost while the upstream was still working");
                return std::future::pending().await;
            }
            Err(e) => {
                tracing::warn!(record = %id.short(), error = %e, "lease renewal failed; retrying")
            }
        }
    }
}
