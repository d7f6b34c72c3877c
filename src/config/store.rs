//! `[store]`: which backend, its bound or its Redis nodes, and the check that a memory
//! store can hold the largest response the routes may record.

use super::model::*;
use super::raw::{Node, Reader, Section};
use super::validate::{dur, pem_file, HOUR, KIB, MIB, MS};
use super::values::*;

/// One `redis://` or `rediss://` URL, or a list of them (a Cluster's nodes).
fn redis_urls(r: &mut Reader, path: &str, node: &Node) -> Option<RedisUrls> {
    let one = |r: &mut Reader, p: &str, n: &Node| -> Option<String> {
        let s = r.string(p, n)?;
        let scheme_ok = s.starts_with("redis://") || s.starts_with("rediss://");
        if !scheme_ok || redis::Client::open(s.as_str()).is_err() {
            let shown = mask_url(&s);
            r.error(
                p,
                &n.span,
                format!("{shown:?} is not a redis:// or rediss:// URL"),
            );
            return None;
        }
        Some(s)
    };
    let urls = match node.value {
        toml::de::DeValue::Array(_) => list(r, path, node, one)?,
        _ => vec![one(r, path, node)?],
    };
    if urls.is_empty() {
        r.error(path, &node.span, "must list at least one node URL");
        return None;
    }
    Some(RedisUrls::new(urls))
}

pub(super) fn store(r: &mut Reader, root: &Section) -> Option<StoreConfig> {
    let s = r.section("store", root.get("store"));
    let backends = [
        ("memory", Backend::Memory),
        ("redis", Backend::Redis),
        ("disk", Backend::Disk),
    ];
    let backend =
        opt(r, &s, "backend", |r, p, n| choice(r, p, n, &backends)).unwrap_or(Backend::Memory);
    let url = opt(r, &s, "url", redis_urls);
    if backend == Backend::Redis && s.get("url").is_none() {
        r.error(
            &s.key_path("url"),
            &s.span.clone(),
            "required when backend = \"redis\"",
        );
    }
    let path = opt(r, &s, "path", string).map(std::path::PathBuf::from);
    if backend == Backend::Disk && path.is_none() {
        r.error(
            &s.key_path("path"),
            &s.span.clone(),
            "required when backend = \"disk\" (the store's directory)",
        );
    }
    if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
        r.error(&s.key_path("path"), &s.span.clone(), "must not be empty");
    }
    let durabilities = [
        ("relaxed", Durability::Relaxed),
        ("strict", Durability::Strict),
    ];
    let durability = opt(r, &s, "durability", |r, p, n| {
        choice(r, p, n, &durabilities)
    })
    .unwrap_or(Durability::Relaxed);
    let on_error = [
        ("reject", OnStoreError::Reject),
        ("pass", OnStoreError::Pass),
    ];
    Some(StoreConfig {
        backend,
        max_bytes: opt(r, &s, "max_bytes", size_in(KIB, 1 << 40)).unwrap_or(256 * MIB),
        urls: url,
        ca_file: opt(r, &s, "ca_file", pem_file),
        prefix: opt(r, &s, "prefix", string).unwrap_or_else(|| "idemgate:".into()),
        lock_lease: dur(r, &s, "lock_lease", (MS, HOUR), 30),
        on_error: opt(r, &s, "on_error", |r, p, n| choice(r, p, n, &on_error))
            .unwrap_or(OnStoreError::Reject),
        path,
        durability,
    })
}

/// On the memory and disk stores a record larger than `max_bytes` is evicted the moment
/// it is stored, so its retry runs again: refuse a `max_stored_response` that cannot fit.
pub(super) fn record_must_fit(
    r: &mut Reader,
    root: &Section,
    store: &StoreConfig,
    defaults: &Policy,
    routes: &[Route],
) {
    if store.backend == Backend::Redis {
        return;
    }
    let largest = routes
        .iter()
        .map(|route| route.policy.max_stored_response)
        .chain([defaults.max_stored_response])
        .max()
        .unwrap_or(0);
    if largest >= store.max_bytes {
        let span = root.get("store").map_or(root.span.clone(), |n| n.span);
        let msg = format!(
            "{} bytes cannot hold a response of max_stored_response ({largest} bytes): it would be evicted as soon as it is recorded; raise max_bytes or lower max_stored_response",
            store.max_bytes
        );
        r.error("store.max_bytes", &span, msg);
    }
}
