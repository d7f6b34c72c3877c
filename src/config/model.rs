//! Typed configuration: everything a request needs is parsed once at load, so the
//! request path never looks at a string from the file again.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode, Uri};

use super::pattern::PathPattern;

/// The whole file, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub store: StoreConfig,
    /// The `[idempotency]` defaults, before any route's overrides.
    pub idempotency: Arc<Policy>,
    pub routes: Vec<Route>,
    pub record_api: Option<RecordApiConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub max_request_body: u64,
    /// Request line plus header section; larger heads get 431.
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Scheme and authority only (a base path is refused at load).
    pub url: Uri,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
    Disk,
}

/// When the disk store's writes count as done (SPEC §5, README "Guarantees").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Written to the OS before use, synced about every second: a process crash loses
    /// nothing, a machine crash at most the last second.
    Relaxed,
    /// Synced before use (group commit): a claim before its request is forwarded, a
    /// record before its response is sent.
    Strict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    Reject,
    Pass,
}

/// Redis node URLs: one for a single node, several for a Cluster. They may hold a
/// password, so `Debug` and `Display` mask it.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrls(Vec<String>);

impl RedisUrls {
    pub fn new(urls: Vec<String>) -> Self {
        RedisUrls(urls)
    }

    pub fn list(&self) -> &[String] {
        &self.0
    }

    pub fn is_cluster(&self) -> bool {
        self.0.len() > 1
    }
}

/// `redis://user:secret@host` → `redis://user:***@host`.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

impl std::fmt::Display for RedisUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let masked: Vec<String> = self.0.iter().map(|u| mask_url(u)).collect();
        f.write_str(&masked.join(", "))
    }
}

impl std::fmt::Debug for RedisUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisUrls({self})")
    }
}

/// A credential: compared and used, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub backend: Backend,
    pub max_bytes: u64,
    pub urls: Option<RedisUrls>,
    /// PEM roots that a `rediss://` server's certificate must chain to (instead of the
    /// system's), for a Redis with its own CA.
    pub ca_file: Option<PathBuf>,
    pub prefix: String,
    pub lock_lease: Duration,
    pub on_error: OnStoreError,
    /// disk: the store's directory (one process at a time).
    pub path: Option<PathBuf>,
    pub durability: Durability,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrent {
    Wait,
    Reject,
}

impl std::fmt::Display for Concurrent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Concurrent::Wait => "wait",
            Concurrent::Reject => "reject",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FingerprintPart {
    Method,
    Path,
    Query,
    Body,
    Header(HeaderName),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFingerprint {
    Raw,
    Json,
}

/// Which response statuses are recorded: whole classes and/or exact codes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusSet {
    classes: [bool; 6],
    codes: Vec<u16>,
}

impl StatusSet {
    pub fn add_class(&mut self, class: u16) {
        if let Some(slot) = self.classes.get_mut(class as usize) {
            *slot = true;
        }
    }
    pub fn add_code(&mut self, code: u16) {
        if !self.codes.contains(&code) {
            self.codes.push(code);
        }
    }
    pub fn contains(&self, status: StatusCode) -> bool {
        let code = status.as_u16();
        self.classes
            .get((code / 100) as usize)
            .copied()
            .unwrap_or(false)
            || self.codes.contains(&code)
    }
}

impl std::fmt::Display for StatusSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let classes = (1..6)
            .filter(|c| self.classes[*c])
            .map(|c| format!("{c}xx"));
        let codes = self.codes.iter().map(|c| c.to_string());
        let all: Vec<String> = classes.chain(codes).collect();
        write!(f, "[{}]", all.join(", "))
    }
}

/// Every `[idempotency]` setting; each route holds its own resolved copy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub key_header: HeaderName,
    pub required: bool,
    pub min_key_length: usize,
    pub max_key_length: usize,
    pub ttl: Duration,
    pub store_statuses: StatusSet,
    pub concurrent: Concurrent,
    pub wait_timeout: Duration,
    pub fingerprint: Vec<FingerprintPart>,
    pub body_fingerprint: BodyFingerprint,
    pub scope_headers: Vec<HeaderName>,
    pub mismatch_status: StatusCode,
    pub replayed_header: HeaderName,
    pub replay_drop_headers: Vec<HeaderName>,
    pub max_stored_response: u64,
}

impl Default for Policy {
    fn default() -> Self {
        let mut store_statuses = StatusSet::default();
        store_statuses.add_class(2);
        Policy {
            key_header: HeaderName::from_static("idempotency-key"),
            required: false,
            min_key_length: 1,
            max_key_length: 255,
            ttl: Duration::from_secs(24 * 3600),
            store_statuses,
            concurrent: Concurrent::Wait,
            wait_timeout: Duration::from_secs(30),
            fingerprint: vec![
                FingerprintPart::Method,
                FingerprintPart::Path,
                FingerprintPart::Query,
                FingerprintPart::Body,
            ],
            body_fingerprint: BodyFingerprint::Raw,
            scope_headers: vec![http::header::AUTHORIZATION],
            mismatch_status: StatusCode::UNPROCESSABLE_ENTITY,
            replayed_header: HeaderName::from_static("idempotent-replayed"),
            replay_drop_headers: vec![http::header::SET_COOKIE],
            max_stored_response: 1024 * 1024,
        }
    }
}

/// Where a route finds its idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Header(HeaderName),
    /// RFC 6901 pointer into a JSON request body (webhook event ids).
    JsonPointer(String),
}

impl KeySource {
    /// Where a client must put the key, for error details: "the Idempotency-Key header".
    pub fn location(&self) -> String {
        match self {
            KeySource::Header(h) => format!("the {} header", title_case(h.as_str())),
            KeySource::JsonPointer(p) => format!("the JSON body member {p}"),
        }
    }
}

/// `idempotency-key` → `Idempotency-Key`, as users write header names.
fn title_case(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Header(h) => write!(f, "header {h}"),
            KeySource::JsonPointer(p) => write!(f, "json_pointer {p}"),
        }
    }
}

/// A fixed answer for duplicates (webhook providers want a 2xx, not a replay).
#[derive(Debug, Clone)]
pub struct DuplicateResponse {
    pub status: StatusCode,
    pub body: bytes::Bytes,
    pub content_type: http::HeaderValue,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: Arc<str>,
    pub methods: Vec<Method>,
    pub path: PathPattern,
    pub key: KeySource,
    pub policy: Arc<Policy>,
    pub duplicate_response: Option<DuplicateResponse>,
}

impl Route {
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        self.methods.contains(method) && self.path.matches(path)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RecordApiConfig {
    pub listen: SocketAddr,
    /// Resolved bearer tokens (masked in `Debug`).
    pub tokens: Vec<Secret>,
    pub ttl: Duration,
    pub lease: Duration,
    pub rate_limit: Option<RateLimit>,
}
