#![allow(clippy::unwrap_used)]

use super::*;

/// Our count of a batch is never below fjall's own (the write buffer it reports),
/// whatever the sizes of keys and values, removals included.
#[test]
fn a_batch_counts_at_least_what_fjall_counts() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::builder(dir.path()).open().unwrap();
    let ks = super::super::open::keyspaces(&db).unwrap();
    let mut ours = 0;
    for (k, v) in [
        (0usize, 0usize),
        (1, 1),
        (32, 0),
        (32, 60),
        (40, 8),
        (32, 70_000),
    ] {
        let before = db.write_buffer_size();
        let mut batch = Batch::new(&db, &ks);
        for space in ALL {
            batch.insert(space, vec![7u8; k.max(1)], vec![1u8; v]);
            batch.remove(space, vec![9u8; k.max(1)]);
        }
        let grew = batch.commit().unwrap();
        let theirs = db.write_buffer_size() - before;
        let counted: u64 = grew.0.iter().sum();
        assert!(
            counted >= theirs,
            "key {k}, value {v}: counted {counted} < fjall's {theirs}"
        );
        ours += counted;
    }
    assert!(ours > 0);
}

/// What the journal replays at a start is in the memtables, uncounted: the start
/// rotates it out.
#[test]
fn the_start_rotates_what_the_journal_replayed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Database::builder(dir.path()).open().unwrap();
        let ks = super::super::open::keyspaces(&db).unwrap();
        let mut batch = Batch::new(&db, &ks);
        batch.insert(Space::Records, b"k".to_vec(), vec![1u8; 1000]);
        batch.commit().unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let db = loop {
        match Database::builder(dir.path()).open() {
            Ok(db) => break db,
            Err(_) => assert!(std::time::Instant::now() < deadline, "never reopened"),
        }
    };
    let ks = super::super::open::keyspaces(&db).unwrap();
    assert_eq!(
        ks.records.table_count() + ks.records.sealed_memtable_count(),
        0
    );
    assert!(ks.records.get(b"k").unwrap().is_some());
    let rotator = Rotator::start(ks.clone()).unwrap();
    assert!(ks.records.table_count() + ks.records.sealed_memtable_count() > 0);
    rotator.stop();
}

/// Crossing the mark makes a keyspace due once; the thread rotates it and starts
/// counting again.
#[test]
fn crossing_the_mark_rotates_the_keyspace() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::builder(dir.path()).open().unwrap();
    let ks = super::super::open::keyspaces(&db).unwrap();
    let rotator = Rotator::start(ks.clone()).unwrap();
    let value = vec![1u8; 64 << 10];
    let mut written = 0;
    let mut n = 0u32;
    while written < Space::Records.rotate_at() {
        let mut batch = Batch::new(&db, &ks);
        batch.insert(Space::Records, n.to_be_bytes().to_vec(), value.clone());
        n += 1;
        let grew = batch.commit().unwrap();
        written += grew.0[Space::Records as usize];
        rotator.grew(&grew);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ks.records.sealed_memtable_count() == 0 && ks.records.table_count() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the records were never rotated"
        );
        std::thread::yield_now();
    }
    assert_eq!(
        ks.claims.table_count() + ks.claims.sealed_memtable_count(),
        0
    );
    rotator.stop();
}
