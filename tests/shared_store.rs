//! Two real `idemgate` processes (replicas A and B) sharing one real `redis-server`, as a
//! sidecar deployment behind a balancer runs them. What is asserted is what a client and
//! the upstream see: statuses, bodies, replay markers and upstream execution counts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use http::StatusCode;
use support::redis::RedisServer;
use support::*;

const KEY: &str = "idempotency-key";

fn config(redis: &str, extra_store: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
url = "{{upstream}}"
[store]
backend = "redis"
url = {redis}
lock_lease = "1s"
{extra_store}
[idempotency]
wait_timeout = "10s"
[[routes]]
name = "orders"
path = "/v1/orders"
"#
    )
}

async fn replicas(toml: &str, upstream: &str) -> (ProxyProcess, ProxyProcess) {
    let a = ProxyProcess::spawn(toml, upstream).await;
    let b = ProxyProcess::spawn(toml, upstream).await;
    for p in [&a, &b] {
        let ready = format!("http://{}/readyz", p.admin.unwrap());
        eventually!(
            Client::new().try_get(&ready).await.map(|g| g.status) == Some(StatusCode::OK),
            "replica never ready"
        );
    }
    (a, b)
}

/// `n` identical requests at once, alternating between the two replicas: every one must
/// get 201 with the same body.
async fn split_storm(
    c: &Client,
    (a, b): (&ProxyProcess, &ProxyProcess),
    key: &'static str,
    n: usize,
) {
    let storm: Vec<_> = (0..n)
        .map(|i| {
            let replica = if i % 2 == 0 { a } else { b };
            spawn_post(c, &replica.url("/v1/orders"), &[(KEY, key)], "s")
        })
        .collect();
    let mut bodies = Vec::new();
    for s in storm {
        let got = s.await.unwrap();
        assert_eq!(got.status, StatusCode::CREATED, "{got:?}");
        bodies.push(got.body);
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "the storm got different bodies"
    );
}

/// Replicas A and B on one Redis, and a request for `key` sent to A that the gated
/// upstream has entered and holds until the gate opens.
struct HeldOnA {
    redis: RedisServer,
    upstream: FakeUpstream,
    gate: std::sync::Arc<Gate>,
    a: ProxyProcess,
    b: ProxyProcess,
    c: Client,
    first: tokio::task::JoinHandle<Got>,
}

async fn held_on_a(key: &'static str) -> HeldOnA {
    let redis = RedisServer::start().await;
    let (upstream, gate) = gated_echo().await;
    let (a, b) = replicas(&config(&format!("{:?}", redis.url()), ""), &upstream.url()).await;
    let c = Client::new();
    let first = spawn_post(&c, &a.url("/v1/orders"), &[(KEY, key)], "x");
    assert_eq!(gate.entered().await, 1);
    HeldOnA {
        redis,
        upstream,
        gate,
        a,
        b,
        c,
        first,
    }
}

async fn metric(p: &ProxyProcess, name: &str) -> f64 {
    let text = Client::new()
        .get(&format!("http://{}/metrics", p.admin.unwrap()))
        .await;
    let text = String::from_utf8_lossy(&text.body).into_owned();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_retry_on_the_other_replica_replays_and_a_split_storm_runs_once() {
    let redis = RedisServer::start().await;
    let upstream = FakeUpstream::echo().await;
    let (a, b) = replicas(&config(&format!("{:?}", redis.url()), ""), &upstream.url()).await;
    let c = Client::new();
    let first = c.post(&a.url("/v1/orders"), &[(KEY, "cross")], "x").await;
    let retry = c.post(&b.url("/v1/orders"), &[(KEY, "cross")], "x").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(upstream.calls(), 1);
    // 40 identical requests at once, alternating replicas.
    split_storm(&c, (&a, &b), "storm", 40).await;
    assert_eq!(upstream.calls(), 2, "the storm ran upstream more than once");
}

#[tokio::test]
async fn records_survive_a_restart_of_both_replicas() {
    let redis = RedisServer::start().await;
    let upstream = FakeUpstream::echo().await;
    let toml = config(&format!("{:?}", redis.url()), "");
    let (a, b) = replicas(&toml, &upstream.url()).await;
    let first = Client::new()
        .post(&a.url("/v1/orders"), &[(KEY, "durable")], "x")
        .await;
    drop((a, b));
    let (a, _b) = replicas(&toml, &upstream.url()).await;
    let again = Client::new()
        .post(&a.url("/v1/orders"), &[(KEY, "durable")], "x")
        .await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn a_killed_holder_blocks_the_key_only_until_its_lease_ends() {
    let redis = RedisServer::start().await;
    let (upstream, gate) = gated_echo().await;
    let (mut a, b) = replicas(&config(&format!("{:?}", redis.url()), ""), &upstream.url()).await;
    let c = Client::new();
    let lost = {
        let (c, url) = (c.clone(), a.url("/v1/orders"));
        tokio::spawn(async move { c.try_post(&url, &[(KEY, "killed")], "x").await })
    };
    assert_eq!(gate.entered().await, 1);
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    assert!(lost.await.unwrap().is_err(), "the killed replica answered");
    // B waits behind the dead holder's lease (1 s), then runs the request itself.
    let started = tokio::time::Instant::now();
    let retry = spawn_post(&c, &b.url("/v1/orders"), &[(KEY, "killed")], "x");
    assert_eq!(gate.entered().await, 2);
    let waited = started.elapsed();
    gate.open();
    let retry = retry.await.unwrap();
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.json()["call"], 2);
    let third = c.post(&b.url("/v1/orders"), &[(KEY, "killed")], "x").await;
    assert_eq!(third.header("idempotent-replayed"), Some("true"));
    assert_eq!(third.json()["call"], 2);
    assert!(
        waited < Duration::from_secs(5),
        "the key stayed locked for {waited:?}"
    );
}

#[tokio::test]
async fn a_holder_keeps_its_lease_while_the_upstream_works_past_it() {
    let HeldOnA {
        redis,
        upstream,
        gate,
        a,
        b,
        c,
        first,
    } = held_on_a("slow").await;
    // The upstream works for three leases (1 s each); the lock never lapses meanwhile.
    let mut conn = redis.connection().await;
    let locks: Vec<String> = ::redis::cmd("KEYS")
        .arg("*:lock")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(locks.len(), 1, "{locks:?}");
    let held_since = tokio::time::Instant::now();
    let mut sample = tokio::time::interval(Duration::from_millis(50));
    while held_since.elapsed() < Duration::from_secs(3) {
        sample.tick().await;
        let left: i64 = ::redis::cmd("PTTL")
            .arg(&locks[0])
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            left > 0,
            "the lease lapsed after {:?}",
            held_since.elapsed()
        );
    }
    // A duplicate on the other replica waits for it rather than running again.
    let duplicate = spawn_post(&c, &b.url("/v1/orders"), &[(KEY, "slow")], "x");
    gate.open();
    let (first, duplicate) = (first.await.unwrap(), duplicate.await.unwrap());
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(duplicate.status, StatusCode::CREATED);
    assert_eq!(duplicate.body, first.body);
    assert_eq!(upstream.calls(), 1);
    assert_eq!(metric(&a, "idemgate_lease_lost_total").await, 0.0);
}

#[tokio::test]
async fn a_stale_holders_completion_is_refused_and_counted() {
    let HeldOnA {
        redis: _redis,
        upstream: _upstream,
        gate,
        a,
        b,
        c,
        first,
    } = held_on_a("stale").await;
    // A freezes (a long GC pause, a stopped container): its lease lapses while it works.
    a.signal("STOP");
    let second = spawn_post(&c, &b.url("/v1/orders"), &[(KEY, "stale")], "x");
    assert_eq!(gate.entered().await, 2);
    gate.open();
    assert_eq!(second.await.unwrap().json()["call"], 2);
    a.signal("CONT");
    // A's client still gets what its upstream call answered; the record stays B's.
    assert_eq!(first.await.unwrap().json()["call"], 1);
    eventually!(
        metric(&a, "idemgate_lease_lost_total").await >= 1.0,
        "the lost lease was not counted"
    );
    let replay = c.post(&a.url("/v1/orders"), &[(KEY, "stale")], "x").await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.json()["call"], 2);
}

#[tokio::test]
async fn redis_down_rejects_or_passes_per_on_error_and_dedupe_resumes() {
    let mut redis = RedisServer::start().await;
    let upstream = FakeUpstream::echo().await;
    let url = format!("{:?}", redis.url());
    let reject = ProxyProcess::spawn(&config(&url, ""), &upstream.url()).await;
    let pass = ProxyProcess::spawn(&config(&url, "on_error = \"pass\""), &upstream.url()).await;
    let c = Client::new();
    redis.stop();
    let refused = c
        .post(&reject.url("/v1/orders"), &[(KEY, "down")], "x")
        .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.code(), "store_unavailable");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(upstream.calls(), 0);
    let passed = c.post(&pass.url("/v1/orders"), &[(KEY, "down")], "x").await;
    assert_eq!(passed.status, StatusCode::CREATED);
    assert_eq!(upstream.calls(), 1);
    assert!(
        metric(
            &pass,
            "idemgate_requests_total{route=\"orders\",outcome=\"store_error\"}"
        )
        .await
            >= 1.0
    );
    let ready = format!("http://{}/readyz", reject.admin.unwrap());
    eventually!(
        c.get(&ready).await.status == StatusCode::SERVICE_UNAVAILABLE,
        "readyz stayed 200 with Redis down"
    );
    redis.restart().await;
    eventually!(
        c.get(&ready).await.status == StatusCode::OK,
        "readyz never recovered"
    );
    let first = c
        .post(&reject.url("/v1/orders"), &[(KEY, "back")], "x")
        .await;
    let again = c
        .post(&reject.url("/v1/orders"), &[(KEY, "back")], "x")
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn redis_holds_no_raw_key_and_no_credential() {
    let redis = RedisServer::start().await;
    let upstream = FakeUpstream::echo().await;
    let secret_url = format!("{:?}", redis.url());
    let (a, _b) = replicas(&config(&secret_url, ""), &upstream.url()).await;
    let c = Client::new();
    let headers = [
        (KEY, "raw-key-4f1d9c"),
        ("authorization", "Bearer tenant-secret-77aa"),
    ];
    c.post(&a.url("/v1/orders"), &headers, "x").await;
    let mut conn = redis.connection().await;
    let keys: Vec<Vec<u8>> = ::redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let mut everything = Vec::new();
    for k in &keys {
        everything.extend_from_slice(k);
        let v: Vec<u8> = ::redis::cmd("GET")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        everything.extend_from_slice(&v);
    }
    let _: () = ::redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    everything.extend(std::fs::read(redis.dir().join("dump.rdb")).unwrap());
    let text = String::from_utf8_lossy(&everything);
    for secret in ["raw-key-4f1d9c", "tenant-secret-77aa"] {
        assert!(!text.contains(secret), "{secret} reached Redis");
    }
}

#[tokio::test]
async fn a_record_api_lock_taken_on_one_replica_is_seen_and_completed_on_the_other() {
    let redis = RedisServer::start().await;
    let upstream = FakeUpstream::echo().await;
    let mut toml = config(&format!("{:?}", redis.url()), "");
    toml.push_str(
        "[record_api]\nlisten = \"127.0.0.1:0\"\ntokens = [\"worker-token\"]\nlease = \"30s\"\n",
    );
    let (a, b) = replicas(&toml, &upstream.url()).await;
    let api = |p: &ProxyProcess| format!("http://{}/v1/record", p.record_api.unwrap());
    let c = Client::new();
    let auth = [
        ("authorization", "Bearer worker-token"),
        ("content-type", "application/json"),
    ];
    let call = |url: String, method: &'static str, doc: serde_json::Value| {
        let c = c.clone();
        async move {
            c.send(request(method, &url, &auth, &doc.to_string()))
                .await
                .json()
        }
    };
    let locked = call(
        api(&a),
        "POST",
        serde_json::json!({"scope": "s", "key": "k"}),
    )
    .await;
    assert_eq!(locked["locked"], true);
    let token = locked["token"].as_str().unwrap().to_string();
    let seen = call(
        api(&b),
        "POST",
        serde_json::json!({"scope": "s", "key": "k"}),
    )
    .await;
    assert_eq!(seen["locked"], false);
    let stored = call(api(&b), "PUT", serde_json::json!({"scope": "s", "key": "k", "token": token, "status": 200, "body": {"ok": 1}})).await;
    assert_eq!(stored["stored"], true);
    let cached = call(
        api(&a),
        "POST",
        serde_json::json!({"scope": "s", "key": "k"}),
    )
    .await;
    assert_eq!(cached["cached"], true);
    assert_eq!(cached["record"]["body"]["ok"], 1);
}

/// Three masters, slots split by `redis-cli --cluster create`.
async fn cluster() -> Vec<RedisServer> {
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(
            RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
            ])
            .await,
        );
    }
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
    let out = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli not found: ./scripts/test installs it");
    assert!(
        out.status.success(),
        "cluster create failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for n in &nodes {
        let mut conn = n.connection().await;
        eventually!(
            ::redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async::<String>(&mut conn)
                .await
                .unwrap_or_default()
                .contains("cluster_state:ok"),
            "the cluster never became ok"
        );
    }
    nodes
}

#[tokio::test]
async fn on_a_three_master_cluster_replicas_share_records() {
    let nodes = cluster().await;
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let upstream = FakeUpstream::echo().await;
    let (a, b) = replicas(&config(&format!("{urls:?}"), ""), &upstream.url()).await;
    let c = Client::new();
    // Keys spread over all three masters' slots.
    for i in 0..12 {
        let key = format!("cluster-{i}");
        let first = c.post(&a.url("/v1/orders"), &[(KEY, &key)], "x").await;
        let retry = c.post(&b.url("/v1/orders"), &[(KEY, &key)], "x").await;
        assert_eq!(first.status, StatusCode::CREATED);
        assert_eq!(
            retry.header("idempotent-replayed"),
            Some("true"),
            "key {key}"
        );
        assert_eq!(retry.body, first.body);
    }
    assert_eq!(upstream.calls(), 12);
    split_storm(&c, (&a, &b), "cluster-storm", 20).await;
    assert_eq!(upstream.calls(), 13);
}

#[tokio::test]
async fn an_evicting_redis_is_warned_about_at_start() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]).await;
    let upstream = FakeUpstream::echo().await;
    let mut a =
        ProxyProcess::spawn(&config(&format!("{:?}", redis.url()), ""), &upstream.url()).await;
    let (line, _) = a.wait_for_line("maxmemory-policy").await;
    assert!(
        line.contains("allkeys-lru") && line.contains("WARN"),
        "{line}"
    );
}

#[tokio::test]
async fn rediss_reaches_a_tls_redis_through_rustls_and_ring() {
    let tls = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/tls");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cert = tls.join("tls.crt");
    let key = tls.join("tls.key");
    let _redis = RedisServer::start_with(&[
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
    ])
    .await;
    let upstream = FakeUpstream::echo().await;
    // The server's certificate chains to the fixture CA (itself: self-signed for localhost).
    let url = format!("\"rediss://localhost:{port}/0\"");
    let ca = format!("ca_file = {:?}", tls.join("ca.pem").to_str().unwrap());
    let (a, b) = replicas(&config(&url, &ca), &upstream.url()).await;
    let c = Client::new();
    let first = c.post(&a.url("/v1/orders"), &[(KEY, "tls")], "x").await;
    let retry = c.post(&b.url("/v1/orders"), &[(KEY, "tls")], "x").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.calls(), 1);
}
