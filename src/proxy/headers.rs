//! Header rules shared by both directions: hop-by-hop headers (and every header the
//! `Connection` header names) never cross the proxy, bodies are re-framed, and forwarded
//! requests learn who the client was.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, response, Uri, Version};

/// RFC 9110 §7.6.1 plus the de-facto ones proxies also drop.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Who is on the other side of a client connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The peer's address as `X-Forwarded-For` appends it, rendered once per connection
    /// rather than per request.
    peer_ip: HeaderValue,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        let ip = peer.ip().to_string();
        let peer_ip = HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static(""));
        ConnInfo { peer, tls, peer_ip }
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(name)
}

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most heads carry none: one pass over the names, rather than a lookup per name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // `Connection: keep-alive` (or `close`) names nothing more to drop.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| {
            !name.eq_ignore_ascii_case("keep-alive") && !name.eq_ignore_ascii_case("close")
        })
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for name in named.iter().chain(present.iter()) {
        headers.remove(name);
    }
}

/// Rewrites a client request's head so it can be sent to `upstream`.
pub fn to_upstream(parts: &mut request::Parts, conn: &ConnInfo, upstream: &Uri) {
    let host = client_host(parts);
    strip_hop_by_hop(&mut parts.headers);
    // Bodies are re-framed: hyper derives the framing from the body we hand it.
    parts.headers.remove(header::CONTENT_LENGTH);
    match &host {
        Some(host) => {
            if !parts.headers.contains_key(header::HOST) {
                parts.headers.insert(header::HOST, host.clone());
            }
            parts.headers.insert(X_FORWARDED_HOST, host.clone());
        }
        // HTTP/1.1 needs one: the upstream's own host, and its port unless the default
        // (never any userinfo in the URL).
        None => {
            if let Some(v) = upstream_host(upstream) {
                parts.headers.insert(header::HOST, v);
            }
        }
    }
    append_forwarded_for(&mut parts.headers, &conn.peer_ip);
    let proto = if conn.tls { "https" } else { "http" };
    parts
        .headers
        .insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    parts.uri = origin_form(&parts.uri);
    parts.version = Version::HTTP_11;
}

fn upstream_host(upstream: &Uri) -> Option<HeaderValue> {
    let host = upstream.host()?;
    let default = match upstream.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let value = match upstream.port_u16() {
        Some(port) if port != default => format!("{host}:{port}"),
        _ => host.to_string(),
    };
    HeaderValue::from_str(&value).ok()
}

/// The host the client asked for: `Host` on HTTP/1, `:authority` on HTTP/2.
fn client_host(parts: &request::Parts) -> Option<HeaderValue> {
    if let Some(h) = parts.headers.get(header::HOST) {
        return Some(h.clone());
    }
    let authority = parts.uri.authority()?;
    HeaderValue::from_str(authority.as_str()).ok()
}

fn append_forwarded_for(headers: &mut HeaderMap, peer_ip: &HeaderValue) {
    let prev = headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok());
    let value = match prev {
        Some(prev) if !prev.trim().is_empty() => {
            let ip = peer_ip.to_str().unwrap_or("");
            HeaderValue::from_str(&format!("{prev}, {ip}")).ok()
        }
        _ => Some(peer_ip.clone()),
    };
    headers.remove(&X_FORWARDED_FOR);
    if let Some(v) = value {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// The path and query alone: the connection decides where the request goes.
fn origin_form(original: &Uri) -> Uri {
    match original.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

/// Cleans an upstream response head before it goes back to the client.
pub fn to_client(parts: &mut response::Parts) {
    let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
    strip_hop_by_hop(&mut parts.headers);
    if chunked {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_host_leaves_out_a_default_port_and_any_userinfo() {
        let host = |url: &str| upstream_host(&url.parse().unwrap()); // ok: test
        assert_eq!(host("http://api:80"), Some(HeaderValue::from_static("api")));
        assert_eq!(
            host("https://api:443/x"),
            Some(HeaderValue::from_static("api"))
        );
        assert_eq!(
            host("http://u:pw@api:8080"),
            Some(HeaderValue::from_static("api:8080"))
        );
        assert_eq!(
            host("https://[::1]:8443"),
            Some(HeaderValue::from_static("[::1]:8443"))
        );
    }

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
