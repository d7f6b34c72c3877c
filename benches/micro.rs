//! Micro-benchmarks (criterion) of the per-request work that is not I/O: fingerprints of
//! 1 KiB / 64 KiB / 1 MiB bodies, canonical JSON, the record id, the record encoding, and
//! one begin + complete + replay on each store (memory, disk relaxed and strict, and a real
//! `redis-server` for Redis, started here). `cargo bench --bench micro`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, Request, StatusCode};
use idemgate::config::Policy;
use idemgate::proxy::fingerprint;
use idemgate::store::{Begin, Fingerprint, MemoryStore, Record, RecordId, Store};

fn request_parts() -> http::request::Parts {
    let (parts, ()) = Request::post("/v1/orders?x=1")
        .header("authorization", "Bearer tenant")
        .header("idempotency-key", "k")
        .body(())
        .unwrap()
        .into_parts();
    parts
}

fn json_body(len: usize) -> Bytes {
    let mut doc = String::from("{\"items\":[");
    while doc.len() < len {
        doc.push_str("{\"sku\":\"abc-123\",\"qty\":2,\"price\":19.99},");
    }
    doc.push_str("{}],\"id\":\"ord_1\"}");
    Bytes::from(doc)
}

fn fingerprints(c: &mut Criterion) {
    let parts = request_parts();
    let mut group = c.benchmark_group("fingerprint");
    for len in [1 << 10, 64 << 10, 1 << 20] {
        let body = Bytes::from(vec![b'x'; len]);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("raw", len), &body, |b, body| {
            b.iter(|| fingerprint::fingerprint(&Policy::default(), &parts, black_box(body)))
        });
    }
    let json = json_body(1 << 10);
    group.throughput(Throughput::Bytes(json.len() as u64));
    group.bench_function("canonical json 1 KiB", |b| {
        b.iter(|| fingerprint::canonical_json(black_box(&json)))
    });
    group.finish();
    let headers: HeaderMap = parts.headers.clone();
    c.bench_function("record id", |b| {
        b.iter(|| fingerprint::record_id(&Policy::default(), &headers, black_box("key-123")))
    });
}

fn record() -> Record {
    Record {
        fingerprint: Fingerprint([7; 32]),
        status: StatusCode::CREATED,
        headers: vec![
            (
                http::header::CONTENT_TYPE,
                "application/json".parse().unwrap(),
            ),
            (
                http::HeaderName::from_static("x-request-id"),
                "req-1234567890".parse().unwrap(),
            ),
        ],
        body: Some(Bytes::from(vec![b'r'; 1024])),
    }
}

fn encoding(c: &mut Criterion) {
    let r = record();
    let encoded = r.encode().unwrap();
    c.bench_function("record encode 1 KiB", |b| {
        b.iter(|| black_box(&r).encode().unwrap())
    });
    c.bench_function("record decode 1 KiB", |b| {
        b.iter(|| black_box(&encoded).decode().unwrap())
    });
}

/// One miss (begin, complete) and one replay (begin finds the record) per iteration.
fn store_round(rt: &tokio::runtime::Runtime, store: &Arc<dyn Store>, n: &mut u64) {
    *n += 1;
    let id = RecordId(*blake3::hash(&n.to_le_bytes()).as_bytes());
    let fp = Fingerprint([7; 32]);
    let encoded = record().encode().unwrap();
    rt.block_on(async {
        let lease = store.claim_lease();
        let Begin::Claimed(claim) = store.clone().begin(id, fp, lease).await.unwrap() else {
            panic!("not free")
        };
        claim
            .complete(encoded, Duration::from_secs(3600))
            .await
            .unwrap();
        let Begin::Completed(_) = store.clone().begin(id, fp, lease).await.unwrap() else {
            panic!("no replay")
        };
    });
}

fn stores(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let memory: Arc<dyn Store> = MemoryStore::new(1 << 30);
    let mut n = 0;
    c.bench_function("store memory: begin + complete + replay", |b| {
        b.iter(|| store_round(&rt, &memory, &mut n))
    });
    for (mode, strict) in [("relaxed", false), ("strict", true)] {
        let dir = tempfile::tempdir().unwrap();
        let disk: Arc<dyn Store> = rt.block_on(async {
            idemgate::store::disk::DiskStore::open(
                dir.path(),
                1 << 30,
                strict,
                Box::new(idemgate::proxy::unknown_outcome_record),
                tokio_util::sync::CancellationToken::new(),
            )
            .unwrap()
        });
        c.bench_function(
            &format!("store disk {mode}: begin + complete + replay"),
            |b| b.iter(|| store_round(&rt, &disk, &mut n)),
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut server = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--dir", dir.path().to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server is needed for the Redis rows (apt-get install redis-server)");
    let config = idemgate::config::parse(&format!(
        "[upstream]\nurl = \"http://127.0.0.1:1\"\n[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\n"
    ))
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let redis: Arc<dyn Store> = rt.block_on(async {
        let s = idemgate::store::redis::RedisStore::start(&config.store, stop.clone()).unwrap();
        while !s.ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s
    });
    c.bench_function("store redis: begin + complete + replay", |b| {
        b.iter(|| store_round(&rt, &redis, &mut n))
    });
    stop.cancel();
    let _ = server.kill();
    let _ = server.wait();
}

criterion_group! {
    name = micro;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = fingerprints, encoding, stores
}
criterion_main!(micro);
