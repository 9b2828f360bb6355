//! The Arrow schema of the Parquet projection (docs/parquet.md): one row per ledger record, every event
//! field as a typed column, plus `seq` and `leaf_hash` so any report row can be proved against the
//! tenant's log. [`projection_schema`] is what a tenant's queries see; files shared by the tenants
//! of a partition store a `tenant_id` column first ([`stored_schema`]), and `date` is a hive
//! partition column of the path (`partition=<p>/date=<d>/`).
//!
//! The record's `payload_sha256` is not projected: the leaf hash already commits to it, and 32
//! random bytes per row would be a third of the on-disk budget. Non-event records (budget
//! decisions, admissions, releases, config) keep their fields as their record JSON in `detail`;
//! their `occurred_at` is the record's own `at`.
//!
//! [`rollup_schema`] is the cost roll-up the ledger maintains beside the rows: sums per tenant,
//! 15-minute UTC bucket (the finest offset any time zone uses, so a day in any zone is a whole
//! number of buckets), kind, decision, agent, action, task, currency and billing period. Each
//! row sums what the gateways claimed (`cost_micros`) beside what the ledger charged
//! (`charge_micros`, from the records' `charge`); reports and spend bill the charge.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};

/// The column a shared file names each row's tenant in, first of its columns.
pub const TENANT_COLUMN: &str = "tenant_id";

/// The schema of the files that store `schema`'s rows for many tenants: [`TENANT_COLUMN`] first,
/// then `schema`'s columns. Rows are sorted by tenant, then by seq (rows) or key (roll-ups).
pub fn stored_schema(schema: &Schema) -> Schema {
    let mut fields = vec![Arc::new(Field::new(TENANT_COLUMN, DataType::Utf8, false))];
    fields.extend(schema.fields().iter().cloned());
    Schema::new(fields)
}

/// The columns of one tenant's projection rows, as its queries see them (files store them
/// after a `tenant_id` column: [`stored_schema`]).
pub fn projection_schema() -> Schema {
    let utc = || Some(Arc::<str>::from("UTC"));
    let text = |name: &str| Field::new(name, DataType::Utf8, true);
    Schema::new(vec![
        Field::new("seq", DataType::UInt64, false),
        Field::new("leaf_hash", DataType::FixedSizeBinary(32), false),
        Field::new("record_type", DataType::Utf8, false),
        text("event_id"),
        Field::new("occurred_at", DataType::Timestamp(TimeUnit::Microsecond, utc()), true),
        text("kind"),
        text("decision"),
        text("reason_code"),
        text("agent_id"),
        text("actor_id"),
        text("workspace_id"),
        text("task_id"),
        Field::new("delegation", DataType::List(Arc::new(Field::new("item", DataType::Utf8, false))), true),
        text("action"),
        text("policy_profile"),
        text("quota_class"),
        Field::new("input_tokens", DataType::UInt64, true),
        Field::new("output_tokens", DataType::UInt64, true),
        Field::new("cost_micros", DataType::Int64, true),
        text("currency"),
        // What the ledger charged (the record's `charge`): what reports and spend sum.
        Field::new("charge_micros", DataType::Int64, true),
        text("charge_currency"),
        text("charge_basis"),
        Field::new("catalog_seq", DataType::UInt64, true),
        Field::new("billing_period", DataType::Date32, true),
        Field::new("corrects_period", DataType::Date32, true),
        text("reservation_id"),
        Field::new(
            "attributes",
            DataType::Map(
                Arc::new(Field::new(
                    "entries",
                    DataType::Struct(Fields::from(vec![Field::new("key", DataType::Utf8, false), Field::new("value", DataType::Utf8, true)])),
                    false,
                )),
                false,
            ),
            true,
        ),
        Field::new("kafka_partition", DataType::Int32, true),
        Field::new("kafka_offset", DataType::Int64, true),
        Field::new("kafka_timestamp", DataType::Timestamp(TimeUnit::Millisecond, utc()), true),
        text("detail"),
    ])
}

/// Columns of a tenant's daily roll-ups (files store them after `tenant_id`; `month` is a hive
/// partition column): the
/// same sums per local `date` in each of the ledger's configured report zones, without the task
/// dimension, so a month's report reads a few thousand rows whatever the event volume.
pub fn daily_rollup_schema() -> Schema {
    let text = |name: &str| Field::new(name, DataType::Utf8, true);
    Schema::new(
        vec![
            Field::new("zone", DataType::Utf8, false),
            Field::new("date", DataType::Date32, false),
            Field::new("kind", DataType::Utf8, false),
            text("decision"),
            text("agent_id"),
            text("action"),
            text("currency"),
            Field::new("billing_period", DataType::Date32, true),
            text("charge_basis"),
            Field::new("corrects_period", DataType::Date32, true),
        ]
        .into_iter()
        .chain(sum_fields())
        .collect::<Vec<_>>(),
    )
}

/// Columns of a tenant's billing roll-up (files store them after `tenant_id`; `month` is a hive
/// partition column, the UTC month of the events): what the spend export bills, one row per UTC
/// `date`, currency, charge basis, billing period and corrected period, without any other
/// dimension, so a month's spend of every tenant of a partition is a few rows per tenant and
/// active day. (Days, not months: one day's sum fitting 64 bits is what a flush needs; a month's
/// is checked when it is read.)
pub fn billing_rollup_schema() -> Schema {
    Schema::new(
        vec![
            Field::new("date", DataType::Date32, false),
            Field::new("currency", DataType::Utf8, false),
            Field::new("billing_period", DataType::Date32, true),
            Field::new("charge_basis", DataType::Utf8, true),
            Field::new("corrects_period", DataType::Date32, true),
        ]
        .into_iter()
        .chain(sum_fields())
        .collect::<Vec<_>>(),
    )
}

/// The sums every roll-up row ends with: events, what the gateways claimed, what was charged,
/// and tokens.
fn sum_fields() -> [Field; 5] {
    ["events", "cost_micros", "charge_micros", "input_tokens", "output_tokens"].map(|name| Field::new(name, DataType::Int64, false))
}

/// Width of a roll-up bucket in seconds.
pub const ROLLUP_BUCKET_SECONDS: i64 = 15 * 60;

/// Columns of a tenant's 15-minute roll-ups (files store them after `tenant_id`; `month` is a
/// hive partition column).
pub fn rollup_schema() -> Schema {
    let text = |name: &str| Field::new(name, DataType::Utf8, true);
    Schema::new(
        vec![
            Field::new("bucket_start", DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::<str>::from("UTC"))), false),
            Field::new("kind", DataType::Utf8, false),
            text("decision"),
            text("agent_id"),
            text("action"),
            text("task_id"),
            text("currency"),
            Field::new("billing_period", DataType::Date32, true),
            text("charge_basis"),
            Field::new("corrects_period", DataType::Date32, true),
        ]
        .into_iter()
        .chain(sum_fields())
        .collect::<Vec<_>>(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_provable_and_money_is_integer() {
        let schema = projection_schema();
        assert_eq!(schema.field_with_name("seq").unwrap().data_type(), &DataType::UInt64);
        assert!(!schema.field_with_name("leaf_hash").unwrap().is_nullable());
        assert_eq!(schema.field_with_name("cost_micros").unwrap().data_type(), &DataType::Int64);
        assert!(schema.field_with_name("tenant_id").is_err(), "tenant_id is a hive partition column");
    }
}
