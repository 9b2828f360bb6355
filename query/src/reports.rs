//! The reports the service answers: an audit-trail page, cost roll-ups, read-only SQL, billing
//! spend and the audit export with its completeness evidence.
//!
//! Cost figures come from the roll-ups the ledger maintains (never from scanning raw rows): daily
//! sums per report zone when they fit the request, else 15-minute UTC buckets (a day in any
//! zone is a whole number of buckets, so grouping by a local day is exact). Money and tokens
//! stay integers (micros) end to end.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{Array, ArrayRef, Decimal128Array, FixedSizeBinaryArray, Int64Array, RecordBatch, StringArray, UInt64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::dataframe::DataFrame;
use datafusion::execution::context::SQLOptions;
use datafusion::functions_aggregate::expr_fn::sum;
use datafusion::prelude::{cast as cast_expr, col, lit, Expr};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Serialize;
use tally_log::merkle::{self, Hash};
use tally_log::TenantEntries;
use tally_projection::{read_watermark, RollupSums, Tree};

use crate::error::{Error, Result};
use crate::tables::Engine;

/// Runs a DataFrame to completion within `timeout`, holding at most the engine's
/// [`Engine::max_result_bytes`] of result batches (`query_too_large` past it: result batches are
/// not in DataFusion's memory pool, so this is what bounds them).
pub async fn collect(df: DataFrame, timeout: Duration, engine: &Engine) -> Result<Vec<RecordBatch>> {
    use futures::StreamExt as _;
    let root = engine.root();
    let max = engine.max_result_bytes();
    let run = async {
        let mut stream = df.execute_stream().await.map_err(|e| Error::from_datafusion(e, root))?;
        let (mut batches, mut bytes) = (Vec::new(), 0usize);
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| Error::from_datafusion(e, root))?;
            // A slice's own bytes, not its parent's buffers: `LIMIT 1` over big rows is small.
            bytes = bytes
                .saturating_add(batch.columns().iter().map(|c| c.to_data().get_slice_memory_size().unwrap_or(usize::MAX)).fold(0usize, usize::saturating_add));
            if bytes > max {
                return Err(Error::ResourcesExhausted(format!("the result holds more than {} MiB; ask for fewer rows or columns", max >> 20)));
            }
            batches.push(batch);
        }
        Ok(batches)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout(timeout.as_millis() as u64)),
    }
}

fn df_err(root: &Path) -> impl Fn(datafusion::error::DataFusionError) -> Error + '_ {
    move |e| Error::from_datafusion(e, root)
}

fn ts_lit(t: Timestamp) -> Expr {
    lit(ScalarValue::TimestampMicrosecond(Some(t.as_microsecond()), Some(Arc::from("UTC"))))
}

/// Column `name` of `batch` as optional strings.
fn strings(batch: &RecordBatch, name: &str) -> Result<Vec<Option<String>>> {
    let column = batch.column_by_name(name).ok_or_else(|| Error::Internal(format!("result lacks column {name}")))?;
    let utf8: ArrayRef = cast(column, &DataType::Utf8).map_err(|e| Error::Internal(e.to_string()))?;
    let a = utf8.as_any().downcast_ref::<StringArray>().ok_or_else(|| Error::Internal(format!("column {name} is not text")))?;
    Ok((0..a.len()).map(|i| (!a.is_null(i)).then(|| a.value(i).to_string())).collect())
}

/// Column `name` of `batch`, a sum of 128-bit decimals, as 64-bit integers (nulls as 0); a sum
/// beyond the 64-bit range is an error, never a wrapped figure.
fn sums(batch: &RecordBatch, name: &str) -> Result<Vec<i64>> {
    let column = batch.column_by_name(name).ok_or_else(|| Error::Internal(format!("result lacks column {name}")))?;
    let a = column.as_any().downcast_ref::<Decimal128Array>().ok_or_else(|| Error::Internal(format!("column {name} is not a decimal sum")))?;
    (0..a.len())
        .map(
            |i| {
                if a.is_null(i) {
                    Ok(0)
                } else {
                    i64::try_from(a.value(i)).map_err(|_| Error::SumOverflow(format!("the {name} sum exceeds the 64-bit range")))
                }
            },
        )
        .collect()
}

/// Column `name` of `batch` as integers (nulls as 0).
fn ints(batch: &RecordBatch, name: &str) -> Result<Vec<i64>> {
    let column = batch.column_by_name(name).ok_or_else(|| Error::Internal(format!("result lacks column {name}")))?;
    let wide: ArrayRef = cast(column, &DataType::Int64).map_err(|e| Error::Internal(e.to_string()))?;
    let a = wide.as_any().downcast_ref::<Int64Array>().ok_or_else(|| Error::Internal(format!("column {name} is not an integer")))?;
    Ok((0..a.len()).map(|i| if a.is_null(i) { 0 } else { a.value(i) }).collect())
}

/// The UTC dates (`YYYY-MM-DD`) an instant range [from, to) can have rows in.
fn date_range(from: Option<Timestamp>, to: Option<Timestamp>) -> impl Fn(&str) -> bool + Send + 'static {
    let lo = from.map(|t| t.strftime("%Y-%m-%d").to_string());
    let hi = to.map(|t| t.strftime("%Y-%m-%d").to_string());
    move |d: &str| lo.as_deref().is_none_or(|lo| d >= lo) && hi.as_deref().is_none_or(|hi| d <= hi)
}

/// Filters of an audit-trail page.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
    /// Exact matches on these columns.
    pub equals: Vec<(&'static str, String)>,
    /// Rows after this seq (the cursor).
    pub after: Option<u64>,
    pub limit: usize,
}

/// One page of the tenant's records, in seq order, and the cursor of the next page.
///
/// Reads the files of the dates the range allows; the tenant's rows in them are found by the
/// files' statistics on `tenant_id` and `seq` (rows are sorted by both). In two steps, so a page
/// of a large tenant decodes a page's worth of rows, not its whole trail: first the seqs alone of
/// the first `limit` matching rows past the cursor (a top-k sort over one column), then every
/// column of the rows up to the last of them, which the page statistics on `seq` narrow to a few
/// pages.
pub async fn events_page(engine: &Engine, tenant: &str, filter: &EventFilter, timeout: Duration) -> Result<(SchemaRef, Vec<RecordBatch>, Option<u64>)> {
    let page = async {
        let listed = engine.files(Tree::Events, tenant, date_range(filter.from, filter.to)).await?.with_seq_range(filter.after, None);
        let upto = page_bound(&engine.events_context(&listed)?, filter, timeout, engine).await?;
        let ctx = engine.events_context(&listed.with_seq_range(filter.after, upto))?;
        let (schema, batches) = page_of(&ctx, filter, upto, timeout, engine).await?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        let next = if rows == filter.limit && rows > 0 { last_seq(&batches)? } else { None };
        Ok((schema, batches, next))
    };
    tokio::time::timeout(timeout, page).await.map_err(|_| Error::Timeout(timeout.as_millis() as u64))?
}

/// The seq of the `limit`-th row of the page, when there are that many: no row of the page lies
/// past it.
async fn page_bound(ctx: &datafusion::prelude::SessionContext, filter: &EventFilter, timeout: Duration, engine: &Engine) -> Result<Option<u64>> {
    let root = engine.root();
    let df = filtered_events(ctx, filter, None, engine).await?;
    let df = df
        .select(vec![col("seq")])
        .map_err(df_err(root))?
        .sort(vec![col("seq").sort(true, false)])
        .map_err(df_err(root))?
        .limit(0, Some(filter.limit))
        .map_err(df_err(root))?;
    let batches = collect(df, timeout, engine).await?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    if rows < filter.limit {
        return Ok(None);
    }
    last_seq(&batches)
}

/// The context's `events` with the page's conditions, and `seq <= upto` when given.
async fn filtered_events(ctx: &datafusion::prelude::SessionContext, filter: &EventFilter, upto: Option<u64>, engine: &Engine) -> Result<DataFrame> {
    let root = engine.root();
    let mut df = ctx.table(tally_sql_gate::EVENTS_TABLE).await.map_err(df_err(root))?;
    let mut conditions = Vec::new();
    if let Some(upto) = upto {
        conditions.push(col("seq").lt_eq(lit(upto)));
    }
    if let Some(from) = filter.from {
        conditions.push(col("occurred_at").gt_eq(ts_lit(from)));
    }
    if let Some(to) = filter.to {
        conditions.push(col("occurred_at").lt(ts_lit(to)));
    }
    for (column, value) in &filter.equals {
        conditions.push(col(*column).eq(lit(value.clone())));
    }
    if let Some(after) = filter.after {
        conditions.push(col("seq").gt(lit(after)));
    }
    if let Some(all) = conditions.into_iter().reduce(Expr::and) {
        df = df.filter(all).map_err(df_err(root))?;
    }
    Ok(df)
}

/// The filtered, seq-ordered first `limit` rows of the context's `events` (up to seq `upto`).
async fn page_of(
    ctx: &datafusion::prelude::SessionContext,
    filter: &EventFilter,
    upto: Option<u64>,
    timeout: Duration,
    engine: &Engine,
) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let root = engine.root();
    let df = filtered_events(ctx, filter, upto, engine).await?;
    let df = df.sort(vec![col("seq").sort(true, false)]).map_err(df_err(root))?.limit(0, Some(filter.limit)).map_err(df_err(root))?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    Ok((schema, collect(df, timeout, engine).await?))
}

fn last_seq(batches: &[RecordBatch]) -> Result<Option<u64>> {
    let Some(b) = batches.iter().rev().find(|b| b.num_rows() > 0) else { return Ok(None) };
    let seq = b.column_by_name("seq").and_then(|c| c.as_any().downcast_ref::<UInt64Array>()).ok_or_else(|| Error::Internal("rows lack seq".into()))?;
    Ok(Some(seq.value(b.num_rows() - 1)))
}

/// Read-only SQL over the tenant's `events`; the rows and whether they were cut at `max_rows`.
pub async fn tenant_sql(
    engine: &Engine,
    tenant: &str,
    sql: &str,
    max_sql_bytes: usize,
    max_rows: usize,
    timeout: Duration,
) -> Result<(SchemaRef, Vec<RecordBatch>, bool)> {
    tally_sql_gate::check_read_only(sql, max_sql_bytes).map_err(|tally_sql_gate::Error::Rejected(why)| Error::SqlRejected(why))?;
    let ctx = engine.tenant_sql_context(tenant).await?;
    let root = engine.root();
    let options = SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false);
    let planned = tokio::time::timeout(timeout, ctx.sql_with_options(sql, options)).await.map_err(|_| Error::Timeout(timeout.as_millis() as u64))?;
    let (state, plan) = planned.map_err(df_err(root))?.into_parts();
    let plan = crate::bounded::Builders::bound_plan(&ctx, plan).map_err(df_err(root))?;
    let df = DataFrame::new(state, plan).limit(0, Some(max_rows + 1)).map_err(df_err(root))?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let mut batches = collect(df, timeout, engine).await?;
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    let truncated = total > max_rows;
    if truncated {
        let mut keep = max_rows;
        for b in batches.iter_mut() {
            let n = b.num_rows().min(keep);
            *b = b.slice(0, n);
            keep -= n;
        }
    }
    Ok((schema, batches, truncated))
}

/// A cost roll-up dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dim {
    Day,
    Agent,
    Action,
    Task,
    Kind,
}

impl Dim {
    pub fn parse(s: &str) -> Result<Dim> {
        Ok(match s {
            "day" => Dim::Day,
            "agent" | "agent_id" => Dim::Agent,
            "action" | "model" => Dim::Action,
            "task" | "task_id" => Dim::Task,
            "kind" => Dim::Kind,
            other => {
                return Err(Error::BadRequest(format!(
                    "group_by: unknown dimension {other:?}; use day, agent (or agent_id), action (or model), task (or task_id), kind"
                )))
            }
        })
    }

    fn column(self) -> &'static str {
        match self {
            Dim::Day => "bucket_start",
            Dim::Agent => "agent_id",
            Dim::Action => "action",
            Dim::Task => "task_id",
            Dim::Kind => "kind",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dim::Day => "day",
            Dim::Agent => "agent_id",
            Dim::Action => "action",
            Dim::Task => "task_id",
            Dim::Kind => "kind",
        }
    }
}

/// What a cost report covers.
#[derive(Debug, Clone)]
pub struct CostQuery {
    /// Inclusive; a multiple of 15 minutes.
    pub from: Timestamp,
    /// Exclusive; a multiple of 15 minutes.
    pub to: Timestamp,
    /// The zone `day` is taken in.
    pub tz: TimeZone,
    pub group_by: Vec<Dim>,
    /// Only charges billed in the billing period starting that day (`charge.period`), late
    /// events' corrections included.
    pub billing_period: Option<jiff::civil::Date>,
}

/// The `to` of a report over the whole log: the first second of year 9999, on a 15-minute
/// boundary.
pub const OPEN_END: Timestamp = Timestamp::constant(253_370_764_800, 0);

/// One row of a cost report: its dimension values (in `group_by` order), currency and sums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CostRow {
    pub dims: Vec<Option<String>>,
    pub currency: Option<String>,
    pub events: i64,
    /// What the gateways claimed (`cost.amount_micros`).
    pub cost_micros: i64,
    /// What the ledger charged: the sum that bills.
    pub charge_micros: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

impl CostRow {
    fn new(dims: Vec<Option<String>>, currency: Option<String>, s: RollupSums) -> CostRow {
        CostRow {
            dims,
            currency,
            events: s.events,
            cost_micros: s.cost_micros,
            charge_micros: s.charge_micros,
            input_tokens: s.input_tokens,
            output_tokens: s.output_tokens,
        }
    }
}

/// The tenant's watermark (how far its projection and its daily roll-ups reach); zero for a
/// tenant with no log.
async fn watermark(engine: &Engine, tenant: &str) -> Result<tally_projection::Watermark> {
    let engine = engine.clone();
    let tenant = tenant.to_string();
    let read = move || match engine.unit_of(&tenant) {
        Some(unit) => read_watermark(engine.root(), &unit, &tenant),
        None => Ok(tally_projection::Watermark::default()),
    };
    tokio::task::spawn_blocking(read).await.map_err(|e| Error::Internal(e.to_string()))?.map_err(Error::from)
}

/// Whether the tenant's daily roll-ups in `zone` cover its whole log.
fn daily_complete(mark: &tally_projection::Watermark, zone: &str) -> bool {
    mark.daily_zones.get(zone) == Some(&0)
}

/// A tenant's cost report.
///
/// Read from the daily roll-ups when they fit: the zone is one the ledger keeps them for (over
/// the whole log), the range is whole local days, and the task is not a dimension. Otherwise
/// from the 15-minute buckets, grouped into local days here. Both give the same sums.
pub async fn costs(engine: &Engine, tenant: &str, q: &CostQuery, timeout: Duration) -> Result<CostReport> {
    let bucket = tally_schemas::ROLLUP_BUCKET_SECONDS;
    for (name, t) in [("from", q.from), ("to", q.to)] {
        if t.as_second().rem_euclid(bucket) != 0 || t.subsec_nanosecond() != 0 {
            return Err(Error::BadRequest(format!("{name} = {t} is not on a {m}-minute boundary (roll-ups are kept per {m} minutes)", m = bucket / 60)));
        }
    }
    if q.from >= q.to {
        return Err(Error::BadRequest(format!("from ({}) must be before to ({})", q.from, q.to)));
    }
    let root = engine.root();
    let (from_local, to_local) = (q.from.to_zoned(q.tz.clone()), q.to.to_zoned(q.tz.clone()));
    let whole_days = from_local.time() == jiff::civil::Time::midnight() && to_local.time() == jiff::civil::Time::midnight();
    let mark = watermark(engine, tenant).await?;
    let daily_zone = q.tz.iana_name().filter(|z| whole_days && !q.group_by.contains(&Dim::Task) && daily_complete(&mark, z)).map(str::to_string);
    let in_period = |df: DataFrame| match q.billing_period {
        Some(d) => df.filter(col("billing_period").eq(lit(ScalarValue::Date32(Some(tally_projection::epoch_days(d)))))).map_err(df_err(root)),
        None => Ok(df),
    };
    // Summed as 38-digit decimals: DataFusion's 64-bit integer sum wraps on overflow.
    let sum_columns = || {
        ["events", "cost_micros", "charge_micros", "input_tokens", "output_tokens"]
            .map(|c| sum(cast_expr(col(c), DataType::Decimal128(38, 0))).alias(c))
            .to_vec()
    };
    let (df, day_column) = match daily_zone {
        Some(zone) => {
            let (from_date, to_date) = (from_local.date(), to_local.date());
            let lo = from_date.strftime("%Y-%m").to_string();
            let hi = to_date.yesterday().map_err(|e| Error::BadRequest(e.to_string()))?.strftime("%Y-%m").to_string();
            let ctx = engine.tenant_rollups(Tree::Daily, tenant, move |m| m >= lo.as_str() && m <= hi.as_str()).await?;
            let date = |d: jiff::civil::Date| lit(ScalarValue::Date32(Some(tally_projection::epoch_days(d))));
            let mut group: Vec<Expr> = q.group_by.iter().map(|d| col(if *d == Dim::Day { "date" } else { d.column() })).collect();
            group.push(col("currency"));
            let df = ctx
                .table("rollups")
                .await
                .map_err(df_err(root))?
                .filter(col("zone").eq(lit(zone)).and(col("date").gt_eq(date(from_date))).and(col("date").lt(date(to_date))))
                .map_err(df_err(root))?;
            let df = in_period(df)?.aggregate(group, sum_columns()).map_err(df_err(root))?;
            (df, DayColumn::Date)
        }
        None => {
            let lo = q.from.strftime("%Y-%m").to_string();
            let hi = (q.to - jiff::SignedDuration::from_micros(1)).strftime("%Y-%m").to_string();
            let ctx = engine.tenant_rollups(Tree::Rollups, tenant, move |m| m >= lo.as_str() && m <= hi.as_str()).await?;
            let mut group: Vec<Expr> = q.group_by.iter().map(|d| col(d.column())).collect();
            group.push(col("currency"));
            let df = ctx
                .table("rollups")
                .await
                .map_err(df_err(root))?
                .filter(col("bucket_start").gt_eq(ts_lit(q.from)).and(col("bucket_start").lt(ts_lit(q.to))))
                .map_err(df_err(root))?;
            let df = in_period(df)?.aggregate(group, sum_columns()).map_err(df_err(root))?;
            (df, DayColumn::Bucket)
        }
    };
    let batches = collect(df, timeout, engine).await?;
    let mut rows: BTreeMap<(Vec<Option<String>>, Option<String>), RollupSums> = BTreeMap::new();
    for b in &batches {
        let mut dims: Vec<Vec<Option<String>>> = Vec::new();
        for d in &q.group_by {
            dims.push(match (d, day_column) {
                (Dim::Day, DayColumn::Bucket) => ints(b, "bucket_start")?
                    .into_iter()
                    .map(|us| Timestamp::from_microsecond(us).ok().map(|t| t.to_zoned(q.tz.clone()).date().to_string()))
                    .collect(),
                (Dim::Day, DayColumn::Date) => strings(b, "date")?,
                (other, _) => strings(b, other.column())?,
            });
        }
        let currency = strings(b, "currency")?;
        let columns = ["events", "cost_micros", "charge_micros", "input_tokens", "output_tokens"].map(|c| sums(b, c));
        let [events, cost, charge, input, output] = columns;
        let (events, cost, charge, input, output) = (events?, cost?, charge?, input?, output?);
        for i in 0..b.num_rows() {
            let key: Vec<Option<String>> = dims.iter().map(|d| d[i].clone()).collect();
            rows.entry((key, currency[i].clone())).or_default().add(RollupSums {
                events: events[i],
                cost_micros: cost[i],
                charge_micros: charge[i],
                input_tokens: input[i],
                output_tokens: output[i],
            })?;
        }
    }
    let mut totals: BTreeMap<Option<String>, RollupSums> = BTreeMap::new();
    let mut out = Vec::with_capacity(rows.len());
    for ((dims, currency), s) in rows {
        totals.entry(currency.clone()).or_default().add(s)?;
        out.push(CostRow::new(dims, currency, s));
    }
    let totals = totals.into_iter().map(|(currency, s)| CostRow::new(Vec::new(), currency, s)).collect();
    let source = match day_column {
        DayColumn::Date => "daily",
        DayColumn::Bucket => "15-minute",
    };
    Ok(CostReport { rows: out, totals, source })
}

/// A cost report: rows sorted by dimensions then currency, totals per currency, and which
/// roll-ups answered it (`daily` or `15-minute`).
#[derive(Debug, Clone)]
pub struct CostReport {
    pub rows: Vec<CostRow>,
    pub totals: Vec<CostRow>,
    pub source: &'static str,
}

/// Where a report's day comes from.
#[derive(Debug, Clone, Copy)]
enum DayColumn {
    /// A 15-minute bucket's start, grouped into the report zone's day here.
    Bucket,
    /// The daily roll-up's own local date.
    Date,
}

/// One tenant's spend in one currency and charge basis over a billing period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spend {
    pub tenant: String,
    pub currency: Option<String>,
    /// `event`, `table` or `ceiling`; `None` for costs recorded before rating moved into the log.
    pub basis: Option<String>,
    /// Late events' charges, correcting a closed period (FOCUS `ChargeClass` `Correction`).
    pub correction: bool,
    /// The line's sums. From a statement, `cost_micros` (what gateways claimed) is not known: a
    /// statement carries what was charged.
    pub sums: RollupSums,
    /// The tenant's log origin, from the signed checkpoint its projection holds (none before a
    /// flush ended at a checkpoint): where the rows can be proved.
    pub origin: Option<String>,
    /// The billing period the line covers.
    pub period_start: Timestamp,
    pub period_end: Timestamp,
    /// The seq of the `statement` record the line comes from (the billing-period view).
    pub statement_seq: Option<u64>,
}

/// Which periods the spend export is cut into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendCalendar {
    /// The UTC calendar month, from the roll-ups: every tenant alike, open months included.
    Month,
    /// Each tenant's own billing period (its anchor day and zone), from its `statement`
    /// records: the periods starting in the month, closed ones only (an open period has no
    /// invoice yet).
    Billing,
}

impl SpendCalendar {
    /// The `calendar` parameter's value for each.
    pub fn parse(name: &str) -> Option<SpendCalendar> {
        match name {
            "month" => Some(SpendCalendar::Month),
            "billing" => Some(SpendCalendar::Billing),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SpendCalendar::Month => "month",
            SpendCalendar::Billing => "billing",
        }
    }
}

/// Every tenant's spend for `period` (`YYYY-MM`) in `calendar`: one row per tenant, currency,
/// charge basis and correction (events with nothing charged are not billing lines).
///
/// Billing reads each partition's few shared files (the billing roll-ups of the month, a few
/// rows per tenant; or its statements) directly with the Parquet reader, partitions on
/// all cores: O(partitions × files) reads, whatever the number of tenants.
pub async fn spend(engine: &Engine, period: &str, calendar: SpendCalendar, timeout: Duration) -> Result<Vec<Spend>> {
    let root = engine.root().to_path_buf();
    let month = period.to_string();
    let bounds = month_bounds(period)?;
    let work = tokio::task::spawn_blocking(move || -> tally_projection::Result<Vec<Spend>> {
        let units = tally_projection::projected_units(&root)?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(units.len().max(1));
        let chunk = units.len().div_ceil(threads).max(1);
        let per_unit = |unit: &String| match calendar {
            SpendCalendar::Month => month_spend(&root, unit, &month, bounds),
            SpendCalendar::Billing => billing_spend(&root, unit, &month),
        };
        let parts: Vec<tally_projection::Result<Vec<Spend>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = units
                .chunks(chunk)
                .map(|us| scope.spawn(move || us.iter().map(per_unit).collect::<tally_projection::Result<Vec<Vec<Spend>>>>().map(|v| v.concat())))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(tally_projection::Error::Projection("a spend worker panicked".into())))).collect()
        });
        let mut out = Vec::new();
        for p in parts {
            out.extend(p?);
        }
        out.sort_by(|a, b| {
            (&a.tenant, a.period_start, &a.currency, &a.basis, a.correction).cmp(&(&b.tenant, b.period_start, &b.currency, &b.basis, b.correction))
        });
        Ok(out)
    });
    match tokio::time::timeout(timeout, work).await {
        Ok(joined) => Ok(joined.map_err(|e| Error::Internal(e.to_string()))??),
        Err(_) => Err(Error::Timeout(timeout.as_millis() as u64)),
    }
}

/// The UTC instants bounding the month `period` (`YYYY-MM`).
pub fn month_bounds(period: &str) -> Result<(Timestamp, Timestamp)> {
    let bad = || Error::BadRequest(format!("period: {period:?} is not YYYY-MM"));
    let start: jiff::civil::Date = format!("{period}-01").parse().ok().filter(|_| period.len() == 7).ok_or_else(bad)?;
    let end = start.checked_add(jiff::Span::new().months(1)).map_err(|e| Error::BadRequest(format!("period: {e}")))?;
    let utc = |d: jiff::civil::Date| d.to_zoned(TimeZone::UTC).map(|z| z.timestamp()).map_err(|e| Error::BadRequest(format!("period: {e}")));
    Ok((utc(start)?, utc(end)?))
}

/// The log origin named by the first line of the tenant's projected checkpoint.
fn log_origin(mark: &tally_projection::Watermark) -> Option<String> {
    mark.checkpoint.as_deref().and_then(|note| note.lines().next()).map(str::to_string)
}

/// The spend of a partition's tenants in the UTC month, from their roll-ups.
fn month_spend(root: &Path, unit: &str, month: &str, (start, end): (Timestamp, Timestamp)) -> tally_projection::Result<Vec<Spend>> {
    use tally_projection::{currency_sums, list_files};
    let marks = tally_projection::read_watermarks(root, unit)?;
    // The billing roll-up of the UTC month: a few rows per tenant, every line already summed
    // (kept from each tenant's first flush, so always complete).
    let mut total = tally_projection::TenantSpend::new();
    for file in list_files(root, Tree::Billing, unit, |m| m == month)? {
        for (tenant, lines) in currency_sums(&file.path, None, None, |_| true)? {
            let into = total.entry(tenant).or_default();
            for (key, s) in lines {
                into.entry(key).or_default().add(s)?;
            }
        }
    }
    Ok(total
        .into_iter()
        .flat_map(|(tenant, lines)| {
            let origin = marks.get(&tenant).and_then(log_origin);
            lines.into_iter().map(move |(k, sums)| Spend {
                tenant: tenant.clone(),
                currency: Some(k.currency),
                basis: k.basis,
                correction: k.correction,
                sums,
                origin: origin.clone(),
                period_start: start,
                period_end: end,
                statement_seq: None,
            })
        })
        .collect())
}

/// The spend of a partition's tenants in their billing periods that start in `month`, from
/// their statements.
fn billing_spend(root: &Path, unit: &str, month: &str) -> tally_projection::Result<Vec<Spend>> {
    let marks = tally_projection::read_watermarks(root, unit)?;
    let below = |t: &str| marks.get(t).map_or(0, |m| m.next_seq);
    let mut out = Vec::new();
    for (tenant, held) in tally_projection::read_unit_statements(root, unit, |t, seq| seq < below(t))? {
        let origin = marks.get(&tenant).and_then(log_origin);
        let count = |n: Option<u64>, what: &str| {
            i64::try_from(n.unwrap_or(0)).map_err(|_| tally_projection::Error::SumOverflow(format!("{tenant}'s statement {what} exceeds the 64-bit range")))
        };
        let s = &held.statement;
        if s.period.strftime("%Y-%m").to_string() != month {
            continue;
        }
        for t in &s.totals {
            out.push(Spend {
                tenant: tenant.to_string(),
                currency: Some(t.currency.clone()),
                basis: Some(t.basis.as_str().to_string()),
                correction: t.correction,
                sums: RollupSums {
                    events: count(Some(t.events), "event count")?,
                    cost_micros: 0,
                    charge_micros: t.micros,
                    input_tokens: count(t.input_tokens, "input token count")?,
                    output_tokens: count(t.output_tokens, "output token count")?,
                },
                origin: origin.clone(),
                period_start: s.period_start,
                period_end: s.period_end,
                statement_seq: Some(held.seq),
            });
        }
    }
    Ok(out)
}

/// An audit export: a seq range of the tenant's rows with the evidence that it is complete.
/// Read back with [`crate::parse_export`], which refuses unknown and repeated members.
#[derive(Debug, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditExport {
    pub tenant_id: String,
    pub from_seq: u64,
    /// The last seq served (inclusive). Below the asked `to_seq` when the range's entries were
    /// more than the service's `max_export_mb`: then `truncated` is true.
    pub to_seq: u64,
    pub truncated: bool,
    /// Where the rest of the asked range starts, when `truncated`.
    pub next_from_seq: Option<u64>,
    /// Size of the tree the checkpoint signs.
    pub tree_size: u64,
    /// Every seq of the range has exactly one row whose leaf hash is the log's, and the rows'
    /// leaf hashes with `range_proof` recompute the checkpoint's root.
    pub complete: bool,
    /// Seqs of the range with no row in the projection.
    pub missing_seqs: Vec<u64>,
    /// Seqs whose row differs in any column (leaf hash included) from the row the log's entry
    /// gives, or that have several rows.
    pub mismatched_seqs: Vec<u64>,
    /// The signed checkpoint (C2SP tlog-checkpoint note) of the tenant's log at `tree_size`.
    pub checkpoint: String,
    /// Base64 hashes: with the rows' leaf hashes they rebuild the root (see `merkle::range_proof`).
    pub range_proof: Vec<String>,
    /// The log's entry bytes of each seq of the range, base64: a verifier hashes them
    /// (RFC 9162 leaf hash) and checks them against the rows.
    pub entries: Vec<String>,
    pub rows: serde_json::Value,
    /// The personal values of the range's records that still have them, by seq: each field's
    /// value and salt, which open the commitment in the entry's `personal` member
    /// (docs/privacy.md). A record that commits to fields absent here had them erased; its row
    /// shows `"erased"`.
    #[serde(default)]
    pub personal: BTreeMap<u64, BTreeMap<String, tally_log::Opening>>,
}

/// The journal holding `tenant`'s log under the ledger's `data_dir`, opened read-only: what the
/// ledger had committed when it was opened (see [`tally_log::PartitionLog::open_read_only`]).
///
/// With it, the partition's subject keys, read-only: the export reveals personal values as the
/// projection does, to check the rows against the entries.
fn open_partition_log(data_dir: &Path, tenant: &str) -> Result<(tally_log::PartitionLog, tally_log::SubjectKeys)> {
    let dir = tally_log::find_tenant_ledger(data_dir, tenant).ok_or_else(|| Error::Internal(format!("no log of {tenant} under the data directory")))?;
    let log = tally_log::PartitionLog::open_read_only(&dir.join(tally_log::JOURNAL_DIR))?;
    Ok((log, tally_log::SubjectKeys::open_read_only(&dir.join(tally_log::SUBJECT_KEYS_DIR))))
}

/// Builds the export of seqs `[from, to]` (defaults: the whole projected log), cut after the
/// entry that brings the entries' bytes past `max_bytes` (at least one entry is served).
///
/// Memory is a small multiple of `max_bytes`: the entries, their rows and the JSON of both.
#[allow(clippy::too_many_arguments)]
pub async fn audit_export(
    engine: &Engine,
    data_dir: &Path,
    tenant: &str,
    from: Option<u64>,
    to: Option<u64>,
    max_rows: u64,
    max_bytes: usize,
    timeout: Duration,
) -> Result<AuditExport> {
    let mark = watermark(engine, tenant).await?;
    let checkpoint = mark.checkpoint.ok_or(Error::NoCheckpoint)?;
    let stated =
        tally_log::Checkpoint::parse_note(&checkpoint).map_err(|e| Error::Internal(format!("unreadable checkpoint in the projection watermark: {e}")))?;
    let (tree_size, root_hash) = (stated.size, stated.root);
    if tree_size == 0 {
        return Err(Error::NoCheckpoint);
    }
    let from = from.unwrap_or(0);
    let to = to.unwrap_or(tree_size - 1);
    if from > to || to >= tree_size {
        return Err(Error::BadRequest(format!(
            "the range {from}..={to} is not within the checkpointed log of {tree_size} records (seqs 0..={})",
            tree_size - 1
        )));
    }
    if to - from + 1 > max_rows {
        return Err(Error::BadRequest(format!("the range holds {} records; an export holds at most {max_rows}: split it", to - from + 1)));
    }
    // The entries first: they decide how much of the range fits. The journal is opened once
    // (reading every segment index's header) and kept for the proof below.
    let (log_dir, tenant_owned) = (data_dir.to_path_buf(), tenant.to_string());
    type Read = (Vec<Vec<u8>>, Vec<Option<tally_log::Revealed>>, tally_log::PartitionLog);
    let (entries, revealed, partition) = tokio::task::spawn_blocking(move || -> Result<Read> {
        let (partition, mut keys) = open_partition_log(&log_dir, &tenant_owned)?;
        let (mut entries, mut revealed, mut bytes) = (Vec::new(), Vec::new(), 0usize);
        for seq in from..=to {
            if bytes >= max_bytes {
                break;
            }
            let (entry, sealed) = partition.entry_and_sealed(&tenant_owned, seq)?;
            bytes += entry.len();
            entries.push(entry);
            revealed.push(match sealed {
                Some(sealed) => Some(keys.reveal(&tenant_owned, seq, &sealed)?),
                None => None,
            });
        }
        Ok((entries, revealed, partition))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    let asked_to = to;
    let to = from + entries.len() as u64 - 1;
    let ctx = engine.tenant_events(tenant, |_| true).await?;
    let eroot = engine.root();
    let df = ctx
        .table(tally_sql_gate::EVENTS_TABLE)
        .await
        .map_err(df_err(eroot))?
        .filter(col("seq").gt_eq(lit(from)).and(col("seq").lt_eq(lit(to))))
        .map_err(df_err(eroot))?
        .sort(vec![col("seq").sort(true, false)])
        .map_err(df_err(eroot))?;
    let batches = collect(df, timeout, engine).await?;
    let mut found: Vec<(u64, Hash)> = Vec::new();
    for b in &batches {
        let seq = b.column_by_name("seq").and_then(|c| c.as_any().downcast_ref::<UInt64Array>()).ok_or_else(|| Error::Internal("rows lack seq".into()))?;
        let leaf = b
            .column_by_name("leaf_hash")
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>())
            .ok_or_else(|| Error::Internal("rows lack leaf_hash".into()))?;
        for i in 0..b.num_rows() {
            found.push((seq.value(i), leaf.value(i).try_into().map_err(|_| Error::Internal("leaf_hash is not 32 bytes".into()))?));
        }
    }
    let rows = crate::encode::json_rows(&batches)?;
    drop(batches);
    let tenant_owned = tenant.to_string();
    let (rows, entries, missing, mismatched, proof, leaves, personal) = tokio::task::spawn_blocking(move || -> Result<_> {
        let log = partition.view(&tenant_owned);
        if log.size() < tree_size {
            return Err(Error::Internal(format!("the log holds {} records, fewer than its checkpoint's {tree_size}", log.size())));
        }
        // What the rows must be: derived from the log's own entries, field by field.
        let expected = crate::encode::json_rows(&[tally_projection::expected_rows(from, &entries, &revealed)?])?;
        let mut by_seq: BTreeMap<u64, Vec<&serde_json::Value>> = BTreeMap::new();
        for row in rows.as_array().into_iter().flatten() {
            if let Some(seq) = row["seq"].as_u64() {
                by_seq.entry(seq).or_default().push(row);
            }
        }
        let mut missing = Vec::new();
        let mut mismatched = Vec::new();
        for (want, seq) in expected.as_array().into_iter().flatten().zip(from..) {
            match by_seq.get(&seq).map(|v| &v[..]) {
                None => missing.push(seq),
                Some([got]) if *got == want => {}
                Some(_) => mismatched.push(seq),
            }
        }
        drop(by_seq);
        let proof = merkle::range_proof(&log, from, to + 1, tree_size)?;
        let leaves: Vec<Hash> = found.iter().map(|(_, h)| *h).collect();
        let personal = revealed
            .into_iter()
            .zip(from..)
            .filter_map(|(r, seq)| match r {
                Some(tally_log::Revealed::Open(fields)) => Some((seq, fields)),
                _ => None,
            })
            .collect();
        Ok((rows, entries, missing, mismatched, proof, leaves, personal))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    let recomputes = merkle::root_from_range(&leaves, from, tree_size, &proof) == Some(root_hash);
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok(AuditExport {
        tenant_id: tenant.to_string(),
        from_seq: from,
        to_seq: to,
        truncated: to < asked_to,
        next_from_seq: (to < asked_to).then_some(to + 1),
        tree_size,
        complete: missing.is_empty() && mismatched.is_empty() && recomputes,
        missing_seqs: missing,
        mismatched_seqs: mismatched,
        checkpoint,
        range_proof: proof.iter().map(|h| b64.encode(h)).collect(),
        entries: entries.iter().map(|e| b64.encode(e)).collect(),
        rows,
        personal,
    })
}
