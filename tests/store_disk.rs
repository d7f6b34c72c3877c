//! The disk store through the real binary and real files: records survive SIGTERM and
//! `kill -9`, requests in flight when the process died are settled per SPEC §3 step 8,
//! and a store that cannot be used (held by another process, damaged, unwritable, from a
//! newer idemgate) stops the start with a clear message instead of a panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use support::disk::*;
use support::*;

/// Records `n` orders and returns what each first answer's body was.
async fn record_orders(c: &Client, p: &ProxyProcess, n: usize) -> Vec<bytes::Bytes> {
    let mut bodies = Vec::new();
    for i in 0..n {
        let key = format!("order-{i}");
        let got = c.post(&p.url("/v1/orders"), &[(KEY, &key)], &body(i)).await;
        assert_eq!(got.status, StatusCode::CREATED, "order {i}");
        bodies.push(got.body);
    }
    bodies
}

async fn assert_all_replay(c: &Client, p: &ProxyProcess, bodies: &[bytes::Bytes]) {
    for (i, first) in bodies.iter().enumerate() {
        let key = format!("order-{i}");
        let got = c.post(&p.url("/v1/orders"), &[(KEY, &key)], &body(i)).await;
        assert_eq!(
            got.status,
            StatusCode::CREATED,
            "order {i} after the restart"
        );
        assert_eq!(&got.body, first, "order {i}: not the recorded body");
        assert_eq!(got.header("idempotent-replayed"), Some("true"), "order {i}");
    }
}

async fn restart_replays(durability: &str, signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::echo().await;
    let toml = disk_config(dir.path(), durability, r#"["2xx"]"#);
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
    assert_eq!(
        upstream.calls(),
        20,
        "a recorded order ran again after the restart"
    );
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
    let toml = disk_config(dir.path(), durability, statuses);
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
    assert!(
        pending.await.unwrap().is_err(),
        "the killed process answered"
    );
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
    run_command(idemgate(&path)).await
}

/// The binary on the config at `path`, its output captured.
fn idemgate(path: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"));
    cmd.arg("--config")
        .arg(path)
        .args(["--log-format", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
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
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("panicked"), "idemgate panicked: {text}");
    (out.status, text)
}

#[tokio::test]
async fn a_second_process_on_the_same_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::echo().await;
    let toml = disk_config(dir.path(), "relaxed", r#"["2xx"]"#);
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
    let toml = disk_config(dir.path(), "relaxed", r#"["2xx"]"#);
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
    assert!(
        out.contains("is damaged or truncated"),
        "unclear message: {out}"
    );
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
    let toml = disk_config(dir.path(), "relaxed", r#"["2xx"]"#);
    let config_dir = tempfile::tempdir().unwrap();
    let (status, out) = run_to_exit(&toml, config_dir.path()).await;
    assert!(!status.success(), "started on a newer store: {out}");
    assert!(
        out.contains("written by a newer idemgate (format 99"),
        "unclear message: {out}"
    );
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
    let toml = disk_config(&store, "relaxed", r#"["2xx"]"#);
    let path = parent.path().join("proxy.toml");
    std::fs::write(&path, toml.replace("{upstream}", "http://127.0.0.1:9")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = idemgate(&path);
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
        disk_config(dir.path(), "strict", r#"["2xx"]"#)
    );
    let c = Client::new();
    let mut first = ProxyProcess::spawn(&toml, &upstream.url()).await;
    let api = first.record_api.unwrap();
    let done = json!({ "scope": "payouts", "key": "p-1" });
    let lock = record_call(&c, api, "POST", done.clone()).await;
    let put = json!({ "scope": "payouts", "key": "p-1", "token": lock["token"], "status": 201, "body": { "paid": true } });
    assert_eq!(
        record_call(&c, api, "PUT", put).await,
        json!({ "stored": true })
    );
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
    assert_eq!(
        record_call(&c, api, "PUT", put).await,
        json!({ "stored": true })
    );
}
