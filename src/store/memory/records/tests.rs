use std::time::Duration;

use bytes::Bytes;

use super::*;

fn id(n: u8) -> RecordId {
    RecordId([n; 32])
}

fn bytes(len: usize) -> Encoded {
    Encoded::from_stored(Bytes::from(vec![b'r'; len]))
}

const LATER: Duration = Duration::from_secs(3600);

#[tokio::test(start_paused = true)]
async fn the_oldest_record_goes_first_and_counts_as_early() {
    let mut r = Records::new(250, 0);
    let now = Instant::now();
    for n in 0..3 {
        r.insert(id(n), bytes(100), now + LATER, now);
    }
    assert_eq!((r.len(), r.bytes(), r.evicted_early()), (2, 200, 1));
    assert!(r.get_live(&id(0), now).is_none());
    assert!(r.get_live(&id(1), now).is_some() && r.get_live(&id(2), now).is_some());
}

#[tokio::test(start_paused = true)]
async fn a_record_heavier_than_the_bound_is_not_kept_and_evicts_nothing() {
    let mut r = Records::new(250, 0);
    let now = Instant::now();
    r.insert(id(1), bytes(100), now + LATER, now);
    r.insert(id(2), bytes(300), now + LATER, now);
    assert_eq!((r.len(), r.bytes(), r.evicted_early()), (1, 100, 1));
    assert!(r.get_live(&id(1), now).is_some() && r.get_live(&id(2), now).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_record_replays_until_its_full_ttl() {
    let mut r = Records::new(1 << 20, 0);
    tokio::time::advance(Duration::from_micros(300)).await;
    let now = Instant::now();
    r.insert(id(1), bytes(1), now + Duration::from_millis(5), now);
    tokio::time::advance(Duration::from_micros(4_900)).await;
    assert!(r.get_live(&id(1), Instant::now()).is_some());
    tokio::time::advance(Duration::from_micros(100)).await;
    assert!(r.get_live(&id(1), Instant::now()).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_record_replaced_under_its_id_is_counted_once() {
    let mut r = Records::new(1000, 10);
    let now = Instant::now();
    r.insert(id(1), bytes(100), now + LATER, now);
    r.insert(id(1), bytes(50), now + LATER, now);
    assert_eq!((r.len(), r.bytes()), (1, 60));
    assert_eq!(r.get_live(&id(1), now).map(Encoded::weight), Some(50));
}

#[tokio::test(start_paused = true)]
async fn expired_records_stop_replaying_and_the_sweep_frees_them() {
    let mut r = Records::new(1 << 20, 0);
    let now = Instant::now();
    for n in 0..100 {
        let ttl = if n % 2 == 0 {
            Duration::from_secs(1)
        } else {
            LATER
        };
        r.insert(id(n), bytes(10), now + ttl, now);
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    let later = Instant::now();
    assert!(r.get_live(&id(0), later).is_none());
    assert!(r.get_live(&id(1), later).is_some());
    r.sweep(later, 100);
    assert_eq!((r.len(), r.bytes()), (50, 500));
    // Nothing expired was counted as evicted early, and freed slots are reused.
    assert_eq!(r.evicted_early(), 0);
    r.insert(id(200), bytes(10), later + LATER, later);
    assert_eq!(r.used, 100);
}

/// A claim's begin looks its id up once, and its complete then adds the record
/// without looking again: the lookup must have freed an expired record.
#[tokio::test(start_paused = true)]
async fn an_expired_record_looked_up_is_freed_so_its_id_takes_a_new_one() {
    let mut r = Records::new(1 << 20, 0);
    let now = Instant::now();
    r.insert(id(1), bytes(10), now + Duration::from_secs(1), now);
    tokio::time::advance(Duration::from_secs(2)).await;
    let later = Instant::now();
    assert!(r.get_live(&id(1), later).is_none());
    assert_eq!((r.len(), r.bytes()), (0, 0));
    r.insert_new(id(1), bytes(20), later + LATER, later);
    assert_eq!(r.get_live(&id(1), later).map(Encoded::weight), Some(20));
    assert_eq!((r.len(), r.bytes(), r.evicted_early()), (1, 20, 0));
}

#[tokio::test(start_paused = true)]
async fn records_across_chunks_are_found_evicted_and_reused() {
    let mut r = Records::new(1 << 30, 0);
    let now = Instant::now();
    let id = |n: u32| {
        let mut b = [0; 32];
        b[..4].copy_from_slice(&n.to_le_bytes());
        RecordId(b)
    };
    let n = 3 * CHUNK as u32 + 5;
    for i in 0..n {
        r.insert(id(i), bytes(1), now + LATER, now);
    }
    assert!((0..n).all(|i| r.get_live(&id(i), now).is_some()));
    r.max_bytes = CHUNK as u64;
    r.insert(id(n), bytes(1), now + LATER, now);
    assert_eq!(r.len(), CHUNK as u64);
    assert!(r.get_live(&id(n - CHUNK as u32), now).is_none());
    assert!(r.get_live(&id(n - CHUNK as u32 + 1), now).is_some());
    // The evicted slots are taken again before a fresh one.
    assert_eq!(r.used, n as usize + 1);
    r.insert(id(n + 1), bytes(1), now + LATER, now);
    assert_eq!(r.used, n as usize + 1);
}

#[tokio::test(start_paused = true)]
async fn eviction_after_removals_keeps_completion_order() {
    let mut r = Records::new(1 << 20, 0);
    let now = Instant::now();
    for n in 0..5 {
        r.insert(id(n), bytes(10), now + LATER, now);
    }
    r.remove(&id(0));
    r.remove(&id(2));
    r.remove(&id(4));
    r.max_bytes = 10;
    r.insert(id(9), bytes(10), now + LATER, now);
    assert_eq!(r.len(), 1);
    assert!(r.get_live(&id(9), now).is_some());
    assert_eq!(r.evicted_early(), 2);
}
