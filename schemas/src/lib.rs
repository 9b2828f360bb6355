//! Tally's wire contract, shared by every other crate.
//!
//! * [`Event`]: the v1 Tally event (docs/events.md) as a typed, already-validated value. The only way to
//!   get one from untrusted bytes is [`Event::from_json`] or [`decode_message`], which reject bad
//!   input with a [`Rejection`] carrying a stable [`RejectCode`].
//! * [`decode_message`]: one Kafka message (key, value, headers) → a [`Decoded`] event bound to its
//!   tenant, whether it arrived as plain Tally JSON or as a CloudEvent (structured or binary mode).
//! * [`tenant_partition`]: the partition a tenant's events land in (Kafka's murmur2 partitioner),
//!   which is also where its log lives.
//! * [`projection_schema`]: the Arrow schema of the Parquet projection (docs/parquet.md).
//!
//! This crate does no I/O and knows nothing of Kafka clients, so everything in it is testable with
//! plain bytes.

mod envelope;
mod error;
mod event;
mod json;
mod partitioner;
mod projection;

pub use envelope::{decode_message, Decoded, IdempotencyKey, IngressFormat, MAX_MESSAGE_BYTES, PERSONAL_FIELD_BYTES};
pub use error::{RejectCode, Rejection};
pub use event::{
    check_event_time, check_identifier, decimal_units, validate_tenant_id, Cost, Decision, Event, Usage, MAX_AMOUNT_MICROS, MAX_ATTRIBUTES,
    MAX_CLOCK_AHEAD_SECONDS, MAX_ID_CHARS, MAX_TOKENS,
};
pub use partitioner::{murmur2, tenant_partition};
pub use projection::{billing_rollup_schema, daily_rollup_schema, projection_schema, rollup_schema, stored_schema, ROLLUP_BUCKET_SECONDS, TENANT_COLUMN};
