//! The HTTP API of `tally query` (docs/http-api.md): routes, authorization, parameters and formats.
//!
//! Every tenant route checks the caller may read that tenant before anything else, with the
//! same refusal whether or not the tenant exists, so ids cannot be probed. Unknown query
//! parameters are refused (a typo never silently widens a report).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use tally_auth::{Action, Principal, TokenStore};
use tally_schemas::decimal_units as decimal;

use crate::config::QueryConfig;
use crate::encode::{encode, json_rows, Format};
use crate::error::{Error, Result};
use crate::reports::{self, CostQuery, Dim, EventFilter};
use crate::tables::Engine;

/// What the handlers share.
pub struct AppState {
    pub config: QueryConfig,
    pub engine: Engine,
    pub tokens: TokenStore,
    /// Where query work runs (never on the threads that answer HTTP), and its admission limits.
    pub workers: crate::workers::Workers,
    pub metrics: QueryMetrics,
}

/// The query service's metrics: per-route latency and errors by code (from
/// [`tally_auth::Telemetry`]), and gauges of the present read when `/metrics` is.
pub struct QueryMetrics {
    telemetry: tally_auth::Telemetry,
    running: tally_auth::prometheus::IntGauge,
    memory: tally_auth::prometheus::IntGauge,
}

impl QueryMetrics {
    pub fn new() -> QueryMetrics {
        let t = tally_auth::Telemetry::new("query");
        QueryMetrics {
            running: t.int_gauge("tally_query_running", "Queries running now."),
            memory: t.int_gauge("tally_query_memory_reserved_bytes", "Bytes of the process-wide query memory pool reserved by running queries."),
            telemetry: t,
        }
    }

    fn render(&self, state: &AppState) -> String {
        self.running.set(i64::try_from(state.workers.running()).unwrap_or(i64::MAX));
        self.memory.set(i64::try_from(state.engine.memory_in_use()).unwrap_or(i64::MAX));
        self.telemetry.render(state.tokens.reload_failures())
    }
}

impl Default for QueryMetrics {
    fn default() -> Self {
        QueryMetrics::new()
    }
}

impl AppState {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.query_timeout_ms)
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    // The tenant check runs as a layer, before any extractor reads a request body: a caller
    // without a token for the tenant cannot make the service read (or wait for) 1 MiB.
    let per_tenant = Router::new()
        .route("/v1/tenants/{tenant}/events", get(events))
        .route("/v1/tenants/{tenant}/sql", post(sql))
        .route("/v1/tenants/{tenant}/audit-export", get(audit_export))
        .route_layer(axum::middleware::from_fn_with_state((Arc::clone(&state), Action::ReadAudit), tenant_gate));
    // Cost roll-ups are sums, never a record: billing reads them for every tenant.
    let per_tenant_costs = Router::new()
        .route("/v1/tenants/{tenant}/costs", get(costs))
        .route_layer(axum::middleware::from_fn_with_state((Arc::clone(&state), Action::ReadCosts), tenant_gate));
    let telemetry = state.metrics.telemetry.clone();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .merge(per_tenant)
        .merge(per_tenant_costs)
        .route("/v1/spend", get(spend))
        .fallback(|| async { Error::NotFound("no such route; see /openapi.json".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state);
    telemetry.instrument(app)
}

/// Prometheus text: a `metrics` token (a scraper that reads no data) or `admin`.
async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response> {
    principal(&state, &headers)?.check(Action::ReadMetrics, None)?;
    Ok(tally_auth::Telemetry::text_response(state.metrics.render(&state)))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], crate::OPENAPI).into_response()
}

fn principal(state: &AppState, headers: &HeaderMap) -> Result<Principal> {
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    Ok(state.tokens.authenticate(auth)?)
}

/// Lets a request through only if its caller may take `action` on the path's tenant.
async fn tenant_gate(
    State((state, action)): State<(Arc<AppState>, Action)>,
    Path(params): Path<HashMap<String, String>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let tenant = params.get("tenant").map(String::as_str).unwrap_or_default();
    match tenant_reader(&state, request.headers(), tenant, action) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// The caller, if it may take `action` on `tenant`. Checked before the id is even parsed.
fn tenant_reader(state: &AppState, headers: &HeaderMap, tenant: &str, action: Action) -> Result<()> {
    let who = principal(state, headers)?;
    who.check(action, Some(tenant))?;
    tally_schemas::validate_tenant_id(tenant).map_err(|r| Error::BadRequest(r.detail))?;
    Ok(())
}

/// Rows of an events page when the request names no `limit`.
const DEFAULT_PAGE_ROWS: usize = 1000;

/// Query parameters, each read at most once; leftovers are an error.
struct Params(HashMap<String, String>);

impl Params {
    fn take(&mut self, key: &str) -> Option<String> {
        self.0.remove(key).filter(|v| !v.is_empty())
    }

    fn parse<T: std::str::FromStr>(&mut self, key: &str, what: &str) -> Result<Option<T>> {
        self.take(key).map(|v| v.parse::<T>().map_err(|_| Error::BadRequest(format!("{key}: {v:?} is not {what}")))).transpose()
    }

    fn format(&mut self) -> Result<Format> {
        match self.take("format").as_deref() {
            None | Some("json") => Ok(Format::Json),
            Some("csv") => Ok(Format::Csv),
            Some("parquet") => Ok(Format::Parquet),
            Some("arrow") => Ok(Format::Arrow),
            Some(other) => Err(Error::BadRequest(format!("format: {other:?} is not one of json, csv, parquet, arrow"))),
        }
    }

    fn finish(self) -> Result<()> {
        let mut left: Vec<&String> = self.0.keys().collect();
        left.sort();
        match left.first() {
            None => Ok(()),
            Some(_) => Err(Error::BadRequest(format!("unknown query parameter(s): {}", left.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")))),
        }
    }
}

/// An instant from RFC 3339, or a date (`YYYY-MM-DD`) taken as its midnight in `tz`.
fn instant(key: &str, value: &str, tz: &TimeZone) -> Result<Timestamp> {
    if let Ok(t) = value.parse::<Timestamp>() {
        return Ok(t);
    }
    let date: jiff::civil::Date =
        value.parse().map_err(|_| Error::BadRequest(format!("{key}: {value:?} is neither an RFC 3339 timestamp nor a YYYY-MM-DD date")))?;
    date.to_zoned(tz.clone()).map(|z| z.timestamp()).map_err(|e| Error::BadRequest(format!("{key}: {e}")))
}

/// `to` as an exclusive bound: a date means the end of that day.
fn instant_end(key: &str, value: &str, tz: &TimeZone) -> Result<Timestamp> {
    if let Ok(t) = value.parse::<Timestamp>() {
        return Ok(t);
    }
    let date: jiff::civil::Date =
        value.parse().map_err(|_| Error::BadRequest(format!("{key}: {value:?} is neither an RFC 3339 timestamp nor a YYYY-MM-DD date")))?;
    let next = date.tomorrow().map_err(|e| Error::BadRequest(format!("{key}: {e}")))?;
    next.to_zoned(tz.clone()).map(|z| z.timestamp()).map_err(|e| Error::BadRequest(format!("{key}: {e}")))
}

fn body(format: Format, bytes: Vec<u8>, extra: &[(&'static str, String)]) -> Response {
    let mut response = (StatusCode::OK, bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    for (name, value) in extra {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(*name, v);
        }
    }
    response
}

async fn events(State(state): State<Arc<AppState>>, Path(tenant): Path<String>, Query(q): Query<HashMap<String, String>>) -> Result<Response> {
    let mut p = Params(q);
    let utc = TimeZone::UTC;
    let from = p.take("from").map(|v| instant("from", &v, &utc)).transpose()?;
    let to = p.take("to").map(|v| instant_end("to", &v, &utc)).transpose()?;
    let mut equals = Vec::new();
    for (param, column) in
        [("kind", "kind"), ("decision", "decision"), ("agent", "agent_id"), ("task", "task_id"), ("action", "action"), ("record_type", "record_type")]
    {
        if let Some(v) = p.take(param) {
            equals.push((column, v));
        }
    }
    let after = p.parse::<u64>("after", "a seq (non-negative integer)")?;
    // The default page never exceeds the configured maximum (a max_rows below 1,000 would
    // otherwise refuse a request that names no limit at all).
    let limit = p.parse::<usize>("limit", "a positive integer")?.unwrap_or(DEFAULT_PAGE_ROWS.min(state.config.max_rows));
    if limit == 0 || limit > state.config.max_rows {
        return Err(Error::BadRequest(format!("limit: must be 1..={}", state.config.max_rows)));
    }
    let format = p.format()?;
    p.finish()?;
    let filter = EventFilter { from, to, equals, after, limit };
    let work = Arc::clone(&state);
    state
        .workers
        .run(&tenant.clone(), state.timeout(), async move {
            let (schema, batches, next) = reports::events_page(&work.engine, &tenant, &filter, work.timeout()).await?;
            if format == Format::Json {
                return Ok(Json(serde_json::json!({ "tenant_id": tenant, "rows": json_rows(&batches)?, "next_cursor": next })).into_response());
            }
            let extra: Vec<(&'static str, String)> = next.map(|n| ("x-tally-next-cursor", n.to_string())).into_iter().collect();
            Ok(body(format, encode(format, schema, &batches)?, &extra))
        })
        .await
}

async fn costs(State(state): State<Arc<AppState>>, Path(tenant): Path<String>, Query(q): Query<HashMap<String, String>>) -> Result<Response> {
    let mut p = Params(q);
    let tz_name = p.take("tz").unwrap_or_else(|| "UTC".into());
    let tz = TimeZone::get(&tz_name).map_err(|_| Error::BadRequest(format!("tz: {tz_name:?} is not a known IANA time zone")))?;
    let billing_period = match p.take("billing_period") {
        Some(d) => Some(
            d.parse::<jiff::civil::Date>()
                .map_err(|_| Error::BadRequest(format!("billing_period: {d:?} is not a date (YYYY-MM-DD, the period's first day)")))?,
        ),
        None => None,
    };
    // A billing period's charges include late events from earlier periods: with one, the
    // occurrence range defaults to the whole log.
    let (from, to) = (p.take("from"), p.take("to"));
    let required = |name: &str| Error::BadRequest(format!("{name} is required (YYYY-MM-DD or RFC 3339) unless billing_period is given"));
    let from = match (from, billing_period) {
        (Some(from), _) => instant("from", &from, &tz)?,
        (None, Some(_)) => jiff::Timestamp::UNIX_EPOCH,
        (None, None) => return Err(required("from")),
    };
    let to = match (to, billing_period) {
        (Some(to), _) => instant_end("to", &to, &tz)?,
        (None, Some(_)) => reports::OPEN_END,
        (None, None) => return Err(required("to")),
    };
    let mut group_by = Vec::new();
    for d in p.take("group_by").unwrap_or_default().split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let d = Dim::parse(d)?;
        if !group_by.contains(&d) {
            group_by.push(d);
        }
    }
    let format = p.format()?;
    p.finish()?;
    let work = Arc::clone(&state);
    state
        .workers
        .run(&tenant.clone(), state.timeout(), async move {
            cost_response(&work, tenant, CostQuery { from, to, tz, group_by, billing_period }, tz_name, format).await
        })
        .await
}

async fn cost_response(state: &AppState, tenant: String, query: CostQuery, tz_name: String, format: Format) -> Result<Response> {
    let (from, to, group_by, billing_period) = (query.from, query.to, query.group_by.clone(), query.billing_period);
    let report = reports::costs(&state.engine, &tenant, &query, state.timeout()).await?;
    let (rows, totals) = (report.rows, report.totals);
    let names: Vec<&str> = group_by.iter().map(|d| d.name()).collect();
    let batch = cost_batch(&names, &rows)?;
    if format == Format::Json {
        let totals_batch = cost_batch(&[], &totals)?;
        return Ok(Json(serde_json::json!({
            "tenant_id": tenant, "from": from.to_string(), "to": to.to_string(), "tz": tz_name, "group_by": names,
            "billing_period": billing_period.map(|d| d.to_string()),
            "rows": json_rows(&[batch])?, "totals": json_rows(&[totals_batch])?, "source": report.source,
        }))
        .into_response());
    }
    Ok(body(format, encode(format, batch.schema(), &[batch])?, &[]))
}

/// Columns of text and integers, as a batch.
enum Column {
    Text(Vec<Option<String>>),
    Int(Vec<i64>),
    /// A nullable integer column.
    OptInt(Vec<Option<i64>>),
}

fn batch_of(columns: Vec<(String, Column)>) -> Result<RecordBatch> {
    let mut fields = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    for (name, column) in columns {
        match column {
            Column::Text(v) => {
                fields.push(Field::new(name, DataType::Utf8, true));
                arrays.push(Arc::new(StringArray::from(v)));
            }
            Column::Int(v) => {
                fields.push(Field::new(name, DataType::Int64, false));
                arrays.push(Arc::new(Int64Array::from(v)));
            }
            Column::OptInt(v) => {
                fields.push(Field::new(name, DataType::Int64, true));
                arrays.push(Arc::new(Int64Array::from(v)));
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).map_err(|e| Error::Internal(e.to_string()))
}

fn cost_batch(names: &[&str], rows: &[reports::CostRow]) -> Result<RecordBatch> {
    let mut columns: Vec<(String, Column)> =
        names.iter().enumerate().map(|(i, n)| (n.to_string(), Column::Text(rows.iter().map(|r| r.dims[i].clone()).collect()))).collect();
    columns.push(("currency".into(), Column::Text(rows.iter().map(|r| r.currency.clone()).collect())));
    columns.push(("events".into(), Column::Int(rows.iter().map(|r| r.events).collect())));
    columns.push(("cost_micros".into(), Column::Int(rows.iter().map(|r| r.cost_micros).collect())));
    columns.push(("charge_micros".into(), Column::Int(rows.iter().map(|r| r.charge_micros).collect())));
    columns.push(("input_tokens".into(), Column::Int(rows.iter().map(|r| r.input_tokens).collect())));
    columns.push(("output_tokens".into(), Column::Int(rows.iter().map(|r| r.output_tokens).collect())));
    batch_of(columns)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlBody {
    sql: String,
}

async fn sql(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    raw: std::result::Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response> {
    let raw = match raw {
        Ok(raw) => raw,
        Err(e) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => return Err(Error::BodyTooLarge(MAX_BODY_BYTES)),
        Err(e) => return Err(Error::BadRequest(format!("the body could not be read: {}", e.body_text()))),
    };
    let mut p = Params(q);
    let format = p.format()?;
    p.finish()?;
    let request: SqlBody = serde_json::from_slice(&raw).map_err(|e| Error::BadRequest(format!("body must be {{\"sql\": \"…\"}}: {e}")))?;
    let work = Arc::clone(&state);
    state
        .workers
        .run(&tenant.clone(), state.timeout(), async move {
            let max_rows = work.config.max_rows;
            let (schema, batches, truncated) =
                reports::tenant_sql(&work.engine, &tenant, &request.sql, work.config.max_sql_bytes, max_rows, work.timeout()).await?;
            if format == Format::Json {
                return Ok(Json(serde_json::json!({ "tenant_id": tenant, "rows": json_rows(&batches)?, "truncated": truncated, "max_rows": max_rows }))
                    .into_response());
            }
            Ok(body(format, encode(format, schema, &batches)?, &[("x-tally-truncated", truncated.to_string())]))
        })
        .await
}

async fn audit_export(State(state): State<Arc<AppState>>, Path(tenant): Path<String>, Query(q): Query<HashMap<String, String>>) -> Result<Response> {
    let mut p = Params(q);
    let from = p.parse::<u64>("from_seq", "a seq")?;
    let to = p.parse::<u64>("to_seq", "a seq")?;
    p.finish()?;
    let work = Arc::clone(&state);
    state
        .workers
        .run(&tenant.clone(), state.timeout(), async move {
            let c = &work.config;
            let export = reports::audit_export(&work.engine, &c.data_dir, &tenant, from, to, c.max_export_rows, c.max_export_mb << 20, work.timeout()).await?;
            Ok(Json(export).into_response())
        })
        .await
}

async fn spend(State(state): State<Arc<AppState>>, Query(q): Query<HashMap<String, String>>, headers: HeaderMap) -> Result<Response> {
    let who = principal(&state, &headers)?;
    who.check(Action::ReadAllSpend, None)?;
    let mut p = Params(q);
    let period = p.take("period").ok_or_else(|| Error::BadRequest("period is required (YYYY-MM)".into()))?;
    let calendar = match p.take("calendar") {
        None => reports::SpendCalendar::Month,
        Some(name) => reports::SpendCalendar::parse(&name).ok_or_else(|| Error::BadRequest(format!("calendar: {name:?} is neither month nor billing")))?,
    };
    let format = p.format()?;
    p.finish()?;
    reports::month_bounds(&period)?;
    let work = Arc::clone(&state);
    // Billing callers are limited per token, as tenants are per tenant.
    let caller = format!("billing:{}", who.name);
    state.workers.run(&caller, state.timeout(), async move { spend_response(&work, period, calendar, format).await }).await
}

/// The spend export: one FOCUS 1.2 row per tenant, billing period, currency, charge basis and
/// correction (docs/billing.md maps every column).
async fn spend_response(state: &AppState, period: String, calendar: reports::SpendCalendar, format: Format) -> Result<Response> {
    let iso = |t: jiff::Timestamp| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let rows = reports::spend(&state.engine, &period, calendar, state.timeout()).await?;
    let text = |f: &dyn Fn(&reports::Spend) -> Option<String>| Column::Text(rows.iter().map(f).collect());
    let int = |f: &dyn Fn(&reports::Spend) -> i64| Column::Int(rows.iter().map(f).collect());
    let same = |v: &str| -> Column {
        let v = v.to_string();
        Column::Text(rows.iter().map(|_| Some(v.clone())).collect())
    };
    let tokens_priced = |r: &reports::Spend| matches!(r.basis.as_deref(), Some("table" | "ceiling"));
    let issuer = state.config.invoice_issuer.as_str();
    let batch = batch_of(vec![
        ("BillingAccountId".into(), text(&|r| Some(r.tenant.clone()))),
        ("BillingAccountName".into(), text(&|r| Some(r.tenant.clone()))),
        ("BillingCurrency".into(), text(&|r| r.currency.clone())),
        ("BillingPeriodStart".into(), text(&|r| Some(iso(r.period_start)))),
        ("BillingPeriodEnd".into(), text(&|r| Some(iso(r.period_end)))),
        ("ChargeCategory".into(), same("Usage")),
        // Null for a regular charge; `Correction` for late events billed after their period closed.
        ("ChargeClass".into(), text(&|r| r.correction.then(|| "Correction".into()))),
        ("ChargeDescription".into(), text(&|r| Some(format!("AI agent actions recorded by Tally, charged by {}", r.basis.as_deref().unwrap_or("event"))))),
        ("ChargePeriodStart".into(), text(&|r| Some(iso(r.period_start)))),
        ("ChargePeriodEnd".into(), text(&|r| Some(iso(r.period_end)))),
        ("BilledCost".into(), text(&|r| Some(decimal(r.sums.charge_micros)))),
        ("EffectiveCost".into(), text(&|r| Some(decimal(r.sums.charge_micros)))),
        ("ListCost".into(), text(&|r| Some(decimal(r.sums.charge_micros)))),
        ("ContractedCost".into(), text(&|r| Some(decimal(r.sums.charge_micros)))),
        ("PricingQuantity".into(), int(&|r| if tokens_priced(r) { r.sums.input_tokens.saturating_add(r.sums.output_tokens) } else { r.sums.events })),
        ("PricingUnit".into(), text(&|r| Some(if tokens_priced(r) { "Tokens" } else { "Events" }.into()))),
        ("ConsumedQuantity".into(), int(&|r| r.sums.events)),
        ("ConsumedUnit".into(), same("Events")),
        ("InvoiceIssuerName".into(), same(issuer)),
        ("ProviderName".into(), same(issuer)),
        ("PublisherName".into(), same(issuer)),
        ("ServiceCategory".into(), same("AI and Machine Learning")),
        ("ServiceName".into(), same("Tally")),
        ("SubAccountId".into(), text(&|r| Some(r.tenant.clone()))),
        ("x_ChargeBasis".into(), text(&|r| r.basis.clone())),
        ("x_LogOrigin".into(), text(&|r| r.origin.clone())),
        ("x_ChargedMicros".into(), int(&|r| r.sums.charge_micros)),
        // A statement holds what was charged, not what the gateways claimed.
        ("x_ClaimedCostMicros".into(), Column::OptInt(rows.iter().map(|r| r.statement_seq.is_none().then_some(r.sums.cost_micros)).collect())),
        ("x_StatementSeq".into(), Column::OptInt(rows.iter().map(|r| r.statement_seq.and_then(|s| i64::try_from(s).ok())).collect())),
        ("x_InputTokens".into(), int(&|r| r.sums.input_tokens)),
        ("x_OutputTokens".into(), int(&|r| r.sums.output_tokens)),
    ])?;
    if format == Format::Json {
        // Every FOCUS column is in every row, a null one too (the JSON writer leaves nulls out).
        let mut rows = json_rows(std::slice::from_ref(&batch))?;
        for row in rows.as_array_mut().into_iter().flatten().filter_map(serde_json::Value::as_object_mut) {
            for field in batch.schema().fields() {
                row.entry(field.name().clone()).or_insert(serde_json::Value::Null);
            }
        }
        return Ok(Json(serde_json::json!({ "period": period, "calendar": calendar.as_str(), "rows": rows })).into_response());
    }
    Ok(body(format, encode(format, batch.schema(), &[batch])?, &[]))
}

/// Refuses request bodies over 1 MiB (SQL texts are far smaller).
pub const MAX_BODY_BYTES: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_a_decimal_string() {
        assert_eq!(decimal(1_234_567), "1.234567");
        assert_eq!(decimal(-5), "-0.000005");
        assert_eq!(decimal(0), "0.000000");
    }

    #[test]
    fn dates_are_local_midnights_and_to_is_exclusive() {
        let paris = TimeZone::get("Europe/Paris").unwrap();
        assert_eq!(instant("from", "2026-07-01", &paris).unwrap().to_string(), "2026-06-30T22:00:00Z");
        assert_eq!(instant_end("to", "2026-07-01", &paris).unwrap().to_string(), "2026-07-01T22:00:00Z");
        assert_eq!(instant("from", "2026-07-01T00:00:00Z", &paris).unwrap().to_string(), "2026-07-01T00:00:00Z");
        assert!(instant("from", "yesterday", &paris).unwrap_err().to_string().contains("from"));
    }
}
