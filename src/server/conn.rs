//! One client connection, from accept to close. Whatever a client sends (nothing, half a
//! TLS handshake, part of the HTTP/2 preface, a head one byte at a time), it must finish
//! a request head within `header_read_timeout` of connecting or of its last answer, or
//! the connection is closed: idle sockets cannot fill `max_connections`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::activity::{Active, Activity, ClientIo};
use super::io::{OwnBareAnswers, ParserAnswers};
use crate::body::{Body, BoxError};
use crate::config::ServerConfig;
use crate::error::ProxyError;
use crate::proxy::{ConnInfo, Proxy};

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// nginx's `http2_max_concurrent_streams` default.
const H2_MAX_STREAMS: u32 = 128;
/// How long an idle HTTP/2 client gets to take its GOAWAY before the socket is dropped.
const GOODBYE: Duration = Duration::from_secs(1);

/// Protocol settings built once from `[server]` and shared by every connection.
pub struct Settings {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
    max_header_bytes: usize,
}

impl Settings {
    pub fn new(config: &ServerConfig) -> Self {
        let max_header_bytes = config.max_header_bytes;
        let mut h1 = hyper::server::conn::http1::Builder::new();
        // `header_read_timeout` is enforced by `drive`'s idle check (no request in
        // progress for that long, partial heads included); hyper's own armed a timer for
        // every request head.
        h1.header_read_timeout(None)
            .keep_alive(true)
            .max_header_size(max_header_bytes)
            // hyper's default buffer (~400 KiB) unless the head limit is larger.
            .max_buf_size(max_header_bytes.max(8192 + 4096 * 100));
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20))
            .max_concurrent_streams(H2_MAX_STREAMS)
            // HPACK counts 32 bytes per field on top of name and value; the exact limit
            // is checked per request (431 problem+json), this only stops absurd lists.
            .max_header_list_size(u32::try_from(max_header_bytes * 2).unwrap_or(u32::MAX));
        Settings {
            h1,
            h2,
            header_read_timeout: config.header_read_timeout,
            max_header_bytes,
        }
    }
}

pub struct Conn {
    settings: Arc<Settings>,
    proxy: Proxy,
    info: ConnInfo,
    drain: CancellationToken,
    activity: Activity,
    /// TLS, protocol detection and the first head must all be done by then.
    first_deadline: Instant,
}

impl Conn {
    pub fn new(
        settings: Arc<Settings>,
        proxy: Proxy,
        info: ConnInfo,
        drain: CancellationToken,
    ) -> Self {
        let first_deadline = Instant::now() + settings.header_read_timeout;
        Conn {
            settings,
            proxy,
            info,
            drain,
            activity: Activity::default(),
            first_deadline,
        }
    }

    pub async fn serve(self, stream: TcpStream, tls: Option<TlsAcceptor>) {
        let Some(acceptor) = tls else {
            return self.serve_io(stream, false).await;
        };
        match tokio::time::timeout_at(self.first_deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                self.serve_io(tls, h2).await
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = %self.info.peer, error = %e, "TLS handshake failed")
            }
            Err(_) => tracing::debug!(peer = %self.info.peer, "TLS handshake timed out"),
        }
    }

    async fn serve_io<IO>(self, mut io: IO, alpn_h2: bool)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let detected = match alpn_h2 {
            true => Ok(Ok((true, Bytes::new()))),
            false => tokio::time::timeout_at(self.first_deadline, detect(&mut io)).await,
        };
        let (h2, prefix) = match detected {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                return tracing::debug!(peer = %self.info.peer, error = %e, "connection closed before a request")
            }
            Err(_) => {
                return tracing::debug!(peer = %self.info.peer, "no request within header_read_timeout")
            }
        };
        let io = ClientIo::new(prefix, io, self.activity.clone());
        let settings = self.settings.clone();
        if h2 {
            let service = self.service(Proto::Http2(settings.max_header_bytes));
            let conn = settings.h2.serve_connection(TokioIo::new(io), service);
            self.drive(conn, true).await
        } else {
            let own = OwnBareAnswers::default();
            let service = self.service(Proto::Http1(own.clone()));
            let io = ParserAnswers::new(io, own);
            let conn = settings.h1.serve_connection(TokioIo::new(io), service);
            self.drive(conn, false).await
        }
    }

    fn service(
        &self,
        proto: Proto,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Tracked>,
        Error = Infallible,
        Future = impl std::future::Future<Output = Result<Response<Tracked>, Infallible>> + Send,
    > + Clone {
        let (proxy, info, activity) =
            (self.proxy.clone(), self.info.clone(), self.activity.clone());
        service_fn(move |req: Request<Incoming>| {
            let guard = activity.begin();
            let (proxy, proto, info) = (proxy.clone(), proto.clone(), info.clone());
            async move {
                let resp = match proto {
                    Proto::Http2(limit) if head_size(&req) > limit => {
                        ProxyError::HeadersTooLarge.into_response()
                    }
                    _ => proxy.handle(req, info).await,
                };
                if let Proto::Http1(own) = &proto {
                    own.note(resp.status(), resp.body().size_hint().exact());
                }
                Ok::<_, Infallible>(resp.map(|body| Tracked {
                    body,
                    _active: guard,
                }))
            }
        })
    }

    /// Runs the connection until it ends, the server drains, or it sits idle too long.
    async fn drive<C>(self, conn: C, h2: bool)
    where
        C: GracefulConnection,
        C::Error: std::fmt::Display,
    {
        tokio::pin!(conn);
        let idle = self
            .activity
            .idle(self.first_deadline, self.settings.header_read_timeout);
        tokio::pin!(idle);
        let mut draining = false;
        loop {
            tokio::select! {
                ended = conn.as_mut() => {
                    if let Err(e) = ended {
                        tracing::debug!(peer = %self.info.peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = self.drain.cancelled(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = &mut idle => break,
            }
        }
        tracing::debug!(peer = %self.info.peer, "closing a connection idle for header_read_timeout");
        if h2 {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(GOODBYE, conn).await;
        }
    }
}

/// What the service must do beyond the proxy for one protocol: on HTTP/1 hyper enforces
/// the head limit itself and its bare answers are rewritten, so the service notes its own
/// bodiless 400/414/431s; on HTTP/2 the service checks the head size.
#[derive(Clone)]
enum Proto {
    Http1(OwnBareAnswers),
    Http2(usize),
}

/// Reads just enough to tell the HTTP/2 preface from an HTTP/1 request line.
async fn detect<IO: AsyncRead + Unpin>(io: &mut IO) -> std::io::Result<(bool, Bytes)> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    while n < buf.len() {
        let read = io.read(&mut buf[n..]).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        n += read;
        if buf[..n] != H2_PREFACE[..n] {
            return Ok((false, Bytes::copy_from_slice(&buf[..n])));
        }
    }
    Ok((true, Bytes::copy_from_slice(&buf)))
}

/// An HTTP/2 request's pseudo-headers and header list as counted against
/// `max_header_bytes` (HTTP/1 heads are measured on the wire by hyper).
fn head_size<B>(req: &Request<B>) -> usize {
    let target = req.uri().path_and_query().map_or(1, |pq| pq.as_str().len());
    let authority = req.uri().authority().map_or(0, |a| a.as_str().len());
    let line = req.method().as_str().len() + target + authority + 12;
    let fields: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    line + fields
}

/// A response body that keeps its request counted as active until it is fully sent.
pub struct Tracked {
    body: Body,
    _active: Active,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
