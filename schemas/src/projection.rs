//! The Arrow schema of the Parquet projection (SPEC §5): one row per ledger record, every event
//! field as a typed column, plus `seq` and `leaf_hash` so any report row can be proved against the
//! tenant's log. `tenant_id` and `date` are hive partition columns (`tenant_id=<t>/date=<d>/`), so
//! they are not stored inside the files; [`projection_schema`] lists the columns a file holds.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};

/// Columns stored in each projection Parquet file.
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
        text("reservation_id"),
        Field::new(
            "attributes",
            DataType::Map(
                Arc::new(Field::new(
                    "entries",
                    DataType::Struct(Fields::from(vec![
                        Field::new("key", DataType::Utf8, false),
                        Field::new("value", DataType::Utf8, true),
                    ])),
                    false,
                )),
                false,
            ),
            true,
        ),
        Field::new("payload_sha256", DataType::FixedSizeBinary(32), true),
        Field::new("kafka_partition", DataType::Int32, true),
        Field::new("kafka_offset", DataType::Int64, true),
        Field::new("kafka_timestamp", DataType::Timestamp(TimeUnit::Millisecond, utc()), true),
    ])
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
