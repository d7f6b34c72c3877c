//! Load benchmark: the same upstream reached directly (baseline), through a pass-through
//! route, through an enforced route that records every request, and as replays. Figures
//! are ratios against the baseline measured in the same run. `cargo bench --bench proxy`;
//! IDEMGATE_BENCH_REQUESTS sets the request count per scenario (default 20000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};

const CONCURRENCY: usize = 32;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = Bytes::from(format!(
        "{{\"id\":\"ord_1\",\"items\":[{}]}}",
        "\"sku\",".repeat(24) + "\"end\""
    ));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let body = body.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        let mut resp = Response::new(Full::new(body));
                        *resp.status_mut() = StatusCode::CREATED;
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn proxy(upstream: SocketAddr) -> SocketAddr {
    let toml = format!(
        "[upstream]\nurl = \"http://{upstream}\"\n[store]\nmax_bytes = \"512MiB\"\n[[routes]]\nname = \"orders\"\nmethods = [\"POST\"]\npath = \"/v1/orders\"\n"
    );
    let mut config = idemgate::config::parse(&toml).unwrap();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    let listeners = idemgate::Listeners::bind(&config).await.unwrap();
    let addr = listeners.proxy_addr().unwrap();
    tokio::spawn(idemgate::run(config, listeners, std::future::pending()));
    addr
}

struct Result {
    name: &'static str,
    requests: usize,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Sends `n` requests with `CONCURRENCY` in flight; `key(i)` is the request's key, if any.
async fn load(
    client: &HttpClient,
    name: &'static str,
    url: String,
    n: usize,
    key: fn(usize) -> Option<String>,
    replay: bool,
) -> Result {
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, next, failures) =
            (client.clone(), url.clone(), next.clone(), failures.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return latencies;
                }
                let mut req = Request::post(&url);
                if let Some(k) = key(i) {
                    req = req.header("idempotency-key", k);
                }
                let req = req
                    .body(Full::new(Bytes::from_static(
                        b"{\"sku\":\"tea\",\"qty\":1}",
                    )))
                    .unwrap();
                let t = Instant::now();
                let resp = client.request(req).await.unwrap();
                let ok = resp.status() == StatusCode::CREATED
                    && (!replay || resp.headers().get("idempotent-replayed").is_some());
                let _ = resp.into_body().collect().await.unwrap();
                latencies.push(t.elapsed());
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut all: Vec<Duration> = Vec::with_capacity(n);
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let seconds = start.elapsed().as_secs_f64();
    let failed = failures.load(Ordering::Relaxed);
    assert_eq!(
        failed, 0,
        "{name}: {failed} responses were not what the scenario expects"
    );
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e6;
    Result {
        name,
        requests: n,
        seconds,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

fn no_key(_: usize) -> Option<String> {
    None
}
fn unique_key(i: usize) -> Option<String> {
    Some(format!("bench-{i}"))
}
fn warm_key(i: usize) -> Option<String> {
    Some(format!("warm-{}", i % 64))
}

fn micro() -> (f64, f64) {
    let policy = idemgate::config::Policy::default();
    let (parts, ()) = Request::post("/v1/orders?x=1")
        .header("authorization", "Bearer t")
        .body(())
        .unwrap()
        .into_parts();
    let body = Bytes::from(vec![b'a'; 1024]);
    let iterations = 200_000;
    let t = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(idemgate::proxy::fingerprint::fingerprint(
            &policy, &parts, &body,
        ));
    }
    let fingerprint_ns = t.elapsed().as_nanos() as f64 / iterations as f64;
    let t = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(idemgate::proxy::fingerprint::record_id(
            &policy,
            &parts.headers,
            "order-123",
        ));
    }
    (
        fingerprint_ns,
        t.elapsed().as_nanos() as f64 / iterations as f64,
    )
}

fn main() {
    let n: usize = std::env::var("IDEMGATE_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = rt.block_on(async {
        let up = upstream().await;
        let px = proxy(up).await;
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        // Warm-up: pools, and the records the replay scenario reads.
        load(
            &client,
            "warm-up",
            format!("http://{up}/"),
            2_000,
            no_key,
            false,
        )
        .await;
        load(
            &client,
            "warm-up",
            format!("http://{px}/v1/orders"),
            64,
            warm_key,
            false,
        )
        .await;
        vec![
            load(
                &client,
                "baseline (direct)",
                format!("http://{up}/v1/orders"),
                n,
                no_key,
                false,
            )
            .await,
            load(
                &client,
                "pass-through",
                format!("http://{px}/v1/other"),
                n,
                no_key,
                false,
            )
            .await,
            load(
                &client,
                "enforced, forward+record",
                format!("http://{px}/v1/orders"),
                n,
                unique_key,
                false,
            )
            .await,
            load(
                &client,
                "enforced, replay",
                format!("http://{px}/v1/orders"),
                n,
                warm_key,
                true,
            )
            .await,
        ]
    });
    let base = results[0].requests as f64 / results[0].seconds;
    println!("\nidemgate load benchmark: {n} requests per scenario, {CONCURRENCY} in flight, loopback, 2 cores shared by client, proxy and upstream");
    println!(
        "{:<28} {:>9} {:>8} {:>10} {:>9} {:>9} {:>8}",
        "scenario", "requests", "seconds", "req/s", "p50 µs", "p99 µs", "ratio"
    );
    for r in &results {
        let rps = r.requests as f64 / r.seconds;
        println!(
            "{:<28} {:>9} {:>8.2} {:>10.0} {:>9.0} {:>9.0} {:>8.2}",
            r.name,
            r.requests,
            r.seconds,
            rps,
            r.p50_us,
            r.p99_us,
            rps / base
        );
    }
    let (fp, id) = micro();
    println!("\nfingerprint (1 KiB body): {fp:.0} ns/op; record id: {id:.0} ns/op");
    println!("bench: {} scenarios passed, 0 failed", results.len());
}
