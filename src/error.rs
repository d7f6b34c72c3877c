//! The one place where failures become HTTP answers: every response idemgate makes
//! itself is `application/problem+json` (RFC 9457) with a stable `code` (SPEC §4).

use std::time::Duration;

use bytes::Bytes;
use http::{header, response, HeaderValue, Response, StatusCode};

use crate::body::{full, Body};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// `source` says where the key was looked for: "the Idempotency-Key header".
    KeyMissing {
        source: String,
    },
    KeyInvalid(String),
    BodyTooLarge {
        limit: u64,
    },
    BodyTimeout,
    BadRequest(String),
    HeadersTooLarge,
    UriTooLong,
    NotRetained,
    Mismatch {
        status: StatusCode,
    },
    InProgress {
        retry_after: Duration,
    },
    UpstreamUnavailable(String),
    UpstreamTimeout,
    StoreUnavailable,
    Unauthorized,
    RateLimited {
        retry_after: Duration,
    },
    LockNotHeld,
}

impl ProxyError {
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::KeyMissing { .. } => "idempotency_key_missing",
            ProxyError::KeyInvalid(_) => "idempotency_key_invalid",
            ProxyError::BodyTooLarge { .. } => "request_body_too_large",
            ProxyError::BodyTimeout => "request_body_timeout",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::HeadersTooLarge => "request_headers_too_large",
            ProxyError::UriTooLong => "uri_too_long",
            ProxyError::NotRetained => "idempotency_response_not_retained",
            ProxyError::Mismatch { .. } => "idempotency_key_mismatch",
            ProxyError::InProgress { .. } => "idempotency_request_in_progress",
            ProxyError::UpstreamUnavailable(_) => "upstream_unavailable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::StoreUnavailable => "store_unavailable",
            ProxyError::Unauthorized => "unauthorized",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::LockNotHeld => "lock_not_held",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::KeyMissing { .. }
            | ProxyError::KeyInvalid(_)
            | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::NotRetained => StatusCode::GONE,
            ProxyError::Mismatch { status } => *status,
            ProxyError::InProgress { .. } => StatusCode::CONFLICT,
            ProxyError::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::LockNotHeld => StatusCode::CONFLICT,
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ProxyError::KeyMissing { .. } => "Idempotency key missing",
            ProxyError::KeyInvalid(_) => "Idempotency key invalid",
            ProxyError::BodyTooLarge { .. } => "Request body too large",
            ProxyError::BodyTimeout => "Request body timeout",
            ProxyError::BadRequest(_) => "Bad request",
            ProxyError::HeadersTooLarge => "Request headers too large",
            ProxyError::UriTooLong => "URI too long",
            ProxyError::NotRetained => "Response not retained",
            ProxyError::Mismatch { .. } => "Idempotency key reused",
            ProxyError::InProgress { .. } => "Request in progress",
            ProxyError::UpstreamUnavailable(_) => "Upstream unavailable",
            ProxyError::UpstreamTimeout => "Upstream timeout",
            ProxyError::StoreUnavailable => "Store unavailable",
            ProxyError::Unauthorized => "Unauthorized",
            ProxyError::RateLimited { .. } => "Too many requests",
            ProxyError::LockNotHeld => "Lock not held",
        }
    }

    fn detail(&self) -> String {
        match self {
            ProxyError::KeyMissing { source } => format!("this endpoint requires an idempotency key in {source}"),
            ProxyError::KeyInvalid(why) => why.clone(),
            ProxyError::BodyTooLarge { limit } => format!("the request body is larger than {limit} bytes"),
            ProxyError::BodyTimeout => "the request body did not arrive in time".into(),
            ProxyError::BadRequest(why) => why.clone(),
            ProxyError::HeadersTooLarge => "the request line and headers are larger than server.max_header_bytes, or there are more than 100 headers".into(),
            ProxyError::UriTooLong => "the request target is too long".into(),
            ProxyError::NotRetained => "the request with this key completed, but its response was too large to keep; it is not run again".into(),
            ProxyError::Mismatch { .. } => "this idempotency key was already used with a different request".into(),
            ProxyError::InProgress { .. } => "a request with this idempotency key is still being processed; retry later".into(),
            ProxyError::UpstreamUnavailable(why) => format!("the upstream could not be reached: {why}"),
            ProxyError::UpstreamTimeout => "the upstream did not answer in time".into(),
            ProxyError::StoreUnavailable => "the idempotency store is unavailable".into(),
            ProxyError::Unauthorized => "a valid bearer token is required".into(),
            ProxyError::RateLimited { .. } => "this token has exceeded its rate limit".into(),
            ProxyError::LockNotHeld => {
                "no lock is held with this token: it was completed, released or its lease expired".into()
            }
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let (parts, body) = self.to_parts();
        Response::from_parts(parts, full(body))
    }

    /// The response head and problem document, for callers that record them too.
    pub fn to_parts(&self) -> (response::Parts, Bytes) {
        let status = self.status();
        let doc = serde_json::json!({
            "type": format!("https://idemgate.dev/problems/{}", self.code().replace('_', "-")),
            "title": self.title(),
            "status": status.as_u16(),
            "detail": self.detail(),
            "code": self.code(),
        });
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.status = status;
        let headers = &mut parts.headers;
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let ProxyError::InProgress { retry_after } | ProxyError::RateLimited { retry_after } =
            self
        {
            let secs = retry_after.as_secs().max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let ProxyError::StoreUnavailable = self {
            // The store's own reconnect back-off is about a second: retry then.
            headers.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        }
        if let ProxyError::Unauthorized = self {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        (parts, Bytes::from(doc.to_string()))
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.detail())
    }
}

impl std::error::Error for ProxyError {}
