//! Test harness: a real counting upstream, the proxy on real sockets, real hyper clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use idemgate::body::{full, Body};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

type BoxFut = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
type Handler = Arc<dyn Fn(Request<Incoming>, usize) -> BoxFut + Send + Sync>;

pub mod disk;
pub mod redis;
pub mod relay;

/// Polls `$cond` until it holds, failing the test with `$($msg)+` after 10 s. For state
/// that has no signal to wait on (a metric, a process's memory); never a fixed sleep.
#[macro_export]
macro_rules! eventually {
    ($cond:expr, $($msg:tt)+) => {{
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(5));
        loop {
            if $cond {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, $($msg)+);
            tick.tick().await;
        }
    }};
}

/// An HTTP/1.1 + h2c server on 127.0.0.1:0 that counts the requests it receives. A
/// handler that panics fails the test (when the upstream is dropped) instead of passing
/// unnoticed as a 502 the test might even expect.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    panics: Arc<std::sync::Mutex<Vec<String>>>,
    _stop: oneshot::Sender<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        let panics = self.panics.lock().map(|p| p.clone()).unwrap_or_default();
        if !panics.is_empty() && !std::thread::panicking() {
            panic!("the fake upstream's handler panicked: {panics:?}");
        }
    }
}

impl FakeUpstream {
    /// `handler` gets each raw request and its 1-based call number.
    pub async fn raw<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req, n| Box::pin(handler(req, n)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let panics = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let (counter, seen_panics) = (calls.clone(), panics.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = &mut stop_rx => return,
                };
                let handler = handler.clone();
                let counter = counter.clone();
                let seen_panics = seen_panics.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                        let task = tokio::spawn(handler(req, n));
                        let seen_panics = seen_panics.clone();
                        async move {
                            match task.await {
                                Ok(resp) => Ok::<_, Infallible>(resp),
                                Err(e) => {
                                    seen_panics.lock().unwrap().push(format!("call {n}: {e}"));
                                    let mut resp = Response::new(full("handler panicked"));
                                    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                                    Ok(resp)
                                }
                            }
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeUpstream {
            addr,
            calls,
            panics,
            _stop: stop_tx,
        }
    }

    /// `handler` gets each request with its body read in full.
    pub async fn buffered<F, Fut>(handler: F) -> Self
    where
        F: Fn(Seen, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        Self::raw(move |req, n| {
            let handler = handler.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let seen = Seen {
                    method: parts.method,
                    uri: parts.uri,
                    headers: parts.headers,
                    body,
                };
                handler(seen, n).await
            }
        })
        .await
    }

    /// Answers 201 with a JSON body describing the request and its call number.
    pub async fn echo() -> Self {
        Self::buffered(|seen, n| async move { echo_response(&seen, n) }).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

pub fn echo_response(seen: &Seen, n: usize) -> Response<Body> {
    let doc = serde_json::json!({
        "call": n,
        "method": seen.method.as_str(),
        "uri": seen.uri.to_string(),
        "body": String::from_utf8_lossy(&seen.body),
    });
    Response::builder()
        .status(StatusCode::CREATED)
        .header("content-type", "application/json")
        .header("x-upstream-call", n.to_string())
        .body(full(doc.to_string()))
        .unwrap()
}

/// The proxy running in this process on 127.0.0.1:0.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub record_api: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

/// Base config: `{upstream}` is replaced by the upstream's URL; listeners are forced to
/// port 0 on loopback.
pub fn config(toml: &str, upstream: &str) -> idemgate::config::Config {
    let text = toml.replace("{upstream}", upstream);
    match idemgate::config::parse(&text) {
        Ok(mut c) => {
            c.server.listen = "127.0.0.1:0".parse().unwrap();
            c.server.admin_listen = Some("127.0.0.1:0".parse().unwrap());
            if let Some(api) = &mut c.record_api {
                api.listen = "127.0.0.1:0".parse().unwrap();
            }
            c
        }
        Err(errors) => panic!("test config invalid: {errors:?}\n{text}"),
    }
}

impl TestProxy {
    pub async fn start(toml: &str, upstream: &str) -> Self {
        Self::with_config(config(toml, upstream)).await
    }

    pub async fn with_config(config: idemgate::config::Config) -> Self {
        let listeners = idemgate::Listeners::bind(&config).await.unwrap();
        let addr = listeners.proxy_addr().unwrap();
        let admin = listeners.admin_addr();
        let record_api = listeners.record_api_addr();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(idemgate::run(config, listeners, async move {
            let _ = stop_rx.await;
        }));
        TestProxy {
            addr,
            admin,
            record_api,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Fires the shutdown future and waits for `run` to return.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }

    pub fn trigger_shutdown(&mut self) -> tokio::task::JoinHandle<Result<(), String>> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.take().unwrap()
    }
}

/// A response read in full.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// The problem+json `code`, asserting the content type.
    pub fn code(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        self.json()["code"].as_str().unwrap().to_string()
    }
}

/// A pooled HTTP/1.1 client.
#[derive(Clone)]
pub struct Client {
    inner: HyperClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Client {
    pub fn new() -> Self {
        Client {
            inner: HyperClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// A client that drops pooled connections idle for `idle`: keep it under the
    /// server's `header_read_timeout`, which closes idle connections, as with any
    /// keep-alive server, or a request can race the close.
    pub fn with_pool_idle(idle: Duration) -> Self {
        Client {
            inner: HyperClient::builder(TokioExecutor::new())
                .pool_idle_timeout(idle)
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build_http(),
        }
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Got {
        let resp = self.inner.request(req).await.expect("request failed");
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .expect("response body failed")
            .to_bytes();
        Got {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// A POST whose connection may fail (a killed server): the error instead of a panic.
    pub async fn try_post(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Got, String> {
        let resp = self
            .inner
            .request(request("POST", url, headers, body))
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Got {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn post(&self, url: &str, headers: &[(&str, &str)], body: &str) -> Got {
        self.send(request("POST", url, headers, body)).await
    }

    pub async fn get(&self, url: &str) -> Got {
        self.send(request("GET", url, &[], "")).await
    }

    /// A GET whose connection may be refused: `None` then, instead of a panic.
    pub async fn try_get(&self, url: &str) -> Option<Got> {
        let resp = self
            .inner
            .request(request("GET", url, &[], ""))
            .await
            .ok()?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.ok()?.to_bytes();
        Some(Got {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// Sends a POST from a task of its own (for requests that must be in flight together).
pub fn spawn_post(
    c: &Client,
    url: &str,
    headers: &[(&'static str, &'static str)],
    body: &'static str,
) -> tokio::task::JoinHandle<Got> {
    let (c, url, headers) = (c.clone(), url.to_string(), headers.to_vec());
    tokio::spawn(async move { c.post(&url, &headers, body).await })
}

pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .unwrap()
}

/// A body of `total` bytes following a fixed pattern, produced in chunks as it is read,
/// so neither side ever holds the whole body.
pub struct PatternBody {
    sent: usize,
    total: usize,
}

pub const CHUNK: usize = 64 * 1024;

pub fn pattern_byte(i: usize) -> u8 {
    (i % 251) as u8
}

impl PatternBody {
    pub fn new(total: usize) -> Self {
        PatternBody { sent: 0, total }
    }
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.sent >= self.total {
            return std::task::Poll::Ready(None);
        }
        let n = CHUNK.min(self.total - self.sent);
        let start = self.sent;
        let chunk: Vec<u8> = (start..start + n).map(pattern_byte).collect();
        self.sent += n;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(chunk)))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact((self.total - self.sent) as u64)
    }
}

/// Reads a body frame by frame, checking each byte against the pattern; returns the
/// number of bytes read, or the offset of the first wrong byte as an error.
pub async fn verify_pattern<B>(mut body: B) -> Result<usize, String>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut offset = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body error at {offset}: {e:?}"))?;
        if let Ok(data) = frame.into_data() {
            for (i, b) in data.iter().enumerate() {
                if *b != pattern_byte(offset + i) {
                    return Err(format!("wrong byte at offset {}", offset + i));
                }
            }
            offset += data.len();
        }
    }
    Ok(offset)
}

/// The real `idemgate` binary running as a child process.
pub struct ProxyProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub record_api: Option<SocketAddr>,
    pub lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Writes `toml` (with `{upstream}` replaced) to a temp file and starts the binary;
    /// returns once its "idemgate listening" log line names the bound address.
    pub async fn spawn(toml: &str, upstream: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, toml.replace("{upstream}", upstream)).unwrap();
        let path = path.to_str().unwrap().to_string();
        Self::spawn_args(&["--config", &path], dir).await
    }

    /// Starts the binary with `args` (plus JSON logs) and waits until it listens.
    pub async fn spawn_args(args: &[&str], dir: tempfile::TempDir) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
            .args(args)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("idemgate binary did not start");
        let stdout = child.stdout.take().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let listening = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let line = rx.recv().await.expect("idemgate exited before listening");
                let Ok(doc) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if doc["message"] == "idemgate listening" {
                    return doc;
                }
            }
        })
        .await
        .expect("no 'idemgate listening' line within 20s");
        let addr = listening["listen"].as_str().unwrap().parse().unwrap();
        let admin = listening["admin"].as_str().and_then(|s| s.parse().ok());
        let record_api = listening["record_api"]
            .as_str()
            .and_then(|s| s.parse().ok());
        ProxyProcess {
            child,
            addr,
            admin,
            record_api,
            lines: rx,
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The config file written by [`ProxyProcess::spawn`].
    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("proxy.toml")
    }

    /// Reads log lines until one contains `needle`; returns it (and every line read).
    pub async fn wait_for_line(&mut self, needle: &str) -> (String, Vec<String>) {
        let mut seen = Vec::new();
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = self.lines.recv().await {
                seen.push(line.clone());
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => (line, seen),
            _ => panic!("no log line containing {needle:?} within 10s; saw {seen:#?}"),
        }
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// Peak resident memory in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Waits for the process to exit (polling with a deadline) and returns its status.
    pub async fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let end = tokio::time::Instant::now() + deadline;
        let mut poll = tokio::time::interval(Duration::from_millis(10));
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "idemgate did not exit within {deadline:?}"
            );
            poll.tick().await;
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Holds upstream requests until opened, and says when each one arrived.
pub struct Gate {
    entered: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<usize>>,
    release: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    /// Waits until the next request has reached the upstream; returns its call number.
    pub async fn entered(&self) -> usize {
        tokio::time::timeout(Duration::from_secs(10), self.entered.lock().await.recv())
            .await
            .expect("no request reached the upstream within 10s")
            .unwrap()
    }

    pub fn open(&self) {
        self.release.send_replace(true);
    }

    /// Closes the gate again: requests from now on wait for the next [`Gate::open`].
    pub fn close(&self) {
        self.release.send_replace(false);
    }
}

/// An echo upstream whose requests wait at a [`Gate`].
pub async fn gated_echo() -> (FakeUpstream, Arc<Gate>) {
    let (entered_tx, entered_rx) = tokio::sync::mpsc::unbounded_channel();
    let (release, release_rx) = tokio::sync::watch::channel(false);
    let upstream = FakeUpstream::buffered(move |seen, n| {
        let entered = entered_tx.clone();
        let mut release = release_rx.clone();
        async move {
            let _ = entered.send(n);
            let _ = release.wait_for(|open| *open).await;
            echo_response(&seen, n)
        }
    })
    .await;
    let gate = Gate {
        entered: tokio::sync::Mutex::new(entered_rx),
        release,
    };
    (upstream, Arc::new(gate))
}

/// A process's resident memory in KiB (`VmRSS`): what a bound is proven by.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap();
    line.trim().trim_end_matches("kB").trim().parse().unwrap()
}
