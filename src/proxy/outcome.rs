//! What happened to a request, for the log line and the `outcome` metric label.

use std::time::Duration;

use crate::error::ProxyError;
use crate::store::RecordId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Passthrough,
    Forwarded,
    Replayed,
    Coalesced,
    Conflict,
    Mismatch,
    KeyMissing,
    KeyInvalid,
    TooLarge,
    BodyTimeout,
    BadRequest,
    UpstreamError,
    StoreError,
}

impl Outcome {
    pub const ALL: [Outcome; 13] = [
        Outcome::Passthrough,
        Outcome::Forwarded,
        Outcome::Replayed,
        Outcome::Coalesced,
        Outcome::Conflict,
        Outcome::Mismatch,
        Outcome::KeyMissing,
        Outcome::KeyInvalid,
        Outcome::TooLarge,
        Outcome::BodyTimeout,
        Outcome::BadRequest,
        Outcome::UpstreamError,
        Outcome::StoreError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Passthrough => "passthrough",
            Outcome::Forwarded => "forwarded",
            Outcome::Replayed => "replayed",
            Outcome::Coalesced => "coalesced",
            Outcome::Conflict => "conflict",
            Outcome::Mismatch => "mismatch",
            Outcome::KeyMissing => "key_missing",
            Outcome::KeyInvalid => "key_invalid",
            Outcome::TooLarge => "too_large",
            Outcome::BodyTimeout => "body_timeout",
            Outcome::BadRequest => "bad_request",
            Outcome::UpstreamError => "upstream_error",
            Outcome::StoreError => "store_error",
        }
    }

    pub fn of_error(e: &ProxyError) -> Self {
        match e {
            ProxyError::KeyMissing { .. } => Outcome::KeyMissing,
            ProxyError::KeyInvalid(_) => Outcome::KeyInvalid,
            ProxyError::BodyTooLarge { .. } => Outcome::TooLarge,
            ProxyError::BodyTimeout => Outcome::BodyTimeout,
            ProxyError::BadRequest(_) | ProxyError::HeadersTooLarge | ProxyError::UriTooLong => {
                Outcome::BadRequest
            }
            ProxyError::NotRetained => Outcome::Replayed,
            ProxyError::Mismatch { .. } => Outcome::Mismatch,
            ProxyError::InProgress { .. } => Outcome::Conflict,
            ProxyError::UpstreamUnavailable(_) | ProxyError::UpstreamTimeout => {
                Outcome::UpstreamError
            }
            ProxyError::StoreUnavailable => Outcome::StoreError,
            // Record API answers; never produced on the proxy path.
            ProxyError::Unauthorized | ProxyError::RateLimited { .. } | ProxyError::LockNotHeld => {
                Outcome::BadRequest
            }
        }
    }
}

/// A request's fate, reported once per request.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub outcome: Option<Outcome>,
    pub record: Option<RecordId>,
    pub upstream_latency: Option<Duration>,
}

impl Report {
    pub fn new(
        outcome: Outcome,
        record: Option<RecordId>,
        upstream_latency: Option<Duration>,
    ) -> Self {
        Report {
            outcome: Some(outcome),
            record,
            upstream_latency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metrics keep one counter per outcome, found at `outcome as usize`.
    #[test]
    fn all_lists_each_outcome_at_its_own_index() {
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, i, "{outcome:?}");
        }
    }
}
