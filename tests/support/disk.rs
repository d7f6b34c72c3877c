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
