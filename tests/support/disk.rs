//! The disk store's test helpers: its config, files, and what the binary reports.

use std::path::Path;

use super::{Client, ProxyProcess};

pub const KEY: &str = "idempotency-key";

pub fn disk_config(store: &Path, durability: &str, statuses: &str) -> String {
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

pub fn body(n: usize) -> String {
    format!("{{\"order\":{n}}}")
}

pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
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

pub async fn metric(c: &Client, p: &ProxyProcess, name: &str) -> u64 {
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
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    files_under(dir)
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.blocks() * 512))
        .sum()
}

/// Incompressible, so the bytes on disk are the bytes sent.
pub fn padding(i: usize, len: usize) -> String {
    let mut out = vec![0u8; len / 2];
    blake3::Hasher::new()
        .update(&i.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out.iter().map(|b| format!("{b:02x}")).collect()
}

/// Claims record `i` on `store` and completes it with a 201 and a body of `body_len`
/// bytes, as the proxy would; panics if the record was not free.
pub async fn put_record(
    store: &std::sync::Arc<idemgate::store::disk::DiskStore>,
    i: u64,
    body_len: usize,
) {
    use idemgate::store::{Begin, Fingerprint, Record, RecordId, Store};
    let id = RecordId(*blake3::hash(&i.to_le_bytes()).as_bytes());
    let Begin::Claimed(claim) = store
        .clone()
        .begin(id, Fingerprint([1; 32]), None)
        .await
        .unwrap()
    else {
        panic!("record {i} was not free")
    };
    let record = Record {
        fingerprint: Fingerprint([1; 32]),
        status: http::StatusCode::CREATED,
        headers: vec![],
        body: Some(padding(i as usize, body_len).into()),
    };
    claim
        .complete(
            record.encode().unwrap(),
            std::time::Duration::from_secs(3600),
        )
        .await
        .unwrap();
}

/// Opens a `relaxed` disk store at `dir` with room for everything, as the binary would.
pub fn open_store(
    dir: &Path,
    stop: &tokio_util::sync::CancellationToken,
) -> std::sync::Arc<idemgate::store::disk::DiskStore> {
    idemgate::store::disk::DiskStore::open(
        dir,
        64 << 30,
        false,
        Box::new(idemgate::proxy::unknown_outcome_record),
        stop.clone(),
    )
    .unwrap()
}
