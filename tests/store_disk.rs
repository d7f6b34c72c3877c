//! The disk store through the real binary and real files: records survive SIGTERM and
//! `kill -9`, requests in flight when the process died are settled per SPEC §3 step 8,
//! and a store that cannot be used (held by another process, damaged, unwritable, from a
//! newer idemgate) stops the start with a clear message instead of a panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use support::*;

const KEY: &str = "idempotency-key";

fn config(store: &Path, durability: &str, statuses: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
url = "{{upstream}}"
[store]
backend = "disk"
path = "{}"
durability = "{durability}"
[idempotency]
store_statuses = {statuses}
[[routes]]
name = "orders"
path = "/v1/orders"
"#,
        store.display()
    )
}

fn body(n: usize) -> String {
    format!("{{\"order\":{n}}}")
}

/// Records `n` orders and returns what each first answer's body was.
async fn record_orders(c: &Client, p: &ProxyProcess, n: usize) -> Vec<bytes::Bytes> {
    let mut bodies = Vec::new();
    for i in 0..n {
        let key = format!("order-{i}");
        let got = c
            .post(&p.url("/v1/orders"), &[(KEY, &key)], &body(i))
            .await;
        assert_eq!(got.status, StatusCode::CREATED, "order {i}");
        bodies.push(got.body);
    }
    bodies
}

async fn assert_all_replay(c: &Client, p: &ProxyProcess, bodies: &[bytes::Bytes]) {
    for (i, first) in bodies.iter().enumerate() {
        let key = format!("order-{i}");
        let got = c
            .post(&p.url("/v1/orders"), &[(KEY, &key)], &body(i))
            .await;
        assert_eq!(got.status, StatusCode::CREATED, "order {i} after the restart");
        assert_eq!(&got.body, first, "order {i}: not the recorded body");
        assert_eq!(got.header("idempotent-replayed"), Some("true"), "order {i}");
    }
}

async fn restart_replays(durability: &str, signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::echo().await;
    let toml = config(dir.path(), durability, r#"["2xx"]"#);
    let c = Client::new();
    let mut first = ProxyProcess::spawn(&toml, &upstream.url()).await;
    let bodies = record_orders(&c, &first, 20).await;
    first.signal(signal);
    let status = first.wait_exit(Duration::from_secs(20)).await;
    if signal == "TERM" {
        assert!(status.success(), "SIGTERM exit: {status}");
    }
    let second = ProxyProcess::spawn(&toml, &upstream.url()).await;
    assert_all_replay(&c, &second, &bodies).await;
    assert_eq!(upstream.calls(), 20, "a recorded order ran again after the restart");
}

#[tokio::test]
async fn relaxed_records_replay_after_sigterm_and_restart() {
    restart_replays("relaxed", "TERM").await;
}

#[tokio::test]
async fn strict_records_replay_after_sigterm_and_restart() {
    restart_replays("strict", "TERM").await;
}

#[tokio::test]
async fn relaxed_records_replay_after_kill_9() {
    restart_replays("relaxed", "KILL").await;
}

#[tokio::test]
async fn strict_records_replay_after_kill_9() {
    restart_replays("strict", "KILL").await;
}

/// A request is at the upstream when the process is killed; after the restart its retry
/// either replays the 502 of an unknown outcome (5xx recorded) or runs again.
async fn killed_in_flight(durability: &str, statuses: &str) -> (Got, usize) {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, gate) = gated_echo().await;
    let toml = config(dir.path(), durability, statuses);
    let mut first = ProxyProcess::spawn(&toml, &upstream.url()).await;
    let c = Client::new();
    let url = first.url("/v1/orders");
    let pending = tokio::spawn({
        let c = c.clone();
        async move { c.try_post(&url, &[(KEY, "in-flight")], &body(1)).await }
    });
    assert_eq!(gate.entered().await, 1);
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(20)).await;
    assert!(pending.await.unwrap().is_err(), "the killed process answered");
    // A retry that wrongly ran again would reach the upstream and be counted, not hang.
    gate.open();
    let second = ProxyProcess::spawn(&toml, &upstream.url()).await;
    let retry = c
        .post(&second.url("/v1/orders"), &[(KEY, "in-flight")], &body(1))
        .await;
    (retry, upstream.calls())
}

#[tokio::test]
async fn killed_in_flight_is_recorded_as_502_when_5xx_is_stored() {
    for durability in ["relaxed", "strict"] {
        let (retry, calls) = killed_in_flight(durability, r#"["2xx", "5xx"]"#).await;
        assert_eq!(retry.status, StatusCode::BAD_GATEWAY, "{durability}");
        assert_eq!(retry.code(), "upstream_unavailable", "{durability}");
        assert_eq!(retry.header("idempotent-replayed"), Some("true"));
        assert_eq!(calls, 1, "{durability}: the unknown outcome ran again");
    }
}

#[tokio::test]
async fn killed_in_flight_runs_again_when_5xx_is_not_stored() {
    for durability in ["relaxed", "strict"] {
        let (retry, calls) = killed_in_flight(durability, r#"["2xx"]"#).await;
        assert_eq!(retry.status, StatusCode::CREATED, "{durability}");
        assert_eq!(retry.header("idempotent-replayed"), None, "{durability}");
        assert_eq!(calls, 2, "{durability}: the freed key did not run again");
    }
}

/// Runs the binary on `toml` and returns its exit status and everything it printed.
async fn run_to_exit(toml: &str, config_dir: &Path) -> (std::process::ExitStatus, String) {
    let path = config_dir.join("proxy.toml");
    std::fs::write(&path, toml.replace("{upstream}", "http://127.0.0.1:9")).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"));
    cmd.arg("--config")
        .arg(&path)
        .args(["--log-format", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    run_command(cmd).await
}

async fn run_command(mut cmd: std::process::Command) -> (std::process::ExitStatus, String) {
    let child = cmd.spawn().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("idemgate did not exit within 20s on a store it cannot use")
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("panicked"), "idemgate panicked: {text}");
    (out.status, text)
}

#[tokio::test]
async fn a_second_process_on_the_same_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::echo().await;
    let toml = config(dir.path(), "relaxed", r#"["2xx"]"#);
    let first = ProxyProcess::spawn(&toml, &upstream.url()).await;
    let config_dir = tempfile::tempdir().unwrap();
    let (status, out) = run_to_exit(&toml, config_dir.path()).await;
    assert!(!status.success(), "a second process started: {out}");
    assert!(
        out.contains("in use by another idemgate process"),
        "unclear message: {out}"
    );
    // The first one is untouched.
    let got = Client::new()
        .post(&first.url("/v1/orders"), &[(KEY, "k")], &body(1))
        .await;
    assert_eq!(got.status, StatusCode::CREATED);
}

/// Fills a store through the binary, stops it, then cuts the files `damaged` picks to
/// half their length.
async fn truncated(damaged: impl Fn(&Path) -> bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::echo().await;
    let toml = config(dir.path(), "relaxed", r#"["2xx"]"#);
    let mut first = ProxyProcess::spawn(&toml, &upstream.url()).await;
    record_orders(&Client::new(), &first, 50).await;
    first.signal("TERM");
    first.wait_exit(Duration::from_secs(20)).await;
    let mut cut = 0;
    for file in files_under(dir.path()).into_iter().filter(|f| damaged(f)) {
        let len = std::fs::metadata(&file).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(len / 2).unwrap();
        cut += 1;
    }
    assert!(cut > 0, "no file to damage");
    let config_dir = tempfile::tempdir().unwrap();
    let (status, out) = run_to_exit(&toml, config_dir.path()).await;
    assert!(!status.success(), "started on a damaged store: {out}");
    out
}

#[tokio::test]
async fn a_truncated_version_file_is_a_clear_error() {
    let out = truncated(|f| f.ends_with("version")).await;
    assert!(
        out.contains("is damaged or truncated: its version file is unreadable"),
        "unclear message: {out}"
    );
}

#[tokio::test]
async fn truncated_table_files_are_a_clear_error() {
    let out = truncated(|f| f.parent().is_some_and(|p| p.ends_with("tables"))).await;
    assert!(out.contains("is damaged or truncated"), "unclear message: {out}");
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn a_store_from_a_newer_idemgate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        // What a future idemgate would leave: its own format marker.
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        meta.insert("format", 99u32.to_le_bytes()).unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let toml = config(dir.path(), "relaxed", r#"["2xx"]"#);
    let config_dir = tempfile::tempdir().unwrap();
    let (status, out) = run_to_exit(&toml, config_dir.path()).await;
    assert!(!status.success(), "started on a newer store: {out}");
    assert!(out.contains("written by a newer idemgate (format 99"), "unclear message: {out}");
}

#[tokio::test]
async fn a_directory_without_write_permission_is_a_clear_error() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let store = parent.path().join("store");
    std::fs::create_dir(&store).unwrap();
    // Readable and searchable by everyone, writable by no one but root.
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let toml = config(&store, "relaxed", r#"["2xx"]"#);
    let path = parent.path().join("proxy.toml");
    std::fs::write(&path, toml.replace("{upstream}", "http://127.0.0.1:9")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"));
    cmd.arg("--config")
        .arg(&path)
        .args(["--log-format", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if running_as_root() {
        // Root ignores permission bits: run the binary as `nobody`, as a service would.
        use std::os::unix::process::CommandExt;
        cmd.uid(65534).gid(65534);
    }
    let (status, out) = run_command(cmd).await;
    assert!(!status.success(), "started on a read-only directory: {out}");
    assert!(
        out.contains("cannot open the disk store") && out.contains("ermission denied"),
        "unclear message: {out}"
    );
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid() == 0
}

async fn record_call(
    c: &Client,
    api: std::net::SocketAddr,
    method: &str,
    doc: serde_json::Value,
) -> serde_json::Value {
    let headers = [
        ("content-type", "application/json"),
        ("authorization", "Bearer tok-disk"),
    ];
    let url = format!("http://{api}/v1/record");
    let got = c
        .send(request(method, &url, &headers, &doc.to_string()))
        .await;
    serde_json::from_slice(&got.body).unwrap()
}

/// The record API on the disk store: a stored record and a worker's live lock both
/// outlive a restart of the sidecar.
#[tokio::test]
async fn record_api_records_and_locks_survive_a_restart() {
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::echo().await;
    let toml = format!(
        "{}\n[record_api]\nlisten = \"127.0.0.1:0\"\ntokens = [\"tok-disk\"]\nlease = \"30s\"\n",
        config(dir.path(), "strict", r#"["2xx"]"#)
    );
    let c = Client::new();
    let mut first = ProxyProcess::spawn(&toml, &upstream.url()).await;
    let api = first.record_api.unwrap();
    let done = json!({ "scope": "payouts", "key": "p-1" });
    let lock = record_call(&c, api, "POST", done.clone()).await;
    let put = json!({ "scope": "payouts", "key": "p-1", "token": lock["token"], "status": 201, "body": { "paid": true } });
    assert_eq!(record_call(&c, api, "PUT", put).await, json!({ "stored": true }));
    let running = json!({ "scope": "payouts", "key": "p-2" });
    let held = record_call(&c, api, "POST", running.clone()).await;
    assert_eq!(held["locked"], true);
    first.signal("TERM");
    first.wait_exit(Duration::from_secs(20)).await;

    let second = ProxyProcess::spawn(&toml, &upstream.url()).await;
    let api = second.record_api.unwrap();
    assert_eq!(
        record_call(&c, api, "POST", done).await,
        json!({ "cached": true, "record": { "status": 201, "body": { "paid": true } } })
    );
    // The worker holding p-2 is still working: nobody else may take it...
    assert_eq!(record_call(&c, api, "POST", running).await["locked"], false);
    // ...and it can still finish with its token.
    let put = json!({ "scope": "payouts", "key": "p-2", "token": held["token"], "body": 2 });
    assert_eq!(record_call(&c, api, "PUT", put).await, json!({ "stored": true }));
}

async fn metric(c: &Client, p: &ProxyProcess, name: &str) -> u64 {
    let text = c
        .get(&format!("http://{}/metrics", p.admin.unwrap()))
        .await
        .body;
    let text = String::from_utf8_lossy(&text).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Bytes the store's files take on disk (allocated blocks, not sparse lengths).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    files_under(dir)
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.blocks() * 512))
        .sum()
}

/// Incompressible, so the bytes on disk are the bytes sent.
fn padding(i: usize, len: usize) -> String {
    let mut out = vec![0u8; len / 2];
    blake3::Hasher::new()
        .update(&i.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out.iter().map(|b| format!("{b:02x}")).collect()
}

/// 4,000 records of 8 KiB (32 MiB) expire: the sweep removes them and compaction takes
/// their space back, down to the documented slack (at most 8 MiB of not yet compacted
/// garbage in the tables; the journal is bounded on its own and not counted here).
#[tokio::test]
async fn expired_records_are_swept_and_their_space_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::echo().await;
    let toml = config(dir.path(), "relaxed", r#"["2xx"]"#)
        .replace("[idempotency]", "[idempotency]\nttl = \"2s\"");
    let p = ProxyProcess::spawn(&toml, &upstream.url()).await;
    let c = Client::new();
    let url = p.url("/v1/orders");
    let tables = dir.path().join("keyspaces");
    let mut peak = 0;
    for i in 0..4000 {
        let body = format!("{{\"pad\":\"{}\"}}", padding(i, 8192));
        let got = c.post(&url, &[(KEY, &format!("k{i}"))], &body).await;
        assert_eq!(got.status, StatusCode::CREATED);
        if i % 100 == 0 {
            peak = peak.max(disk_usage(&tables));
        }
    }
    eventually!(
        metric(&c, &p, "idemgate_store_records").await == 0,
        "expired records were never swept"
    );
    assert_eq!(metric(&c, &p, "idemgate_store_bytes").await, 0);
    let mut now = u64::MAX;
    eventually!(
        {
            now = disk_usage(&tables);
            now <= 12 << 20
        },
        "the space of expired records was not reclaimed: tables {now} bytes (peak {peak})"
    );
    eprintln!("32 MiB of records: tables peaked at {peak} bytes, {now} after expiry");
    // An expired key runs again.
    let got = c.post(&url, &[(KEY, "k0")], "{}").await;
    assert_eq!(got.header("idempotent-replayed"), None);
}

#[tokio::test]
async fn max_bytes_evicts_the_oldest_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::echo().await;
    let toml = config(dir.path(), "relaxed", r#"["2xx"]"#)
        .replace("[store]", "[store]\nmax_bytes = \"64KiB\"")
        .replace("[idempotency]", "[idempotency]\nmax_stored_response = \"8KiB\"");
    let p = ProxyProcess::spawn(&toml, &upstream.url()).await;
    let c = Client::new();
    let url = p.url("/v1/orders");
    for i in 0..200 {
        let body = format!("{{\"pad\":\"{}\"}}", padding(i, 1024));
        let got = c.post(&url, &[(KEY, &format!("k{i}"))], &body).await;
        assert_eq!(got.status, StatusCode::CREATED);
        assert!(metric(&c, &p, "idemgate_store_bytes").await <= 64 * 1024);
    }
    let evicted = metric(&c, &p, "idemgate_evicted_before_ttl_total").await;
    assert!(evicted > 100, "early evictions not counted: {evicted}");
    // The newest still replays; the oldest was evicted and runs again.
    let newest = format!("{{\"pad\":\"{}\"}}", padding(199, 1024));
    let got = c.post(&url, &[(KEY, "k199")], &newest).await;
    assert_eq!(got.header("idempotent-replayed"), Some("true"));
    let oldest = format!("{{\"pad\":\"{}\"}}", padding(0, 1024));
    let got = c.post(&url, &[(KEY, "k0")], &oldest).await;
    assert_eq!(got.header("idempotent-replayed"), None);
    assert_eq!(upstream.calls(), 201);
}

/// Writes `n` records of `body_len` bytes straight into a disk store at `dir` (the
/// layout the binary reads), then waits until the store has let go of its lock.
async fn fill(dir: &Path, n: u64, body_len: usize) {
    use idemgate::store::{Begin, Fingerprint, Record, RecordId, Store};
    let stop = tokio_util::sync::CancellationToken::new();
    let store = idemgate::store::disk::DiskStore::open(
        dir,
        64 << 30,
        false,
        Box::new(idemgate::proxy::unknown_outcome_record),
        stop.clone(),
    )
    .unwrap();
    for i in 0..n {
        let id = RecordId(*blake3::hash(&i.to_le_bytes()).as_bytes());
        let Begin::Claimed(claim) = store.clone().begin(id, Fingerprint([1; 32]), None).await.unwrap()
        else {
            panic!("record {i} was not free")
        };
        let record = Record {
            fingerprint: Fingerprint([1; 32]),
            status: StatusCode::CREATED,
            headers: vec![],
            body: Some(padding(i as usize, body_len).into()),
        };
        claim.complete(record.encode().unwrap(), Duration::from_secs(3600)).await.unwrap();
    }
    stop.cancel();
    drop(store);
    eventually!(
        fjall::Database::builder(dir).open().is_ok(),
        "the filled store never let go of its lock"
    );
}

/// The binary's RSS after serving new keys and lookups on the store at `dir`.
async fn rss_serving(dir: &Path) -> u64 {
    let upstream = FakeUpstream::echo().await;
    let toml = config(dir, "relaxed", r#"["2xx"]"#);
    let p = ProxyProcess::spawn(&toml, &upstream.url()).await;
    let c = Client::new();
    let url = p.url("/v1/orders");
    for i in 0..2000 {
        let got = c.post(&url, &[(KEY, &format!("new-{i}"))], &body(i)).await;
        assert_eq!(got.status, StatusCode::CREATED);
        let again = c.post(&url, &[(KEY, &format!("new-{i}"))], &body(i)).await;
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
    }
    p.rss_kib()
}

/// A million records on disk cost the process no more memory than an empty store:
/// the block cache and write buffers are bounded, the records stay on disk.
#[tokio::test]
async fn a_million_records_on_disk_keep_the_process_small() {
    let records: u64 = std::env::var("IDEMGATE_DISK_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let (empty, full) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let started = std::time::Instant::now();
    fill(full.path(), records, 512).await;
    let filled = started.elapsed();
    let on_disk = disk_usage(full.path());
    let rss_empty = rss_serving(empty.path()).await;
    let rss_full = rss_serving(full.path()).await;
    eprintln!(
        "{records} records ({on_disk} bytes on disk, filled in {filled:?}): RSS {rss_full} KiB, against {rss_empty} KiB on an empty store"
    );
    assert!(
        rss_full <= rss_empty + 48 * 1024,
        "RSS grew with the records on disk: {rss_full} KiB against {rss_empty} KiB"
    );
}
