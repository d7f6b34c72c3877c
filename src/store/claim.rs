//! The right to run the request for a record id. While held it renews its lease (about
//! every third of it); dropped without [`Claim::complete`] it releases the record so
//! waiters and retries run it again. A drop cannot await the network, so the release
//! runs on the store's tracked background tasks, drained at shutdown; should it fail,
//! the lease is the backstop.

use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Encoded, RecordId, Store, StoreError, Token};

pub struct Claim {
    store: Arc<dyn Store>,
    id: RecordId,
    token: Token,
    renewing: Option<CancellationToken>,
    done: bool,
}

impl Claim {
    /// Made by a backend's `begin`; starts renewing when the claim has a lease.
    pub fn new(store: Arc<dyn Store>, id: RecordId, token: Token, lease: Option<Duration>) -> Self {
        let renewing = lease.map(|lease| {
            let stop = CancellationToken::new();
            let renew = renew_while_held(store.clone(), id, token, lease, stop.clone());
            store.background().spawn(renew);
            stop
        });
        Claim {
            store,
            id,
            token,
            renewing,
            done: false,
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
        self.stop_renewing();
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
        self.stop_renewing();
        self.done = true;
        self.token
    }

    /// Explicit release (same as drop), for readability at call sites.
    pub fn release(self) {}

    fn stop_renewing(&mut self) {
        if let Some(stop) = self.renewing.take() {
            stop.cancel();
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.stop_renewing();
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
    stop: CancellationToken,
) {
    let every = (lease / 3).max(Duration::from_millis(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match store.clone().renew(id, token, lease).await {
            Ok(()) => {}
            Err(StoreError::LeaseLost) => {
                tracing::warn!(record = %id.short(), "lease lost while the upstream was still working");
                return;
            }
            Err(e) => {
                tracing::warn!(record = %id.short(), error = %e, "lease renewal failed; retrying")
            }
        }
    }
}
