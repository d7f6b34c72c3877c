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

use std::sync::{Mutex, MutexGuard};
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

struct Idle {
    sender: Sender,
    since: Instant,
}

struct Conns {
    /// Connections with or without a response still being read; most recent last.
    list: Vec<Idle>,
    swept: Instant,
}

/// Closed connections, and those idle past the timeout, are dropped this often.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// Where connections go: the upstream's scheme and authority.
    base: Uri,
    conns: Mutex<Conns>,
    idle_timeout: Duration,
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
                swept: Instant::now(),
            }),
            idle_timeout,
        }
    }

    /// Sends `req` (its URI in origin form) on a ready connection, or a new one.
    pub async fn send(
        &self,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamFailure> {
        while let Some(sender) = self.checkout() {
            match send_on(sender, &self.base, req).await {
                Sent::Answered(resp, sender) => return Ok(self.checkin(resp, sender)),
                Sent::HandedBack(back, _) => req = back,
                Sent::Lost(why) => return Err(UpstreamFailure::Reset(why)),
            }
        }
        let sender = self.connect().await.map_err(UpstreamFailure::Refused)?;
        match send_on(sender, &self.base, req).await {
            Sent::Answered(resp, sender) => Ok(self.checkin(resp, sender)),
            Sent::HandedBack(_, why) => Err(UpstreamFailure::Refused(why)),
            Sent::Lost(why) => Err(UpstreamFailure::Reset(why)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Conns> {
        // The list is whole between any two statements: a poisoned one is still usable.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ready connection, the most recently used first.
    fn checkout(&self) -> Option<Sender> {
        let now = Instant::now();
        let mut conns = self.lock();
        if now.duration_since(conns.swept) >= SWEEP_EVERY {
            let timeout = self.idle_timeout;
            conns.swept = now;
            conns
                .list
                .retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < timeout);
        }
        let list = &mut conns.list;
        let i = list.iter().rposition(|c| c.sender.is_ready())?;
        match &list[i].sender {
            Sender::H2(s) => {
                let s = s.clone();
                list[i].since = now;
                Some(Sender::H2(s))
            }
            Sender::H1(_) => Some(list.remove(i).sender),
        }
    }

    /// Puts the connection back as soon as the response head is in; it is picked again
    /// once it is ready (an HTTP/2 connection is shared and already there).
    fn checkin(&self, resp: Response<Incoming>, sender: Sender) -> Response<Incoming> {
        if let Sender::H1(_) = sender {
            self.lock().list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
        resp
    }

    async fn connect(&self) -> Result<Sender, String> {
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
            // Shared from the start: later requests multiplex on it.
            self.lock().list.push(Idle {
                sender: Sender::H2(sender.clone()),
                since: Instant::now(),
            });
            Sender::H2(sender)
        } else {
            let (sender, conn) = http1::handshake(io).await.map_err(|e| error_chain(&e))?;
            tokio::spawn(conn);
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
            let result = s.try_send_request(h2_form(base, req)).await;
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

/// HTTP/2 carries the scheme and authority in the request itself.
fn h2_form(base: &Uri, mut req: Request<Body>) -> Request<Body> {
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
    if let Ok(uri) = uri.build() {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = Version::HTTP_2;
    req
}

/// A request handed back from an HTTP/2 connection, as the next one may be HTTP/1.
fn h1_form(mut req: Request<Body>) -> Request<Body> {
    if let Some(pq) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = Uri::from(pq);
    }
    *req.version_mut() = Version::HTTP_11;
    req
}
