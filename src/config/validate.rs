//! Turns the spanned document into a typed [`Config`], reporting every problem found.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{StatusCode, Uri};

use super::model::*;
use super::raw::{Node, Reader, Section};
use super::values::*;

pub fn config(r: &mut Reader, doc: &toml::Spanned<toml::de::DeTable>) -> Option<Config> {
    let root = &r.root(doc);
    let server = server(r, root);
    let upstream = upstream(r, root);
    let store = super::store::store(r, root);
    let idem = r.section("idempotency", root.get("idempotency"));
    let defaults = Arc::new(policy(r, &idem, &Policy::default()));
    let routes = super::routes::routes(r, root, &defaults);
    let record_api = record_api(r, root);
    if let Some(store) = &store {
        super::store::record_must_fit(r, root, store, &defaults, &routes);
    }
    r.finish();
    if !r.errors.is_empty() {
        return None;
    }
    Some(Config {
        server: server?,
        upstream: upstream?,
        store: store?,
        idempotency: defaults,
        routes,
        record_api,
    })
}

pub(super) const MS: Duration = Duration::from_millis(1);
pub(super) const HOUR: Duration = Duration::from_secs(3600);
/// humantime's year (365.25 days), so the range prints as "1year".
pub(super) const YEAR: Duration = Duration::from_secs(31_557_600);
pub(super) const KIB: u64 = 1 << 10;
pub(super) const MIB: u64 = 1 << 20;
pub(super) const GIB: u64 = 1 << 30;

fn server(r: &mut Reader, root: &Section) -> Option<ServerConfig> {
    let s = r.section("server", root.get("server"));
    let tls = tls(r, &s);
    let listen = opt(r, &s, "listen", socket_addr);
    let default_listen = ([127, 0, 0, 1], 8080).into();
    let config = ServerConfig {
        listen: listen.unwrap_or(default_listen),
        admin_listen: opt(r, &s, "admin_listen", socket_addr),
        max_request_body: opt(r, &s, "max_request_body", size_in(1, GIB)).unwrap_or(MIB),
        max_header_bytes: opt(r, &s, "max_header_bytes", size_in(KIB, MIB)).unwrap_or(64 * KIB)
            as usize,
        header_read_timeout: dur(r, &s, "header_read_timeout", (MS, HOUR), 10),
        body_read_timeout: dur(r, &s, "body_read_timeout", (MS, HOUR), 30),
        max_connections: opt(r, &s, "max_connections", count_in(1, 1_000_000)).unwrap_or(10_000)
            as usize,
        shutdown_grace: dur(r, &s, "shutdown_grace", (Duration::ZERO, HOUR), 30),
        tls: None,
    };
    Some(ServerConfig {
        tls: tls?,
        ..config
    })
}

/// `[server.tls]`: the files are loaded here, so `check` fails on what `run` would.
fn tls(r: &mut Reader, server: &Section) -> Option<Option<TlsFiles>> {
    let sec = r.section("server.tls", server.get("tls"));
    if !sec.is_present() {
        return Some(None);
    }
    let cert = required(r, &sec, "cert_file", string);
    let key = required(r, &sec, "key_file", string);
    let files = TlsFiles {
        cert_file: PathBuf::from(cert?),
        key_file: PathBuf::from(key?),
    };
    if let Err(e) = crate::server::tls::acceptor(&files) {
        // The loader's message already names the key and the file.
        let key = if e.contains("key_file") {
            "key_file"
        } else {
            "cert_file"
        };
        let span = sec.get(key).map_or(sec.span.clone(), |n| n.span);
        r.error("", &span, e);
        return None;
    }
    Some(Some(files))
}

/// A duration key within `range`, or `default_secs` when absent.
pub(super) fn dur(
    r: &mut Reader,
    sec: &Section,
    key: &str,
    range: (Duration, Duration),
    default_secs: u64,
) -> Duration {
    opt(r, sec, key, duration_in(range.0, range.1)).unwrap_or(Duration::from_secs(default_secs))
}

/// A PEM certificate file, loaded now so `check` fails where `run` would.
pub(super) fn pem_file(r: &mut Reader, path: &str, node: &Node) -> Option<PathBuf> {
    let file = PathBuf::from(r.string(path, node)?);
    match crate::proxy::forward::load_roots(&file) {
        Ok(_) => Some(file),
        Err(e) => {
            r.error(path, &node.span, e);
            None
        }
    }
}

fn upstream(r: &mut Reader, root: &Section) -> Option<UpstreamConfig> {
    let s = r.section("upstream", root.get("upstream"));
    let url = if s.is_present() {
        required(r, &s, "url", upstream_url)
    } else {
        let span = root.span.start..root.span.start;
        r.error(
            "upstream",
            &span,
            "missing required table [upstream] with url = \"http://HOST:PORT\"",
        );
        None
    };
    let connect_timeout = dur(
        r,
        &s,
        "connect_timeout",
        (MS, 300 * Duration::from_secs(1)),
        2,
    );
    let timeout = dur(r, &s, "timeout", (MS, 24 * HOUR), 30);
    let ca_file = opt(r, &s, "ca_file", pem_file);
    Some(UpstreamConfig {
        url: url?,
        connect_timeout,
        timeout,
        ca_file,
    })
}

fn upstream_url(r: &mut Reader, path: &str, node: &Node) -> Option<Uri> {
    let s = r.string(path, node)?;
    let problem = match s.parse::<Uri>() {
        Ok(uri) => match (uri.scheme_str(), uri.authority(), uri.path()) {
            (Some("http" | "https"), Some(_), "/" | "") if uri.query().is_none() => {
                return Some(uri)
            }
            (Some("http" | "https"), Some(_), _) => "a base path or query is not supported",
            _ => "must be http://HOST:PORT or https://HOST:PORT",
        },
        Err(_) => "not a valid URL",
    };
    r.error(path, &node.span, format!("{s:?}: {problem}"));
    None
}

/// Reads every `[idempotency]` key present in `sec` on top of `base`.
pub(super) fn policy(r: &mut Reader, sec: &Section, base: &Policy) -> Policy {
    let mut p = base.clone();
    set(r, sec, "key_header", request_header, &mut p.key_header);
    set(r, sec, "required", boolean, &mut p.required);
    set(r, sec, "min_key_length", key_len, &mut p.min_key_length);
    set(r, sec, "max_key_length", key_len, &mut p.max_key_length);
    set(r, sec, "ttl", duration_in(MS, YEAR), &mut p.ttl);
    set(r, sec, "store_statuses", status_set, &mut p.store_statuses);
    let concurrent = [("wait", Concurrent::Wait), ("reject", Concurrent::Reject)];
    set(
        r,
        sec,
        "concurrent",
        |r, pa, n| choice(r, pa, n, &concurrent),
        &mut p.concurrent,
    );
    set(
        r,
        sec,
        "wait_timeout",
        duration_in(MS, HOUR),
        &mut p.wait_timeout,
    );
    set(
        r,
        sec,
        "fingerprint",
        |r, pa, n| list(r, pa, n, fingerprint_part),
        &mut p.fingerprint,
    );
    let body = [
        ("raw", BodyFingerprint::Raw),
        ("json", BodyFingerprint::Json),
    ];
    set(
        r,
        sec,
        "body_fingerprint",
        |r, pa, n| choice(r, pa, n, &body),
        &mut p.body_fingerprint,
    );
    set(r, sec, "scope_headers", header_names, &mut p.scope_headers);
    set(
        r,
        sec,
        "mismatch_status",
        error_status,
        &mut p.mismatch_status,
    );
    set(
        r,
        sec,
        "replayed_header",
        response_header,
        &mut p.replayed_header,
    );
    set(
        r,
        sec,
        "replay_drop_headers",
        header_names,
        &mut p.replay_drop_headers,
    );
    set(
        r,
        sec,
        "max_stored_response",
        size_in(0, GIB),
        &mut p.max_stored_response,
    );
    let set_here = sec
        .get("min_key_length")
        .or_else(|| sec.get("max_key_length"));
    if let (true, Some(node)) = (p.min_key_length > p.max_key_length, set_here) {
        let span = node.span.clone();
        r.error(
            &sec.key_path("min_key_length"),
            &span,
            format!(
                "min_key_length ({}) is greater than max_key_length ({})",
                p.min_key_length, p.max_key_length
            ),
        );
    }
    p
}

fn set<T>(
    r: &mut Reader,
    sec: &Section,
    key: &str,
    read: impl FnOnce(&mut Reader, &str, &Node) -> Option<T>,
    slot: &mut T,
) {
    if let Some(v) = opt(r, sec, key, read) {
        *slot = v;
    }
}

fn key_len(r: &mut Reader, path: &str, node: &Node) -> Option<usize> {
    let n = count(r, path, node)?;
    usize::try_from(n).ok().filter(|n| *n <= 8192).or_else(|| {
        r.error(path, &node.span, "must be between 1 and 8192");
        None
    })
}

fn error_status(r: &mut Reader, path: &str, node: &Node) -> Option<StatusCode> {
    let s = status(r, path, node)?;
    if !(s.is_client_error() || s.is_server_error()) {
        r.error(path, &node.span, "must be a 4xx or 5xx status");
        return None;
    }
    Some(s)
}

fn fingerprint_part(r: &mut Reader, path: &str, node: &Node) -> Option<FingerprintPart> {
    let s = r.string(path, node)?;
    let part = match s.as_str() {
        "method" => FingerprintPart::Method,
        "path" => FingerprintPart::Path,
        "query" => FingerprintPart::Query,
        "body" => FingerprintPart::Body,
        other => match other
            .strip_prefix("header:")
            .map(|h| http::HeaderName::from_bytes(h.as_bytes()))
        {
            Some(Ok(h)) => FingerprintPart::Header(h),
            _ => {
                let msg = format!("invalid part {s:?}; expected \"method\", \"path\", \"query\", \"body\" or \"header:NAME\"");
                r.error(path, &node.span, msg);
                return None;
            }
        },
    };
    Some(part)
}

fn record_api(r: &mut Reader, root: &Section) -> Option<RecordApiConfig> {
    let node = root.get("record_api")?;
    let sec = r.section("record_api", Some(node));
    let listen = required(r, &sec, "listen", socket_addr);
    let tokens = required(r, &sec, "tokens", |r, p, n| list(r, p, n, token));
    let rate_limit = opt(r, &sec, "rate_limit", rate_limit);
    let ttl = dur(r, &sec, "ttl", (MS, YEAR), 24 * 3600);
    let lease = dur(r, &sec, "lease", (MS, HOUR), 30);
    if let (Some(t), Some(node)) = (&tokens, sec.get("tokens")) {
        if t.is_empty() {
            r.error(
                &sec.key_path("tokens"),
                &node.span,
                "must list at least one token",
            );
        }
    }
    Some(RecordApiConfig {
        listen: listen?,
        tokens: tokens?,
        ttl,
        lease,
        rate_limit,
    })
}

fn token(r: &mut Reader, path: &str, node: &Node) -> Option<Secret> {
    let s = r.string(path, node)?;
    let Some(var) = s.strip_prefix("env:") else {
        if s.is_empty() {
            r.error(path, &node.span, "a token cannot be empty");
            return None;
        }
        return Some(Secret::new(s));
    };
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(Secret::new(v)),
        Ok(_) => {
            r.error(
                path,
                &node.span,
                format!("environment variable {var} is empty"),
            );
            None
        }
        Err(_) => {
            r.error(
                path,
                &node.span,
                format!("environment variable {var} is not set"),
            );
            None
        }
    }
}

fn rate_limit(r: &mut Reader, path: &str, node: &Node) -> Option<RateLimit> {
    let s = r.string(path, node)?;
    let parsed = s.split_once('/').and_then(|(n, unit)| {
        let count: u32 = n
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=1_000_000).contains(n))?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return None,
        };
        Some(RateLimit { count, per })
    });
    parsed.or_else(|| {
        r.error(
            path,
            &node.span,
            format!("invalid rate {s:?}; use \"N/s\", \"N/m\" or \"N/h\" with N from 1 to 1000000"),
        );
        None
    })
}
