//! Opening a disk store: the directory and its lock, the format check, the byte count,
//! and the claims a process that died left behind (SPEC §3 step 8: unknown outcomes).

use fjall::config::{PartitioningPolicy, PinningPolicy};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::path::Path;

use super::super::{Encoded, Fingerprint, RecordId, StoreError};
use super::layout::{self, ClaimValue, RecordHead};
use super::rotate::{Batch, Space};

/// The record that stands for a request whose process died before the upstream
/// answered: made by the proxy (the 502 it would have recorded), kept by the store.
pub type OrphanRecord = Box<dyn Fn(Fingerprint) -> Result<Encoded, StoreError> + Send + Sync>;

/// Block cache and write buffers: what the store may hold in memory, whatever its size
/// on disk.
const CACHE_BYTES: u64 = 16 << 20;
pub const RECORDS_MEMTABLE: u64 = 8 << 20;
pub const INDEX_MEMTABLE: u64 = 2 << 20;
/// fjall's smallest journal budget.
const JOURNAL_BYTES: u64 = 64 << 20;

#[derive(Clone)]
pub struct Keyspaces {
    pub records: Keyspace,
    pub claims: Keyspace,
    pub expiry: Keyspace,
    pub age: Keyspace,
    pub meta: Keyspace,
}

impl Keyspaces {
    pub fn get(&self, space: Space) -> &Keyspace {
        match space {
            Space::Records => &self.records,
            Space::Claims => &self.claims,
            Space::Expiry => &self.expiry,
            Space::Age => &self.age,
            Space::Meta => &self.meta,
        }
    }

    /// Adds a record and its index entries to `batch`; returns the bytes it counts for.
    pub fn put_record(
        &self,
        batch: &mut Batch,
        id: &RecordId,
        head: &RecordHead,
        encoded: &Encoded,
    ) -> u64 {
        let size = encoded.weight() + layout::RECORD_OVERHEAD;
        let value = layout::record_value(head, encoded.as_bytes());
        batch.insert(Space::Records, id.0, value);
        batch.insert(Space::Expiry, layout::index_key(head.expires_ms, id), []);
        let age = layout::index_key(head.seq, id);
        batch.insert(Space::Age, age, layout::size_value(size));
        size
    }

    /// Removes from `batch` the index entries of the record `id` holds now (an expired
    /// one being replaced); returns its size, 0 if there is none.
    pub fn unindex(&self, batch: &mut Batch, id: &RecordId) -> Result<u64, StoreError> {
        let Some(v) = self.records.get(id.0).map_err(unreadable)? else {
            return Ok(0);
        };
        let head = layout::parse_record(&v)?;
        let size = (v.len() - layout::RECORD_BODY_AT) as u64 + layout::RECORD_OVERHEAD;
        batch.remove(Space::Expiry, layout::index_key(head.expires_ms, id));
        batch.remove(Space::Age, layout::index_key(head.seq, id));
        Ok(size)
    }
}

pub struct Opened {
    pub db: Database,
    pub ks: Keyspaces,
    pub bytes: u64,
    pub records: u64,
    pub next_seq: u64,
    /// Record-API locks still within their lease: their workers may be alive.
    pub leased: Vec<(RecordId, ClaimValue)>,
}

pub fn open(path: &Path, orphan: &OrphanRecord) -> Result<Opened, String> {
    let shown = path.display();
    std::fs::create_dir_all(path)
        .map_err(|e| format!("cannot create the disk store directory {shown}: {e}"))?;
    let db = Database::builder(path)
        .cache_size(CACHE_BYTES)
        .max_journaling_size(JOURNAL_BYTES)
        .open()
        .map_err(|e| open_error(path, e))?;
    let ks = keyspaces(&db).map_err(|e| open_error(path, e))?;
    check_format(&ks, path)?;
    let (bytes, records, next_seq) = count(&ks).map_err(|e| format!("disk store {shown}: {e}"))?;
    let mut opened = Opened {
        db,
        ks,
        bytes,
        records,
        next_seq,
        leased: Vec::new(),
    };
    recover_claims(&mut opened, orphan).map_err(|e| format!("disk store {shown}: {e}"))?;
    opened
        .db
        .persist(PersistMode::SyncAll)
        .map_err(|e| format!("disk store {shown}: cannot sync: {e}"))?;
    Ok(opened)
}

pub(super) fn keyspaces(db: &Database) -> fjall::Result<Keyspaces> {
    // Index and filter blocks are partitioned and go through the block cache instead of
    // being held whole in memory, where they grow with the records on disk (measured
    // +42 MiB RSS at 1M records with fjall's defaults).
    let sized = |bytes| {
        move || {
            KeyspaceCreateOptions::default()
                .max_memtable_size(bytes)
                .index_block_pinning_policy(PinningPolicy::all(false))
                .filter_block_pinning_policy(PinningPolicy::all(false))
                .index_block_partitioning_policy(PartitioningPolicy::all(true))
                .filter_block_partitioning_policy(PartitioningPolicy::all(true))
        }
    };
    Ok(Keyspaces {
        records: db.keyspace("records", sized(RECORDS_MEMTABLE))?,
        claims: db.keyspace("claims", sized(INDEX_MEMTABLE))?,
        expiry: db.keyspace("expiry", sized(INDEX_MEMTABLE))?,
        age: db.keyspace("age", sized(INDEX_MEMTABLE))?,
        meta: db.keyspace("meta", sized(INDEX_MEMTABLE))?,
    })
}

fn open_error(path: &Path, e: fjall::Error) -> String {
    let shown = path.display();
    match e {
        fjall::Error::Locked => format!(
            "the disk store {shown} is in use by another idemgate process (one process per store.path)"
        ),
        fjall::Error::Io(io) => format!("cannot open the disk store {shown}: {io}"),
        fjall::Error::InvalidVersion(Some(v)) => format!(
            "the disk store {shown} was written in a storage format this idemgate cannot read ({v:?})"
        ),
        fjall::Error::InvalidVersion(None) => format!(
            "the disk store {shown} is damaged or truncated: its version file is unreadable"
        ),
        other => format!("the disk store {shown} is damaged or truncated: {other}"),
    }
}

fn check_format(ks: &Keyspaces, path: &Path) -> Result<(), String> {
    let shown = path.display();
    let read = |e: fjall::Error| format!("the disk store {shown} cannot be read: {e}");
    let meta = &ks.meta;
    match meta.get(layout::FORMAT_KEY).map_err(read)? {
        Some(v) => {
            let version = <[u8; 4]>::try_from(&v[..])
                .map(u32::from_le_bytes)
                .map_err(|_| format!("the disk store {shown} has a damaged format marker"))?;
            if version > layout::FORMAT {
                return Err(format!(
                    "the disk store {shown} was written by a newer idemgate (format {version}; this one reads format {} and older)",
                    layout::FORMAT
                ));
            }
            Ok(())
        }
        None if ks.records.is_empty().map_err(read)? && ks.claims.is_empty().map_err(read)? => meta
            .insert(layout::FORMAT_KEY, layout::FORMAT.to_le_bytes())
            .map_err(read),
        None => Err(format!(
            "the disk store {shown} holds records but no format marker: damaged, or not idemgate's"
        )),
    }
}

/// Bytes, records and the next sequence number, from the age index.
fn count(ks: &Keyspaces) -> Result<(u64, u64, u64), StoreError> {
    let (mut bytes, mut records, mut last) = (0u64, 0u64, 0u64);
    for entry in ks.age.iter() {
        let (k, v) = entry.into_inner().map_err(unreadable)?;
        let (seq, _) = layout::parse_index_key(&k)?;
        bytes += layout::parse_size(&v)?;
        records += 1;
        last = last.max(seq);
    }
    Ok((bytes, records, last + 1))
}

pub fn unreadable(e: fjall::Error) -> StoreError {
    StoreError::Unavailable(format!("disk store: {e}"))
}

fn recover_claims(o: &mut Opened, orphan: &OrphanRecord) -> Result<(), StoreError> {
    let now = layout::now_ms();
    let ks = o.ks.clone();
    let mut batch = Batch::new(&o.db, &ks);
    let (mut recorded, mut freed) = (0u64, 0u64);
    for entry in o.ks.claims.iter() {
        let (k, v) = entry.into_inner().map_err(unreadable)?;
        let id = layout::parse_id(&k)?;
        let claim = layout::parse_claim(&v)?;
        let keep = claim.lease_until_ms > now;
        if !keep {
            batch.remove(Space::Claims, k);
        }
        match (claim.lease_until_ms, claim.if_orphaned) {
            (0, Some(ttl)) => {
                let encoded = orphan(claim.fingerprint)?;
                let head = RecordHead {
                    expires_ms: now.saturating_add(layout::ms(ttl)),
                    seq: o.next_seq,
                };
                o.next_seq += 1;
                // An expired record the sweep had not removed yet: replaced, not doubled.
                let replaced = ks.unindex(&mut batch, &id)?;
                o.bytes = o.bytes.saturating_sub(replaced);
                o.records -= u64::from(replaced > 0 && o.records > 0);
                o.bytes += ks.put_record(&mut batch, &id, &head, &encoded);
                o.records += 1;
                recorded += 1;
            }
            _ if keep => o.leased.push((id, claim)),
            _ => freed += 1,
        }
    }
    batch.commit().map_err(unreadable)?;
    if recorded + freed > 0 {
        tracing::warn!(
            recorded,
            freed,
            "requests were in flight when the last process stopped: their outcome is unknown; recorded as 502 where store_statuses holds 5xx, freed otherwise"
        );
    }
    Ok(())
}
