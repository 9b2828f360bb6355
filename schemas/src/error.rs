//! Why a message was rejected. The codes are a public, stable contract: they travel in the
//! `tally-error-code` DLQ header and operators alert on them, so a code is never renamed or reused.

use std::fmt;

/// Stable, machine-readable reason a message was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectCode {
    /// The Kafka message has no key; the key must be the tenant id.
    MissingKey,
    /// The message key differs from the event's `tenant_id`.
    TenantMismatch,
    /// The value is larger than 60 KiB.
    TooLarge,
    /// The value is not UTF-8 JSON (truncated, malformed, binary).
    MalformedJson,
    /// The JSON is valid but not an object.
    NotAnObject,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong JSON type (e.g. a float where integer micros are required).
    WrongType,
    /// A field the v1 schema does not define (it would otherwise be dropped silently).
    UnknownField,
    /// `tenant_id` does not match `^[a-z0-9][a-z0-9_-]{0,62}$`.
    BadTenantId,
    /// An identifier (event id, agent id, …) is empty, too long, or holds control characters.
    BadIdentifier,
    /// `occurred_at` is not an RFC 3339 timestamp.
    BadTimestamp,
    /// `kind` is not a lowercase snake_case word.
    BadKind,
    /// `decision` is not one of the five defined decisions.
    BadDecision,
    /// `cost.amount_micros` is negative.
    NegativeCost,
    /// `cost.currency` is not a three-letter ISO 4217 code.
    BadCurrency,
    /// A token count is negative, not an integer, or above [`crate::MAX_TOKENS`].
    BadUsage,
    /// A CloudEvent lacks a required attribute, has the wrong spec version, or contradicts its data.
    BadCloudEvent,
    /// A `content-type` this pipeline does not accept.
    UnsupportedContentType,
    /// An object names the same member twice (I-JSON, RFC 7493): readers would disagree on it.
    DuplicateKey,
    /// `cost.amount_micros` is above [`crate::MAX_AMOUNT_MICROS`].
    AmountTooLarge,
    /// The message is on another partition than its tenant's home partition (the producer does
    /// not use Kafka's murmur2 partitioner, or the topic's partition count changed).
    WrongPartition,
    /// `occurred_at` is more than [`crate::MAX_CLOCK_AHEAD_SECONDS`] after the Kafka message
    /// carrying the event was published.
    OccurredAfterPublish,
    /// The event's time (its message's timestamp, else `occurred_at`) is more than
    /// [`crate::MAX_CLOCK_AHEAD_SECONDS`] ahead of the ledger's clock when it reads it.
    TimestampInFuture,
}

impl RejectCode {
    /// Every code, for documentation and exhaustive tests.
    pub const ALL: [RejectCode; 23] = [
        RejectCode::MissingKey,
        RejectCode::TenantMismatch,
        RejectCode::TooLarge,
        RejectCode::MalformedJson,
        RejectCode::NotAnObject,
        RejectCode::MissingField,
        RejectCode::WrongType,
        RejectCode::UnknownField,
        RejectCode::BadTenantId,
        RejectCode::BadIdentifier,
        RejectCode::BadTimestamp,
        RejectCode::BadKind,
        RejectCode::BadDecision,
        RejectCode::NegativeCost,
        RejectCode::BadCurrency,
        RejectCode::BadUsage,
        RejectCode::BadCloudEvent,
        RejectCode::UnsupportedContentType,
        RejectCode::DuplicateKey,
        RejectCode::AmountTooLarge,
        RejectCode::WrongPartition,
        RejectCode::OccurredAfterPublish,
        RejectCode::TimestampInFuture,
    ];

    /// The stable wire form, e.g. `tenant_mismatch`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::MissingKey => "missing_key",
            RejectCode::TenantMismatch => "tenant_mismatch",
            RejectCode::TooLarge => "too_large",
            RejectCode::MalformedJson => "malformed_json",
            RejectCode::NotAnObject => "not_an_object",
            RejectCode::MissingField => "missing_field",
            RejectCode::WrongType => "wrong_type",
            RejectCode::UnknownField => "unknown_field",
            RejectCode::BadTenantId => "bad_tenant_id",
            RejectCode::BadIdentifier => "bad_identifier",
            RejectCode::BadTimestamp => "bad_timestamp",
            RejectCode::BadKind => "bad_kind",
            RejectCode::BadDecision => "bad_decision",
            RejectCode::NegativeCost => "negative_cost",
            RejectCode::BadCurrency => "bad_currency",
            RejectCode::BadUsage => "bad_usage",
            RejectCode::BadCloudEvent => "bad_cloudevent",
            RejectCode::UnsupportedContentType => "unsupported_content_type",
            RejectCode::DuplicateKey => "duplicate_key",
            RejectCode::AmountTooLarge => "amount_too_large",
            RejectCode::WrongPartition => "wrong_partition",
            RejectCode::OccurredAfterPublish => "occurred_after_publish",
            RejectCode::TimestampInFuture => "timestamp_in_future",
        }
    }

    /// Parses the wire form back (used by DLQ readers and tests).
    pub fn from_wire(s: &str) -> Option<RejectCode> {
        RejectCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected message: a stable code and a human-readable detail naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct Rejection {
    pub code: RejectCode,
    pub detail: String,
}

impl Rejection {
    pub fn new(code: RejectCode, detail: impl Into<String>) -> Self {
        Rejection { code, detail: detail.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in RejectCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate wire code {code}");
            assert_eq!(RejectCode::from_wire(code.as_str()), Some(code));
        }
        assert_eq!(RejectCode::from_wire("nope"), None);
    }
}
