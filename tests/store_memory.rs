//! The memory store under pressure: the byte bound holds at every step, in-flight claims
//! are never evicted, and early evictions are counted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use idemgate::store::{Begin, Encoded, Fingerprint, MemoryStore, Record, RecordId, Store};

fn id(n: u64) -> RecordId {
    RecordId(*blake3::hash(&n.to_le_bytes()).as_bytes())
}

const FP: Fingerprint = Fingerprint([7; 32]);

const TTL: Duration = Duration::from_secs(3600);

fn record(body: Bytes) -> Encoded {
    Record {
        fingerprint: FP,
        status: StatusCode::CREATED,
        headers: vec![(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        )],
        body: Some(body),
    }
    .encode()
    .unwrap()
}

async fn claim(store: &Arc<MemoryStore>, n: u64) -> idemgate::store::Claim {
    match store.clone().begin(id(n), FP, None).await.unwrap() {
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
        c.complete(record(body.clone()), TTL).await.unwrap();
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
    match store.clone().begin(id(u64::MAX), FP, None).await.unwrap() {
        Begin::InFlight { waiter, .. } => {
            drop(held);
            tokio::time::timeout(Duration::from_secs(5), waiter.wait())
                .await
                .unwrap();
        }
        _ => panic!("the in-flight claim was evicted"),
    }
    // The most recent records are still there to replay.
    match store.clone().begin(id(199_999), FP, None).await.unwrap() {
        Begin::Completed(r) => assert_eq!(r.body.as_deref(), Some(&body[..])),
        _ => panic!("the newest record was evicted"),
    }
}

#[tokio::test(start_paused = true)]
async fn records_expire_on_the_tokio_clock() {
    let store = MemoryStore::new(1 << 20);
    let c = claim(&store, 9).await;
    c.complete(record(Bytes::from_static(b"x")), Duration::from_secs(60))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(matches!(
        store.clone().begin(id(9), FP, None).await.unwrap(),
        Begin::Completed(_)
    ));
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(matches!(
        store.clone().begin(id(9), FP, None).await.unwrap(),
        Begin::Claimed(_)
    ));
}

mod support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_grows_with_the_bound_not_with_the_records() {
    const MAX_MIB: u64 = 32;
    const RECORDS: usize = 100_000;
    let body = Bytes::from(vec![b'r'; 1024]);
    let upstream = support::FakeUpstream::buffered(move |_, _| {
        let body = body.clone();
        async move {
            let mut resp = http::Response::new(idemgate::body::full(body));
            *resp.status_mut() = StatusCode::CREATED;
            resp.headers_mut()
                .insert("content-type", "application/octet-stream".parse().unwrap());
            resp
        }
    })
    .await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"{{upstream}}\"\n[store]\nmax_bytes = \"{MAX_MIB}MiB\"\n[[routes]]\nname = \"orders\"\npath = \"/v1/orders\"\n"
    );
    let proxy = support::ProxyProcess::spawn(&toml, &upstream.url()).await;
    let pid = proxy.child.id();
    let url = proxy.url("/v1/orders");
    let send = |range: std::ops::Range<usize>| {
        let url = url.clone();
        async move {
            let c = support::Client::new();
            for n in range {
                let key = format!("rss-{n}");
                let got = c.post(&url, &[("idempotency-key", &key)], "x").await;
                assert_eq!(got.status, StatusCode::CREATED);
            }
        }
    };
    send(0..1000).await;
    let before = support::rss_kib(pid);
    let workers: Vec<_> = (0..16)
        .map(|w| tokio::spawn(send(1000 + w * RECORDS / 16..1000 + (w + 1) * RECORDS / 16)))
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let grew = support::rss_kib(pid).saturating_sub(before);
    println!("{RECORDS} records of 1 KiB under max_bytes = {MAX_MIB}MiB: RSS grew {grew} KiB");
    assert!(
        grew <= MAX_MIB * 1024 * 3 / 2,
        "RSS grew {grew} KiB for a {MAX_MIB} MiB bound"
    );
}
