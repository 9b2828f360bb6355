//! The ledger's read API over HTTP (axum): per tenant, the C2SP tlog-tiles paths, records,
//! receipts and consistency proofs; `/healthz`, `/readyz` and Prometheus `/metrics`.
//!
//! Errors are JSON `{"error": {"code": "...", "message": "..."}}` with stable codes:
//! `unauthenticated`, `forbidden`, `bad_host`, `token_file_invalid` (503: the server's token file
//! is missing or invalid), `bad_request`, `not_found`, `not_owner` (421: another instance owns the
//! tenant's partition), `rebalancing` (503: the partition is moving), `request_timeout`,
//! `internal` (docs/http-api.md). Tenant ids are validated before any path is built.
//!
//! Authorization (docs/http-api.md, [`tally_auth`]): every per-tenant read route needs a token that
//! reaches that tenant (its own `tenant` token, a `regulator` naming it, or `admin`); the budget
//! writes (`authorize`, `release`) need the tenant's own token or `admin`, never a regulator's or
//! billing's; `/metrics` needs a `metrics` token or `admin`; `/healthz`, `/readyz` and
//! `/openapi.json` are open. The tenant check runs
//! before the handler, so a refusal is the same whether or not the other tenant exists.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::collections::HashMap;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde::Deserialize;

use super::Shared;
use crate::error::Error;
use tally_auth::{AuthError, Principal};
use tally_log::Receipt;
use tally_log::TilePath;
use tally_log::{Checkpoint, TenantEntries};

/// Serves the API within [`tally_auth::serve::ServeLimits::default`] (connection cap, header, idle
/// and request timeouts). Without a token file (loopback only) requests must name a loopback
/// host: DNS rebinding cannot reach the unauthenticated API.
pub(super) async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, shutdown: impl std::future::Future<Output = ()> + Send + 'static) {
    let auth = shared.tokens.is_enabled();
    let mut app = router(shared);
    if !auth {
        app = app.layer(middleware::from_fn(tally_auth::serve::loopback_host_only));
    }
    if let Err(e) = tally_auth::serve::serve(listener, app, tally_auth::serve::ServeLimits::default(), shutdown).await {
        tracing::error!(error = %e, "http server failed");
    }
}

pub(super) fn router(shared: Arc<Shared>) -> Router {
    let per_tenant = Router::new()
        .route("/t/{tenant}/checkpoint", get(checkpoint))
        .route("/t/{tenant}/tile/{*rest}", get(tile))
        .route("/v1/tenants/{tenant}/records/{seq}", get(record))
        .route("/v1/tenants/{tenant}/receipt/{seq}", get(receipt))
        .route("/v1/tenants/{tenant}/receipt", get(receipt_by_event))
        .route("/v1/tenants/{tenant}/consistency", get(consistency))
        .route("/v1/tenants/{tenant}/budget", get(budget_state))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&shared), tenant_access));
    // Writes: reserving or releasing a tenant's budget spends its money, so reading it is not enough.
    let per_tenant_writes = Router::new()
        .route("/v1/tenants/{tenant}/budget/authorize", post(authorize))
        .route("/v1/tenants/{tenant}/budget/release", post(release))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&shared), tenant_budget_write_access));
    let metrics = Router::new().route("/metrics", get(metrics)).route_layer(middleware::from_fn_with_state(Arc::clone(&shared), metrics_access));
    let telemetry = shared.metrics.telemetry().clone();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .merge(per_tenant)
        .merge(per_tenant_writes)
        .merge(metrics)
        .with_state(shared);
    telemetry.instrument(app)
}

fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    shared.tokens.authenticate(header).map_err(ApiError::from)
}

/// Reads of one tenant: its own token, a regulator naming it, admin.
async fn tenant_access(State(shared): State<Arc<Shared>>, Path(params): Path<HashMap<String, String>>, request: Request, next: Next) -> Response {
    check_tenant(&shared, &params, request, next, Principal::can_read_tenant, "access to this tenant").await
}

/// Budget writes of one tenant (authorize, release): its own token, admin.
async fn tenant_budget_write_access(State(shared): State<Arc<Shared>>, Path(params): Path<HashMap<String, String>>, request: Request, next: Next) -> Response {
    check_tenant(&shared, &params, request, next, Principal::can_write_budget, "changes to this tenant's budget").await
}

/// Runs the handler only if the caller is authenticated and `allowed` for the path's tenant. The
/// check looks at the token alone, never at the tenant's data, so a refusal is the same whether
/// or not the tenant exists.
async fn check_tenant(
    shared: &Shared,
    params: &HashMap<String, String>,
    request: Request,
    next: Next,
    allowed: fn(&Principal, &str) -> bool,
    what: &'static str,
) -> Response {
    let principal = match authenticate(shared, request.headers()) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let tenant = params.get("tenant").map(String::as_str).unwrap_or_default();
    if !allowed(&principal, tenant) {
        tracing::info!(token = %principal.name, role = principal.role.as_str(), tenant_id = %tenant, refused = what, "refused: tenant not granted");
        return ApiError::from(AuthError::Forbidden(what)).into_response();
    }
    next.run(request).await
}

/// `/metrics`: a `metrics` token (a scraper that reads no data) or `admin`.
async fn metrics_access(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    match authenticate(&shared, request.headers()) {
        Ok(p) if p.can_read_metrics() => next.run(request).await,
        Ok(_) => ApiError::from(AuthError::Forbidden("metrics access")).into_response(),
        Err(e) => e.into_response(),
    }
}

struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.1, "message": self.2}});
        let mut response = (self.0, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
        response.extensions_mut().insert(tally_auth::ErrorCode(self.1));
        if self.0 == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
        ApiError(status, e.code(), e.to_string())
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Log(log) => ApiError::from(log),
            Error::NoSuchEvent(_) => ApiError(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            other => internal(&other),
        }
    }
}

impl From<tally_log::Error> for ApiError {
    fn from(e: tally_log::Error) -> Self {
        use tally_log::Error as L;
        match e {
            L::NoSuchEntry { .. } | L::NoSuchTile(_) => ApiError(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            L::BadTilePath(_) => ApiError(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
            other => internal(&other),
        }
    }
}

/// A failure the caller cannot act on: logged with its detail, answered without it.
fn internal(error: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error = %error, "request failed");
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error".into())
}

type ApiResult = Result<Response, ApiError>;

/// `Path`, with a rejection in the API's JSON error shape.
struct ApiPath<T>(T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(ApiError(StatusCode::BAD_REQUEST, "bad_request", e.body_text())),
        }
    }
}

/// `Json`, with a rejection in the API's JSON error shape.
struct ApiJson<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(e) => Err(ApiError(StatusCode::BAD_REQUEST, "bad_request", e.body_text())),
        }
    }
}

/// `Query`, with a rejection in the API's JSON error shape.
struct ApiQuery<T>(T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(ApiError(StatusCode::BAD_REQUEST, "bad_request", e.body_text())),
        }
    }
}

/// Runs `f` on the tenant's log, wherever its partition is open here.
fn with_tenant<T>(shared: &Shared, tenant: &str, f: impl FnOnce(&tally_log::Ledger) -> tally_log::Result<T>) -> Result<T, ApiError> {
    with_partition(shared, tenant, |p| Ok(f(p.ledger())?))
}

/// Runs `f` on the partition holding the tenant's log.
fn with_partition<T>(shared: &Shared, tenant: &str, f: impl FnOnce(&mut super::PartitionLedger) -> crate::error::Result<T>) -> Result<T, ApiError> {
    if tally_schemas::validate_tenant_id(tenant).is_err() {
        return Err(ApiError(StatusCode::BAD_REQUEST, "bad_request", "not a valid tenant id".into()));
    }
    // Only the tenant's home partition can hold its log: lock that one alone.
    let home = tally_ingest::tenant_partition(tenant, shared.partition_count.load(Ordering::Relaxed));
    if let Some(owned) = shared.partition(home) {
        let mut p = super::lock(&owned);
        if !p.is_closed() && p.ledger().has_tenant(tenant) {
            return f(&mut p).map_err(ApiError::from);
        }
    }
    Err(ApiError(StatusCode::NOT_FOUND, "not_found", format!("no log for tenant {tenant} on this instance")))
}

fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

async fn checkpoint(State(shared): State<Arc<Shared>>, ApiPath(tenant): ApiPath<String>) -> ApiResult {
    let note = with_tenant(&shared, &tenant, |l| l.checkpoint_note(&tenant))?;
    Ok(([(header::CACHE_CONTROL, "no-cache")], text(note)).into_response())
}

async fn tile(State(shared): State<Arc<Shared>>, ApiPath((tenant, rest)): ApiPath<(String, String)>) -> ApiResult {
    let path = TilePath::parse(&format!("tile/{rest}"))?;
    let bytes = with_tenant(&shared, &tenant, |l| {
        let log = l.tenant(&tenant);
        match path {
            TilePath::Hashes { level, index, width } => log.hash_tile(level, index, width),
            TilePath::Entries { index, width } => log.entry_bundle(index, width),
        }
    })?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream"), (header::CACHE_CONTROL, "private, max-age=31536000, immutable")], bytes).into_response())
}

async fn record(State(shared): State<Arc<Shared>>, ApiPath((tenant, seq)): ApiPath<(String, u64)>) -> ApiResult {
    let entry = with_tenant(&shared, &tenant, |l| l.tenant(&tenant).entry(seq))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], entry).into_response())
}

async fn receipt(State(shared): State<Arc<Shared>>, ApiPath((tenant, seq)): ApiPath<(String, u64)>) -> ApiResult {
    let (receipt, _entry): (Receipt, Vec<u8>) = with_tenant(&shared, &tenant, |l| l.receipt(&tenant, seq))?;
    Ok(text(receipt.to_text()))
}

#[derive(Deserialize)]
struct ByEvent {
    event_id: String,
    /// The CloudEvents `source`, for events that arrived as CloudEvents.
    #[serde(default)]
    source: Option<String>,
}

/// The receipt of the record an event was first recorded as; `X-Tally-Seq` names its seq.
async fn receipt_by_event(State(shared): State<Arc<Shared>>, ApiPath(tenant): ApiPath<String>, ApiQuery(by): ApiQuery<ByEvent>) -> ApiResult {
    let key = tally_schemas::IdempotencyKey { source: by.source, id: by.event_id };
    let (seq, receipt) = with_partition(&shared, &tenant, |p| {
        let seq = p.seq_of(&tenant, &key)?.ok_or_else(|| Error::NoSuchEvent(key.id.clone()))?;
        Ok((seq, p.ledger().receipt(&tenant, seq)?.0))
    })?;
    Ok(([("x-tally-seq", seq.to_string())], text(receipt.to_text())).into_response())
}

#[derive(Deserialize)]
struct Sizes {
    old: u64,
    new: u64,
}

async fn consistency(State(shared): State<Arc<Shared>>, ApiPath(tenant): ApiPath<String>, ApiQuery(sizes): ApiQuery<Sizes>) -> ApiResult {
    let proof = with_tenant(&shared, &tenant, |l| {
        let verifiers = l.verifiers_for(&tenant)?;
        let note = l.checkpoint_note(&tenant)?;
        let latest = Checkpoint::open(&note, &verifiers, None)?;
        if sizes.new > latest.size {
            return Err(tally_log::Error::NoSuchEntry { seq: sizes.new, size: latest.size });
        }
        l.tenant(&tenant).consistency_proof(sizes.old, sizes.new)
    })?;
    let mut body = String::new();
    for h in proof {
        body.push_str(&base64::engine::general_purpose::STANDARD.encode(h));
        body.push('\n');
    }
    Ok(text(body))
}

// ---- Budgets: admission, release, state -------------------------------------------------------

/// The partition holding `tenant`'s budget, if this instance owns it; otherwise a 421 naming the
/// owner (from `<data_dir>/owners/`), so the caller can retry there.
// The error is the response itself (large, as axum's are): it is what the handler returns.
#[allow(clippy::result_large_err)]
fn owned_partition(shared: &Shared, tenant: &str) -> Result<i32, Response> {
    if tally_schemas::validate_tenant_id(tenant).is_err() {
        return Err(ApiError(StatusCode::BAD_REQUEST, "bad_request", "not a valid tenant id".into()).into_response());
    }
    let count = shared.partition_count.load(Ordering::Relaxed);
    let partition = tally_ingest::tenant_partition(tenant, count);
    if shared.partition(partition).is_some() {
        return Ok(partition);
    }
    let owner = super::read_owner(&shared.root, &shared.topic, partition);
    let body = serde_json::json!({"error": {
        "code": "not_owner",
        "message": format!("partition {partition}, which holds this tenant, is owned by another instance"),
        "owner": owner,
    }});
    let mut response = (StatusCode::MISDIRECTED_REQUEST, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    if let Some(url) = owner.and_then(|o| axum::http::HeaderValue::from_str(&o).ok()) {
        response.headers_mut().insert("x-tally-owner", url);
    }
    Err(response)
}

/// The partition as this instance owns it now: the same instance must then serve the whole
/// request (an admission and the commit that makes it durable), even if the partition is
/// revoked and opened again meanwhile.
#[allow(clippy::result_large_err)]
fn owned_now(shared: &Shared, partition: i32) -> Result<super::Owned, Response> {
    shared.partition(partition).ok_or_else(|| rebalancing().into_response())
}

fn rebalancing() -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, "rebalancing", "the partition moved; retry".into())
}

/// The outcome of blocking work on a partition; a task that failed (panicked) is logged and
/// answered 500, its message never shown to the caller.
#[allow(clippy::result_large_err)]
fn joined_or_internal<T>(partition: i32, joined: Result<Result<T, Response>, tokio::task::JoinError>) -> Result<T, Response> {
    joined.unwrap_or_else(|e| {
        tracing::error!(partition, error = %e, "partition work failed");
        Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error".into()).into_response())
    })
}

/// Runs `f` on `owned` (open only: a closed partition answers 503 `rebalancing`) and, when it
/// appended a record (`Some(seq)`), makes the tenant's log durable up to it before returning:
/// the answer goes out only once its record survives a crash. One blocking task for both: the
/// decision under the partition's lock, the commit after it (`commit_owned`, its `fdatasync`
/// without that lock). Callers that arrive while another commit is syncing append meanwhile and
/// share the next commit; a caller whose record a commit already covered returns at once.
///
/// The commit runs on the instance that appended the record (`owned`), closed or not by then: a
/// closing commit after the append already covers it, and committing a closed partition is
/// still safe, since this process holds its lock for as long as `owned` lives.
// The error is the response itself (large, as axum's are): it is what the handler returns.
#[allow(clippy::result_large_err)]
async fn on_owned_durably<T: Send + 'static>(
    shared: &Arc<Shared>,
    owned: super::Owned,
    partition: i32,
    tenant: String,
    f: impl FnOnce(&mut super::PartitionLedger) -> crate::error::Result<(T, Option<u64>)> + Send + 'static,
) -> Result<T, Response> {
    let shared = Arc::clone(shared);
    let joined = tokio::task::spawn_blocking(move || {
        let (out, seq) = {
            let mut p = super::lock(&owned);
            if p.is_closed() {
                return Err(rebalancing().into_response());
            }
            f(&mut p).map_err(|e| ApiError::from(e).into_response())?
        };
        if let Some(seq) = seq {
            let committed = super::commit_owned(&owned, false, |p| p.committed_size(&tenant) > seq).map_err(|e| ApiError::from(e).into_response())?;
            if let Some((_, times)) = committed {
                shared.metrics.observe_commit(times);
            }
        }
        Ok(out)
    })
    .await;
    joined_or_internal(partition, joined)
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizeBody {
    #[serde(default)]
    task_id: Option<String>,
    estimate_micros: i64,
    #[serde(default = "default_ttl_ms")]
    ttl_ms: i64,
}

fn default_ttl_ms() -> i64 {
    60_000
}

const MAX_TTL_MS: i64 = 24 * 3600 * 1000;
/// One billion dollars in micros: far above any real call, far below overflow.
const MAX_ESTIMATE_MICROS: i64 = 1_000_000_000_000_000;

async fn authorize(State(shared): State<Arc<Shared>>, ApiPath(tenant): ApiPath<String>, body: Result<ApiJson<AuthorizeBody>, ApiError>) -> Response {
    let started = std::time::Instant::now();
    let response = decide(&shared, tenant, body).await;
    shared.metrics.authorize_seconds.observe(started.elapsed().as_secs_f64());
    response
}

/// An authorize request: validated, decided on the tenant's partition, made durable, answered.
async fn decide(shared: &Arc<Shared>, tenant: String, body: Result<ApiJson<AuthorizeBody>, ApiError>) -> Response {
    let body = match body {
        Ok(ApiJson(b)) => b,
        Err(e) => return e.into_response(),
    };
    if !(0..=MAX_ESTIMATE_MICROS).contains(&body.estimate_micros) {
        return ApiError(StatusCode::BAD_REQUEST, "bad_request", format!("estimate_micros must be 0..={MAX_ESTIMATE_MICROS}")).into_response();
    }
    if !(1..=MAX_TTL_MS).contains(&body.ttl_ms) {
        return ApiError(StatusCode::BAD_REQUEST, "bad_request", format!("ttl_ms must be 1..={MAX_TTL_MS}")).into_response();
    }
    // The same rule as an event's task_id: the id names one task in records and topic keys.
    if let Some(Err(rejection)) = body.task_id.as_deref().map(|t| tally_schemas::check_identifier("task_id", t)) {
        return ApiError(StatusCode::BAD_REQUEST, "bad_request", rejection.detail).into_response();
    }
    let partition = match owned_partition(shared, &tenant) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let t = tenant.clone();
    let owned = match owned_now(shared, partition) {
        Ok(o) => o,
        Err(r) => return r,
    };
    // Durable before the answer: a reservation a gateway was told about survives a crash.
    let decided = on_owned_durably(shared, owned, partition, tenant, move |p| {
        let (verdict, admission, seq) = p.authorize(&t, jiff::Timestamp::now(), body.task_id.as_deref(), body.estimate_micros, body.ttl_ms)?;
        Ok(((verdict, admission, seq), Some(seq)))
    })
    .await;
    let (verdict, admission, seq) = match decided {
        Ok(v) => v,
        Err(r) => return r,
    };
    let m = &shared.metrics;
    if verdict.allowed { &m.admissions_allowed } else { &m.admissions_denied }.inc();
    json(
        StatusCode::OK,
        serde_json::json!({
            "decision": if verdict.allowed { "allow" } else { "deny" },
            "reservation_id": admission.reservation_id,
            "expires_at": admission.expires_at,
            "denied_by": verdict.denied_by,
            "seq": seq,
            "levels": verdict.levels,
        }),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    reservation_id: String,
}

async fn release(State(shared): State<Arc<Shared>>, ApiPath(tenant): ApiPath<String>, body: Result<ApiJson<ReleaseBody>, ApiError>) -> Response {
    let body = match body {
        Ok(ApiJson(b)) => b,
        Err(e) => return e.into_response(),
    };
    let partition = match owned_partition(&shared, &tenant) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let t = tenant.clone();
    let owned = match owned_now(&shared, partition) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let released = on_owned_durably(&shared, owned, partition, tenant, move |p| {
        let seq = p.release(&t, &body.reservation_id, jiff::Timestamp::now())?;
        Ok((seq, seq))
    })
    .await;
    match released {
        Ok(Some(seq)) => json(StatusCode::OK, serde_json::json!({"released": true, "seq": seq})),
        Ok(None) => ApiError(StatusCode::NOT_FOUND, "not_found", "no such reservation (settled, released or expired)".into()).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct BudgetQuery {
    #[serde(default)]
    task_id: Option<String>,
}

async fn budget_state(State(shared): State<Arc<Shared>>, ApiPath(tenant): ApiPath<String>, ApiQuery(q): ApiQuery<BudgetQuery>) -> Response {
    let partition = match owned_partition(&shared, &tenant) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(owned) = shared.partition(partition) else {
        return rebalancing().into_response();
    };
    let p = super::lock(&owned);
    if p.is_closed() {
        return rebalancing().into_response();
    }
    let state = p.budget(&tenant).cloned().unwrap_or_default();
    drop(p);
    let (_, value) = super::budget_message(&tenant, q.task_id.as_deref(), &state, jiff::Timestamp::now());
    ([(header::CONTENT_TYPE, "application/json")], value).into_response()
}

/// Ready once this instance owns at least one partition and nothing has failed: a member that
/// has not (yet) been assigned anything can serve no tenant.
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.fatal.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some() {
        return (StatusCode::SERVICE_UNAVAILABLE, "failed\n").into_response();
    }
    let n = match shared.partitions().len() {
        0 => return (StatusCode::SERVICE_UNAVAILABLE, "no partitions assigned\n").into_response(),
        n => n,
    };
    // Reads, receipts and admissions do not need the budget topic or the DLQ: an outage of
    // either is reported here, and in the metrics, without taking the instance out of service.
    let mut body = format!("ready: {n} partitions\n");
    if let Some((error, waiting)) = shared.budget_outbox.failing() {
        body.push_str(&format!("degraded: budget topic unreachable, {waiting} states waiting: {error}\n"));
    }
    if let Some(error) = shared.dlq_stalled.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone() {
        body.push_str(&format!("degraded: dead-letter queue unreachable, its partition waits: {error}\n"));
    }
    body.into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let owned = shared.partitions().len();
    tally_auth::Telemetry::text_response(shared.metrics.render(owned, shared.tokens.reload_failures()))
}

/// The OpenAPI 3.1 description of this API, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::service::partition::test_delivery;
    use crate::service::{Metrics, PartitionLedger};
    use tally_auth::{new_token, stanza, Role, TokenStore};
    use tally_log::LedgerKey;

    struct Fixture {
        dir: tempfile::TempDir,
        shared: Arc<Shared>,
        app: Router,
        acme: String,
        regulator: String,
        billing: String,
        admin: String,
        scraper: String,
    }

    fn fixture() -> Fixture {
        fixture_with(1)
    }

    /// `partition_count` partitions in the topic, of which this instance owns partition 0.
    fn fixture_with(partition_count: i32) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut p = PartitionLedger::open(dir.path(), "events", 0, vec![key.clone()]).unwrap();
        for (i, t) in ["acme", "globex", "acme"].iter().enumerate() {
            p.apply(&test_delivery(i as i64, t, &format!("e{i}"), 5)).unwrap();
        }
        p.commit().unwrap();
        // Budgets arrive after those events: acme's `config` record is appended at its first
        // admission (seq 2).
        let budgets: crate::budget::BudgetFile =
            toml::from_str("[tenants.acme]\nperiod_micros = 5_000_000\nceiling = { input_per_million_micros = 1, output_per_million_micros = 1 }\n").unwrap();
        p.set_budget_file(Some(Arc::new(budgets.clone())));
        let tokens = [
            new_token("acme-app", Role::Tenant, vec!["acme".into()]).unwrap(),
            new_token("auditor", Role::Regulator, vec!["globex".into()]).unwrap(),
            new_token("billing", Role::Billing, vec![]).unwrap(),
            new_token("ops", Role::Admin, vec![]).unwrap(),
            new_token("prometheus", Role::Metrics, vec![]).unwrap(),
        ];
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, tokens.iter().map(|(_, e)| stanza(e).unwrap()).collect::<String>()).unwrap();
        let shared = Arc::new(Shared {
            root: dir.path().to_path_buf(),
            keys: vec![key],
            partitions: std::sync::RwLock::new(BTreeMap::from([(0, crate::service::OwnedPartition::new(p, projection(dir.path())))])),
            fatal: Mutex::new(None),
            tokens: TokenStore::load(&path).unwrap(),
            budgets: crate::service::BudgetSource::new(None, Some(budgets)),
            partition_count: std::sync::atomic::AtomicI32::new(partition_count),
            topic: "events".into(),
            assignment: super::super::AssignmentMode::Assign,
            advertise_url: "http://127.0.0.1:1".into(),
            projection_interval: std::time::Duration::from_secs(1),
            report_zones: Vec::new(),
            budget_outbox: Default::default(),
            dlq_stalled: Mutex::new(None),
            metrics: Metrics::default(),
        });
        let [acme, regulator, billing, admin, scraper] = tokens.map(|(t, _)| t);
        Fixture { dir, app: router(Arc::clone(&shared)), shared, acme, regulator, billing, admin, scraper }
    }

    async fn call(app: &Router, path: &str, token: Option<&str>) -> (StatusCode, String, serde_json::Value) {
        let mut request = axum::http::Request::get(path);
        if let Some(t) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let response = app.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        (status, text, json)
    }

    #[tokio::test]
    async fn a_tenant_token_reaches_its_own_log_only() {
        let f = fixture();
        let (status, body, _) = call(&f.app, "/t/acme/checkpoint", Some(&f.acme)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("tally.example.com/t/acme\n2\n"), "{body}");
        assert_eq!(call(&f.app, "/v1/tenants/acme/records/1", Some(&f.acme)).await.0, StatusCode::OK);
        // Another tenant, existing or not, gets the same refusal: nothing to infer.
        let (s1, _, e1) = call(&f.app, "/t/globex/checkpoint", Some(&f.acme)).await;
        let (s2, _, e2) = call(&f.app, "/t/nosuch/checkpoint", Some(&f.acme)).await;
        assert_eq!((s1, s2), (StatusCode::FORBIDDEN, StatusCode::FORBIDDEN));
        assert_eq!(e1, e2);
        assert_eq!(e1["error"]["code"], "forbidden");
        for path in [
            "/t/globex/tile/0/000.p/1",
            "/v1/tenants/globex/records/0",
            "/v1/tenants/globex/receipt/0",
            "/v1/tenants/globex/consistency?old=0&new=1",
            "/metrics",
        ] {
            assert_eq!(call(&f.app, path, Some(&f.acme)).await.0, StatusCode::FORBIDDEN, "{path}");
        }
    }

    #[tokio::test]
    async fn regulators_billing_and_admins() {
        let f = fixture();
        assert_eq!(call(&f.app, "/v1/tenants/globex/receipt/0", Some(&f.regulator)).await.0, StatusCode::OK);
        assert_eq!(call(&f.app, "/v1/tenants/acme/receipt/0", Some(&f.regulator)).await.0, StatusCode::FORBIDDEN);
        assert_eq!(call(&f.app, "/v1/tenants/acme/records/0", Some(&f.billing)).await.0, StatusCode::FORBIDDEN);
        assert_eq!(call(&f.app, "/v1/tenants/acme/records/0", Some(&f.admin)).await.0, StatusCode::OK);
        let (status, body, _) = call(&f.app, "/metrics", Some(&f.admin)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("tally_ledger_partitions 1"), "{body}");
        assert!(body.lines().any(|l| l == "tally_ledger_checkpoint_lag_seconds 0"), "{body}");
    }

    #[tokio::test]
    async fn no_or_unknown_token_is_unauthenticated_and_probes_stay_open() {
        let f = fixture();
        for token in [None, Some("tally_not-a-token")] {
            let (status, _, json) = call(&f.app, "/t/acme/checkpoint", token).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(json["error"]["code"], "unauthenticated");
        }
        assert_eq!(call(&f.app, "/healthz", None).await.0, StatusCode::OK);
        let (status, body, _) = call(&f.app, "/readyz", None).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ready: 1 partitions\n"));
    }

    /// Tiles are immutable but need a token: a shared cache must not hand them to another caller.
    #[tokio::test]
    async fn tiles_are_cached_privately() {
        let f = fixture();
        let request = axum::http::Request::get("/t/acme/tile/0/000.p/2").header(header::AUTHORIZATION, format!("Bearer {}", f.acme));
        let response = f.app.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let cache = response.headers()[header::CACHE_CONTROL].to_str().unwrap();
        assert!(cache.starts_with("private"), "{cache}");
        assert!(!cache.contains("public"), "{cache}");
    }

    async fn post(app: &Router, path: &str, token: &str, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
        let request = axum::http::Request::post(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thousand_concurrent_dimes_against_five_dollars_allow_exactly_fifty() {
        let f = fixture();
        let mut calls = Vec::new();
        for i in 0..1_000 {
            let (app, token) = (f.app.clone(), f.acme.clone());
            calls.push(tokio::spawn(async move {
                post(&app, "/v1/tenants/acme/budget/authorize", &token, serde_json::json!({"task_id": format!("t{i}"), "estimate_micros": 100_000})).await
            }));
        }
        let mut allowed = 0;
        for c in calls {
            let (status, body) = c.await.unwrap();
            assert_eq!(status, StatusCode::OK, "{body}");
            match body["decision"].as_str() {
                Some("allow") => allowed += 1,
                Some("deny") => assert_eq!(body["denied_by"], "period", "{body}"),
                other => panic!("{other:?}: {body}"),
            }
        }
        assert_eq!(allowed, 50);
        let (status, _, state) = call(&f.app, "/v1/tenants/acme/budget", Some(&f.acme)).await;
        assert_eq!(status, StatusCode::OK);
        let period = state["levels"].as_array().unwrap().iter().find(|l| l["level"] == "period").unwrap().clone();
        assert_eq!((period["reserved_micros"].as_i64(), period["remaining_micros"].as_i64()), (Some(5_000_000), Some(0)), "{state}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_owner_republishes_every_budget_and_each_reserved_task() {
        let f = fixture();
        let (_, allow) = post(&f.app, "/v1/tenants/acme/budget/authorize", &f.acme, serde_json::json!({"task_id": "run-1", "estimate_micros": 1_000})).await;
        assert_eq!(allow["decision"], "allow", "{allow}");
        let messages = super::super::lock(&f.shared.partition(0).unwrap()).current_budget_messages(jiff::Timestamp::now());
        let keys: Vec<&str> = messages.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["acme", "acme/run-1"], "globex has no budget; acme's reserved task is republished");
        let state: serde_json::Value = serde_json::from_slice(&messages[1].1).unwrap();
        assert_eq!(state["task_id"], "run-1");
    }

    #[tokio::test]
    async fn readiness_reports_a_stalled_dlq_without_leaving_service() {
        let f = fixture();
        *f.shared.dlq_stalled.lock().unwrap() = Some("broker unreachable (3 tries)".into());
        let (status, body, _) = call(&f.app, "/readyz", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("degraded: dead-letter queue unreachable") && body.contains("3 tries"), "{body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn release_frees_budget_and_bad_bodies_are_refused() {
        let f = fixture();
        let (_, allow) = post(&f.app, "/v1/tenants/acme/budget/authorize", &f.acme, serde_json::json!({"estimate_micros": 5_000_000})).await;
        assert_eq!(allow["decision"], "allow", "{allow}");
        let (_, deny) = post(&f.app, "/v1/tenants/acme/budget/authorize", &f.acme, serde_json::json!({"estimate_micros": 1})).await;
        assert_eq!((deny["decision"].as_str(), deny["denied_by"].as_str()), (Some("deny"), Some("period")), "{deny}");
        let id = allow["reservation_id"].as_str().unwrap();
        let (status, body) = post(&f.app, "/v1/tenants/acme/budget/release", &f.acme, serde_json::json!({"reservation_id": id})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = post(&f.app, "/v1/tenants/acme/budget/release", &f.acme, serde_json::json!({"reservation_id": id})).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
        let (_, again) = post(&f.app, "/v1/tenants/acme/budget/authorize", &f.acme, serde_json::json!({"estimate_micros": 1})).await;
        assert_eq!(again["decision"], "allow");
        for body in [
            serde_json::json!({"estimate_micros": -1}),
            serde_json::json!({"estimate_micros": i64::MAX}),
            serde_json::json!({"estimate": 1}),
            serde_json::json!({"estimate_micros": 1, "ttl_ms": 0}),
            serde_json::json!({"estimate_micros": 1, "task_id": "run\n1"}),
            serde_json::json!({"estimate_micros": 1, "task_id": "é".repeat(257)}),
            serde_json::json!({"estimate_micros": 1, "task_id": ""}),
        ] {
            let (status, err) = post(&f.app, "/v1/tenants/acme/budget/authorize", &f.acme, body.clone()).await;
            assert_eq!((status, err["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{body}");
        }
        // Another tenant's budget is out of reach of acme's token.
        let (status, _) = post(&f.app, "/v1/tenants/globex/budget/authorize", &f.acme, serde_json::json!({"estimate_micros": 1})).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        // Every decision is in acme's log.
        let (_, body, _) = call(&f.app, "/v1/tenants/acme/records/2", Some(&f.admin)).await;
        assert!(body.contains(r#""type":"config""#), "{body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_reservation_never_causes_a_denial() {
        let f = fixture();
        let body = serde_json::json!({"estimate_micros": 5_000_000, "ttl_ms": 50});
        assert_eq!(post(&f.app, "/v1/tenants/acme/budget/authorize", &f.acme, body).await.1["decision"], "allow");
        let small = serde_json::json!({"estimate_micros": 1});
        assert_eq!(post(&f.app, "/v1/tenants/acme/budget/authorize", &f.acme, small.clone()).await.1["decision"], "deny");
        tokio::time::sleep(std::time::Duration::from_millis(80)).await;
        assert_eq!(post(&f.app, "/v1/tenants/acme/budget/authorize", &f.acme, small).await.1["decision"], "allow");
        // The expiry is on the record, before the admission it made room for.
        let (_, body, _) = call(&f.app, "/v1/tenants/acme/records/5", Some(&f.admin)).await;
        assert!(body.contains(r#""type":"release""#) && body.contains(r#""reason":"expired""#), "{body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_on_another_instance_gets_the_owner_address() {
        let f = fixture_with(2);
        let elsewhere = (0..100).map(|i| format!("tenant{i}")).find(|t| tally_ingest::tenant_partition(t, 2) == 1).unwrap();
        super::super::write_owner(f.dir.path(), "events", 1, "http://ledger-b:8080").unwrap();
        let path = format!("/v1/tenants/{elsewhere}/budget/authorize");
        let request = axum::http::Request::post(&path)
            .header(header::AUTHORIZATION, format!("Bearer {}", f.admin))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(r#"{"estimate_micros":1}"#))
            .unwrap();
        let response = f.app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(response.headers()["x-tally-owner"], "http://ledger-b:8080");
        let body: serde_json::Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!((body["error"]["code"].as_str(), body["error"]["owner"].as_str()), (Some("not_owner"), Some("http://ledger-b:8080")));
        // A tenant of the owned partition is answered here.
        let here = (0..100).map(|i| format!("tenant{i}")).find(|t| tally_ingest::tenant_partition(t, 2) == 0).unwrap();
        let (status, body) = post(&f.app, &format!("/v1/tenants/{here}/budget/authorize"), &f.admin, serde_json::json!({"estimate_micros": 1})).await;
        assert_eq!((status, body["decision"].as_str()), (StatusCode::OK, Some("allow")), "{body}");
    }

    #[tokio::test]
    async fn receipts_by_event_id() {
        let f = fixture();
        let (status, by_event, _) = call(&f.app, "/v1/tenants/acme/receipt?event_id=e2", Some(&f.acme)).await;
        assert_eq!(status, StatusCode::OK);
        let (_, by_seq, _) = call(&f.app, "/v1/tenants/acme/receipt/1", Some(&f.acme)).await;
        assert_eq!(by_event, by_seq);
        let (status, _, json) = call(&f.app, "/v1/tenants/acme/receipt?event_id=e1", Some(&f.acme)).await;
        assert_eq!((status, json["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "e1 is globex's");
        for path in ["/v1/tenants/acme/receipt", "/v1/tenants/acme/records/x", "/v1/tenants/acme/consistency?old=1"] {
            let (status, _, json) = call(&f.app, path, Some(&f.acme)).await;
            assert_eq!((status, json["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{path}");
        }
    }

    /// Who may do what, route by route: every route of the API against every kind of caller.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_route_against_every_role() {
        use Want::{Allowed as A, Forbidden as F, Unauthenticated as U};
        let f = fixture();
        // (who, token, the tenant in the path). The regulator names globex only.
        let callers: [(&str, Option<&str>, &str); 8] = [
            ("tenant, own", Some(&f.acme), "acme"),
            ("tenant, other", Some(&f.acme), "globex"),
            ("regulator, named", Some(&f.regulator), "globex"),
            ("regulator, not named", Some(&f.regulator), "acme"),
            ("billing", Some(&f.billing), "acme"),
            ("metrics", Some(&f.scraper), "acme"),
            ("admin", Some(&f.admin), "acme"),
            ("no token", None, "acme"),
        ];
        let release = r#"{"reservation_id":"r-none"}"#;
        let authorize = r#"{"estimate_micros":1}"#;
        let table = route_matrix(authorize, release);
        let mut wrong = Vec::new();
        for (method, route, body, wants) in table {
            for ((who, token, tenant), want) in callers.iter().zip(wants) {
                let path = route.replace("{t}", tenant);
                let (status, json) = send(&f.app, method, &path, *token, body).await;
                let got = match status {
                    StatusCode::FORBIDDEN => F,
                    StatusCode::UNAUTHORIZED => U,
                    _ => A,
                };
                if got != want {
                    wrong.push(format!("{method} {path} as {who}: want {want:?}, got {status} {json}"));
                }
                let code = json["error"]["code"].as_str();
                match got {
                    F => assert_eq!(code, Some("forbidden"), "{method} {path} as {who}"),
                    U => assert_eq!(code, Some("unauthenticated"), "{method} {path} as {who}"),
                    A => {}
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        // A refused write says the same whether or not the tenant exists.
        for token in [&f.acme, &f.regulator, &f.billing] {
            let (s1, e1) = send(&f.app, "POST", "/v1/tenants/globex/budget/authorize", Some(token), Some(authorize)).await;
            let (s2, e2) = send(&f.app, "POST", "/v1/tenants/nosuch/budget/authorize", Some(token), Some(authorize)).await;
            assert_eq!((s1, &e1), (s2, &e2));
        }
        // Only the allowed writes were recorded: acme's two events, its budget config and one
        // admission each by acme and admin; globex, which only refused callers wrote to, is as it was.
        let (_, body, _) = call(&f.app, "/t/acme/checkpoint", Some(&f.admin)).await;
        assert!(body.starts_with("tally.example.com/t/acme\n5\n"), "{body}");
        let (_, body, _) = call(&f.app, "/t/globex/checkpoint", Some(&f.admin)).await;
        assert!(body.starts_with("tally.example.com/t/globex\n1\n"), "{body}");
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Want {
        /// Reaches the handler: anything but 401 and 403.
        Allowed,
        Forbidden,
        Unauthenticated,
    }

    /// Every route of the API (`{t}` for the tenant) and who may call it (docs/http-api.md).
    fn route_matrix<'a>(authorize: &'a str, release: &'a str) -> [(&'static str, &'static str, Option<&'a str>, [Want; 8]); 13] {
        use Want::{Allowed as A, Forbidden as F, Unauthenticated as U};
        //                                                                        own other reg+ reg- bill metr admin none
        [
            ("GET", "/t/{t}/checkpoint", None, /*                             */ [A, F, A, F, F, F, A, U]),
            ("GET", "/t/{t}/tile/0/000.p/1", None, /*                         */ [A, F, A, F, F, F, A, U]),
            ("GET", "/v1/tenants/{t}/records/0", None, /*                     */ [A, F, A, F, F, F, A, U]),
            ("GET", "/v1/tenants/{t}/receipt/0", None, /*                     */ [A, F, A, F, F, F, A, U]),
            ("GET", "/v1/tenants/{t}/receipt?event_id=e0", None, /*           */ [A, F, A, F, F, F, A, U]),
            ("GET", "/v1/tenants/{t}/consistency?old=0&new=1", None, /*       */ [A, F, A, F, F, F, A, U]),
            ("GET", "/v1/tenants/{t}/budget", None, /*                        */ [A, F, A, F, F, F, A, U]),
            ("POST", "/v1/tenants/{t}/budget/authorize", Some(authorize), /*  */ [A, F, F, F, F, F, A, U]),
            ("POST", "/v1/tenants/{t}/budget/release", Some(release), /*      */ [A, F, F, F, F, F, A, U]),
            ("GET", "/metrics", None, /*                                      */ [F, F, F, F, F, A, A, U]),
            ("GET", "/healthz", None, /*                                      */ [A, A, A, A, A, A, A, A]),
            ("GET", "/readyz", None, /*                                       */ [A, A, A, A, A, A, A, A]),
            ("GET", "/openapi.json", None, /*                                 */ [A, A, A, A, A, A, A, A]),
        ]
    }

    /// The served OpenAPI document describes every route of the matrix, with its method, and
    /// nothing the router does not serve.
    #[tokio::test]
    async fn the_openapi_document_lists_every_route() {
        let f = fixture();
        let (status, body, doc) = call(&f.app, "/openapi.json", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."), "{body}");
        let paths = doc["paths"].as_object().unwrap();
        let mut listed: Vec<String> = Vec::new();
        for (method, route, _, _) in route_matrix("", "") {
            // The matrix's concrete paths back to the templates the document uses.
            let template =
                route.split('?').next().unwrap().replace("{t}", "{tenant}").replace("/records/0", "/records/{seq}").replace("/receipt/0", "/receipt/{seq}");
            let template = if template.starts_with("/t/{tenant}/tile/") { "/t/{tenant}/tile/{rest}".to_string() } else { template };
            let op = &paths.get(&template).unwrap_or_else(|| panic!("{template} missing from openapi.json"))[method.to_lowercase()];
            assert!(op.is_object(), "{method} {template} missing from openapi.json");
            assert!(op["responses"].is_object(), "{method} {template} has no responses");
            listed.push(template);
        }
        for documented in paths.keys() {
            assert!(listed.contains(documented), "openapi.json documents {documented}, which the router does not serve");
        }
    }

    /// Each owned partition has its own lock: while one is held (a commit's fsyncs, a Parquet
    /// flush), reads and admissions of another partition go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_partition_never_holds_up_another() {
        let f = fixture_with(2);
        let other = (0..100).map(|i| format!("tenant{i}")).find(|t| tally_ingest::tenant_partition(t, 2) == 1).unwrap();
        let key = f.shared.keys[0].clone();
        let mut p1 = PartitionLedger::open(f.dir.path(), "events", 1, vec![key]).unwrap();
        p1.apply(&test_delivery(0, &other, "e0", 5)).unwrap();
        p1.commit().unwrap();
        f.shared.partitions_mut().insert(1, crate::service::OwnedPartition::new(p1, projection(f.dir.path())));
        // Partition 0 is busy for as long as this thread holds it.
        let busy = f.shared.partition(0).unwrap();
        let (held, release) = (std::sync::mpsc::channel::<()>(), std::sync::mpsc::channel::<()>());
        let holder = std::thread::spawn(move || {
            let _guard = super::super::lock(&busy);
            held.0.send(()).unwrap();
            release.1.recv().unwrap();
        });
        held.1.recv().unwrap();
        let work = async {
            let (status, body, _) = call(&f.app, &format!("/t/{other}/checkpoint"), Some(&f.admin)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert!(body.contains(&format!("/t/{other}\n1\n")), "{body}");
            let path = format!("/v1/tenants/{other}/budget/authorize");
            let (status, json) = send(&f.app, "POST", &path, Some(&f.admin), Some(r#"{"estimate_micros":1}"#)).await;
            assert_eq!(status, StatusCode::OK, "{json}");
        };
        // Not a speed limit: a generous bound that only a wait on partition 0 would exceed.
        tokio::time::timeout(std::time::Duration::from_secs(20), work).await.expect("partition 1 waited for partition 0");
        release.0.send(()).unwrap();
        holder.join().unwrap();
    }

    fn projection(root: &std::path::Path) -> tally_projection::Projection {
        tally_projection::Projection::new(&root.join("parquet"), std::time::Duration::from_secs(1))
    }

    /// Within a partition, reads never wait for a Parquet pass or a commit's sync, and
    /// admissions never wait for a Parquet pass: both run under locks of their own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_never_wait_for_the_projection_or_a_commit_sync() {
        let f = fixture();
        let owned = f.shared.partition(0).unwrap();
        let (held, release) = (std::sync::mpsc::channel::<()>(), std::sync::mpsc::channel::<()>());
        let busy = std::sync::Arc::clone(&owned);
        let holder = std::thread::spawn(move || {
            let _projecting = busy.projection.lock().unwrap();
            let _syncing = busy.commits.lock().unwrap();
            held.0.send(()).unwrap();
            release.1.recv().unwrap();
        });
        held.1.recv().unwrap();
        let reads = async {
            for path in ["/t/acme/checkpoint", "/v1/tenants/acme/records/0", "/t/acme/tile/0/000.p/2", "/v1/tenants/acme/receipt/1", "/v1/tenants/acme/budget"]
            {
                let (status, body, _) = call(&f.app, path, Some(&f.admin)).await;
                assert_eq!(status, StatusCode::OK, "{path}: {body}");
            }
        };
        // Not a speed limit: a generous bound that only a wait on those locks would exceed.
        tokio::time::timeout(std::time::Duration::from_secs(20), reads).await.expect("a read waited for the projection or a commit");
        release.0.send(()).unwrap();
        holder.join().unwrap();
        // With only the projection busy, an admission goes through (its commit needs the gate).
        let (held, release) = (std::sync::mpsc::channel::<()>(), std::sync::mpsc::channel::<()>());
        let holder = std::thread::spawn(move || {
            let _projecting = owned.projection.lock().unwrap();
            held.0.send(()).unwrap();
            release.1.recv().unwrap();
        });
        held.1.recv().unwrap();
        let admission = send(&f.app, "POST", "/v1/tenants/acme/budget/authorize", Some(&f.admin), Some(r#"{"estimate_micros":1}"#));
        let (status, json) = tokio::time::timeout(std::time::Duration::from_secs(20), admission).await.expect("an admission waited for the projection");
        assert_eq!(status, StatusCode::OK, "{json}");
        release.0.send(()).unwrap();
        holder.join().unwrap();
    }

    /// A partition revoked while a request waited for it (its closing commit has run, though the
    /// request still holds it) takes no new work: admissions and budget reads answer 503.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_partition_takes_no_new_admissions() {
        let f = fixture();
        let owned = f.shared.partition(0).unwrap();
        super::super::lock(&owned).commit_closing().unwrap();
        let size = super::super::lock(&owned).committed_size("acme");
        let (status, json) = send(&f.app, "POST", "/v1/tenants/acme/budget/authorize", Some(&f.admin), Some(r#"{"estimate_micros":1}"#)).await;
        assert_eq!((status, json["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("rebalancing")), "{json}");
        let (status, json) = send(&f.app, "GET", "/v1/tenants/acme/budget", Some(&f.admin), None).await;
        assert_eq!((status, json["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("rebalancing")), "{json}");
        assert_eq!(super::super::lock(&owned).committed_size("acme"), size, "nothing was appended");
    }

    /// `method` on `path`, with or without a token and a JSON body: the status and the JSON body.
    async fn send(app: &Router, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (StatusCode, serde_json::Value) {
        let mut request = axum::http::Request::builder().method(method).uri(path);
        if let Some(t) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty)).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    #[tokio::test]
    async fn a_missing_token_file_refuses_everyone_with_503_and_is_counted() {
        let f = fixture();
        let path = f.dir.path().join("tokens.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f.shared.tokens.recheck_now();
        for (path, token) in [("/t/acme/checkpoint", Some(&f.acme)), ("/metrics", Some(&f.admin)), ("/t/acme/checkpoint", None)] {
            let (status, body, json) = call(&f.app, path, token.map(String::as_str)).await;
            assert_eq!((status, json["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("token_file_invalid")), "{path}: {body}");
            assert!(!body.contains(f.dir.path().to_str().unwrap()), "no server path in {body}");
        }
        assert_eq!(call(&f.app, "/healthz", None).await.0, StatusCode::OK, "probes stay open");
        std::fs::write(&path, text).unwrap();
        f.shared.tokens.recheck_now();
        let (status, body, _) = call(&f.app, "/metrics", Some(&f.admin)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("\ntally_ledger_token_reload_failures_total 1\n"), "{body}");
    }

    #[tokio::test]
    async fn bad_requests_have_stable_codes() {
        let f = fixture();
        let (status, _, json) = call(&f.app, "/t/..%2Fglobex/checkpoint", Some(&f.admin)).await;
        assert_eq!((status, json["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")));
        let (status, _, json) = call(&f.app, "/v1/tenants/acme/records/99", Some(&f.acme)).await;
        assert_eq!((status, json["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    }
}
