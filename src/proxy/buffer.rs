//! Stage 3: the request body, read in full before the key is claimed, so a failed or
//! slow upload leaves nothing behind (413 judged from `Content-Length` before reading).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::error::ProxyError;

const INITIAL_CAPACITY: u64 = 64 * 1024;

pub async fn read(
    body: Incoming,
    headers: &HeaderMap,
    limit: u64,
    timeout: Duration,
) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut body = body;
    // The declared length is the client's word: it may size the first allocation, never
    // more than a small start (a lying `Content-Length: 500000000000` costs nothing).
    let start = declared.unwrap_or(0).min(INITIAL_CAPACITY) as usize;
    let mut buf = BytesMut::with_capacity(start);
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ProxyError::BodyTimeout),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => {
                return Err(ProxyError::BadRequest(format!(
                    "the request body could not be read: {e}"
                )))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if (buf.len() + data.len()) as u64 > limit {
                return Err(ProxyError::BodyTooLarge { limit });
            }
            buf.extend_from_slice(&data);
        }
    }
}
