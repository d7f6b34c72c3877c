//! The memory store under pressure: the byte bound holds at every step, in-flight claims
//! are never evicted, and early evictions are counted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use idemgate::store::{Begin, Fingerprint, MemoryStore, Record, RecordId, Store};

fn id(n: u64) -> RecordId {
    RecordId(*blake3::hash(&n.to_le_bytes()).as_bytes())
}

const FP: Fingerprint = Fingerprint([7; 32]);

fn record(body: Bytes) -> Record {
    Record {
        fingerprint: FP,
        status: StatusCode::CREATED,
        headers: vec![(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        )],
        body: Some(body),
        expires_at: tokio::time::Instant::now() + Duration::from_secs(3600),
    }
}

async fn claim(store: &Arc<MemoryStore>, n: u64) -> idemgate::store::Claim {
    match store.clone().begin(id(n), FP).await.unwrap() {
        Begin::Claimed(c) => c,
        _ => panic!("id {n} was not free"),
    }
}

#[tokio::test]
async fn two_hundred_thousand_1kib_records_never_exceed_32mib() {
    const MAX: u64 = 32 << 20;
    let store = MemoryStore::new(MAX);
    let held = claim(&store, u64::MAX).await;
    let body = Bytes::from(vec![b'r'; 1024]);
    let mut peak = 0;
    for n in 0..200_000u64 {
        let c = claim(&store, n).await;
        c.complete(record(body.clone())).await.unwrap();
        let stats = store.stats();
        peak = peak.max(stats.bytes);
        assert!(
            stats.bytes <= MAX,
            "after {n} records: {} bytes > {MAX}",
            stats.bytes
        );
    }
    let stats = store.stats();
    eprintln!("200k records: peak {peak} bytes of {MAX}; {stats:?}");
    // Near the bound, not far under it: eviction makes room, it does not empty the store.
    assert!(peak > MAX / 2, "peak {peak} is far below the bound");
    assert!(
        stats.evicted_before_ttl > 150_000,
        "early evictions not counted: {stats:?}"
    );
    // The claim taken first survived all of it.
    assert_eq!(stats.inflight, 1);
    match store.clone().begin(id(u64::MAX), FP).await.unwrap() {
        Begin::InFlight { waiter, .. } => {
            drop(held);
            tokio::time::timeout(Duration::from_secs(5), waiter.wait())
                .await
                .unwrap();
        }
        _ => panic!("the in-flight claim was evicted"),
    }
    // The most recent records are still there to replay.
    match store.clone().begin(id(199_999), FP).await.unwrap() {
        Begin::Completed(r) => assert_eq!(r.body.as_deref(), Some(&body[..])),
        _ => panic!("the newest record was evicted"),
    }
}

#[tokio::test]
async fn completing_wakes_waiters_and_they_see_the_record() {
    let store = MemoryStore::new(1 << 20);
    let c = claim(&store, 1).await;
    let Begin::InFlight {
        waiter,
        fingerprint,
    } = store.clone().begin(id(1), FP).await.unwrap()
    else {
        panic!("expected in flight")
    };
    assert_eq!(fingerprint, FP);
    let woke = tokio::spawn(waiter.wait());
    c.complete(record(Bytes::from_static(b"done")))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), woke)
        .await
        .unwrap()
        .unwrap();
    let Begin::Completed(r) = store.clone().begin(id(1), FP).await.unwrap() else {
        panic!("expected the record")
    };
    assert_eq!(r.body.as_deref(), Some(&b"done"[..]));
}

#[tokio::test(start_paused = true)]
async fn records_expire_on_the_tokio_clock() {
    let store = MemoryStore::new(1 << 20);
    let c = claim(&store, 9).await;
    let mut r = record(Bytes::from_static(b"x"));
    r.expires_at = tokio::time::Instant::now() + Duration::from_secs(60);
    c.complete(r).await.unwrap();
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(matches!(
        store.clone().begin(id(9), FP).await.unwrap(),
        Begin::Completed(_)
    ));
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(matches!(
        store.clone().begin(id(9), FP).await.unwrap(),
        Begin::Claimed(_)
    ));
}

#[tokio::test]
async fn a_dropped_claim_frees_the_key_for_the_next_request() {
    let store = MemoryStore::new(1 << 20);
    let first = claim(&store, 5).await;
    drop(first);
    let second = claim(&store, 5).await;
    second
        .complete(record(Bytes::from_static(b"second")))
        .await
        .unwrap();
    assert_eq!(store.stats().inflight, 0);
    let Begin::Completed(r) = store.clone().begin(id(5), FP).await.unwrap() else {
        panic!("expected the second claim's record")
    };
    assert_eq!(r.body.as_deref(), Some(&b"second"[..]));
}
