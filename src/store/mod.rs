//! Records and the store they live in. One atomic step ([`Store::begin`]) decides a
//! request's fate; an in-flight claim is a [`Claim`] guard whose drop releases it, so a
//! failed or cancelled exchange never leaves a key locked.

pub mod memory;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use tokio::sync::watch;

pub use memory::MemoryStore;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// blake3 of the scope header values and the key: the raw key is never kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordId(pub [u8; 32]);

impl RecordId {
    /// Enough of the id to correlate log lines, never enough to recover anything.
    pub fn short(&self) -> String {
        self.0[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// blake3 over the request parts the route's `fingerprint` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

/// A completed exchange as it will be replayed.
#[derive(Debug, Clone)]
pub struct Record {
    pub fingerprint: Fingerprint,
    pub status: StatusCode,
    /// End-to-end headers only; hop-by-hop ones never reach a record.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// `None` when the body was larger than `max_stored_response` (retries get 410).
    pub body: Option<Bytes>,
    /// On the tokio clock, so paused-time tests see expiry.
    pub expires_at: tokio::time::Instant,
}

impl Record {
    /// Bytes this record holds, as counted against `store.max_bytes`.
    pub fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 8)
            .sum();
        (self.body.as_ref().map_or(0, |b| b.len()) + headers + 128) as u64
    }
}

/// What the store found for a record id.
pub enum Begin {
    /// Nothing was there: this request runs, and must complete or drop the claim.
    Claimed(Claim),
    /// Another request with this id is running.
    InFlight {
        fingerprint: Fingerprint,
        waiter: Waiter,
    },
    Completed(Arc<Record>),
}

/// Resolves when an in-flight claim completes or is released.
pub struct Waiter(pub(crate) watch::Receiver<()>);

impl Waiter {
    pub async fn wait(mut self) {
        // The claim's sender is dropped on complete or release; that is the wake-up.
        while self.0.changed().await.is_ok() {}
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "store error: {}", self.0)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub records: u64,
    pub bytes: u64,
    pub inflight: u64,
    pub evicted_before_ttl: u64,
    /// Leases lost while still held; always 0 on the memory store (claims cannot expire).
    pub lease_lost: u64,
}

/// A store backend. Claims hold an `Arc` of it so their drop can release.
pub trait Store: Send + Sync + 'static {
    fn begin(
        self: Arc<Self>,
        id: RecordId,
        fingerprint: Fingerprint,
    ) -> BoxFuture<'static, Result<Begin, StoreError>>;
    fn complete(
        &self,
        id: RecordId,
        owner: u64,
        record: Record,
    ) -> BoxFuture<'_, Result<(), StoreError>>;
    fn release(&self, id: RecordId, owner: u64);
    fn stats(&self) -> StoreStats;
}

/// The right to run the request for `id`. Dropping it without [`Claim::complete`]
/// releases the id so that waiters (and retries) run it again.
pub struct Claim {
    store: Arc<dyn Store>,
    id: RecordId,
    owner: u64,
    done: bool,
}

impl Claim {
    pub(crate) fn new(store: Arc<dyn Store>, id: RecordId, owner: u64) -> Self {
        Claim {
            store,
            id,
            owner,
            done: false,
        }
    }

    pub fn id(&self) -> RecordId {
        self.id
    }

    pub async fn complete(mut self, record: Record) -> Result<(), StoreError> {
        self.done = true;
        let result = self.store.complete(self.id, self.owner, record).await;
        if result.is_err() {
            self.store.release(self.id, self.owner);
        }
        result
    }

    /// Explicit release (same as drop), for readability at call sites.
    pub fn release(self) {}
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.done {
            self.store.release(self.id, self.owner);
        }
    }
}
