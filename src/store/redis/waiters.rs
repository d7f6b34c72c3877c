//! Waiters on any replica: a local registry woken by the `events` channel, with a bounded
//! poll of the lock as the fallback (which also notices a dead holder's lease ending).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::conn::OP_TIMEOUT;
use super::{unavailable, RedisStore};
use crate::store::{RecordId, Woke};

/// How often a waiter re-checks the holder when no message arrives.
const WAIT_POLL: Duration = Duration::from_millis(250);

/// How long a waiter's `:w` mark lasts; each poll renews it, so it outlives the waiter
/// by at most this.
pub(super) const WAITING_MS: u64 = 4 * WAIT_POLL.as_millis() as u64;

impl RedisStore {
    /// Waits for a message about `id`, re-checking the lock every [`WAIT_POLL`].
    pub(super) async fn wait(self: Arc<Self>, id: RecordId) -> Woke {
        let mut rx = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            waiters
                .entry(id)
                .or_insert_with(|| watch::channel(None).0)
                .subscribe()
        };
        let _unregister = Unregister {
            store: &self,
            id,
            rx: rx.clone(),
        };
        let keys = self.keys(id);
        let (lock, waiting) = (keys.lock(), keys.waiting());
        loop {
            // Subscribed first, then checked: a completion in between is not missed.
            let mut conn = match self.conn() {
                Ok(c) => c,
                Err(e) => return Woke::Failed(e),
            };
            // The mark first, best effort (a refused write only costs the message).
            let mut mark = ::redis::cmd("SET");
            mark.arg(waiting).arg("1").arg("PX").arg(WAITING_MS);
            let _ = tokio::time::timeout(OP_TIMEOUT, mark.query_async::<()>(&mut conn)).await;
            let mut cmd = ::redis::cmd("EXISTS");
            cmd.arg(lock);
            let exists = tokio::time::timeout(OP_TIMEOUT, cmd.query_async::<i64>(&mut conn)).await;
            match exists {
                Ok(Ok(0)) => return Woke::LeaseExpired,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Woke::Failed(unavailable(e)),
                Err(_) => return Woke::Failed(unavailable("no answer")),
            }
            let woke = tokio::time::timeout(WAIT_POLL, rx.wait_for(Option::is_some))
                .await
                .map(|r| r.map(|w| w.clone()));
            match woke {
                Ok(Ok(woke)) => return woke.unwrap_or(Woke::Released),
                // The channel is gone (delivered to someone else): poll, never spin.
                Ok(Err(_)) => tokio::time::sleep(WAIT_POLL).await,
                Err(_) => {}
            }
        }
    }

    /// Delivers `events` messages (`<hex id>:c` or `:r`) to local waiters; reconnects
    /// with back-off. The waiters' own polling covers any gap.
    pub(super) async fn subscribe(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if let Err(e) = self.listen().await {
                tracing::debug!(error = %e, "store subscription lost; reconnecting");
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn listen(&self) -> ::redis::RedisResult<()> {
        use futures_util::StreamExt;
        let client = self.client(&self.urls[0])?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&self.channel).await?;
        let mut messages = pubsub.on_message();
        loop {
            let msg = tokio::select! {
                m = messages.next() => m,
                _ = self.stop.cancelled() => return Ok(()),
            };
            let Some(msg) = msg else { return Ok(()) };
            self.deliver(msg.get_payload_bytes());
        }
    }

    fn deliver(&self, payload: &[u8]) {
        let Some((id, kind)) = std::str::from_utf8(payload)
            .ok()
            .and_then(|p| p.split_once(':'))
        else {
            return;
        };
        let Some(id) = parse_id(id) else { return };
        let woke = if kind == "c" {
            Woke::Completed
        } else {
            Woke::Released
        };
        let tx = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(tx) = tx {
            tx.send_replace(Some(woke));
        }
    }
}

/// Drops a waiter's registration when it is the last one on its own channel (a newer
/// channel for the same id, made after this one was delivered, is left alone).
struct Unregister<'a> {
    store: &'a RedisStore,
    id: RecordId,
    rx: watch::Receiver<Option<Woke>>,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        let mut waiters = self.store.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let ours_and_last = waiters.get(&self.id).is_some_and(|tx| {
            // This guard and the waiter's own receiver are the last two.
            self.rx.same_channel(&tx.subscribe()) && tx.receiver_count() <= 3
        });
        if ours_and_last {
            waiters.remove(&self.id);
        }
    }
}

pub(super) fn parse_id(hex_id: &str) -> Option<RecordId> {
    let bytes = hex_id.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut id = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        id[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(RecordId(id))
}
