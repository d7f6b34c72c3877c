//! One serving thread's connections to the upstream.
//!
//! Why not hyper-util's pooled client: for each HTTP/1 request it took a shared pool's
//! lock, raced a checkout against a lazily built connect, and spawned a task to put the
//! connection back once it was ready again. A serving thread never shares its
//! connections, so a short list does: a request takes a connection that hyper says is
//! ready, and the connection goes back on the list as soon as the response head is in.
//! It is ready again once its response body has been read.
//!
//! What is known about a failed exchange is exact: a request hyper hands back was never
//! written, so it goes on the next connection (or, on a fresh one, is refused); one that
//! was written and then lost its connection has an unknown outcome.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use http::uri::Uri;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower_service::Service;

use super::forward::{error_chain, UpstreamFailure};
use crate::body::Body;

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    fn is_ready(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }
}

/// A connection on the list, idle or with a response still being read.
struct Entry {
    sender: Sender,
    since: Instant,
}

struct Conns {
    /// Connections with or without a response still being read; most recent last.
    list: Vec<Entry>,
    /// Whether the task that closes idle connections runs (from the first connect on,
    /// since a runtime is needed).
    reaping: bool,
}

/// Closed connections, and those idle past the timeout, are dropped this often.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// Where connections go: the upstream's scheme and authority.
    base: Uri,
    conns: Mutex<Conns>,
    idle_timeout: Duration,
    /// What the upstream's last new connection spoke: [`UNKNOWN`], [`HTTP1`] or [`HTTP2`].
    spoke: AtomicU8,
    /// Taken to connect while the upstream may speak HTTP/2: its one connection serves
    /// every request, so a burst must not open one each.
    connecting: tokio::sync::Mutex<()>,
}

const UNKNOWN: u8 = 0;
const HTTP1: u8 = 1;
const HTTP2: u8 = 2;

/// Where a request stands after the connections already open.
enum Pooled {
    Answered(Response<Incoming>),
    NoneReady(Request<Body>),
}

/// What became of a request on one connection.
enum Sent {
    Answered(Response<Incoming>, Sender),
    /// Never written: the request is handed back.
    HandedBack(Request<Body>, String),
    Lost(String),
}

impl Pool {
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        base: Uri,
        idle_timeout: Duration,
    ) -> Self {
        Pool {
            connector,
            base,
            conns: Mutex::new(Conns {
                list: Vec::new(),
                reaping: false,
            }),
            idle_timeout,
            spoke: AtomicU8::new(UNKNOWN),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Sends `req` (its URI in origin form) on a ready connection, or a new one.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamFailure> {
        req = match self.on_open(req).await? {
            Pooled::Answered(resp) => return Ok(resp),
            Pooled::NoneReady(req) => req,
        };
        let mut gate = None;
        if self.may_speak_h2() {
            gate = Some(self.connecting.lock().await);
            // The connect this one waited for may have opened a connection to share.
            req = match self.on_open(req).await? {
                Pooled::Answered(resp) => return Ok(resp),
                Pooled::NoneReady(req) => req,
            };
        }
        // Boxed: a connect's state (resolver, TCP, TLS and HTTP/2 handshakes) is ~7.5 KB,
        // and every request's future would otherwise carry it and be copied with it.
        let sender = Box::pin(self.connect())
            .await
            .map_err(UpstreamFailure::Refused)?;
        drop(gate);
        match send_on(sender, &self.base, req).await {
            Sent::Answered(resp, sender) => {
                self.checkin(sender);
                Ok(resp)
            }
            Sent::HandedBack(_, why) => Err(UpstreamFailure::Refused(why)),
            Sent::Lost(why) => Err(UpstreamFailure::Reset(why)),
        }
    }

    /// Tries the connections already open; a request one hands back unwritten goes on
    /// the next.
    async fn on_open(&self, mut req: Request<Body>) -> Result<Pooled, UpstreamFailure> {
        while let Some(sender) = self.checkout() {
            match send_on(sender, &self.base, req).await {
                Sent::Answered(resp, sender) => {
                    self.checkin(sender);
                    return Ok(Pooled::Answered(resp));
                }
                Sent::HandedBack(back, _) => req = back,
                Sent::Lost(why) => return Err(UpstreamFailure::Reset(why)),
            }
        }
        Ok(Pooled::NoneReady(req))
    }

    /// Only an https upstream can choose HTTP/2 (by ALPN); until one connection says
    /// which it speaks, or while it speaks HTTP/2, new connections are made one at a time.
    fn may_speak_h2(&self) -> bool {
        self.base.scheme() == Some(&http::uri::Scheme::HTTPS)
            && self.spoke.load(Ordering::Relaxed) != HTTP1
    }

    fn lock(&self) -> MutexGuard<'_, Conns> {
        // The list is whole between any two statements: a poisoned one is still usable.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ready connection, the most recently used first.
    fn checkout(&self) -> Option<Sender> {
        let mut conns = self.lock();
        let list = &mut conns.list;
        let i = list.iter().rposition(|c| c.sender.is_ready())?;
        match &list[i].sender {
            Sender::H2(s) => {
                let s = s.clone();
                list[i].since = Instant::now();
                Some(Sender::H2(s))
            }
            Sender::H1(_) => Some(list.remove(i).sender),
        }
    }

    /// Drops closed connections and closes those idle past the timeout (dropping an idle
    /// connection's sender ends it). An HTTP/1 connection whose response is still being
    /// read is busy, not idle: its clock starts again.
    fn sweep(&self) {
        let now = Instant::now();
        let timeout = self.idle_timeout;
        let mut conns = self.lock();
        for c in conns.list.iter_mut() {
            if matches!(c.sender, Sender::H1(_)) && !c.sender.is_ready() {
                c.since = now;
            }
        }
        conns
            .list
            .retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < timeout);
    }

    /// Sweeps every [`SWEEP_EVERY`] for as long as the pool lives.
    fn start_reaper(self: &Arc<Self>) {
        let mut conns = self.lock();
        if conns.reaping {
            return;
        }
        conns.reaping = true;
        let pool: Weak<Pool> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                match pool.upgrade() {
                    Some(pool) => pool.sweep(),
                    None => return,
                }
            }
        });
    }

    /// Puts the connection back as soon as the response head is in; it is picked again
    /// once it is ready (an HTTP/2 connection is shared and already there).
    fn checkin(&self, sender: Sender) {
        if let Sender::H1(_) = sender {
            self.lock().list.push(Entry {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(self: &Arc<Self>) -> Result<Sender, String> {
        self.start_reaper();
        let io = self
            .connector
            .clone()
            .call(self.base.clone())
            .await
            .map_err(|e| error_chain(&*e))?;
        let sender = if io.connected().is_negotiated_h2() {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| error_chain(&e))?;
            tokio::spawn(conn);
            self.spoke.store(HTTP2, Ordering::Relaxed);
            // Shared from the start: later requests multiplex on it.
            self.lock().list.push(Entry {
                sender: Sender::H2(sender.clone()),
                since: Instant::now(),
            });
            Sender::H2(sender)
        } else {
            let (sender, conn) = http1::handshake(io).await.map_err(|e| error_chain(&e))?;
            tokio::spawn(conn);
            self.spoke.store(HTTP1, Ordering::Relaxed);
            Sender::H1(sender)
        };
        Ok(sender)
    }
}

/// Writes `req` on one connection, in the form its protocol wants.
async fn send_on(sender: Sender, base: &Uri, req: Request<Body>) -> Sent {
    let result = match sender {
        Sender::H1(mut s) => {
            let result = s.try_send_request(req).await;
            result.map(|resp| (resp, Sender::H1(s)))
        }
        Sender::H2(mut s) => {
            let mut req = req;
            if !h2_form(base, &mut req) {
                return Sent::HandedBack(req, "no HTTP/2 form for the URI".into());
            }
            let result = s.try_send_request(req).await;
            result.map(|resp| (resp, Sender::H2(s)))
        }
    };
    match result {
        Ok((resp, sender)) => Sent::Answered(resp, sender),
        Err(mut e) => match e.take_message() {
            Some(back) => Sent::HandedBack(h1_form(back), error_chain(e.error())),
            None => Sent::Lost(error_chain(e.error())),
        },
    }
}

/// HTTP/2 carries the scheme and authority in the request itself; `false` (and the
/// request unchanged) if they cannot form a URI.
fn h2_form(base: &Uri, req: &mut Request<Body>) -> bool {
    let mut uri = Uri::builder();
    if let Some(scheme) = base.scheme() {
        uri = uri.scheme(scheme.clone());
    }
    if let Some(authority) = base.authority() {
        uri = uri.authority(authority.clone());
    }
    if let Some(pq) = req.uri().path_and_query() {
        uri = uri.path_and_query(pq.clone());
    }
    match uri.build() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return false,
    }
    *req.version_mut() = Version::HTTP_2;
    true
}

/// A request handed back from an HTTP/2 connection, as the next one may be HTTP/1.
fn h1_form(mut req: Request<Body>) -> Request<Body> {
    if let Some(pq) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = Uri::from(pq);
    }
    *req.version_mut() = Version::HTTP_11;
    req
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn connector() -> HttpsConnector<HttpConnector> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap() // ok: test
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http)
    }

    /// A connection left idle past the timeout is closed without another request coming.
    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_idle_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(); // ok: test
        let addr = listener.local_addr().unwrap(); // ok: test
        let upstream = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap(); // ok: test
            let mut buf = [0u8; 4096];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap(); // ok: test
                head.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap(); // ok: test
                           // What the next read sees: the pool closing the connection (0 bytes).
            s.read(&mut buf).await.unwrap() // ok: test
        });
        let base: Uri = format!("http://{addr}").parse().unwrap(); // ok: test
        let pool = Arc::new(Pool::new(connector(), base, Duration::from_millis(50)));
        let req = Request::get("/")
            .header("host", "upstream")
            .body(crate::body::full(Bytes::new()))
            .unwrap(); // ok: test
        let resp = pool.send(req).await.unwrap(); // ok: test
        let body = resp.into_body().collect().await.unwrap().to_bytes(); // ok: test
        assert_eq!(body, Bytes::from_static(b"ok"));
        let read = tokio::time::timeout(Duration::from_secs(5), upstream).await;
        assert_eq!(read.unwrap().unwrap(), 0, "the idle connection stayed open"); // ok: test
        assert!(pool.lock().list.is_empty());
    }
}
