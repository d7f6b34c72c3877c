//! The store contract every backend keeps, so the proxy and the record API behave the
//! same on each (memory, Redis). One atomic step ([`Store::begin`]) decides a request's
//! fate. An in-flight record is a lease held by an opaque random [`Token`] the backend
//! made; only its owner may [`Store::renew`], [`Store::complete`] or [`Store::release`]
//! it, and an owner whose lease lapsed gets [`StoreError::LeaseLost`], never a silent
//! overwrite. Records travel as one byte encoding ([`record::Encoded`]) with a relative
//! ttl, so no replica ever compares clocks.
//!
//! - [`record`]: the record and its encoding.
//! - [`claim`]: the [`Claim`] guard: renews while its holder polls `keep_alive`, releases in
//!   the background on drop.
//! - [`memory`], [`redis`], [`disk`]: the backends.

pub mod claim;
pub mod disk;
mod fanout;
pub mod memory;
pub mod record;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

pub use claim::Claim;
pub use memory::MemoryStore;
pub use record::{Encoded, Record};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// blake3 of the scope header values and the key: the raw key is never kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordId(pub [u8; 32]);

impl RecordId {
    /// Enough of the id to correlate log lines, never enough to recover anything.
    pub fn short(&self) -> String {
        hex(&self.0[..6])
    }

    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

/// blake3 over the request parts the route's `fingerprint` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

/// The owner of an in-flight record: random, made by the backend, so that no two
/// replicas (or processes over time) can ever hold the same one.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub [u8; 16]);

impl Token {
    /// Unpredictable and never repeated: a keyed blake3 of a counter, the key drawn from
    /// the OS once per process (a getrandom syscall per claim showed on the miss path).
    pub fn random() -> Result<Self, StoreError> {
        static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let key = match KEY.get() {
            Some(k) => *k,
            None => {
                // A failure is not remembered: the next claim asks the OS again.
                let mut k = [0u8; 32];
                getrandom::fill(&mut k)
                    .map_err(|e| StoreError::Unavailable(format!("no randomness: {e}")))?;
                *KEY.get_or_init(|| k)
            }
        };
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let hash = blake3::keyed_hash(&key, &n.to_le_bytes());
        let mut t = [0u8; 16];
        t.copy_from_slice(&hash.as_bytes()[..16]);
        Ok(Token(t))
    }

    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 32 {
            return None;
        }
        let mut t = [0u8; 16];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).ok()?;
            t[i] = u8::from_str_radix(text, 16).ok()?;
        }
        Some(Token(t))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A lock token is a credential for the record API: never in a log line.
        f.write_str("Token(…)")
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

/// Appends the lowercase hex of `bytes`: a Redis call renders several ids and tokens,
/// and a `char` at a time this was ~4% of a Redis miss's instructions.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 64];
    for chunk in bytes.chunks(buf.len() / 2) {
        for (pair, b) in buf.chunks_exact_mut(2).zip(chunk) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 0xf)];
        }
        let digits = &buf[..chunk.len() * 2];
        // Always ASCII; the check is a fast scan.
        out.push_str(std::str::from_utf8(digits).unwrap_or_default());
    }
}

/// Why a store call failed. Only `Unavailable` is subject to `store.on_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time.
    Unavailable(String),
    /// The caller's lease lapsed (or was never held): another may own the record now.
    LeaseLost,
    /// What the store holds cannot be read (damaged, or written by a newer idemgate).
    Corrupt(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "store unavailable: {why}"),
            StoreError::LeaseLost => {
                f.write_str("lease lost: the in-flight record is no longer ours")
            }
            StoreError::Corrupt(why) => write!(f, "store holds an unreadable record: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Why a waiter woke; it goes back to [`Store::begin`], which decides, unless it was
/// handed the record itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Woke {
    Completed,
    /// Completed, and this is the record: a storm's waiters replay it without each
    /// asking the store again (the memory store; others send `Completed`).
    Recorded(Arc<Record>),
    Released,
    /// The holder's lease ended without completion (it may have died), or the waiter's
    /// bounded poll found the holder gone.
    LeaseExpired,
    Failed(StoreError),
}

/// Resolves when an in-flight record completes, is released or its lease ends.
pub struct Waiter(BoxFuture<'static, Woke>);

impl Waiter {
    pub fn new(fut: impl Future<Output = Woke> + Send + 'static) -> Self {
        Waiter(Box::pin(fut))
    }

    pub async fn wait(self) -> Woke {
        self.0.await
    }
}

/// What the store found for a record id.
pub enum Begin {
    /// Nothing was there: this caller runs, and must complete or drop the claim.
    Claimed(Claim),
    /// Another request with this id is running.
    InFlight {
        fingerprint: Fingerprint,
        waiter: Waiter,
        /// How long the holder's lease has left, when it has one.
        lease_left: Option<Duration>,
    },
    Completed(Record),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub records: u64,
    pub bytes: u64,
    pub inflight: u64,
    pub evicted_before_ttl: u64,
    /// Owners that found their lease gone when they renewed, completed or released.
    pub lease_lost: u64,
}

/// A store backend. Every async call takes `Arc<Self>` so its future owns what it needs
/// and can run on a background task (a dropped claim's release) or beside other work (a
/// lease renewal).
pub trait Store: Send + Sync + 'static {
    /// The atomic step: a completed record, an in-flight one to wait for, or a claim.
    /// `lease` bounds the claim's life unless renewed; `None` lets it live as long as
    /// this process (the memory store's proxy claims).
    fn begin(
        self: Arc<Self>,
        id: RecordId,
        fingerprint: Fingerprint,
        lease: Option<Duration>,
    ) -> BoxFuture<'static, Result<Begin, StoreError>>;
    /// [`Store::begin`] for a proxy request, also saying what its claim becomes if this
    /// process dies holding it: `Some(ttl)` records the unknown outcome (SPEC §3 step 8)
    /// for `ttl`, `None` frees it. Only a store whose claims outlive the process (disk)
    /// needs to know; the others' claims end with their holder.
    fn begin_request(
        self: Arc<Self>,
        id: RecordId,
        fingerprint: Fingerprint,
        lease: Option<Duration>,
        if_orphaned: Option<Duration>,
    ) -> BoxFuture<'static, Result<Begin, StoreError>> {
        let _ = if_orphaned;
        self.begin(id, fingerprint, lease)
    }
    fn renew(
        self: Arc<Self>,
        id: RecordId,
        token: Token,
        lease: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>>;
    /// Stores `record` for `ttl` and frees the claim, if `token` still owns it.
    fn complete(
        self: Arc<Self>,
        id: RecordId,
        token: Token,
        record: Encoded,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>>;
    fn release(
        self: Arc<Self>,
        id: RecordId,
        token: Token,
    ) -> BoxFuture<'static, Result<(), StoreError>>;
    /// Counters held by the backend: a scrape never waits on the network.
    fn stats(&self) -> StoreStats;
    /// From the backend's own background check; never a blocking call.
    fn ready(&self) -> bool;
    /// The lease proxy claims take, renewed while the upstream works.
    fn claim_lease(&self) -> Option<Duration>;
    /// Releases of dropped claims run here (and a backend's own chores); drained at
    /// shutdown. Leases are renewed by their holders (`Claim::keep_alive`).
    fn background(&self) -> &TaskTracker;
    /// Called once at shutdown, after the last write: a store with write buffers moves
    /// them to its files, so the next start has nothing to replay. Blocking.
    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_renders_every_byte_across_chunks() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        // Longer than one 32-byte chunk: every byte value, in order.
        let all: Vec<u8> = (0..=255).collect();
        let expected: String = all.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&all), expected);
        let mut out = String::from("k:");
        push_hex(&mut out, &all[..33]);
        assert_eq!(out, format!("k:{}", &expected[..66]));
    }
}
