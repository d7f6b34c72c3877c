//! How busy one client connection is, so an idle one can be closed: requests in progress,
//! and when the connection last made progress (a request ended, or bytes were written to
//! the client). Plain atomics: a request costs two increments and a clock read, and
//! nothing is woken; the idle check wakes on its own timer.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

#[derive(Clone)]
pub struct Activity(Arc<ActivityState>);

struct ActivityState {
    began: Instant,
    active: AtomicUsize,
    /// When a request last ended or bytes last reached the client; `u64::MAX` before.
    last_end_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity(Arc::new(ActivityState {
            began: Instant::now(),
            active: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(u64::MAX),
        }))
    }
}

pub struct Active(Activity);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.progressed();
        self.0 .0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    /// The connection moved: a request ended or bytes were written.
    fn progressed(&self) {
        let ms = self.0.began.elapsed().as_millis() as u64;
        self.0.last_end_ms.store(ms, Ordering::Release);
    }

    pub fn begin(&self) -> Active {
        self.0.active.fetch_add(1, Ordering::AcqRel);
        Active(self.clone())
    }

    /// Completes once the connection has had no request in progress for `every` since
    /// its last one ended, or, before its first request, at `first`.
    pub async fn idle(&self, first: Instant, every: Duration) {
        let state = &self.0;
        loop {
            let busy = state.active.load(Ordering::Acquire) > 0;
            let deadline = match state.last_end_ms.load(Ordering::Acquire) {
                _ if busy => Instant::now() + every,
                u64::MAX => first,
                ms => state.began + Duration::from_millis(ms) + every,
            };
            if !busy && Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// The client IO as hyper sees it: the bytes read to tell HTTP/2 from HTTP/1 are handed
/// back first, and every write that made progress is noted, so a response still draining
/// to a slow reader keeps its connection from counting as idle.
pub struct ClientIo<IO> {
    prefix: Bytes,
    inner: IO,
    activity: Activity,
}

impl<IO> ClientIo<IO> {
    pub fn new(prefix: Bytes, inner: IO, activity: Activity) -> Self {
        ClientIo {
            prefix,
            inner,
            activity,
        }
    }

    fn note(&self, written: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = written {
            if *n > 0 {
                self.activity.progressed();
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ClientIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ClientIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&written);
        written
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(&written);
        written
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
