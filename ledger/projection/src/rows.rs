//! Ledger records → projection rows (Arrow record batches) and cost roll-ups.
//!
//! A row is derived from the record bytes alone (plus its seq and leaf hash), so a rebuild from
//! the log writes the same rows. Roll-ups sum `event` records only: a `conflict` is a second
//! version of an event already counted, and budget-side records carry no spend of their own.
//! Money and token sums are integers, added with overflow checks: a sum past 64 bits is an
//! error ([`crate::Error::SumOverflow`]), never a wrapped or clamped figure.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::builder::Date32Builder;
use arrow_array::builder::{
    FixedSizeBinaryBuilder, Int32Builder, Int64Builder, ListBuilder, MapBuilder, MapFieldNames, StringBuilder, TimestampMicrosecondBuilder,
    TimestampMillisecondBuilder, UInt64Builder,
};
use arrow_array::{Array, ArrayRef, Date32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{Field, Schema, SchemaRef};
use jiff::Timestamp;
use serde::Deserialize;
use tally_schemas::{billing_rollup_schema, daily_rollup_schema, projection_schema, rollup_schema, Event, ROLLUP_BUCKET_SECONDS};

use crate::error::{Error, Result};
use tally_log::merkle::{leaf_hash, Hash};
use tally_log::{Charge, ChargeBasis, Record, Revealed, Source};

/// One record, parsed for projection.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub seq: u64,
    pub leaf_hash: Hash,
    pub record_type: String,
    pub event: Option<Event>,
    /// What an `event` record was charged ([`recorded_charge`]).
    pub charge: Option<Charge>,
    /// The event's `occurred_at`, or a budget-side record's `at`.
    pub at: Option<Timestamp>,
    pub kafka: Option<KafkaSource>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct KafkaSource {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
}

/// What the projection takes from a budget-side record: its type and time (the whole record
/// goes to the `detail` column as stored).
#[derive(Deserialize)]
struct BudgetSide {
    #[serde(rename = "type")]
    record_type: String,
    #[serde(default)]
    at: Option<Timestamp>,
}

impl Row {
    /// Parses entry `seq` of a tenant's log with the log core's record codec.
    /// `revealed`: the record's personal values ([`tally_log::Ledger::entry_revealed`]); the
    /// row shows them, or `"erased"` for each field the record commits to without them.
    pub fn parse(seq: u64, entry: &[u8], revealed: Option<&Revealed>) -> Result<Row> {
        let leaf_hash = leaf_hash(entry);
        Ok(match Record::<BudgetSide>::decode(seq, entry)? {
            Record::Event(r) => {
                let kafka = match r.source {
                    Source::Kafka { partition, offset, timestamp_ms, .. } => Some(KafkaSource { partition, offset, timestamp_ms }),
                    Source::File { .. } => None,
                };
                let record_type = if r.is_conflict() { "conflict" } else { "event" }.to_string();
                let detail = r.conflicts_with_seq.map(|first| format!("{{\"conflicts_with_seq\":{first}}}"));
                let event = r.revealed_event(revealed);
                let charge = if r.is_conflict() { None } else { recorded_charge(r.charge, &r.event) };
                Row { seq, leaf_hash, record_type, at: Some(event.occurred_at), event: Some(event), charge, kafka, detail }
            }
            Record::Budget(b) => Row {
                seq,
                leaf_hash,
                record_type: b.record_type,
                event: None,
                charge: None,
                at: b.at,
                kafka: None,
                detail: Some(String::from_utf8_lossy(entry).into_owned()),
            },
        })
    }

    /// The UTC date (`YYYY-MM-DD`) directory the row goes to.
    pub fn date(&self) -> String {
        self.at.map_or_else(|| "1970-01-01".to_string(), |t| t.strftime("%Y-%m-%d").to_string())
    }
}

/// An event record's charge as the projection reports it: the one the ledger wrote. A record
/// from before rating moved into the log has none, and its own cost stands for it (in the UTC
/// month), which is what reports summed then (docs/billing.md).
fn recorded_charge(charge: Option<Charge>, event: &Event) -> Option<Charge> {
    charge.or_else(|| {
        event.cost.as_ref().map(|c| Charge {
            micros: c.amount_micros,
            currency: c.currency.clone(),
            basis: ChargeBasis::Event,
            catalog_seq: None,
            period: event.occurred_at.strftime("%Y-%m-01").to_string(),
            corrects: None,
        })
    })
}

/// The billing period of a charge as days since 1970-01-01 (`None`: not a date, which the
/// ledger never writes).
fn period_days(charge: &Charge) -> Option<i32> {
    charge.period.parse::<jiff::civil::Date>().ok().map(epoch_days)
}

/// The closed period a late event's charge corrects, as days since 1970-01-01.
fn corrects_days(charge: &Charge) -> Option<i32> {
    charge.corrects.as_deref().and_then(|d| d.parse::<jiff::civil::Date>().ok()).map(epoch_days)
}

/// The Arrow batch of `rows` (in seq order) under [`projection_schema`].
pub(crate) fn rows_batch(rows: &[&Row]) -> Result<RecordBatch> {
    let schema: SchemaRef = Arc::new(projection_schema());
    let n = rows.len();
    let mut seq = UInt64Builder::with_capacity(n);
    let mut leaf = FixedSizeBinaryBuilder::with_capacity(n, 32);
    let mut record_type = StringBuilder::new();
    let mut text: Vec<StringBuilder> = (0..11).map(|_| StringBuilder::new()).collect();
    let mut occurred = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let item = Arc::new(Field::new("item", arrow_schema::DataType::Utf8, false));
    let mut delegation = ListBuilder::new(StringBuilder::new()).with_field(item);
    let names = MapFieldNames { entry: "entries".into(), key: "key".into(), value: "value".into() };
    let mut attributes = MapBuilder::new(Some(names), StringBuilder::new(), StringBuilder::new());
    let mut input_tokens = UInt64Builder::with_capacity(n);
    let mut output_tokens = UInt64Builder::with_capacity(n);
    let mut cost = Int64Builder::with_capacity(n);
    let mut currency = StringBuilder::new();
    let mut charge_micros = Int64Builder::with_capacity(n);
    let mut charge_currency = StringBuilder::new();
    let mut charge_basis = StringBuilder::new();
    let mut catalog_seq = UInt64Builder::with_capacity(n);
    let mut billing_period = Date32Builder::with_capacity(n);
    let mut corrects_period = Date32Builder::with_capacity(n);
    let mut reservation = StringBuilder::new();
    let mut kafka_partition = Int32Builder::with_capacity(n);
    let mut kafka_offset = Int64Builder::with_capacity(n);
    let mut kafka_ts = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut detail = StringBuilder::new();
    for row in rows {
        seq.append_value(row.seq);
        leaf.append_value(row.leaf_hash).map_err(|e| Error::Projection(e.to_string()))?;
        record_type.append_value(&row.record_type);
        occurred.append_option(row.at.map(|t| t.as_microsecond()));
        let e = row.event.as_ref();
        let fields: [Option<&str>; 11] = [
            e.map(|e| e.event_id.as_str()),
            e.map(|e| e.kind.as_str()),
            e.and_then(|e| e.decision).map(|d| d.as_str()),
            e.and_then(|e| e.reason_code.as_deref()),
            e.and_then(|e| e.agent_id.as_deref()),
            e.and_then(|e| e.actor_id.as_deref()),
            e.and_then(|e| e.workspace_id.as_deref()),
            e.and_then(|e| e.task_id.as_deref()),
            e.and_then(|e| e.action.as_deref()),
            e.and_then(|e| e.policy_profile.as_deref()),
            e.and_then(|e| e.quota_class.as_deref()),
        ];
        for (builder, value) in text.iter_mut().zip(fields) {
            builder.append_option(value);
        }
        match e.filter(|e| !e.delegation.is_empty()) {
            Some(e) => {
                for agent in &e.delegation {
                    delegation.values().append_value(agent);
                }
                delegation.append(true);
            }
            None => delegation.append(false),
        }
        match e.filter(|e| !e.attributes.is_empty()) {
            Some(e) => {
                for (k, v) in &e.attributes {
                    attributes.keys().append_value(k);
                    attributes.values().append_value(v);
                }
                attributes.append(true).map_err(|e| Error::Projection(e.to_string()))?;
            }
            None => attributes.append(false).map_err(|e| Error::Projection(e.to_string()))?,
        }
        input_tokens.append_option(e.and_then(|e| e.usage.as_ref()).map(|u| u.input_tokens));
        output_tokens.append_option(e.and_then(|e| e.usage.as_ref()).map(|u| u.output_tokens));
        cost.append_option(e.and_then(|e| e.cost.as_ref()).map(|c| c.amount_micros));
        currency.append_option(e.and_then(|e| e.cost.as_ref()).map(|c| c.currency.as_str()));
        let charge = row.charge.as_ref();
        charge_micros.append_option(charge.map(|c| c.micros));
        charge_currency.append_option(charge.map(|c| c.currency.as_str()));
        charge_basis.append_option(charge.map(|c| c.basis.as_str()));
        catalog_seq.append_option(charge.and_then(|c| c.catalog_seq));
        billing_period.append_option(charge.and_then(period_days));
        corrects_period.append_option(charge.and_then(corrects_days));
        reservation.append_option(e.and_then(|e| e.reservation_id.as_deref()));
        kafka_partition.append_option(row.kafka.map(|k| k.partition));
        kafka_offset.append_option(row.kafka.map(|k| k.offset));
        kafka_ts.append_option(row.kafka.and_then(|k| k.timestamp_ms));
        detail.append_option(row.detail.as_deref());
    }
    let mut text: Vec<ArrayRef> = text.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef).collect();
    // Schema order: event_id, occurred_at, kind, decision, reason_code, agent_id, actor_id,
    // workspace_id, task_id, delegation, action, policy_profile, quota_class, …
    let event_id = text.remove(0);
    let mut columns: Vec<ArrayRef> =
        vec![Arc::new(seq.finish()), Arc::new(leaf.finish()), Arc::new(record_type.finish()), event_id, Arc::new(occurred.finish())];
    let mut rest = text.into_iter();
    columns.extend(rest.by_ref().take(7)); // kind … task_id
    columns.push(Arc::new(delegation.finish()));
    columns.extend(rest); // action, policy_profile, quota_class
    columns.extend([
        Arc::new(input_tokens.finish()) as ArrayRef,
        Arc::new(output_tokens.finish()),
        Arc::new(cost.finish()),
        Arc::new(currency.finish()),
        Arc::new(charge_micros.finish()),
        Arc::new(charge_currency.finish()),
        Arc::new(charge_basis.finish()),
        Arc::new(catalog_seq.finish()),
        Arc::new(billing_period.finish()),
        Arc::new(corrects_period.finish()),
        Arc::new(reservation.finish()),
        Arc::new(attributes.finish()),
        Arc::new(kafka_partition.finish()),
        Arc::new(kafka_offset.finish()),
        Arc::new(kafka_ts.finish()),
        Arc::new(detail.finish()),
    ]);
    // The builders' nested field names and nullability differ from the schema's in ways that do
    // not change the data; cast them to the schema's exact types.
    let columns = columns
        .into_iter()
        .zip(schema.fields())
        .map(|(col, field)| if col.data_type() == field.data_type() { Ok(col) } else { retype(col, field) })
        .collect::<Result<Vec<_>>>()?;
    RecordBatch::try_new(schema, columns).map_err(|e| Error::Projection(format!("projection batch: {e}")))
}

fn retype(col: ArrayRef, field: &Field) -> Result<ArrayRef> {
    let data =
        col.to_data().into_builder().data_type(field.data_type().clone()).build().map_err(|e| Error::Projection(format!("column {}: {e}", field.name())))?;
    Ok(arrow_array::make_array(data))
}

/// What a roll-up row is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RollupKey {
    /// Start of the 15-minute UTC bucket, in microseconds.
    pub bucket_start: i64,
    pub kind: String,
    pub decision: Option<String>,
    pub agent_id: Option<String>,
    pub action: Option<String>,
    pub task_id: Option<String>,
    /// The charge's currency (the event's cost currency when it has no charge).
    pub currency: Option<String>,
    /// The first day of the charge's billing period, days since 1970-01-01.
    pub billing_period: Option<i32>,
    /// The charge's basis (`event`, `table`, `ceiling`); `None` when nothing was charged.
    pub charge_basis: Option<String>,
    /// For a late event's charge: the closed period it corrects, days since 1970-01-01.
    pub corrects_period: Option<i32>,
}

/// The sums of a roll-up row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RollupSums {
    pub events: i64,
    /// What the gateways claimed (`cost.amount_micros`), beside what was charged.
    pub cost_micros: i64,
    /// What the ledger charged (the records' `charge.micros`): what reports and spend bill.
    pub charge_micros: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

impl RollupSums {
    /// Adds `other` to these sums. A sum past the 64-bit range is an error, never a wrapped or
    /// saturated figure: a report or a bill must be right or refused.
    pub fn add(&mut self, other: RollupSums) -> Result<()> {
        let sum = |a: i64, b: i64, what: &str| a.checked_add(b).ok_or_else(|| Error::SumOverflow(format!("the {what} sum exceeds the 64-bit range")));
        *self = RollupSums {
            events: sum(self.events, other.events, "event count")?,
            cost_micros: sum(self.cost_micros, other.cost_micros, "cost")?,
            charge_micros: sum(self.charge_micros, other.charge_micros, "charge")?,
            input_tokens: sum(self.input_tokens, other.input_tokens, "input token")?,
            output_tokens: sum(self.output_tokens, other.output_tokens, "output token")?,
        };
        Ok(())
    }
}

impl RollupSums {
    /// The sums in their column order: events, cost, charge, input and output tokens.
    pub fn values(&self) -> [i64; 5] {
        [self.events, self.cost_micros, self.charge_micros, self.input_tokens, self.output_tokens]
    }
}

/// Roll-up rows by key.
pub type Rollup = BTreeMap<RollupKey, RollupSums>;

/// The bucket an instant falls in, in microseconds.
pub fn bucket_of(t: Timestamp) -> i64 {
    t.as_second().div_euclid(ROLLUP_BUCKET_SECONDS) * ROLLUP_BUCKET_SECONDS * 1_000_000
}

/// Adds an event and its recorded charge to a roll-up.
pub fn add_event(rollup: &mut Rollup, event: &Event, charge: Option<&Charge>) -> Result<()> {
    let key = RollupKey {
        bucket_start: bucket_of(event.occurred_at),
        kind: event.kind.clone(),
        decision: event.decision.map(|d| d.as_str().to_string()),
        agent_id: event.agent_id.clone(),
        action: event.action.clone(),
        task_id: event.task_id.clone(),
        currency: sum_currency(event, charge),
        billing_period: charge.and_then(period_days),
        charge_basis: charge.map(|c| c.basis.as_str().to_string()),
        corrects_period: charge.and_then(corrects_days),
    };
    rollup.entry(key).or_default().add(event_sums(event, charge))
}

/// The currency a roll-up row sums in: the charge's; the cost's when nothing was charged. (A cost
/// is always charged as itself, so the two agree whenever both exist.)
fn sum_currency(event: &Event, charge: Option<&Charge>) -> Option<String> {
    charge.map(|c| c.currency.clone()).or_else(|| event.cost.as_ref().map(|c| c.currency.clone()))
}

/// What one event adds to a roll-up.
fn event_sums(event: &Event, charge: Option<&Charge>) -> RollupSums {
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    RollupSums {
        events: 1,
        cost_micros: event.cost.as_ref().map_or(0, |c| c.amount_micros),
        charge_micros: charge.map_or(0, |c| c.micros),
        input_tokens: event.usage.as_ref().map_or(0, |u| clamp(u.input_tokens)),
        output_tokens: event.usage.as_ref().map_or(0, |u| clamp(u.output_tokens)),
    }
}

/// The UTC month (`YYYY-MM`) a bucket belongs to.
pub(crate) fn month_of(bucket_start: i64) -> String {
    Timestamp::from_microsecond(bucket_start).map_or_else(|_| "1970-01".to_string(), |t| t.strftime("%Y-%m").to_string())
}

/// The Arrow batch of a roll-up under [`rollup_schema`].
pub(crate) fn rollup_batch<'a>(rows: impl Iterator<Item = (&'a RollupKey, &'a RollupSums)>) -> Result<RecordBatch> {
    let schema = Arc::new(rollup_schema());
    let mut bucket = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut text: Vec<StringBuilder> = (0..7).map(|_| StringBuilder::new()).collect();
    let mut period = Date32Builder::new();
    let mut corrects = Date32Builder::new();
    let mut sums: Vec<Int64Builder> = (0..5).map(|_| Int64Builder::new()).collect();
    for (k, s) in rows {
        bucket.append_value(k.bucket_start);
        text[0].append_value(&k.kind);
        for (b, v) in text[1..].iter_mut().zip([&k.decision, &k.agent_id, &k.action, &k.task_id, &k.currency, &k.charge_basis]) {
            b.append_option(v.as_deref());
        }
        period.append_option(k.billing_period);
        corrects.append_option(k.corrects_period);
        for (b, v) in sums.iter_mut().zip(s.values()) {
            b.append_value(v);
        }
    }
    let mut columns: Vec<ArrayRef> = vec![Arc::new(bucket.finish())];
    columns.extend(text[..6].iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    columns.push(Arc::new(period.finish()));
    columns.push(Arc::new(text[6].finish()));
    columns.push(Arc::new(corrects.finish()));
    columns.extend(sums.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    RecordBatch::try_new(schema, columns).map_err(|e| Error::Projection(format!("roll-up batch: {e}")))
}

/// Adds the rows of a roll-up batch (as written by [`rollup_batch`]) to `rollup`.
pub(crate) fn fold_rollup_batch(rollup: &mut Rollup, batch: &RecordBatch) -> Result<()> {
    let bucket = column::<TimestampMicrosecondArray>(batch, "bucket_start")?;
    let text = |name| column::<StringArray>(batch, name);
    let (kind, decision, agent, action, task, currency) =
        (text("kind")?, text("decision")?, text("agent_id")?, text("action")?, text("task_id")?, text("currency")?);
    let period = column::<Date32Array>(batch, "billing_period")?;
    let basis = text("charge_basis")?;
    let corrects = column::<Date32Array>(batch, "corrects_period")?;
    let sums = SumColumns::of(batch)?;
    let opt = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_string());
    for i in 0..batch.num_rows() {
        let key = RollupKey {
            bucket_start: bucket.value(i),
            kind: kind.value(i).to_string(),
            decision: opt(decision, i),
            agent_id: opt(agent, i),
            action: opt(action, i),
            task_id: opt(task, i),
            currency: opt(currency, i),
            billing_period: (!period.is_null(i)).then(|| period.value(i)),
            charge_basis: opt(basis, i),
            corrects_period: (!corrects.is_null(i)).then(|| corrects.value(i)),
        };
        rollup.entry(key).or_default().add(sums.row(i))?;
    }
    Ok(())
}

/// What a daily roll-up row is keyed by: a report zone, a local date in it, and every dimension
/// but the task.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DailyKey {
    pub zone: String,
    /// Days since 1970-01-01 (Arrow `Date32`).
    pub date: i32,
    pub kind: String,
    pub decision: Option<String>,
    pub agent_id: Option<String>,
    pub action: Option<String>,
    pub currency: Option<String>,
    /// The first day of the charge's billing period, days since 1970-01-01.
    pub billing_period: Option<i32>,
    /// The charge's basis (`event`, `table`, `ceiling`); `None` when nothing was charged.
    pub charge_basis: Option<String>,
    /// For a late event's charge: the closed period it corrects, days since 1970-01-01.
    pub corrects_period: Option<i32>,
}

/// Daily roll-up rows by key.
pub type Daily = BTreeMap<DailyKey, RollupSums>;

/// Days since 1970-01-01 of a civil date.
pub fn epoch_days(date: jiff::civil::Date) -> i32 {
    (date - jiff::civil::date(1970, 1, 1)).get_days()
}

/// The civil date `days` after 1970-01-01.
pub fn from_epoch_days(days: i32) -> Option<jiff::civil::Date> {
    jiff::civil::date(1970, 1, 1).checked_add(jiff::Span::new().days(days)).ok()
}

/// Adds an event and its recorded charge to the daily roll-ups of every zone, keyed by its local
/// date there.
pub fn add_event_daily(daily: &mut BTreeMap<String, Daily>, zones: &[(String, jiff::tz::TimeZone)], event: &Event, charge: Option<&Charge>) -> Result<()> {
    let sums = event_sums(event, charge);
    for (name, tz) in zones {
        let date = event.occurred_at.to_zoned(tz.clone()).date();
        let key = DailyKey {
            zone: name.clone(),
            date: epoch_days(date),
            kind: event.kind.clone(),
            decision: event.decision.map(|d| d.as_str().to_string()),
            agent_id: event.agent_id.clone(),
            action: event.action.clone(),
            currency: sum_currency(event, charge),
            billing_period: charge.and_then(period_days),
            charge_basis: charge.map(|c| c.basis.as_str().to_string()),
            corrects_period: charge.and_then(corrects_days),
        };
        let month = date.strftime("%Y-%m").to_string();
        daily.entry(month).or_default().entry(key).or_default().add(sums)?;
    }
    Ok(())
}

/// The Arrow batch of daily roll-ups under [`daily_rollup_schema`].
pub(crate) fn daily_batch<'a>(rows: impl Iterator<Item = (&'a DailyKey, &'a RollupSums)>) -> Result<RecordBatch> {
    let schema = Arc::new(daily_rollup_schema());
    let mut zone = StringBuilder::new();
    let mut date = Date32Builder::new();
    let mut text: Vec<StringBuilder> = (0..6).map(|_| StringBuilder::new()).collect();
    let mut period = Date32Builder::new();
    let mut corrects = Date32Builder::new();
    let mut sums: Vec<Int64Builder> = (0..5).map(|_| Int64Builder::new()).collect();
    for (k, s) in rows {
        zone.append_value(&k.zone);
        date.append_value(k.date);
        text[0].append_value(&k.kind);
        for (b, v) in text[1..].iter_mut().zip([&k.decision, &k.agent_id, &k.action, &k.currency, &k.charge_basis]) {
            b.append_option(v.as_deref());
        }
        period.append_option(k.billing_period);
        corrects.append_option(k.corrects_period);
        for (b, v) in sums.iter_mut().zip(s.values()) {
            b.append_value(v);
        }
    }
    let mut columns: Vec<ArrayRef> = vec![Arc::new(zone.finish()), Arc::new(date.finish())];
    columns.extend(text[..5].iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    columns.push(Arc::new(period.finish()));
    columns.push(Arc::new(text[5].finish()));
    columns.push(Arc::new(corrects.finish()));
    columns.extend(sums.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    RecordBatch::try_new(schema, columns).map_err(|e| Error::Projection(format!("daily roll-up batch: {e}")))
}

/// Adds the rows of a daily roll-up batch to `daily`.
pub(crate) fn fold_daily_batch(daily: &mut Daily, batch: &RecordBatch) -> Result<()> {
    let zone = column::<StringArray>(batch, "zone")?;
    let date = column::<Date32Array>(batch, "date")?;
    let text = |name| column::<StringArray>(batch, name);
    let (kind, decision, agent, action, currency) = (text("kind")?, text("decision")?, text("agent_id")?, text("action")?, text("currency")?);
    let period = column::<Date32Array>(batch, "billing_period")?;
    let basis = text("charge_basis")?;
    let corrects = column::<Date32Array>(batch, "corrects_period")?;
    let sums = SumColumns::of(batch)?;
    let opt = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_string());
    for i in 0..batch.num_rows() {
        let key = DailyKey {
            zone: zone.value(i).to_string(),
            date: date.value(i),
            kind: kind.value(i).to_string(),
            decision: opt(decision, i),
            agent_id: opt(agent, i),
            action: opt(action, i),
            currency: opt(currency, i),
            billing_period: (!period.is_null(i)).then(|| period.value(i)),
            charge_basis: opt(basis, i),
            corrects_period: (!corrects.is_null(i)).then(|| corrects.value(i)),
        };
        daily.entry(key).or_default().add(sums.row(i))?;
    }
    Ok(())
}

/// What a billing roll-up row is keyed by: what a spend line is, and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BillingKey {
    /// The UTC date of the events, days since 1970-01-01.
    pub date: i32,
    pub currency: String,
    pub billing_period: Option<i32>,
    pub charge_basis: Option<String>,
    pub corrects_period: Option<i32>,
}

/// Billing roll-up rows by key.
pub type Billing = BTreeMap<BillingKey, RollupSums>;

/// Adds an event to the billing roll-up of its UTC month (`month → rows`); an event with no
/// currency (no charge, no cost) bills nothing and is left out.
pub fn add_event_billing(billing: &mut BTreeMap<String, Billing>, event: &Event, charge: Option<&Charge>) -> Result<()> {
    let Some(currency) = sum_currency(event, charge) else { return Ok(()) };
    let key = BillingKey {
        date: epoch_days(event.occurred_at.to_zoned(jiff::tz::TimeZone::UTC).date()),
        currency,
        billing_period: charge.and_then(period_days),
        charge_basis: charge.map(|c| c.basis.as_str().to_string()),
        corrects_period: charge.and_then(corrects_days),
    };
    let month = month_of(bucket_of(event.occurred_at));
    billing.entry(month).or_default().entry(key).or_default().add(event_sums(event, charge))
}

/// The Arrow batch of billing roll-ups under [`billing_rollup_schema`].
pub(crate) fn billing_batch<'a>(rows: impl Iterator<Item = (&'a BillingKey, &'a RollupSums)>) -> Result<RecordBatch> {
    let mut date = Date32Builder::new();
    let mut currency = StringBuilder::new();
    let mut period = Date32Builder::new();
    let mut basis = StringBuilder::new();
    let mut corrects = Date32Builder::new();
    let mut sums: Vec<Int64Builder> = (0..5).map(|_| Int64Builder::new()).collect();
    for (k, s) in rows {
        date.append_value(k.date);
        currency.append_value(&k.currency);
        period.append_option(k.billing_period);
        basis.append_option(k.charge_basis.as_deref());
        corrects.append_option(k.corrects_period);
        for (b, v) in sums.iter_mut().zip(s.values()) {
            b.append_value(v);
        }
    }
    let mut columns: Vec<ArrayRef> =
        vec![Arc::new(date.finish()), Arc::new(currency.finish()), Arc::new(period.finish()), Arc::new(basis.finish()), Arc::new(corrects.finish())];
    columns.extend(sums.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    RecordBatch::try_new(Arc::new(billing_rollup_schema()), columns).map_err(|e| Error::Projection(format!("billing roll-up batch: {e}")))
}

/// Adds the rows of a billing roll-up batch to `billing`.
pub(crate) fn fold_billing_batch(billing: &mut Billing, batch: &RecordBatch) -> Result<()> {
    let date = column::<Date32Array>(batch, "date")?;
    let currency = column::<StringArray>(batch, "currency")?;
    let period = column::<Date32Array>(batch, "billing_period")?;
    let basis = column::<StringArray>(batch, "charge_basis")?;
    let corrects = column::<Date32Array>(batch, "corrects_period")?;
    let sums = SumColumns::of(batch)?;
    for i in 0..batch.num_rows() {
        let key = BillingKey {
            date: date.value(i),
            currency: currency.value(i).to_string(),
            billing_period: (!period.is_null(i)).then(|| period.value(i)),
            charge_basis: (!basis.is_null(i)).then(|| basis.value(i).to_string()),
            corrects_period: (!corrects.is_null(i)).then(|| corrects.value(i)),
        };
        billing.entry(key).or_default().add(sums.row(i))?;
    }
    Ok(())
}

/// The sum columns of a roll-up batch (all kinds), in [`RollupSums::values`] order.
pub(crate) struct SumColumns<'a>([&'a Int64Array; 5]);

impl<'a> SumColumns<'a> {
    pub(crate) fn of(batch: &'a RecordBatch) -> Result<Self> {
        let num = |name| column::<Int64Array>(batch, name);
        Ok(SumColumns([num("events")?, num("cost_micros")?, num("charge_micros")?, num("input_tokens")?, num("output_tokens")?]))
    }

    pub(crate) fn row(&self, i: usize) -> RollupSums {
        let [events, cost_micros, charge_micros, input_tokens, output_tokens] = self.0.map(|c| c.value(i));
        RollupSums { events, cost_micros, charge_micros, input_tokens, output_tokens }
    }
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
    batch.column_by_name(name).and_then(|c| c.as_any().downcast_ref::<T>()).ok_or_else(|| Error::Projection(format!("roll-up file lacks column {name}")))
}

/// Checks that a batch has exactly the schema `want` (files are read back for merges).
pub(crate) fn check_schema(batch: &RecordBatch, want: &Schema) -> Result<()> {
    if batch.schema().fields() != want.fields() {
        return Err(Error::Projection("a projection file does not have the current schema; rebuild the projection (tally parquet rebuild)".into()));
    }
    Ok(())
}
