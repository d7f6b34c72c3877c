//! How the disk store lays its data out in fjall keyspaces. Every value starts with the
//! fields the store needs without decoding the record; the record itself is the
//! contract's own encoding ([`Encoded`]), so a future record version is refused by the
//! same check as on every backend.
//!
//! - `records`: id → expires (ms since the epoch) · seq · encoded record
//! - `claims`: id → token · fingerprint · lease end (ms, 0 = held for the process's
//!   life) · ttl to record an unknown outcome with (`u64::MAX` = free it instead)
//! - `expiry`: expires (big-endian, so the keyspace is in time order) · id → ()
//! - `age`: seq (big-endian: oldest first) · id → stored size
//! - `meta`: `format` → this layout's version

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::super::{Fingerprint, RecordId, StoreError, Token};

/// The layout version this build writes; a directory written by a newer one is refused.
pub const FORMAT: u32 = 1;
pub const FORMAT_KEY: &[u8] = b"format";
/// When the store last compacted (written to make fjall drop the replaced tables).
pub const COMPACTED_KEY: &[u8] = b"compacted_at";

/// What a record costs beyond its encoded bytes: its key, value header and index
/// entries. Counted against `max_bytes` so the bound is about the disk, not the payload.
pub const RECORD_OVERHEAD: u64 = 160;

/// Wall-clock milliseconds: records outlive the process, so monotonic time cannot do.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("the disk store holds a damaged {what} entry"))
}

fn u64_at(v: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = v.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

pub struct RecordHead {
    pub expires_ms: u64,
    pub seq: u64,
}

pub fn record_value(head: &RecordHead, encoded: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + encoded.len());
    v.extend_from_slice(&head.expires_ms.to_le_bytes());
    v.extend_from_slice(&head.seq.to_le_bytes());
    v.extend_from_slice(encoded);
    v
}

/// The head and where the encoded record starts.
pub fn parse_record(v: &[u8]) -> Result<RecordHead, StoreError> {
    match (u64_at(v, 0), u64_at(v, 8)) {
        (Some(expires_ms), Some(seq)) if v.len() > 16 => Ok(RecordHead { expires_ms, seq }),
        _ => Err(corrupt("record")),
    }
}

pub const RECORD_BODY_AT: usize = 16;

pub struct ClaimValue {
    pub token: Token,
    pub fingerprint: Fingerprint,
    /// 0: held for as long as the process that made it lives.
    pub lease_until_ms: u64,
    pub if_orphaned: Option<Duration>,
}

pub fn claim_value(c: &ClaimValue) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&c.token.0);
    v.extend_from_slice(&c.fingerprint.0);
    v.extend_from_slice(&c.lease_until_ms.to_le_bytes());
    v.extend_from_slice(&c.if_orphaned.map_or(u64::MAX, ms).to_le_bytes());
    v
}

pub fn parse_claim(v: &[u8]) -> Result<ClaimValue, StoreError> {
    let token: [u8; 16] = v
        .get(..16)
        .and_then(|t| t.try_into().ok())
        .ok_or_else(|| corrupt("claim"))?;
    let fp: [u8; 32] = v
        .get(16..48)
        .and_then(|t| t.try_into().ok())
        .ok_or_else(|| corrupt("claim"))?;
    let (Some(lease_until_ms), Some(orphan), 64) = (u64_at(v, 48), u64_at(v, 56), v.len()) else {
        return Err(corrupt("claim"));
    };
    Ok(ClaimValue {
        token: Token(token),
        fingerprint: Fingerprint(fp),
        lease_until_ms,
        if_orphaned: (orphan != u64::MAX).then(|| Duration::from_millis(orphan)),
    })
}

/// A time- or seq-ordered index key: big-endian `n`, then the id.
pub fn index_key(n: u64, id: &RecordId) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..8].copy_from_slice(&n.to_be_bytes());
    k[8..].copy_from_slice(&id.0);
    k
}

pub fn parse_index_key(k: &[u8]) -> Result<(u64, RecordId), StoreError> {
    let n: [u8; 8] = k
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("index"))?;
    let id: [u8; 32] = k
        .get(8..)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("index"))?;
    Ok((u64::from_be_bytes(n), RecordId(id)))
}

pub fn parse_id(k: &[u8]) -> Result<RecordId, StoreError> {
    k.try_into().map(RecordId).map_err(|_| corrupt("key"))
}

pub fn size_value(size: u64) -> [u8; 8] {
    size.to_le_bytes()
}

pub fn parse_size(v: &[u8]) -> Result<u64, StoreError> {
    u64_at(v, 0).ok_or_else(|| corrupt("age"))
}
