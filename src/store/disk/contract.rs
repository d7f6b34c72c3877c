//! The store contract ([`Store`]) on the disk store's own operations.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::super::memory::ready;
use super::super::*;
use super::DiskStore;

impl Store for DiskStore {
    fn begin(
        self: Arc<Self>,
        id: RecordId,
        fingerprint: Fingerprint,
        lease: Option<Duration>,
    ) -> BoxFuture<'static, Result<Begin, StoreError>> {
        Box::pin(self.begin_now(id, fingerprint, lease, None))
    }

    fn begin_request(
        self: Arc<Self>,
        id: RecordId,
        fingerprint: Fingerprint,
        lease: Option<Duration>,
        if_orphaned: Option<Duration>,
    ) -> BoxFuture<'static, Result<Begin, StoreError>> {
        Box::pin(self.begin_now(id, fingerprint, lease, if_orphaned))
    }

    fn renew(
        self: Arc<Self>,
        id: RecordId,
        token: Token,
        lease: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        ready(self.renew_now(id, token, lease))
    }

    fn complete(
        self: Arc<Self>,
        id: RecordId,
        token: Token,
        record: Encoded,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(self.complete_now(id, token, record, ttl))
    }

    fn release(
        self: Arc<Self>,
        id: RecordId,
        token: Token,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        ready(self.release_now(id, token))
    }

    fn stats(&self) -> StoreStats {
        let state = self.lock();
        StoreStats {
            records: state.records,
            bytes: state.bytes,
            inflight: state.inflight.len() as u64,
            evicted_before_ttl: self.evicted_early.load(Ordering::Relaxed),
            lease_lost: self.lease_lost.load(Ordering::Relaxed),
        }
    }

    fn ready(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.syncer.failed()
    }

    fn claim_lease(&self) -> Option<Duration> {
        None
    }

    fn background(&self) -> &TaskTracker {
        &self.background
    }

    fn flush(&self) {
        if let Err(e) = self.flush_now() {
            tracing::warn!(error = %e, "the disk store could not flush its write buffers");
        }
    }
}
