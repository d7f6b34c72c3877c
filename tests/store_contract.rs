//! One contract, every backend: the same tests run on the memory store and on a real
//! `redis-server` (two store instances on one server standing for two replicas), so the
//! backends cannot drift apart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use idemgate::config::{Backend, OnStoreError, RedisUrls, StoreConfig};
use idemgate::store::disk::DiskStore;
use idemgate::store::redis::RedisStore;
use idemgate::store::{
    Begin, Claim, Fingerprint, MemoryStore, Record, RecordId, Store, StoreError, Token, Woke,
};
use support::redis::RedisServer;
use tokio_util::sync::CancellationToken;

const FP: Fingerprint = Fingerprint([7; 32]);
const OTHER_FP: Fingerprint = Fingerprint([8; 32]);
const TTL: Duration = Duration::from_secs(60);

fn id(n: u64) -> RecordId {
    RecordId(*blake3::hash(&n.to_le_bytes()).as_bytes())
}

fn record(body: &'static str) -> idemgate::store::Encoded {
    record_of(Bytes::from_static(body.as_bytes()))
}

fn record_of(body: Bytes) -> idemgate::store::Encoded {
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

/// Two handles on one store: the same instance for memory, two clients of one server
/// for Redis (two replicas). Keeps the server alive.
struct Pair {
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
    _server: Option<RedisServer>,
    _dir: Option<tempfile::TempDir>,
}

/// A disk store in a fresh directory; `strict` syncs before every answer.
fn disk_store(strict: bool) -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(
        dir.path(),
        1 << 20,
        strict,
        Box::new(idemgate::proxy::unknown_outcome_record),
        CancellationToken::new(),
    )
    .unwrap();
    (store, dir)
}

fn redis_config(url: String, lease: Duration) -> StoreConfig {
    StoreConfig {
        backend: Backend::Redis,
        max_bytes: 1 << 20,
        urls: Some(RedisUrls::new(vec![url])),
        ca_file: None,
        prefix: "test:".into(),
        lock_lease: lease,
        on_error: OnStoreError::Reject,
        path: None,
        durability: idemgate::config::Durability::Relaxed,
    }
}

async fn redis_store(url: String, lease: Duration) -> Arc<dyn Store> {
    let store = RedisStore::start(&redis_config(url, lease), CancellationToken::new()).unwrap();
    eventually!(store.ready(), "the Redis store never became ready");
    store
}

async fn pair(kind: &str) -> Pair {
    match kind {
        "memory" => {
            let s: Arc<dyn Store> = MemoryStore::new(1 << 20);
            Pair {
                a: s.clone(),
                b: s,
                _server: None,
                _dir: None,
            }
        }
        "disk" | "disk_strict" => {
            let (s, dir) = disk_store(kind == "disk_strict");
            Pair {
                a: s.clone(),
                b: s,
                _server: None,
                _dir: Some(dir),
            }
        }
        _ => {
            let server = RedisServer::start().await;
            let a = redis_store(server.url(), Duration::from_secs(30)).await;
            let b = redis_store(server.url(), Duration::from_secs(30)).await;
            Pair {
                a,
                b,
                _server: Some(server),
                _dir: None,
            }
        }
    }
}

async fn claim(store: &Arc<dyn Store>, n: u64, lease: Option<Duration>) -> Claim {
    match store.clone().begin(id(n), FP, lease).await.unwrap() {
        Begin::Claimed(c) => c,
        _ => panic!("id {n} was not free"),
    }
}

async fn body_of(store: &Arc<dyn Store>, n: u64) -> Option<Bytes> {
    match store.clone().begin(id(n), FP, None).await.unwrap() {
        Begin::Completed(r) => r.body,
        Begin::Claimed(c) => {
            drop(c);
            None
        }
        Begin::InFlight { .. } => None,
    }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory { $( #[tokio::test] async fn $name() { super::$name("memory").await } )* }
        mod redis { $( #[tokio::test] async fn $name() { super::$name("redis").await } )* }
        mod disk { $( #[tokio::test] async fn $name() { super::$name("disk").await } )* }
        mod disk_strict { $( #[tokio::test] async fn $name() { super::$name("disk_strict").await } )* }
    };
}

contract!(
    completion_wakes_a_waiter_on_another_replica_with_the_record,
    release_wakes_waiters_and_frees_the_key,
    a_dropped_claim_is_released_in_the_background,
    a_stale_owner_cannot_complete_and_is_counted,
    renewal_keeps_a_claim_past_its_lease,
    a_dead_holders_lease_ends_and_its_waiter_learns_why,
    only_the_tokens_owner_may_complete_or_release,
    records_expire_after_their_relative_ttl,
    the_in_flight_fingerprint_is_reported_for_mismatch,
    a_spent_token_cannot_complete_release_or_renew_again,
);

async fn a_spent_token_cannot_complete_release_or_renew_again(kind: &str) {
    let p = pair(kind).await;
    let token = claim(&p.a, 10, p.a.claim_lease()).await.detach();
    p.a.clone()
        .complete(id(10), token, record("first"), TTL)
        .await
        .unwrap();
    // On the disk store in strict mode this runs while the record may still be syncing.
    assert_eq!(
        p.b.clone()
            .complete(id(10), token, record("again"), TTL)
            .await,
        Err(StoreError::LeaseLost)
    );
    assert_eq!(
        p.b.clone().release(id(10), token).await,
        Err(StoreError::LeaseLost)
    );
    assert_eq!(
        p.b.clone().renew(id(10), token, TTL).await,
        Err(StoreError::LeaseLost)
    );
    assert_eq!(body_of(&p.b, 10).await.as_deref(), Some(&b"first"[..]));
}

async fn completion_wakes_a_waiter_on_another_replica_with_the_record(kind: &str) {
    let p = pair(kind).await;
    let c = claim(&p.a, 1, p.a.claim_lease()).await;
    let Begin::InFlight {
        waiter,
        fingerprint,
        ..
    } = p.b.clone().begin(id(1), FP, None).await.unwrap()
    else {
        panic!("expected in flight")
    };
    assert_eq!(fingerprint, FP);
    let woke = tokio::spawn(waiter.wait());
    c.complete(record("done"), TTL).await.unwrap();
    let why = tokio::time::timeout(Duration::from_secs(5), woke)
        .await
        .unwrap()
        .unwrap();
    match &why {
        // The memory store hands its waiters the record itself.
        Woke::Recorded(rec) => assert_eq!(rec.body.as_deref(), Some(&b"done"[..])),
        Woke::Completed | Woke::LeaseExpired => assert_ne!(kind, "memory", "{why:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(body_of(&p.b, 1).await.as_deref(), Some(&b"done"[..]));
}

async fn release_wakes_waiters_and_frees_the_key(kind: &str) {
    let p = pair(kind).await;
    let c = claim(&p.a, 2, p.a.claim_lease()).await;
    let Begin::InFlight { waiter, .. } = p.b.clone().begin(id(2), FP, None).await.unwrap() else {
        panic!("expected in flight")
    };
    let woke = tokio::spawn(waiter.wait());
    p.a.clone().release(id(2), c.token()).await.unwrap();
    let why = tokio::time::timeout(Duration::from_secs(5), woke)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(why, Woke::Released | Woke::LeaseExpired),
        "{why:?}"
    );
    let again = claim(&p.b, 2, None).await;
    drop(c); // its release now finds someone else's lease: nothing is freed
    let Begin::InFlight { .. } = p.a.clone().begin(id(2), FP, None).await.unwrap() else {
        panic!("the stale guard's drop freed the new owner's claim")
    };
    drop(again);
}

async fn a_dropped_claim_is_released_in_the_background(kind: &str) {
    let p = pair(kind).await;
    drop(claim(&p.a, 3, p.a.claim_lease()).await);
    let mut next = None;
    eventually!(
        {
            if let Ok(Begin::Claimed(c)) = p.b.clone().begin(id(3), FP, None).await {
                next = Some(c);
            }
            next.is_some()
        },
        "a dropped claim was never released"
    );
    next.unwrap().complete(record("second"), TTL).await.unwrap();
    assert_eq!(body_of(&p.a, 3).await.as_deref(), Some(&b"second"[..]));
}

async fn a_stale_owner_cannot_complete_and_is_counted(kind: &str) {
    let p = pair(kind).await;
    let lease = Duration::from_millis(200);
    // A holder that died: it stops renewing and never releases.
    let token = claim(&p.a, 4, Some(lease)).await.detach();
    let mut newer = None;
    eventually!(
        {
            if let Ok(Begin::Claimed(c)) =
                p.b.clone()
                    .begin(id(4), FP, Some(Duration::from_secs(30)))
                    .await
            {
                newer = Some(c);
            }
            newer.is_some()
        },
        "the lapsed lease was never taken over"
    );
    newer.unwrap().complete(record("newer"), TTL).await.unwrap();
    let lost_before = p.a.stats().lease_lost;
    let late =
        p.a.clone()
            .complete(id(4), token, record("stale"), TTL)
            .await;
    assert_eq!(late, Err(StoreError::LeaseLost));
    assert_eq!(p.a.stats().lease_lost, lost_before + 1);
    assert_eq!(body_of(&p.b, 4).await.as_deref(), Some(&b"newer"[..]));
}

async fn renewal_keeps_a_claim_past_its_lease(kind: &str) {
    let p = pair(kind).await;
    let lease = Duration::from_millis(300);
    // The holder runs `keep_alive` beside its work: it renews every third of the lease.
    let held = claim(&p.a, 5, Some(lease)).await;
    // Sampled every 50 ms for four leases' worth of time: never free meanwhile.
    let sampling = async {
        let mut sample = tokio::time::interval(Duration::from_millis(50));
        for _ in 0..24 {
            sample.tick().await;
            match p.b.clone().begin(id(5), FP, Some(lease)).await.unwrap() {
                Begin::InFlight { .. } => {}
                _ => panic!("a renewed claim lapsed"),
            }
        }
    };
    tokio::select! {
        () = sampling => {}
        never = held.keep_alive() => match never {},
    }
    held.complete(record("renewed"), TTL).await.unwrap();
    assert_eq!(body_of(&p.b, 5).await.as_deref(), Some(&b"renewed"[..]));
}

async fn a_dead_holders_lease_ends_and_its_waiter_learns_why(kind: &str) {
    let p = pair(kind).await;
    let token = claim(&p.a, 6, None).await.detach();
    // Without a lease (memory proxy claims) it would hold forever: give it one.
    p.a.clone()
        .renew(id(6), token, Duration::from_millis(200))
        .await
        .unwrap();
    let Begin::InFlight { waiter, .. } = p.b.clone().begin(id(6), FP, None).await.unwrap() else {
        panic!("expected in flight")
    };
    let why = tokio::time::timeout(Duration::from_secs(5), waiter.wait())
        .await
        .unwrap();
    assert_eq!(why, Woke::LeaseExpired);
    claim(&p.b, 6, None).await;
}

async fn only_the_tokens_owner_may_complete_or_release(kind: &str) {
    let p = pair(kind).await;
    let c = claim(&p.a, 7, p.a.claim_lease()).await;
    let forged = Token::random().unwrap();
    assert_ne!(forged, c.token());
    assert_eq!(
        p.b.clone()
            .complete(id(7), forged, record("forged"), TTL)
            .await,
        Err(StoreError::LeaseLost)
    );
    assert_eq!(
        p.b.clone().release(id(7), forged).await,
        Err(StoreError::LeaseLost)
    );
    assert_eq!(
        p.b.clone().renew(id(7), forged, TTL).await,
        Err(StoreError::LeaseLost)
    );
    c.complete(record("owner"), TTL).await.unwrap();
    assert_eq!(body_of(&p.b, 7).await.as_deref(), Some(&b"owner"[..]));
}

async fn records_expire_after_their_relative_ttl(kind: &str) {
    let p = pair(kind).await;
    claim(&p.a, 8, None)
        .await
        .complete(record("short"), Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(body_of(&p.b, 8).await.as_deref(), Some(&b"short"[..]));
    eventually!(
        matches!(
            p.b.clone().begin(id(8), FP, None).await,
            Ok(Begin::Claimed(_))
        ),
        "the record outlived its ttl"
    );
}

async fn the_in_flight_fingerprint_is_reported_for_mismatch(kind: &str) {
    let p = pair(kind).await;
    let _held = claim(&p.a, 9, p.a.claim_lease()).await;
    let Begin::InFlight { fingerprint, .. } =
        p.b.clone().begin(id(9), OTHER_FP, None).await.unwrap()
    else {
        panic!("expected in flight")
    };
    assert_eq!(
        fingerprint, FP,
        "the holder's fingerprint, not the caller's"
    );
}

/// Waiters on other replicas learn of a completion from a message; a completion nobody
/// waits for sends none (a message to every replica on every request was Redis's cost).
#[tokio::test]
async fn redis_publishes_a_completion_only_when_someone_waits() {
    use futures_util::StreamExt;
    let server = RedisServer::start().await;
    let a = redis_store(server.url(), Duration::from_secs(30)).await;
    let b = redis_store(server.url(), Duration::from_secs(30)).await;
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("test:events").await.unwrap();
    let mut messages = pubsub.on_message();

    let quiet = claim(&a, 20, a.claim_lease()).await;
    quiet.complete(record("quiet"), TTL).await.unwrap();
    let loud = claim(&a, 21, a.claim_lease()).await;
    let Begin::InFlight { waiter, .. } = b.clone().begin(id(21), FP, None).await.unwrap() else {
        panic!("expected in flight")
    };
    let woke = tokio::spawn(waiter.wait());
    loud.complete(record("loud"), TTL).await.unwrap();

    let first = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .unwrap()
        .unwrap();
    // Messages arrive in order: the first is the waited-for id's, so id 20 sent none.
    assert_eq!(
        first.get_payload_bytes(),
        format!("{}:c", id(21).hex()).as_bytes()
    );
    tokio::time::timeout(Duration::from_secs(5), woke)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body_of(&b, 21).await.as_deref(), Some(&b"loud"[..]));
}

/// A URL's password and database reach Redis on every connection the store makes, and
/// a wrong password is an unavailable store, never records written elsewhere.
#[tokio::test]
async fn redis_with_a_password_and_a_database_uses_both() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret-pw"]).await;
    let url = |password: &str, db: u8| format!("redis://:{password}@{}/{db}", server.addr);
    let store = redis_store(url("s3cret-pw", 3), Duration::from_secs(30)).await;
    claim(&store, 30, None)
        .await
        .complete(record("in db 3"), TTL)
        .await
        .unwrap();
    assert_eq!(body_of(&store, 30).await.as_deref(), Some(&b"in db 3"[..]));
    for (db, keys) in [(3, 1), (0, 0)] {
        let client = ::redis::Client::open(url("s3cret-pw", db)).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let n: i64 = ::redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        assert_eq!(n, keys, "database {db}");
    }
    let config = redis_config(url("wrong-pw", 3), Duration::from_secs(30));
    let wrong = RedisStore::start(&config, CancellationToken::new()).unwrap();
    match wrong.clone().begin(id(31), FP, None).await {
        Err(StoreError::Unavailable(why)) => assert!(!why.contains("wrong-pw"), "{why}"),
        other => panic!("expected unavailable, got {:?}", other.map(|_| ())),
    }
}

/// Calls in flight together on one connection each get their own reply, a record of a
/// few MiB among them (its reply arrives over many reads).
#[tokio::test]
async fn redis_answers_concurrent_calls_each_with_its_own_reply() {
    use futures_util::future::join_all;
    let server = RedisServer::start().await;
    let store = redis_store(server.url(), Duration::from_secs(30)).await;
    let bodies: Vec<Bytes> = (0..40u64)
        .map(|n| match n {
            7 => Bytes::from(vec![b'z'; 3 << 20]),
            n => Bytes::from(format!("body {n}")),
        })
        .collect();
    let claims = join_all((0..40).map(|n| claim(&store, 100 + n, None))).await;
    let completions = claims
        .into_iter()
        .zip(&bodies)
        .map(|(c, body)| c.complete(record_of(body.clone()), TTL));
    for done in join_all(completions).await {
        done.unwrap();
    }
    let read = join_all((0..40).map(|n| body_of(&store, 100 + n))).await;
    for (n, (got, want)) in read.iter().zip(&bodies).enumerate() {
        assert_eq!(got.as_ref(), Some(want), "id {}", 100 + n);
    }
}

/// A connection's scripts gone (`SCRIPT FLUSH`, or a restarted Redis) are loaded again
/// on the same connection, and the call still answers.
#[tokio::test]
async fn redis_loads_its_scripts_again_after_a_flush() {
    let server = RedisServer::start().await;
    let store = redis_store(server.url(), Duration::from_secs(30)).await;
    let first = claim(&store, 50, None).await;
    let mut conn = server.connection().await;
    let _: () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    first.complete(record("after flush"), TTL).await.unwrap();
    assert_eq!(
        body_of(&store, 50).await.as_deref(),
        Some(&b"after flush"[..])
    );
}

/// A call Redis leaves unanswered fails as unavailable within the store's 2 s, and a
/// later call, on a new connection, is answered.
#[tokio::test]
async fn redis_unanswered_call_is_unavailable_and_the_next_is_answered() {
    unanswered_call(false).await;
}

/// The same after the connection has been quiet longer than the store's 2 s: its
/// watchdog, idle meanwhile, times the next call.
#[tokio::test]
async fn redis_unanswered_call_after_a_quiet_spell_is_unavailable() {
    unanswered_call(true).await;
}

async fn unanswered_call(quiet_first: bool) {
    // Holds Redis for 3 s: every other client's command waits, unanswered.
    const SPIN: &str = "local t = redis.call('TIME') repeat local n = redis.call('TIME') \
        until (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > 3000000 return 1";
    let server = RedisServer::start().await;
    let store = redis_store(server.url(), Duration::from_secs(30)).await;
    claim(&store, 60, None).await.release();
    if quiet_first {
        // Not a synchronisation: the quiet spell is the condition under test.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let mut blocker = server.connection().await;
    let spin = tokio::spawn(async move {
        let _: ::redis::RedisResult<i64> = ::redis::cmd("EVAL")
            .arg(SPIN)
            .arg(0)
            .query_async(&mut blocker)
            .await;
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (why, waited) = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no call went unanswered"
        );
        let started = tokio::time::Instant::now();
        match store.clone().begin(id(61), FP, None).await {
            // Answered before the script began: try again.
            Ok(Begin::Claimed(c)) => c.release(),
            Err(StoreError::Unavailable(why)) => break (why, started.elapsed()),
            other => panic!("unexpected {:?}", other.map(|_| ())),
        }
    };
    assert!(
        waited < Duration::from_secs(3),
        "unavailable after {waited:?}: {why}"
    );
    spin.await.unwrap();
    assert!(
        matches!(
            store.clone().begin(id(62), FP, None).await,
            Ok(Begin::Claimed(_))
        ),
        "the call after the outage was not answered"
    );
}

#[tokio::test]
async fn redis_refuses_a_record_written_by_a_future_version() {
    let server = RedisServer::start().await;
    let store = redis_store(server.url(), Duration::from_secs(30)).await;
    let mut raw = record("x").as_bytes().to_vec();
    raw[3] += 1;
    let mut conn = server.connection().await;
    let key = format!("test:{{{}}}", id(10).hex());
    ::redis::cmd("SET")
        .arg(&key)
        .arg(raw)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    match store.clone().begin(id(10), FP, None).await {
        Err(StoreError::Corrupt(why)) => assert!(why.contains("newer"), "{why}"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn redis_down_is_unavailable_within_the_op_timeout_and_recovers() {
    let mut server = RedisServer::start().await;
    let store = redis_store(server.url(), Duration::from_secs(30)).await;
    server.stop();
    let started = tokio::time::Instant::now();
    match store.clone().begin(id(11), FP, None).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("expected unavailable, got {:?}", other.map(|_| ())),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    eventually!(!store.ready(), "readiness never noticed the outage");
    server.restart().await;
    eventually!(
        matches!(
            store.clone().begin(id(11), FP, None).await,
            Ok(Begin::Claimed(_))
        ),
        "the store never recovered"
    );
    eventually!(store.ready(), "never ready again");
}

/// An expired record that a new claim replaces is counted once, on both disk modes: a
/// claim that found no record skips reading it again at completion, one that found an
/// expired record must still replace its index entries.
#[tokio::test]
async fn disk_counts_a_replaced_expired_record_once() {
    for strict in [false, true] {
        let (store, _dir) = disk_store(strict);
        let first = claim(&store, 30, None).await;
        first
            .complete(record("old"), Duration::from_millis(200))
            .await
            .unwrap();
        let one = store.stats();
        assert_eq!(one.records, 1);
        // Claimable again once expired; the sweep (every second) may not have run yet.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let again = loop {
            if let Ok(Begin::Claimed(c)) = store.clone().begin(id(30), FP, None).await {
                break c;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the record outlived its ttl"
            );
            tokio::task::yield_now().await;
        };
        again.complete(record("new"), TTL).await.unwrap();
        let two = store.stats();
        assert_eq!((two.records, two.bytes), (1, one.bytes), "strict={strict}");
        assert_eq!(body_of(&store, 30).await.as_deref(), Some(&b"new"[..]));
        let fresh = claim(&store, 31, None).await;
        fresh.complete(record("abc"), TTL).await.unwrap();
        assert_eq!(store.stats().records, 2, "strict={strict}");
    }
}
