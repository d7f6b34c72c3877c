//! [`ParserAnswers`] turns the bare 400/414/431 that hyper's HTTP/1 parser writes on its
//! own into problem+json like every other answer.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ProxyError;

/// How many bodiless 400/414/431 responses the service itself handed to hyper on this
/// connection and hyper has not written yet. Such a response (an upstream's own bare
/// 400, say) looks exactly like hyper's automatic one, so it is counted and let through.
#[derive(Clone, Default)]
pub struct OwnBareAnswers(Arc<AtomicUsize>);

impl OwnBareAnswers {
    /// Notes a response the service produced, if it could be mistaken for hyper's.
    pub fn note(&self, status: StatusCode, body_len: Option<u64>) {
        if parser_status(status.as_u16()) && body_len == Some(0) {
            self.0.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn take(&self) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
}

fn parser_status(code: u16) -> bool {
    matches!(code, 400 | 414 | 431)
}

/// hyper writes a parse error's answer as a lone head: status line, `content-length: 0`,
/// a date, nothing after the blank line. Returns its status if `head` is one.
fn bare_parser_answer(head: &[u8]) -> Option<StatusCode> {
    const MAX_HEAD: usize = 256;
    let rest = head.strip_prefix(b"HTTP/1.1 ")?;
    if head.len() > MAX_HEAD || !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let code = std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok()?;
    // Checked first: it is the cheap test, and every head the proxy writes comes here.
    if !parser_status(code) {
        return None;
    }
    let lower = head.to_ascii_lowercase();
    if !lower.windows(19).any(|w| w == b"\r\ncontent-length: 0") {
        return None;
    }
    StatusCode::from_u16(code).ok()
}

/// The problem+json answer written in place of hyper's bare one; the connection closes.
fn problem_answer(status: StatusCode) -> Bytes {
    let error = match status.as_u16() {
        431 => ProxyError::HeadersTooLarge,
        414 => ProxyError::UriTooLong,
        _ => ProxyError::BadRequest("the request could not be parsed as HTTP".into()),
    };
    let (parts, body) = error.to_parts();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_str(),
        parts.status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        out.push_str(&format!(
            "{}: {}\r\n",
            name,
            value.to_str().unwrap_or_default()
        ));
    }
    out.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&body);
    Bytes::from(bytes)
}

/// Rewrites hyper's bare parse-error answers (see [`bare_parser_answer`]).
pub struct ParserAnswers<IO> {
    inner: IO,
    own: OwnBareAnswers,
    /// A replacement being written, and the length of the write it stands for.
    pending: Option<(Bytes, usize)>,
}

impl<IO> ParserAnswers<IO> {
    pub fn new(inner: IO, own: OwnBareAnswers) -> Self {
        ParserAnswers {
            inner,
            own,
            pending: None,
        }
    }
}

impl<IO: AsyncWrite + Unpin> ParserAnswers<IO> {
    /// Writes what is pending; `Ready(Ok(n))` with the length the caller asked to write.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<Option<usize>>> {
        while let Some((bytes, _)) = &mut self.pending {
            if bytes.is_empty() {
                let stands_for = self.pending.take().map(|(_, n)| n);
                return Poll::Ready(Ok(stands_for));
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, bytes))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            bytes.advance(n);
        }
        Poll::Ready(Ok(None))
    }

    fn intercept(&mut self, first: &[u8], total: usize) -> bool {
        match bare_parser_answer(first) {
            Some(_) if first.len() != total => false,
            Some(_) if self.own.take() => false,
            Some(status) => {
                self.pending = Some((problem_answer(status), total));
                true
            }
            None => false,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ParserAnswers<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ParserAnswers<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() && !this.intercept(buf, buf.len()) {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        match ready!(this.drain(cx))? {
            Some(n) => Poll::Ready(Ok(n)),
            None => Pin::new(&mut this.inner).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let first = bufs.iter().find(|b| !b.is_empty()).map(|b| &b[..]);
        let caught = this.pending.is_none() && first.is_some_and(|f| this.intercept(f, total));
        if this.pending.is_none() && !caught {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        match ready!(this.drain(cx))? {
            Some(n) => Poll::Ready(Ok(n)),
            None => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_bodiless_parser_statuses() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Sun, 22 Nov 2026 10:00:00 GMT\r\n\r\n";
        assert_eq!(
            bare_parser_answer(bare),
            Some(StatusCode::from_u16(431).unwrap()) // ok: test
        ); // ok: test
        let with_body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n";
        assert_eq!(bare_parser_answer(with_body), None);
        let other = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(bare_parser_answer(other), None);
    }

    #[test]
    fn own_answers_are_counted_once() {
        let own = OwnBareAnswers::default();
        own.note(StatusCode::BAD_REQUEST, Some(0));
        own.note(StatusCode::BAD_REQUEST, Some(10));
        assert!(own.take());
        assert!(!own.take());
    }
}
