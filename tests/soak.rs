//! Soak: a bounded mixed load against the real binary. New keys, 5% retries, storms of
//! concurrent duplicates, two tenants sharing keys, upstream resets and stalls, and idle
//! sockets, for `IDEMGATE_SOAK_SECS` seconds (30 by default, the CI form; `scripts/soak`
//! runs the 10-minute form). The checker asserts what a user would notice: every key ran
//! upstream at most once, no tenant ever got another's response, every request was
//! answered within its timeouts, and the process's memory stayed flat.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body::Frame;
use idemgate::body::{full, Body};
use support::*;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
header_read_timeout = "1s"
[upstream]
url = "{upstream}"
timeout = "500ms"
[store]
max_bytes = "256MiB"
[idempotency]
ttl = "3s"
wait_timeout = "5s"
store_statuses = ["2xx", "5xx"]
[[routes]]
name = "orders"
path = "/v1/orders"
"#;

/// Longest a request may take: the upstream timeout plus a wait behind a storm's first.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// A response body that sends a little and then breaks the connection.
struct Breaks(bool);

impl http_body::Body for Breaks {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.0 {
            return Poll::Ready(Some(Err(std::io::ErrorKind::ConnectionReset.into())));
        }
        self.0 = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"{\"partial\":")))))
    }
}

type Executions = Arc<Mutex<HashMap<String, u32>>>;

async fn upstream(executions: Executions) -> FakeUpstream {
    FakeUpstream::buffered(move |seen, _| {
        let executions = executions.clone();
        async move {
            let header = |n: &str| {
                let v = seen.headers.get(n).map(|v| v.to_str().unwrap().to_string());
                v.unwrap_or_default()
            };
            let (tenant, key) = (header("authorization"), header("idempotency-key"));
            *executions
                .lock()
                .unwrap()
                .entry(format!("{tenant}/{key}"))
                .or_default() += 1;
            match header("x-fault").as_str() {
                "reset" => Response::builder()
                    .status(201)
                    .header("content-length", "1000")
                    .body(http_body_util::BodyExt::boxed(
                        http_body_util::BodyExt::map_err(
                            Breaks(false),
                            |e| -> idemgate::body::BoxError { Box::new(e) },
                        ),
                    ))
                    .unwrap(),
                "stall" => std::future::pending::<Response<Body>>().await,
                _ => {
                    let doc = serde_json::json!({ "tenant": tenant, "key": key });
                    let mut resp = Response::new(full(doc.to_string()));
                    *resp.status_mut() = StatusCode::CREATED;
                    resp
                }
            }
        }
    })
    .await
}

/// What one logical request is: who sends it, with which key, and what the upstream does.
#[derive(Clone)]
struct Plan {
    tenant: &'static str,
    key: String,
    fault: &'static str,
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    created: AtomicU64,
    replayed: AtomicU64,
    upstream_errors: AtomicU64,
}

/// Sends `plan` once and checks the answer against what the plan allows.
async fn send(c: &Client, url: &str, plan: &Plan, tally: &Tally) {
    tally.sent.fetch_add(1, Ordering::Relaxed);
    let headers = [
        ("authorization", plan.tenant),
        ("idempotency-key", plan.key.as_str()),
        ("x-fault", plan.fault),
    ];
    let body = format!("{{\"order\":\"{}\"}}", plan.key);
    let got = tokio::time::timeout(ANSWER_WITHIN, c.post(url, &headers, &body))
        .await
        .unwrap_or_else(|_| panic!("no answer within {ANSWER_WITHIN:?} for {}", plan.key));
    if got.header("idempotent-replayed").is_some() {
        tally.replayed.fetch_add(1, Ordering::Relaxed);
    }
    match (plan.fault, got.status.as_u16()) {
        ("", 201) => {
            let doc = got.json();
            assert_eq!(
                doc["tenant"], plan.tenant,
                "a tenant got another's response"
            );
            assert_eq!(doc["key"], plan.key.as_str());
            tally.created.fetch_add(1, Ordering::Relaxed);
        }
        ("reset", 502) | ("stall", 504) => {
            tally.upstream_errors.fetch_add(1, Ordering::Relaxed);
        }
        (fault, status) => panic!("fault {fault:?} answered {status}: {got:?}"),
    }
}

/// One worker: new keys, a retry now and then, and every 50th key a storm.
async fn worker(id: usize, url: String, until: Instant, tally: Arc<Tally>) {
    let c = Client::with_pool_idle(Duration::from_millis(400));
    let mut recent: Vec<Plan> = Vec::new();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let tenant = if n % 2 == 0 {
            "Bearer tenant-a"
        } else {
            "Bearer tenant-b"
        };
        // Both tenants use the same key names: scoping must keep them apart.
        let key = format!("w{id}-{}", n / 2);
        let fault = match n % 40 {
            7 => "reset",
            23 => "stall",
            _ => "",
        };
        let plan = Plan { tenant, key, fault };
        if n % 50 == 0 {
            let storm: Vec<_> = (0..20)
                .map(|_| {
                    let (c, url, plan, tally) =
                        (c.clone(), url.clone(), plan.clone(), tally.clone());
                    tokio::spawn(async move { send(&c, &url, &plan, &tally).await })
                })
                .collect();
            for s in storm {
                s.await.unwrap();
            }
        } else {
            send(&c, &url, &plan, &tally).await;
        }
        recent.push(plan);
        if recent.len() > 20 {
            recent.remove(0);
        }
        if n % 20 == 0 {
            let again = recent[(n as usize / 20) % recent.len()].clone();
            send(&c, &url, &again, &tally).await;
        }
    }
}

/// Opens sockets that send nothing; each must be closed by header_read_timeout.
async fn idle_sockets(addr: std::net::SocketAddr, until: Instant) -> u64 {
    let mut closed = 0;
    while Instant::now() < until {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "an idle socket was not closed"
        );
        closed += 1;
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_load_keeps_every_guarantee() {
    let secs: u64 = std::env::var("IDEMGATE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let executions = Executions::default();
    let upstream = upstream(executions.clone()).await;
    let proxy = ProxyProcess::spawn(CONFIG, &upstream.url()).await;
    let url = proxy.url("/v1/orders");
    let pid = proxy.child.id();
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let tally = Arc::new(Tally::default());
    let workers: Vec<_> = (0..8)
        .map(|id| tokio::spawn(worker(id, url.clone(), until, tally.clone())))
        .collect();
    let idle = tokio::spawn(idle_sockets(proxy.addr, until));
    // Memory once warm (a third of the way, past the 3 s ttl) against memory at the end.
    tokio::time::sleep_until(started + Duration::from_secs(secs / 3)).await;
    let warm = support::rss_kib(pid);
    for w in workers {
        w.await.unwrap();
    }
    let idle_closed = idle.await.unwrap();
    let end = support::rss_kib(pid);
    let executions = executions.lock().unwrap();
    let ran_twice: Vec<_> = executions.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "soak {secs}s: {} requests, {} created, {} replayed, {} upstream errors, {} keys ran, {} idle sockets closed, RSS {warm} KiB warm -> {end} KiB end",
        tally.sent.load(Ordering::Relaxed),
        tally.created.load(Ordering::Relaxed),
        tally.replayed.load(Ordering::Relaxed),
        tally.upstream_errors.load(Ordering::Relaxed),
        executions.len(),
        idle_closed,
    );
    assert!(
        ran_twice.is_empty(),
        "keys that ran upstream more than once: {ran_twice:?}"
    );
    assert!(tally.replayed.load(Ordering::Relaxed) > 0 && idle_closed > 0);
    assert!(
        end <= warm + warm / 2 + 8 * 1024,
        "RSS grew from {warm} KiB to {end} KiB"
    );
}
