//! Typed readers for the value kinds the file uses: durations, sizes, addresses,
//! header names, statuses. Each reports its own error and returns `None` on failure.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode};

use super::model::StatusSet;
use super::raw::{Node, Reader, Section};

/// Reads `key` from `sec` with `read` when present; `None` when absent or invalid.
pub fn opt<T>(
    r: &mut Reader,
    sec: &Section,
    key: &str,
    read: impl FnOnce(&mut Reader, &str, &Node) -> Option<T>,
) -> Option<T> {
    let node = sec.get(key)?;
    read(r, &sec.key_path(key), &node)
}

/// Like [`opt`] but reports a missing key.
pub fn required<T>(
    r: &mut Reader,
    sec: &Section,
    key: &str,
    read: impl FnOnce(&mut Reader, &str, &Node) -> Option<T>,
) -> Option<T> {
    if sec.get(key).is_none() {
        let path = sec.key_path(key);
        let span = sec.span.clone();
        r.error(&path, &span, "missing required key");
        return None;
    }
    opt(r, sec, key, read)
}

pub fn string(r: &mut Reader, path: &str, node: &Node) -> Option<String> {
    r.string(path, node)
}

pub fn boolean(r: &mut Reader, path: &str, node: &Node) -> Option<bool> {
    r.bool(path, node)
}

pub fn duration(r: &mut Reader, path: &str, node: &Node) -> Option<Duration> {
    let s = r.string(path, node)?;
    match humantime::parse_duration(&s) {
        Ok(d) => Some(d),
        Err(e) => {
            r.error(
                path,
                &node.span,
                format!("invalid duration {s:?} ({e}); use e.g. \"500ms\", \"30s\", \"24h\""),
            );
            None
        }
    }
}

/// A duration within `min..=max`; the message names the range, so a value like
/// `"300000000000y"` is refused by `check` instead of overflowing a clock at run time.
pub fn duration_in(
    min: Duration,
    max: Duration,
) -> impl Fn(&mut Reader, &str, &Node) -> Option<Duration> {
    move |r, path, node| {
        let d = duration(r, path, node)?;
        if d < min || d > max {
            let (lo, hi) = (
                humantime::format_duration(min),
                humantime::format_duration(max),
            );
            r.error(path, &node.span, format!("must be between {lo} and {hi}"));
            return None;
        }
        Some(d)
    }
}

pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" => 1 << 10,
        "mb" => 1_000_000,
        "mib" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

pub fn size(r: &mut Reader, path: &str, node: &Node) -> Option<u64> {
    if let toml::de::DeValue::Integer(_) = node.value {
        let n = r.integer(path, node)?;
        return u64::try_from(n).ok().or_else(|| {
            r.error(path, &node.span, "a size cannot be negative");
            None
        });
    }
    let s = r.string(path, node)?;
    parse_size(&s).or_else(|| {
        let msg = format!(
            "invalid size {s:?}; use bytes (1048576) or a unit: \"512KiB\", \"1MiB\", \"1GiB\""
        );
        r.error(path, &node.span, msg);
        None
    })
}

/// A size within `min..=max` bytes.
pub fn size_in(min: u64, max: u64) -> impl Fn(&mut Reader, &str, &Node) -> Option<u64> {
    move |r, path, node| {
        let n = size(r, path, node)?;
        if n < min || n > max {
            let msg = format!("must be between {} and {}", show_size(min), show_size(max));
            r.error(path, &node.span, msg);
            return None;
        }
        Some(n)
    }
}

fn show_size(n: u64) -> String {
    match n {
        0 => "0 bytes".into(),
        n if n % (1 << 40) == 0 => format!("{}TiB", n >> 40),
        n if n % (1 << 30) == 0 => format!("{}GiB", n >> 30),
        n if n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => format!("{n} byte{}", if n == 1 { "" } else { "s" }),
    }
}

/// A whole number within `min..=max`.
pub fn count_in(min: u64, max: u64) -> impl Fn(&mut Reader, &str, &Node) -> Option<u64> {
    move |r, path, node| {
        let n = r.integer(path, node)?;
        match u64::try_from(n) {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                r.error(path, &node.span, format!("must be between {min} and {max}"));
                None
            }
        }
    }
}

pub fn count(r: &mut Reader, path: &str, node: &Node) -> Option<u64> {
    let n = r.integer(path, node)?;
    match u64::try_from(n) {
        Ok(n) if n > 0 => Some(n),
        _ => {
            r.error(path, &node.span, "must be a whole number greater than zero");
            None
        }
    }
}

pub fn socket_addr(r: &mut Reader, path: &str, node: &Node) -> Option<SocketAddr> {
    let s = r.string(path, node)?;
    s.parse().ok().or_else(|| {
        let msg = format!("invalid listen address {s:?}; use IP:PORT, e.g. \"127.0.0.1:8080\"");
        r.error(path, &node.span, msg);
        None
    })
}

pub fn header_name(r: &mut Reader, path: &str, node: &Node) -> Option<HeaderName> {
    let s = r.string(path, node)?;
    HeaderName::from_bytes(s.as_bytes()).ok().or_else(|| {
        r.error(path, &node.span, format!("invalid header name {s:?}"));
        None
    })
}

/// Headers the proxy drops or rewrites on every hop, or that frame the message: a key,
/// scope or replay marker in one of them could never work as configured.
const PROXY_OWNED: [&str; 13] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
    "date",
    "http2-settings",
];

fn owned_by_proxy(r: &mut Reader, path: &str, node: &Node, name: HeaderName) -> Option<HeaderName> {
    if PROXY_OWNED.contains(&name.as_str()) {
        let msg = format!(
            "{name} is a hop-by-hop or framing header the proxy manages itself; use another header"
        );
        r.error(path, &node.span, msg);
        return None;
    }
    Some(name)
}

/// A request header idemgate reads (a key source).
pub fn request_header(r: &mut Reader, path: &str, node: &Node) -> Option<HeaderName> {
    let name = header_name(r, path, node)?;
    owned_by_proxy(r, path, node, name)
}

/// A header idemgate adds to responses (the replay marker).
pub fn response_header(r: &mut Reader, path: &str, node: &Node) -> Option<HeaderName> {
    let name = header_name(r, path, node)?;
    if ["content-type", "set-cookie", "retry-after"].contains(&name.as_str()) {
        let msg = format!("{name} carries the response's own meaning; use another header");
        r.error(path, &node.span, msg);
        return None;
    }
    owned_by_proxy(r, path, node, name)
}

pub fn list<T>(
    r: &mut Reader,
    path: &str,
    node: &Node,
    mut item: impl FnMut(&mut Reader, &str, &Node) -> Option<T>,
) -> Option<Vec<T>> {
    let items = r.array(path, node)?;
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, n) in items.iter().enumerate() {
        match item(r, &format!("{path}[{i}]"), n) {
            Some(v) => out.push(v),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

pub fn header_names(r: &mut Reader, path: &str, node: &Node) -> Option<Vec<HeaderName>> {
    list(r, path, node, header_name)
}

pub fn status(r: &mut Reader, path: &str, node: &Node) -> Option<StatusCode> {
    let n = r.integer(path, node)?;
    match u16::try_from(n).ok().filter(|n| (100..=599).contains(n)) {
        Some(n) => StatusCode::from_u16(n).ok(),
        None => {
            r.error(
                path,
                &node.span,
                format!("{n} is not an HTTP status (100-599)"),
            );
            None
        }
    }
}

/// A status a response can end with (200-599): no 1xx as a final answer.
pub fn final_status(r: &mut Reader, path: &str, node: &Node) -> Option<StatusCode> {
    let s = status(r, path, node)?;
    if s.is_informational() {
        r.error(path, &node.span, "must be a final status (200-599)");
        return None;
    }
    Some(s)
}

pub fn status_set(r: &mut Reader, path: &str, node: &Node) -> Option<StatusSet> {
    let mut set = StatusSet::default();
    let items = list(r, path, node, |r, p, n| match n.value {
        toml::de::DeValue::Integer(_) => status(r, p, n).map(|s| (None, Some(s.as_u16()))),
        _ => {
            let s = r.string(p, n)?;
            let class = s
                .strip_suffix("xx")
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|c| (1..=5).contains(c));
            if class.is_none() {
                r.error(
                    p,
                    &n.span,
                    format!("invalid status class {s:?}; use \"1xx\"..\"5xx\" or a number"),
                );
            }
            class.map(|c| (Some(c), None))
        }
    })?;
    for (class, code) in items {
        class.into_iter().for_each(|c| set.add_class(c));
        code.into_iter().for_each(|c| set.add_code(c));
    }
    Some(set)
}

pub fn methods(r: &mut Reader, path: &str, node: &Node) -> Option<Vec<Method>> {
    let methods = list(r, path, node, |r, p, n| {
        let s = r.string(p, n)?;
        let upper = s.to_ascii_uppercase();
        Method::from_bytes(upper.as_bytes()).ok().or_else(|| {
            r.error(p, &n.span, format!("invalid HTTP method {s:?}"));
            None
        })
    })?;
    if methods.is_empty() {
        r.error(path, &node.span, "must list at least one method");
        return None;
    }
    Some(methods)
}

/// One-of string choice, e.g. `concurrent = "wait" | "reject"`.
pub fn choice<T: Copy>(
    r: &mut Reader,
    path: &str,
    node: &Node,
    options: &[(&str, T)],
) -> Option<T> {
    let s = r.string(path, node)?;
    if let Some((_, v)) = options.iter().find(|(name, _)| *name == s) {
        return Some(*v);
    }
    let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
    r.error(
        path,
        &node.span,
        format!("invalid value {s:?}; expected one of {}", names.join(", ")),
    );
    None
}
