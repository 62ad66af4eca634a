//! `sheepdog_rejections_total{reason}`: requests (and connections) the gateway refused itself, by a fixed set
//! of reasons. Every series exists from the start (at 0), so rates and alerts over it always have data.
//!
//! *Finish* counts a request's rejection from the error code it ended with ([`Reason::of_error`]), so an
//! admission check only has to return its `ApiError`; the accept loop counts refused connections. The label
//! values are this file's constants, never client input. Makes no decisions.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use super::must;

/// Why the gateway refused a request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A budget's limit was reached (429 `budget_exceeded`).
    BudgetExceeded,
    /// A client's rate limit was reached (429 `rate_limit_exceeded`).
    RateLimitExceeded,
    /// Missing or unknown client key (401 `invalid_api_key`).
    InvalidApiKey,
    /// The client may not use the model (403 `model_not_allowed`).
    ModelNotAllowed,
    /// Too many requests in flight (503 `overloaded`).
    Overloaded,
    /// The body is over `max_body_bytes` (413).
    BodyTooLarge,
    /// The content type is not JSON (415).
    UnsupportedMediaType,
    /// The requested model is not configured (404 `model_not_found`).
    ModelNotFound,
    /// Any other request the gateway itself found invalid (400).
    InvalidRequest,
    /// A client connection closed at once, past `max_connections`.
    ConnectionLimit,
    /// The client did not send its whole request within `client_timeout` (408 `request_timeout`).
    RequestTimeout,
}

impl Reason {
    /// Every reason, in label order.
    pub const ALL: [Reason; 11] = [
        Reason::BudgetExceeded,
        Reason::RateLimitExceeded,
        Reason::InvalidApiKey,
        Reason::ModelNotAllowed,
        Reason::Overloaded,
        Reason::BodyTooLarge,
        Reason::UnsupportedMediaType,
        Reason::ModelNotFound,
        Reason::InvalidRequest,
        Reason::ConnectionLimit,
        Reason::RequestTimeout,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BudgetExceeded => "budget_exceeded",
            Reason::RateLimitExceeded => "rate_limit_exceeded",
            Reason::InvalidApiKey => "invalid_api_key",
            Reason::ModelNotAllowed => "model_not_allowed",
            Reason::Overloaded => "overloaded",
            Reason::BodyTooLarge => "body_too_large",
            Reason::UnsupportedMediaType => "unsupported_media_type",
            Reason::ModelNotFound => "model_not_found",
            Reason::InvalidRequest => "invalid_request",
            Reason::ConnectionLimit => "connection_limit",
            Reason::RequestTimeout => "request_timeout",
        }
    }

    /// The rejection a request that no upstream answered ended with, from the error code and status the
    /// gateway gave it; `None` when it was not refused (every upstream failed, the client went away …).
    pub fn of_error(code: &str, status: u16) -> Option<Reason> {
        let named = Reason::ALL.into_iter().find(|r| r.as_str() == code && *r != Reason::ConnectionLimit);
        match named {
            Some(r) => Some(r),
            None if status == 400 => Some(Reason::InvalidRequest),
            None => None,
        }
    }
}

/// The counters, one per reason.
pub struct Rejections {
    by_reason: [IntCounter; Reason::ALL.len()],
}

impl Rejections {
    /// Register the family with every reason at 0.
    pub fn new(registry: &Registry) -> Rejections {
        let vec = must(IntCounterVec::new(
            Opts::new("sheepdog_rejections_total", "Requests and connections the gateway refused, by reason."),
            &["reason"],
        ));
        must(registry.register(Box::new(vec.clone())));
        Rejections { by_reason: Reason::ALL.map(|r| vec.with_label_values(&[r.as_str()])) }
    }

    /// Count one rejection.
    pub fn inc(&self, r: Reason) {
        self.by_reason[r as usize].inc();
    }

    /// Rejections so far for `r`.
    pub fn get(&self, r: Reason) -> u64 {
        self.by_reason[r as usize].get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_from_error_codes() {
        assert_eq!(Reason::of_error("budget_exceeded", 429), Some(Reason::BudgetExceeded));
        assert_eq!(Reason::of_error("body_too_large", 413), Some(Reason::BodyTooLarge));
        assert_eq!(Reason::of_error("invalid_json", 400), Some(Reason::InvalidRequest));
        assert_eq!(Reason::of_error("upstream_rate_limited", 429), None);
        assert_eq!(Reason::of_error("no_upstream_available", 503), None);
        assert_eq!(Reason::of_error("connection_limit", 503), None);
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
