//! The ledger's read API over HTTP (axum): per tenant, the C2SP tlog-tiles paths, records,
//! receipts and consistency proofs; `/healthz`, `/readyz` and Prometheus `/metrics`.
//!
//! Errors are JSON `{"error": {"code": "...", "message": "..."}}` with stable codes:
//! `unauthenticated`, `forbidden`, `bad_host`, `token_file_invalid` (503: the server's token file
//! is missing or invalid), `bad_request`, `not_found`, `not_owner` (421: another instance owns the
//! tenant's partition), `rebalancing` (503: the partition is moving), `overloaded` (503: the
//! partition's admission queue is full), `request_timeout`,
//! `internal` (docs/http-api.md). Tenant ids are validated before any path is built.
//!
//! Authorization (docs/http-api.md, [`tally_auth::Role::reach`]): every route but `/healthz`,
//! `/readyz` and `/openapi.json` checks one [`Action`] in a layer before its handler: the audit
//! reads `ReadAudit`, budget state `ReadBudget`, authorize and release `SpendBudget`, `/metrics`
//! `ReadMetrics`. A refusal is the same whether or not the other tenant exists.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::collections::HashMap;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::Router;
use base64::Engine as _;
use serde::Deserialize;

use super::{AuthorizeRequest, Caller, Decided, Frozen, Released, Shared};
use crate::error::Error;
use tally_auth::{Action, AuthError, Principal};
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
        .route("/v1/tenants/{tenant}/records/{seq}/personal", get(personal))
        .route("/v1/tenants/{tenant}/receipt/{seq}", get(receipt))
        .route("/v1/tenants/{tenant}/receipt", get(receipt_by_event))
        .route("/v1/tenants/{tenant}/consistency", get(consistency))
        .route_layer(middleware::from_fn_with_state((Arc::clone(&shared), Action::ReadAudit), tenant_access));
    let budget_reads = Router::new()
        .route("/v1/tenants/{tenant}/budget", get(budget_state))
        .route_layer(middleware::from_fn_with_state((Arc::clone(&shared), Action::ReadBudget), tenant_access));
    // Statements are bills: whoever reads the tenant's costs (billing included) reads them.
    let statements = Router::new()
        .route("/v1/tenants/{tenant}/statements", get(statements))
        .route_layer(middleware::from_fn_with_state((Arc::clone(&shared), Action::ReadCosts), tenant_access));
    // Writes: reserving or releasing a tenant's budget spends its money, so reading it is not enough.
    let per_tenant_writes = Router::new()
        .route("/v1/tenants/{tenant}/budget/authorize", post(authorize))
        .route("/v1/tenants/{tenant}/budget/release", post(release))
        .route_layer(middleware::from_fn_with_state((Arc::clone(&shared), Action::SpendBudget), tenant_access));
    // The kill switch: the tenant itself or an admin; a gateway obeys freezes, never sets them.
    let freezes = Router::new()
        .route("/v1/tenants/{tenant}/freeze", post(freeze))
        .route("/v1/tenants/{tenant}/unfreeze", post(unfreeze))
        .route_layer(middleware::from_fn_with_state((Arc::clone(&shared), Action::Freeze), tenant_access));
    // Erasure cannot be undone: the tenant itself (the controller of its people's data) or an
    // admin, never a reader.
    let erasures = Router::new()
        .route("/v1/tenants/{tenant}/erase", post(erase))
        .route_layer(middleware::from_fn_with_state((Arc::clone(&shared), Action::Erase), tenant_access));
    let metrics = Router::new().route("/metrics", get(metrics)).route_layer(middleware::from_fn_with_state(Arc::clone(&shared), metrics_access));
    let telemetry = shared.metrics.telemetry().clone();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        // Public keys, for anyone who verifies: the same for every tenant id, existing or not.
        .route("/t/{tenant}/vkey", get(vkeys))
        .merge(per_tenant)
        .merge(budget_reads)
        .merge(statements)
        .merge(per_tenant_writes)
        .merge(freezes)
        .merge(erasures)
        .merge(metrics)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared);
    telemetry.instrument(app)
}

/// A request body's bound: every body this API takes is a small JSON object (an authorize with
/// every optional member is under 4 KiB). A larger one is `413 body_too_large`.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    shared.tokens.authenticate(header).map_err(ApiError::from)
}

/// Runs the handler only if the caller is authenticated and may take `action` on the path's
/// tenant. The check looks at the token alone, never at the tenant's data, so a refusal is the
/// same whether or not the tenant exists.
async fn tenant_access(
    State((shared, action)): State<(Arc<Shared>, Action)>,
    Path(params): Path<HashMap<String, String>>,
    request: Request,
    next: Next,
) -> Response {
    let principal = match authenticate(&shared, request.headers()) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let tenant = params.get("tenant").map(String::as_str).unwrap_or_default();
    if let Err(refused) = principal.check(action, Some(tenant)) {
        tracing::info!(token = %principal.name, role = principal.role.as_str(), tenant_id = %tenant, action = action.as_str(), "refused: not granted");
        return ApiError::from(refused).into_response();
    }
    // The handler records who asked (admission and release records name the token).
    let mut request = request;
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// `/metrics`: a `metrics` token (a scraper that reads no data) or `admin`.
async fn metrics_access(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    match authenticate(&shared, request.headers()) {
        Ok(p) => match p.check(Action::ReadMetrics, None) {
            Ok(()) => next.run(request).await,
            Err(refused) => ApiError::from(refused).into_response(),
        },
        Err(e) => e.into_response(),
    }
}

/// Every error this API answers: `{"error": {"code", "message"[, "owner"]}}`.
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// `not_owner`: the instance that owns the tenant's partition (also `X-Tally-Owner`).
    owner: Option<String>,
    /// Seconds for `Retry-After` (503s the caller should simply retry).
    retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), owner: None, retry_after: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = serde_json::json!({"code": self.code, "message": self.message});
        if let Some(owner) = &self.owner {
            error["owner"] = serde_json::Value::String(owner.clone());
        }
        let body = serde_json::json!({ "error": error });
        let mut response = (self.status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
        response.extensions_mut().insert(tally_auth::ErrorCode(self.code));
        let headers = response.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        if let Some(url) = self.owner.and_then(|o| axum::http::HeaderValue::from_str(&o).ok()) {
            headers.insert("x-tally-owner", url);
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, secs.into());
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Log(log) => ApiError::from(log),
            Error::NoSuchEvent(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            Error::IdempotencyConflict { .. } => ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", e.to_string()),
            Error::TooManyFreezes { .. } => ApiError::new(StatusCode::CONFLICT, "too_many_freezes", e.to_string()),
            Error::MissingEstimatedTokens => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
            other => internal(&other),
        }
    }
}

impl From<tally_log::Error> for ApiError {
    fn from(e: tally_log::Error) -> Self {
        use tally_log::Error as L;
        match e {
            L::NoSuchEntry { .. } | L::NoSuchTile(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            L::BadTilePath(_) => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
            other => internal(&other),
        }
    }
}

/// A failure the caller cannot act on: logged with its detail, answered without it.
fn internal(error: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error = %error, "request failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
}

type ApiResult = Result<Response, ApiError>;

/// `Path`, with a rejection in the API's JSON error shape.
struct ApiPath<T>(T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())),
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
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("the request body is over {MAX_BODY_BYTES} bytes")))
            }
            Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())),
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
            Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())),
        }
    }
}

/// Runs `f` on the tenant's log, wherever its partition is open here.
fn with_tenant<T>(shared: &Shared, tenant: &str, f: impl FnOnce(&tally_log::Ledger) -> tally_log::Result<T>) -> Result<T, ApiError> {
    with_partition(shared, tenant, |p| Ok(f(p.ledger())?))
}

/// Runs `f` on the partition holding the tenant's log ([`home`]): 404 only when this instance
/// owns that partition and it holds nothing of the tenant.
fn with_partition<T>(shared: &Shared, tenant: &str, f: impl FnOnce(&mut super::PartitionLedger) -> crate::error::Result<T>) -> Result<T, ApiError> {
    let (_, owned) = home(shared, tenant)?;
    let mut p = super::lock(&owned);
    if p.is_closed() {
        return Err(unavailable(tenant_partition(shared, tenant)));
    }
    if !p.ledger().has_tenant(tenant) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("tenant {tenant} has no records yet")));
    }
    f(&mut p).map_err(ApiError::from)
}

fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// The verifier keys of `tenant`'s checkpoints, one line per signing key this instance holds
/// (several during a key rotation), in the order of `keys`. Open to anyone: a vkey is public,
/// and it is derived from the tenant id alone, so it says nothing of whether the tenant exists.
async fn vkeys(State(shared): State<Arc<Shared>>, ApiPath(tenant): ApiPath<String>) -> ApiResult {
    if tally_schemas::validate_tenant_id(&tenant).is_err() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_request", "not a valid tenant id"));
    }
    let mut body = String::new();
    for key in &shared.keys {
        body.push_str(&key.signer_for(&tenant)?.verifier().to_string());
        body.push('\n');
    }
    Ok(([(header::CACHE_CONTROL, "public, max-age=300")], text(body)).into_response())
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

/// The personal values of a record (docs/privacy.md): each field's value and salt, which open
/// the commitment in the record's `personal` member, or `"erased"`. A record without personal
/// fields answers with none.
async fn personal(State(shared): State<Arc<Shared>>, ApiPath((tenant, seq)): ApiPath<(String, u64)>) -> ApiResult {
    let revealed = with_tenant(&shared, &tenant, |l| l.revealed(&tenant, seq))?;
    let body = match revealed {
        None => serde_json::json!({"seq": seq, "fields": {}}),
        Some(tally_log::Revealed::Open(fields)) => serde_json::json!({"seq": seq, "fields": fields}),
        Some(tally_log::Revealed::Erased) => serde_json::json!({"seq": seq, "erased": true, "fields": {}}),
    };
    Ok(json(StatusCode::OK, body))
}

/// The tenant's committed `statement` records (closed billing periods), oldest first, as stored:
/// `{"tenant_id": …, "statements": [<record>, …]}`. A statement's receipt proves it.
async fn statements(State(shared): State<Arc<Shared>>, ApiPath(tenant): ApiPath<String>) -> ApiResult {
    let records = with_partition(&shared, &tenant, |p| {
        let committed = p.committed_size(&tenant);
        let seqs: Vec<u64> = p.budget(&tenant).map(|s| s.statements().map(|(_, seq)| seq).filter(|seq| *seq < committed).collect()).unwrap_or_default();
        let log = p.ledger().tenant(&tenant);
        Ok(seqs.into_iter().map(|seq| log.entry(seq)).collect::<tally_log::Result<Vec<Vec<u8>>>>()?)
    })?;
    // Each record is canonical JSON already: embedded as stored, so its bytes hash to its leaf.
    let mut body = format!("{{\"tenant_id\":{},\"statements\":[", serde_json::Value::String(tenant));
    for (i, record) in records.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&String::from_utf8_lossy(record));
    }
    body.push_str("]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
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

fn tenant_partition(shared: &Shared, tenant: &str) -> i32 {
    tally_ingest::tenant_partition(tenant, shared.partition_count.load(Ordering::Relaxed))
}

/// Where `tenant` is served, for every per-tenant route: its home partition as this instance
/// owns it now (the same instance then serves the whole request, an admission and the commit
/// that makes it durable, even if the partition is revoked and opened again meanwhile).
/// Otherwise a 421 `not_owner` naming the instance whose note (`<data_dir>/owners/`) says it owns
/// the partition, so the caller can go there; or, when no other instance does (the note names
/// this one: it is still opening its partitions after a restart, or the partition is between
/// owners), a 503 with `Retry-After`. Never a 404 or a 421 pointing at this instance.
fn home(shared: &Shared, tenant: &str) -> Result<(i32, super::Owned), ApiError> {
    if tally_schemas::validate_tenant_id(tenant).is_err() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_request", "not a valid tenant id"));
    }
    let partition = tenant_partition(shared, tenant);
    if let Some(owned) = shared.partition(partition) {
        return Ok((partition, owned));
    }
    if let Some(why) = shared.halted_because(partition) {
        return Err(storage_unavailable(partition, &why));
    }
    match super::read_owner(&shared.root, &shared.topic, partition) {
        Some(owner) if owner != shared.advertise_url => Err(ApiError {
            owner: Some(owner),
            ..ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "not_owner",
                format!("partition {partition}, which holds this tenant, is owned by another instance"),
            )
        }),
        _ => Err(unavailable(partition)),
    }
}

/// 503 `storage_unavailable`: the tenant's partition is halted by a failure of its storage (a
/// full disk) and opens again by itself (docs/storage.md, "When the disk fills up").
fn storage_unavailable(partition: i32, why: &str) -> ApiError {
    ApiError {
        retry_after: Some(super::REOPEN_EVERY.as_secs() as u32),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            format!("partition {partition}, which holds this tenant, is halted because its storage failed ({why}); it opens again by itself once its files can be written"),
        )
    }
}

/// 503 `rebalancing`: the tenant's partition is opening, moving or closing; retry in a second.
fn unavailable(partition: i32) -> ApiError {
    ApiError {
        retry_after: Some(1),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "rebalancing",
            format!("partition {partition}, which holds this tenant, is opening or moving and no instance serves it yet; retry"),
        )
    }
}

/// Runs `f` on `owned` (open only: a closed partition answers 503 `rebalancing`) through the
/// partition's admission queue and, when it appended a record (`Some(seq)`), answers only once
/// the tenant's log is durable up to it: the answer goes out only once its record survives a
/// crash. The queue's thread decides every waiting request under one acquisition of the
/// partition's lock and makes them durable with one commit (`admissions`), so concurrent callers
/// share commits without a blocking thread each. A full queue answers 503 `overloaded`.
///
/// The commit runs on the instance that appended the record (`owned`), closed or not by then: a
/// closing commit after the append already covers it, and committing a closed partition is
/// still safe, since this process holds its lock for as long as `owned` lives.
async fn on_owned_durably<T: Send + 'static>(
    shared: &Arc<Shared>,
    owned: super::Owned,
    partition: i32,
    tenant: String,
    f: impl FnOnce(&mut super::PartitionLedger) -> crate::error::Result<(T, Option<u64>)> + Send + 'static,
) -> Result<T, ApiError> {
    use super::admissions::{Decision, Durability, Enqueued};
    let (answer, answered) = tokio::sync::oneshot::channel::<Result<T, ApiError>>();
    let metrics = Arc::clone(shared);
    let request = Box::new(move |p: &mut super::PartitionLedger| {
        if p.is_closed() {
            let _ = answer.send(Err(unavailable(partition)));
            return Decision::Answered;
        }
        match f(p) {
            Err(e) => {
                let _ = answer.send(Err(ApiError::from(e)));
                Decision::Answered
            }
            Ok((out, None)) => {
                let _ = answer.send(Ok(out));
                Decision::Answered
            }
            Ok((out, Some(seq))) => Decision::Appended {
                tenant,
                seq,
                answer: Box::new(move |durability| {
                    let _ = answer.send(match durability {
                        Durability::Durable(times) => {
                            // Here, on the queue's thread: recorded even if the caller is gone.
                            if let Some(times) = times {
                                metrics.metrics.observe_commit(times);
                            }
                            Ok(out)
                        }
                        // Logged once for the batch by the queue's thread.
                        Durability::Failed(Some(why)) => Err(storage_unavailable(partition, &why)),
                        Durability::Failed(None) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")),
                    });
                }),
            },
        }
    });
    match owned.admissions.enqueue(request) {
        Enqueued::Queued => {}
        Enqueued::Full => {
            shared.metrics.admissions_overloaded.inc();
            return Err(ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    format!(
                        "partition {partition}, which holds this tenant, already has {} requests waiting to be decided; retry",
                        super::admissions::QUEUE_CAPACITY
                    ),
                )
            });
        }
        Enqueued::Gone => return Err(unavailable(partition)),
    }
    match answered.await {
        Ok(result) => result,
        // The request panicked (logged by the queue's thread) or its partition went away.
        Err(_) => {
            tracing::error!(partition, "an admission request was dropped unanswered");
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error"))
        }
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizeBody {
    #[serde(default)]
    task_id: Option<String>,
    /// The agent and the action (a model or tool) about to run: matched against freezes.
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(default)]
    action: Option<String>,
    /// The kind of call (`llm_call`, `tool_call`, …) and its estimated tokens: matched against
    /// rate quotas.
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    estimated_tokens: Option<u64>,
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
/// As an event's token counts.
const MAX_ESTIMATED_TOKENS: u64 = 1_000_000_000_000;

async fn authorize(
    State(shared): State<Arc<Shared>>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    ApiPath(tenant): ApiPath<String>,
    body: Result<ApiJson<AuthorizeBody>, ApiError>,
) -> Response {
    let started = std::time::Instant::now();
    let response = decide(&shared, &who, &headers, tenant, body).await;
    shared.metrics.authorize_seconds.observe(started.elapsed().as_secs_f64());
    response
}

/// The longest `Idempotency-Key` accepted; a UUID or a ULID fits with room to spare.
const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The request's `Idempotency-Key`: 1 to 128 of `A-Z a-z 0-9 . _ : -`, since it is recorded in
/// the tenant's log and shown back.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value.to_str().unwrap_or_default();
    let valid = (1..=MAX_IDEMPOTENCY_KEY).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if !valid {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters of A-Z a-z 0-9 . _ : -"),
        ));
    }
    Ok(Some(key.to_string()))
}

/// Marks an answer given from a keyed request's first record.
fn replayed(mut response: Response) -> Response {
    response.headers_mut().insert("idempotent-replayed", axum::http::HeaderValue::from_static("true"));
    response
}

/// An authorize request: validated, decided on the tenant's partition, made durable, answered.
async fn decide(shared: &Arc<Shared>, who: &Principal, headers: &HeaderMap, tenant: String, body: Result<ApiJson<AuthorizeBody>, ApiError>) -> Response {
    let body = match body {
        Ok(ApiJson(b)) => b,
        Err(e) => return e.into_response(),
    };
    if !(0..=MAX_ESTIMATE_MICROS).contains(&body.estimate_micros) {
        return ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("estimate_micros must be 0..={MAX_ESTIMATE_MICROS}")).into_response();
    }
    if !(1..=MAX_TTL_MS).contains(&body.ttl_ms) {
        return ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("ttl_ms must be 1..={MAX_TTL_MS}")).into_response();
    }
    // The same rule as an event's ids: each names one task, agent or action in records and keys.
    if let Err(e) = check_identifiers(&[("task_id", &body.task_id), ("agent_id", &body.agent_id), ("action", &body.action), ("kind", &body.kind)]) {
        return e.into_response();
    }
    if body.estimated_tokens.is_some_and(|t| t > MAX_ESTIMATED_TOKENS) {
        return ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("estimated_tokens must be 0..={MAX_ESTIMATED_TOKENS}")).into_response();
    }
    let key = match idempotency_key(headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let (partition, owned) = match home(shared, &tenant) {
        Ok(home) => home,
        Err(e) => return e.into_response(),
    };
    let (t, token) = (tenant.clone(), who.name.clone());
    let request = AuthorizeRequest {
        task_id: body.task_id,
        agent_id: body.agent_id,
        action: body.action,
        kind: body.kind,
        estimate_micros: body.estimate_micros,
        estimated_tokens: body.estimated_tokens,
        ttl_ms: body.ttl_ms,
    };
    // Durable before the answer: a reservation a gateway was told about survives a crash. A
    // retry's first record is made durable too (it may still be in the open commit).
    let decided = on_owned_durably(shared, owned, partition, tenant, move |p| {
        let caller = Caller { token: Some(&token), idempotency_key: key.as_deref() };
        let decided = p.authorize(&t, jiff::Timestamp::now(), &request, &caller)?;
        let seq = decided.seq;
        Ok((decided, Some(seq)))
    })
    .await;
    let Decided { verdict, admission, seq, replayed: was_replayed } = match decided {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let m = &shared.metrics;
    if was_replayed {
        m.requests_replayed.inc();
    } else if verdict.allowed {
        m.admissions_allowed.inc();
    } else if verdict.throttled.is_some() {
        m.admissions_throttled.inc();
    } else {
        m.admissions_denied.inc();
    }
    let decision = match (verdict.allowed, &verdict.throttled) {
        (true, _) => "allow",
        (false, Some(_)) => "throttled",
        (false, None) => "deny",
    };
    let mut response = json(
        StatusCode::OK,
        serde_json::json!({
            "decision": decision,
            "reservation_id": admission.reservation_id,
            "expires_at": admission.expires_at,
            "denied_by": verdict.denied_by,
            "denied_unit": admission.denied_unit,
            "throttled_by": admission.throttled_by,
            "retry_after_ms": admission.retry_after_ms,
            "seq": seq,
            "levels": verdict.levels,
        }),
    );
    if let Some((_, ms)) = verdict.throttled {
        // Whole seconds, rounded up: never earlier than the window's end.
        response.headers_mut().insert(header::RETRY_AFTER, ms.div_ceil(1000).into());
    }
    if was_replayed {
        replayed(response)
    } else {
        response
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    reservation_id: String,
}

async fn release(
    State(shared): State<Arc<Shared>>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    ApiPath(tenant): ApiPath<String>,
    body: Result<ApiJson<ReleaseBody>, ApiError>,
) -> Response {
    let body = match body {
        Ok(ApiJson(b)) => b,
        Err(e) => return e.into_response(),
    };
    let key = match idempotency_key(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let (partition, owned) = match home(&shared, &tenant) {
        Ok(home) => home,
        Err(e) => return e.into_response(),
    };
    let (t, token) = (tenant.clone(), who.name);
    let released = on_owned_durably(&shared, owned, partition, tenant, move |p| {
        let caller = Caller { token: Some(&token), idempotency_key: key.as_deref() };
        let released = p.release(&t, &body.reservation_id, jiff::Timestamp::now(), &caller)?;
        Ok((released, released.map(|r| r.seq)))
    })
    .await;
    match released {
        Ok(Some(Released { seq, replayed: was_replayed })) => {
            let response = json(StatusCode::OK, serde_json::json!({"released": true, "seq": seq}));
            if was_replayed {
                shared.metrics.requests_replayed.inc();
                replayed(response)
            } else {
                response
            }
        }
        Ok(None) => ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such reservation (settled, released or expired)").into_response(),
        Err(e) => e.into_response(),
    }
}

/// Each present `(name, value)` under the rule of an event's identifiers.
fn check_identifiers(fields: &[(&str, &Option<String>)]) -> Result<(), ApiError> {
    for (name, value) in fields {
        if let Some(Err(rejection)) = value.as_deref().map(|v| tally_schemas::check_identifier(name, v)) {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_request", rejection.detail));
        }
    }
    Ok(())
}

// ---- The kill switch: freeze, unfreeze ----------------------------------------------------------

/// The longest freeze reason kept in the log.
const MAX_REASON_CHARS: usize = 512;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FreezeBody {
    reason: String,
    #[serde(default)]
    scope: Option<crate::budget::FreezeScope>,
}

/// `POST …/freeze`: a `freeze` record, durable and signed before the answer; then the consume
/// loop is woken to publish the tenant's budget state (which lists its active freezes) at once.
async fn freeze(
    State(shared): State<Arc<Shared>>,
    Extension(who): Extension<Principal>,
    ApiPath(tenant): ApiPath<String>,
    body: Result<ApiJson<FreezeBody>, ApiError>,
) -> Response {
    let body = match body {
        Ok(ApiJson(b)) => b,
        Err(e) => return e.into_response(),
    };
    let chars = body.reason.chars().count();
    if chars == 0 || chars > MAX_REASON_CHARS || body.reason.chars().any(char::is_control) {
        return ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("reason must be 1 to {MAX_REASON_CHARS} characters without control characters"))
            .into_response();
    }
    let scope = body.scope.unwrap_or_default();
    if let Err(e) = check_identifiers(&[("scope.agent_id", &scope.agent_id), ("scope.action", &scope.action), ("scope.task_id", &scope.task_id)]) {
        return e.into_response();
    }
    let (partition, owned) = match home(&shared, &tenant) {
        Ok(home) => home,
        Err(e) => return e.into_response(),
    };
    let (t, token, reason) = (tenant.clone(), who.name.clone(), body.reason);
    let frozen = on_owned_durably(&shared, owned, partition, tenant.clone(), move |p| {
        let frozen = p.freeze(&t, jiff::Timestamp::now(), &reason, scope, &Caller { token: Some(&token), idempotency_key: None })?;
        let seq = frozen.seq;
        Ok((frozen, Some(seq)))
    })
    .await;
    match frozen {
        Ok(Frozen { freeze_id, seq, existing }) => {
            if existing {
                // Nothing new to publish (and no commit to force); the request is still on record here.
                tracing::warn!(tenant_id = %tenant, freeze_id = %freeze_id, token = %who.name, "freeze of an already frozen scope: answered with the active freeze");
            } else {
                // The consume loop publishes the tenant's state (listing the freeze) at once.
                shared.publish_soon.notify_one();
                tracing::warn!(tenant_id = %tenant, freeze_id = %freeze_id, seq, token = %who.name, "tenant scope frozen");
            }
            json(StatusCode::OK, serde_json::json!({"freeze_id": freeze_id, "seq": seq, "existing": existing}))
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EraseBody {
    /// One subject's personal data (the events' `actor_id`; `""`: events without one).
    #[serde(default)]
    subject: Option<String>,
    /// Every subject's: the tenant's personal data (offboarding).
    #[serde(default)]
    all_subjects: bool,
    /// Only what occurred in months wholly before this date (`YYYY-MM-DD`; keys are per UTC
    /// month, so the month holding the date is kept).
    #[serde(default)]
    before: Option<jiff::civil::Date>,
}

/// `POST …/erase`: erases the personal values of one subject's records, or of all the tenant's,
/// appends the signed `erasure` records naming them (durable before the answer), then rewrites
/// the tenant's Parquet projection without the values (docs/privacy.md, "Erasure").
async fn erase(
    State(shared): State<Arc<Shared>>,
    Extension(who): Extension<Principal>,
    ApiPath(tenant): ApiPath<String>,
    body: Result<ApiJson<EraseBody>, ApiError>,
) -> Response {
    let body = match body {
        Ok(ApiJson(b)) => b,
        Err(e) => return e.into_response(),
    };
    let subject = match (body.subject, body.all_subjects) {
        (Some(s), false) => Some(s),
        (None, true) => None,
        _ => return ApiError::new(StatusCode::BAD_REQUEST, "bad_request", "give exactly one of subject and all_subjects = true").into_response(),
    };
    if let Some(s) = &subject {
        if s.chars().count() > tally_schemas::MAX_ID_CHARS || s.chars().any(char::is_control) {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("subject must be at most {} characters without control characters", tally_schemas::MAX_ID_CHARS),
            )
            .into_response();
        }
    }
    if subject.is_none() && who.role != tally_auth::Role::Admin {
        // Every subject at once is offboarding: an operator's act, not an app token's.
        return ApiError::new(StatusCode::FORBIDDEN, "forbidden", "all_subjects needs an admin token; a tenant token erases one subject at a time")
            .into_response();
    }
    let (partition, owned) = match home(&shared, &tenant) {
        Ok(home) => home,
        Err(e) => return e.into_response(),
    };
    // The erasure names every record sealed under the keys it deletes: the tenant's committed
    // records are read first in steps, letting go of the partition between them so admissions
    // and ingestion go on; the plan then reads only what was committed since, and the appends
    // not yet committed are known in memory.
    let before = body.before.map(|d| d.strftime("%Y-%m").to_string());
    let scanned = tokio::task::spawn_blocking({
        let (owned, t, subject, before) = (Arc::clone(&owned), tenant.clone(), subject.clone(), before.clone());
        move || -> crate::error::Result<Option<tally_log::ErasureScan>> {
            let mut scan = super::lock(&owned).ledger().begin_erasure_scan(&t, subject.as_deref(), before.as_deref())?;
            // Up to where the log was when the scan began; the plan reads the rest.
            while scan.next() < scan.began_at() {
                let p = super::lock(&owned);
                if p.is_closed() {
                    return Ok(None);
                }
                let step = ERASURE_SCAN_STEP.min(scan.began_at() - scan.next());
                if p.ledger().scan_for_erasure(&t, subject.as_deref(), before.as_deref(), &mut scan, step)? {
                    break;
                }
                drop(p);
                // The mutex is not fair: give waiting ingestion and admissions their turn.
                std::thread::yield_now();
            }
            Ok(Some(scan))
        }
    })
    .await;
    let scan = match scanned {
        Ok(Ok(Some(scan))) => scan,
        Ok(Ok(None)) => return unavailable(partition).into_response(),
        Ok(Err(e)) => return ApiError::from(e).into_response(),
        Err(e) => return internal(&e).into_response(),
    };
    let (t, token, subject) = (tenant.clone(), who.name.clone(), subject.clone());
    let erased = on_owned_durably(&shared, Arc::clone(&owned), partition, tenant.clone(), move |p| {
        let caller = Caller { token: Some(&token), idempotency_key: None };
        let erased = p.erase_scanned(&t, subject.as_deref(), before.as_deref(), scan, jiff::Timestamp::now(), &caller)?;
        let seq = erased.seq;
        Ok((erased, seq))
    })
    .await;
    let erased = match erased {
        Err(e) => return e.into_response(),
        Ok(erased) => erased,
    };
    tracing::warn!(tenant_id = %tenant, token = %who.name, keys = erased.keys, records = erased.records, unerasable = erased.unerasable, seq = ?erased.seq, "personal data erased");
    // The keys are gone (the commit that made the records durable deleted them); the projection
    // still shows the values: rewrite the tenant's rows. If this does not finish (the request is
    // dropped, the process stops), the projector rebuilds the tenant when it meets the record.
    let rebuilt = if erased.records > 0 {
        let tenant = tenant.clone();
        match tokio::task::spawn_blocking(move || super::projector::reproject_tenant(&owned, &tenant)).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                return internal(&format!("the erasure is recorded and its keys deleted, but rewriting the projection failed (the projector retries): {e}"))
                    .into_response()
            }
            Err(e) => return internal(&e).into_response(),
        }
    } else {
        Some(0)
    };
    json(
        StatusCode::OK,
        serde_json::json!({
            "seq": erased.seq,
            "keys": erased.keys,
            "records": erased.records,
            "erasure_records": erased.erasure_records,
            "unerasable_records": erased.unerasable,
            "projection_rows_rewritten": rebuilt,
        }),
    )
}

/// Committed records an erasure reads per hold of the partition's lock (a few milliseconds);
/// one in tests, so that every step is exercised.
const ERASURE_SCAN_STEP: u64 = if cfg!(test) { 1 } else { 4_096 };

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnfreezeBody {
    freeze_id: String,
}

async fn unfreeze(
    State(shared): State<Arc<Shared>>,
    Extension(who): Extension<Principal>,
    ApiPath(tenant): ApiPath<String>,
    body: Result<ApiJson<UnfreezeBody>, ApiError>,
) -> Response {
    let body = match body {
        Ok(ApiJson(b)) => b,
        Err(e) => return e.into_response(),
    };
    let (partition, owned) = match home(&shared, &tenant) {
        Ok(home) => home,
        Err(e) => return e.into_response(),
    };
    let (t, token) = (tenant.clone(), who.name);
    let unfrozen = on_owned_durably(&shared, owned, partition, tenant.clone(), move |p| {
        let seq = p.unfreeze(&t, &body.freeze_id, jiff::Timestamp::now(), &Caller { token: Some(&token), idempotency_key: None })?;
        Ok((seq, seq))
    })
    .await;
    match unfrozen {
        Ok(Some(seq)) => {
            shared.publish_soon.notify_one();
            json(StatusCode::OK, serde_json::json!({"unfrozen": true, "seq": seq}))
        }
        Ok(None) => ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such active freeze").into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct BudgetQuery {
    #[serde(default)]
    task_id: Option<String>,
}

async fn budget_state(State(shared): State<Arc<Shared>>, ApiPath(tenant): ApiPath<String>, ApiQuery(q): ApiQuery<BudgetQuery>) -> Response {
    let (partition, owned) = match home(&shared, &tenant) {
        Ok(home) => home,
        Err(e) => return e.into_response(),
    };
    let p = super::lock(&owned);
    if p.is_closed() {
        return unavailable(partition).into_response();
    }
    let state = match p.budget_view(&tenant) {
        Ok(state) => state,
        Err(e) => return ApiError::from(e).into_response(),
    };
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
    // A partition halted by its storage is reported whether or not others are served.
    let halted: String = shared
        .halted_partitions()
        .into_iter()
        .map(|(p, lasted, why)| format!("degraded: partition {p} halted for {} s, its storage fails (opened again every 2 s): {why}\n", lasted.as_secs()))
        .collect();
    let n = match shared.partitions().len() {
        0 if halted.is_empty() => return (StatusCode::SERVICE_UNAVAILABLE, "no partitions assigned\n").into_response(),
        0 => return (StatusCode::SERVICE_UNAVAILABLE, halted).into_response(),
        n => n,
    };
    // Reads, receipts and admissions do not need the budget topic or the DLQ: an outage of
    // either is reported here, and in the metrics, without taking the instance out of service.
    let mut body = format!("ready: {n} partitions\n{halted}");
    if let Some((lasted, error)) = shared.projection_failing() {
        body.push_str(&format!(
            "degraded: parquet projection failing for {} s, queries see records up to its last flush (retried at every pass): {error}\n",
            lasted.as_secs()
        ));
    }
    if let Some((error, waiting)) = shared.budget_outbox.failing() {
        body.push_str(&format!("degraded: budget topic unreachable, {waiting} states waiting: {error}\n"));
    }
    if let Some(error) = shared.dlq_stalled.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone() {
        body.push_str(&format!("degraded: dead-letter queue unreachable, its partition waits: {error}\n"));
    }
    if let Some((lasted, error)) = shared.broker.down() {
        body.push_str(&format!(
            "degraded: broker unreachable for {} s, no events are consumed (reads, receipts and authorize go on): {error}\n",
            lasted.as_secs()
        ));
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
        /// A `gateway` token naming acme.
        gateway: String,
        /// An `admin` token that expired in 2025.
        expired: String,
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
        // A December call of globex moves the partition's input clock past November's end plus
        // the grace: the tick closes acme's November with a statement (seq 2).
        p.apply(&super::super::partition::test_delivery_at(3, "globex", "g-dec", "2026-12-02T00:00:00Z")).unwrap();
        p.tick(jiff::Timestamp::now()).unwrap();
        p.commit().unwrap();
        // Budgets arrive after those events: acme's `config` record is appended at its first
        // admission (seq 3).
        let budgets: crate::budget::BudgetFile =
            toml::from_str("[tenants.acme]\nperiod_micros = 5_000_000\nceiling = { input_per_million_micros = 1, output_per_million_micros = 1 }\n").unwrap();
        p.set_budget_file(Some(Arc::new(budgets.clone())));
        let tokens = [
            new_token("acme-app", Role::Tenant, vec!["acme".into()]).unwrap(),
            new_token("auditor", Role::Regulator, vec!["globex".into()]).unwrap(),
            new_token("billing", Role::Billing, vec![]).unwrap(),
            new_token("ops", Role::Admin, vec![]).unwrap(),
            new_token("prometheus", Role::Metrics, vec![]).unwrap(),
            new_token("edge", Role::Gateway, vec!["acme".into()]).unwrap(),
            tally_auth::new_token_expiring("ops-2025", Role::Admin, vec![], Some("2025-12-31T23:59:59Z".parse().unwrap())).unwrap(),
        ];
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, tokens.iter().map(|(_, e)| stanza(e).unwrap()).collect::<String>()).unwrap();
        let shared = Arc::new(Shared {
            root: dir.path().to_path_buf(),
            keys: vec![key],
            partitions: std::sync::RwLock::new(BTreeMap::from([(0, crate::service::OwnedPartition::new(0, p, projection(dir.path(), "events-0")).unwrap())])),
            fatal: Mutex::new(None),
            tokens: TokenStore::load(&path).unwrap(),
            budgets: crate::service::BudgetSource::new(None, Some(budgets)),
            partition_count: std::sync::atomic::AtomicI32::new(partition_count),
            topic: "events".into(),
            assignment: super::super::AssignmentMode::Assign,
            advertise_url: "http://127.0.0.1:1".into(),
            projection_interval: std::time::Duration::from_secs(1),
            report_zones: Vec::new(),
            statement_grace: Some(jiff::SignedDuration::from_hours(24)),
            budget_outbox: Default::default(),
            publish_soon: tokio::sync::Notify::new(),
            dlq_stalled: Mutex::new(None),
            broker: super::super::BrokerHealth::default(),
            halted: Mutex::new(BTreeMap::new()),
            projection_failing: Mutex::new(None),
            metrics: Metrics::default(),
        });
        let [acme, regulator, billing, admin, scraper, gateway, expired] = tokens.map(|(t, _)| t);
        Fixture { dir, app: router(Arc::clone(&shared)), shared, acme, regulator, billing, admin, scraper, gateway, expired }
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
        assert!(body.starts_with("tally.example.com/t/acme\n3\n"), "two events and November's statement: {body}");
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
    async fn readiness_reports_a_broker_outage_while_authorize_still_decides() {
        let f = fixture();
        assert!(f.shared.broker.unanswered("the broker did not answer: timed out".into()));
        let (status, body, _) = call(&f.app, "/readyz", None).await;
        assert_eq!(status, StatusCode::OK, "reads and admissions go on: the instance stays in service");
        assert!(body.contains("degraded: broker unreachable for 0 s") && body.contains("timed out"), "{body}");
        let (status, allow) = post(&f.app, "/v1/tenants/acme/budget/authorize", &f.acme, serde_json::json!({"estimate_micros": 1})).await;
        assert_eq!((status, allow["decision"].as_str()), (StatusCode::OK, Some("allow")), "{allow}");
        assert!(f.shared.broker.answered().is_some());
        let (_, body, _) = call(&f.app, "/readyz", None).await;
        assert!(!body.contains("broker unreachable"), "{body}");
    }

    /// A full disk (docs/storage.md, "When the disk fills up"): flushes that fail show in
    /// readiness and a gauge until a pass has none; a partition halted by its storage answers
    /// every request of its tenants 503 `storage_unavailable` with the cause, and readiness and
    /// the metrics say so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_shows_in_readiness_and_metrics_and_halted_tenants_get_storage_unavailable() {
        let f = fixture();
        let metric = |name: &str| -> f64 {
            let text = f.shared.metrics.render(1, 0);
            let line = text.lines().find(|l| l.split(' ').next() == Some(name)).unwrap_or_else(|| panic!("{name} missing from\n{text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        f.shared.projection_passed(Some("tenant acme of partition 0: No space left on device (os error 28)".into()));
        let (status, body, _) = call(&f.app, "/readyz", None).await;
        assert_eq!(status, StatusCode::OK, "reads and admissions go on");
        assert!(body.contains("degraded: parquet projection failing for 0 s") && body.contains("os error 28"), "{body}");
        assert_eq!(metric("tally_ledger_projection_failing"), 1.0);
        f.shared.projection_passed(None);
        let (_, body, _) = call(&f.app, "/readyz", None).await;
        assert!(!body.contains("projection failing"), "{body}");
        assert_eq!(metric("tally_ledger_projection_failing"), 0.0);

        let held = f.shared.partition(0).unwrap();
        let error = crate::error::Error::io(std::path::Path::new("/data/partitions/events-0/journal/0.seg"), std::io::Error::from_raw_os_error(28));
        assert!(error.is_storage());
        // Budget states built since the last commit, of the halted partition's tenant: dropped.
        let mut states = vec![("acme".to_string(), b"{}".to_vec()), ("acme/run-1".to_string(), b"{}".to_vec())];
        f.shared.drop_states_of_halted(&mut states);
        assert_eq!(states.len(), 2, "nothing is halted yet");
        f.shared.halt(0, &held, &error);
        f.shared.halt(0, &held, &error);
        f.shared.drop_states_of_halted(&mut states);
        assert!(states.is_empty(), "{states:?}");
        assert!(super::super::lock(&held).is_closed(), "a request already holding it answers rebalancing");
        for (path, body) in [("/t/acme/checkpoint", None), ("/v1/tenants/acme/budget/authorize", Some(serde_json::json!({"estimate_micros": 1})))] {
            let mut request = axum::http::Request::builder().uri(path).header(header::AUTHORIZATION, format!("Bearer {}", f.acme));
            if body.is_some() {
                request = request.method("POST").header(header::CONTENT_TYPE, "application/json");
            }
            let response = f.app.clone().oneshot(request.body(body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty)).unwrap()).await.unwrap();
            let (status, retry) = (response.status(), response.headers().get(header::RETRY_AFTER).cloned());
            let json: serde_json::Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
            assert_eq!((status, json["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("storage_unavailable")), "{path}: {json}");
            assert_eq!(retry.as_ref().and_then(|v| v.to_str().ok()), Some("2"), "{path}");
            assert!(json["error"]["message"].as_str().unwrap().contains("No space left on device"), "{json}");
        }
        let (status, body, _) = call(&f.app, "/readyz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "its only partition is halted");
        assert!(body.contains("degraded: partition 0 halted for 0 s") && body.contains("No space left on device"), "{body}");
        assert_eq!((metric("tally_ledger_partitions_halted"), metric("tally_ledger_partition_halts_total")), (1.0, 1.0), "one halt, counted once");
    }

    /// A halt that comes after a rebalance revoked the partition, or opened it again, stops the
    /// instance that failed and nothing else: no halted entry, the new instance still served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_halt_of_a_partition_already_replaced_or_revoked_halts_nothing() {
        let f = fixture();
        let stale = f.shared.partition(0).unwrap();
        let error = crate::error::Error::io(std::path::Path::new("/data/j"), std::io::Error::from_raw_os_error(28));
        let fresh = crate::service::OwnedPartition::new(
            0,
            PartitionLedger::open(&f.dir.path().join("elsewhere"), "events", 0, f.shared.keys.clone()).unwrap(),
            projection(f.dir.path(), "events-0"),
        )
        .unwrap();
        f.shared.partitions_mut().insert(0, Arc::clone(&fresh));
        f.shared.halt(0, &stale, &error);
        assert!(super::super::lock(&stale).is_closed() && !super::super::lock(&fresh).is_closed());
        assert!(f.shared.halted_because(0).is_none());
        assert!(Arc::ptr_eq(&f.shared.partition(0).unwrap(), &fresh), "the partition opened since is still served");
        f.shared.partitions_mut().remove(&0);
        f.shared.halt(0, &fresh, &error);
        assert!(f.shared.halted_because(0).is_none(), "revoked meanwhile: nothing to reopen");
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
        let (_, body, _) = call(&f.app, "/v1/tenants/acme/records/3", Some(&f.admin)).await;
        assert!(body.contains(r#""type":"config""#), "{body}");
    }

    async fn post_keyed(app: &Router, path: &str, token: &str, key: &str, body: serde_json::Value) -> (StatusCode, Option<String>, serde_json::Value) {
        let request = axum::http::Request::post(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", key)
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let replayed = response.headers().get("idempotent-replayed").and_then(|v| v.to_str().ok()).map(str::to_string);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, replayed, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    /// A retried authorize or release with the same `Idempotency-Key` gets the first answer and
    /// writes nothing; the key reused for another request is a 409; the records name the token;
    /// an allow's levels include its own reservation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keyed_retries_get_the_first_answer_and_a_reused_key_is_a_conflict() {
        let f = fixture();
        let authorize = "/v1/tenants/acme/budget/authorize";
        let body = serde_json::json!({"task_id": "run-1", "estimate_micros": 1_000_000});
        let (status, replayed, first) = post_keyed(&f.app, authorize, &f.gateway, "req-1", body.clone()).await;
        assert_eq!((status, replayed.as_deref(), first["decision"].as_str()), (StatusCode::OK, None, Some("allow")), "{first}");
        let period = first["levels"].as_array().unwrap().iter().find(|l| l["level"] == "period").unwrap();
        assert_eq!(period["reserved_micros"], 1_000_000, "the answer shows the levels after its own reservation: {first}");
        let size = |f: &Fixture| super::super::lock(&f.shared.partition(0).unwrap()).ledger().next_seq("acme");
        let before = size(&f);
        for _ in 0..3 {
            let (status, replayed, again) = post_keyed(&f.app, authorize, &f.gateway, "req-1", body.clone()).await;
            assert_eq!((status, replayed.as_deref()), (StatusCode::OK, Some("true")), "{again}");
            for field in ["decision", "reservation_id", "expires_at", "seq"] {
                assert_eq!(again[field], first[field], "{field}: {again}");
            }
        }
        assert_eq!(size(&f), before, "a retry appends nothing");
        // Same key, another request: refused, nothing written.
        for other in [serde_json::json!({"task_id": "run-1", "estimate_micros": 2}), serde_json::json!({"estimate_micros": 1_000_000})] {
            let (status, _, err) = post_keyed(&f.app, authorize, &f.gateway, "req-1", other).await;
            assert_eq!((status, err["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("idempotency_conflict")), "{err}");
        }
        let release = "/v1/tenants/acme/budget/release";
        let (status, _, err) = post_keyed(&f.app, release, &f.gateway, "req-1", serde_json::json!({"reservation_id": first["reservation_id"]})).await;
        assert_eq!((status, err["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("idempotency_conflict")), "an authorize key is not a release key");
        assert_eq!(size(&f), before);
        // A keyed release: the retry gets the same 200, not "no such reservation".
        let (status, replayed, released) =
            post_keyed(&f.app, release, &f.gateway, "rel-1", serde_json::json!({"reservation_id": first["reservation_id"]})).await;
        assert_eq!((status, replayed), (StatusCode::OK, None), "{released}");
        let (status, replayed, again) = post_keyed(&f.app, release, &f.gateway, "rel-1", serde_json::json!({"reservation_id": first["reservation_id"]})).await;
        assert_eq!((status, replayed.as_deref(), &again), (StatusCode::OK, Some("true"), &released));
        // Both records name the gateway's token and carry the key.
        let seq = first["seq"].as_u64().unwrap();
        let (_, admission, _) = call(&f.app, &format!("/v1/tenants/acme/records/{seq}"), Some(&f.admin)).await;
        assert!(admission.contains(r#""token":"edge""#) && admission.contains(r#""key":"req-1""#), "{admission}");
        let (_, release_record, _) = call(&f.app, &format!("/v1/tenants/acme/records/{}", released["seq"]), Some(&f.admin)).await;
        assert!(release_record.contains(r#""token":"edge""#) && release_record.contains(r#""key":"rel-1""#), "{release_record}");
        // Malformed keys are refused before anything is decided.
        for key in ["", "has space", &"k".repeat(129), "ключ"] {
            let request = axum::http::Request::post(authorize)
                .header(header::AUTHORIZATION, format!("Bearer {}", f.gateway))
                .header(header::CONTENT_TYPE, "application/json")
                .header("idempotency-key", axum::http::HeaderValue::from_bytes(key.as_bytes()).unwrap())
                .body(Body::from(body.to_string()))
                .unwrap();
            let response = f.app.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{key:?}");
        }
        assert_eq!(size(&f), before + 1, "only the keyed release was written");
    }

    /// The kill switch under load: 500 authorize callers race one freeze of the whole tenant.
    /// Every admission recorded after the freeze record is denied by it, the freeze is listed in
    /// the budget state and queued for the budget topic at once, and an unfreeze lets calls
    /// through again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_allow_after_a_freeze_under_500_concurrent_callers() {
        let f = fixture();
        let body = serde_json::json!({"agent_id": "a1", "estimate_micros": 1});
        let mut calls = Vec::new();
        for i in 0..500 {
            let (app, token, body) = (f.app.clone(), f.gateway.clone(), body.clone());
            calls.push(tokio::spawn(async move { post(&app, "/v1/tenants/acme/budget/authorize", &token, body).await }));
            if i == 250 {
                let (app, token) = (f.app.clone(), f.acme.clone());
                calls.push(tokio::spawn(async move { post(&app, "/v1/tenants/acme/freeze", &token, serde_json::json!({"reason": "runaway agent"})).await }));
            }
        }
        let mut freeze_seq = None;
        let mut answers = Vec::new();
        for call in calls {
            let (status, body) = call.await.unwrap();
            assert_eq!(status, StatusCode::OK, "{body}");
            if let Some(id) = body["freeze_id"].as_str() {
                freeze_seq = Some(body["seq"].as_u64().unwrap());
                assert_eq!(id, format!("frz-{}", body["seq"]));
            } else {
                answers.push(body);
            }
        }
        let freeze_seq = freeze_seq.unwrap();
        let (mut before, mut after) = (0, 0);
        for a in &answers {
            if a["seq"].as_u64().unwrap() > freeze_seq {
                after += 1;
                assert_eq!((a["decision"].as_str(), a["denied_by"].as_str()), (Some("deny"), Some("freeze")), "{a}");
            } else {
                before += 1;
            }
        }
        assert_eq!(before + after, 500);
        // The log agrees with the answers: no allowed admission after the freeze record.
        let size = super::super::lock(&f.shared.partition(0).unwrap()).ledger().size("acme");
        for seq in freeze_seq + 1..size {
            let (_, record, _) = call(&f.app, &format!("/v1/tenants/acme/records/{seq}"), Some(&f.admin)).await;
            assert!(!record.contains(r#""allowed":true"#), "seq {seq}: {record}");
        }
        // Listed in the state, readable by the gateway, and queued for the topic.
        let (status, _, state) = call(&f.app, "/v1/tenants/acme/budget", Some(&f.gateway)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(state["freezes"][0]["reason"], "runaway agent", "{state}");
        let woken = tokio::time::timeout(std::time::Duration::from_millis(100), f.shared.publish_soon.notified()).await;
        assert!(woken.is_ok(), "the consume loop is asked to publish at once");
        let (status, unfrozen) = post(&f.app, "/v1/tenants/acme/unfreeze", &f.acme, serde_json::json!({"freeze_id": format!("frz-{freeze_seq}")})).await;
        assert_eq!(status, StatusCode::OK, "{unfrozen}");
        let (_, again) = post(&f.app, "/v1/tenants/acme/budget/authorize", &f.gateway, body.clone()).await;
        assert_eq!(again["decision"], "allow", "{again}");
        // Bad bodies.
        for bad in [serde_json::json!({"reason": ""}), serde_json::json!({"reason": "x\ny"}), serde_json::json!({"reason": "x", "scope": {"agent": "a"}})] {
            let (status, err) = post(&f.app, "/v1/tenants/acme/freeze", &f.acme, bad.clone()).await;
            assert_eq!((status, err["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{bad}");
        }
        let (status, _) = post(&f.app, "/v1/tenants/acme/unfreeze", &f.acme, serde_json::json!({"freeze_id": "frz-1"})).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    /// A throttled call is a 200 with `decision: throttled`, `throttled_by`, `retry_after_ms` and
    /// a `Retry-After` header; the budget state shows each quota's use.
    #[tokio::test]
    async fn a_throttled_call_says_when_to_come_back() {
        let f = fixture();
        let budgets: crate::budget::BudgetFile = toml::from_str(
            "[tenants.acme]\nperiod_micros = 5_000_000\nceiling = { input_per_million_micros = 1, output_per_million_micros = 1 }\n[tenants.acme.quotas]\n\"action:send_email\" = \"1/h\"\n",
        )
        .unwrap();
        super::super::lock(&f.shared.partition(0).unwrap()).set_budget_file(Some(Arc::new(budgets)));
        let body = serde_json::json!({"action": "send_email", "kind": "tool_call", "estimate_micros": 1});
        let (_, first) = post(&f.app, "/v1/tenants/acme/budget/authorize", &f.gateway, body.clone()).await;
        assert_eq!(first["decision"], "allow", "{first}");
        let request = axum::http::Request::post("/v1/tenants/acme/budget/authorize")
            .header(header::AUTHORIZATION, format!("Bearer {}", f.gateway))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = f.app.clone().oneshot(request).await.unwrap();
        let retry_after: u64 = response.headers()[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
        let second: serde_json::Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!((second["decision"].as_str(), second["throttled_by"].as_str()), (Some("throttled"), Some("action:send_email")), "{second}");
        let ms = second["retry_after_ms"].as_u64().unwrap();
        assert!((1..=3_600_000).contains(&ms) && retry_after == ms.div_ceil(1000), "{ms} ms, Retry-After {retry_after}");
        assert!(second["reservation_id"].is_null() && second["denied_by"].is_null());
        let (_, _, state) = call(&f.app, "/v1/tenants/acme/budget", Some(&f.gateway)).await;
        assert_eq!(
            (state["quotas"][0]["quota"].as_str(), state["quotas"][0]["used"].as_u64(), state["quotas"][0]["limit"].as_u64()),
            (Some("action:send_email"), Some(1), Some(1)),
            "{state}"
        );
        let (status, err) =
            post(&f.app, "/v1/tenants/acme/budget/authorize", &f.gateway, serde_json::json!({"estimate_micros": 1, "estimated_tokens": 1_000_000_000_001_u64}))
                .await;
        assert_eq!((status, err["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")));
    }

    /// A keyed retry after the partition is closed and opened again (a restart, or a move to
    /// another instance) still gets the first answer: the key lives in the log and its replay.
    #[test]
    fn a_keyed_retry_after_a_reopen_gets_the_first_answer() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let budgets: Arc<crate::budget::BudgetFile> = Arc::new(
            toml::from_str("[tenants.acme]\nperiod_micros = 10\nceiling = { input_per_million_micros = 1, output_per_million_micros = 1 }\n").unwrap(),
        );
        let request = AuthorizeRequest { estimate_micros: 6, ttl_ms: 60_000, ..AuthorizeRequest::default() };
        let caller = Caller { token: Some("edge"), idempotency_key: Some("k-1") };
        let now = jiff::Timestamp::now();
        let first = {
            let mut p = PartitionLedger::open(dir.path(), "events", 0, vec![key.clone()]).unwrap();
            p.set_budget_file(Some(Arc::clone(&budgets)));
            let first = p.authorize("acme", now, &request, &caller).unwrap();
            p.commit().unwrap();
            first
        };
        assert!(first.verdict.allowed && !first.replayed);
        let mut p = PartitionLedger::open(dir.path(), "events", 0, vec![key]).unwrap();
        p.set_budget_file(Some(budgets));
        let again = p.authorize("acme", now, &request, &caller).unwrap();
        assert!(again.replayed);
        assert_eq!((again.seq, &again.admission.reservation_id), (first.seq, &first.admission.reservation_id));
        // Without the key the same request is a new one, and the cap (10) denies it.
        let fresh = p.authorize("acme", now, &request, &Caller { token: Some("edge"), idempotency_key: None }).unwrap();
        assert!(!fresh.verdict.allowed && !fresh.replayed);
        let conflict = p.authorize("acme", now, &AuthorizeRequest { estimate_micros: 5, ..request.clone() }, &caller).unwrap_err();
        assert!(matches!(conflict, Error::IdempotencyConflict { seq, .. } if seq == first.seq), "{conflict}");
        // More than 24 h after its first use a key is a new request, pruned or not.
        let later = now + jiff::SignedDuration::from_hours(25);
        let fresh = p.authorize("acme", later, &request, &caller).unwrap();
        assert!(!fresh.replayed && fresh.seq > first.seq);
    }

    /// The fixture's events are of November 2026, closed by a December call: the route lists
    /// the statement as stored, to the tenant and to billing; admissions (wall-clock calls)
    /// close nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn statements_list_the_closed_periods_as_stored() {
        let f = fixture();
        let (_, before, _) = call(&f.app, "/v1/tenants/acme/statements", Some(&f.acme)).await;
        post(&f.app, "/v1/tenants/acme/budget/authorize", &f.acme, serde_json::json!({"estimate_micros": 1})).await;
        let (status, body, doc) = call(&f.app, "/v1/tenants/acme/statements", Some(&f.billing)).await;
        assert_eq!(before, body, "the admission closed nothing");
        assert_eq!(status, StatusCode::OK, "{body}");
        let statements = doc["statements"].as_array().unwrap();
        assert_eq!(statements.len(), 1, "{body}");
        let s = &statements[0];
        assert_eq!(
            (s["period"].as_str(), s["first_seq"].as_u64(), s["last_seq"].as_u64(), s["tree_size"].as_u64()),
            (Some("2026-11-01"), Some(0), Some(1), Some(2))
        );
        assert_eq!(s["totals"], serde_json::json!([{"currency": "USD", "basis": "event", "events": 2, "micros": 10, "input_tokens": 0, "output_tokens": 0}]));
        let (_, record, _) = call(&f.app, "/v1/tenants/acme/records/2", Some(&f.admin)).await;
        assert!(body.contains(&record), "listed as stored: {record}");
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
        // The expiry is on the record, before the admission it made room for (after November's
        // statement, the config and the two admissions).
        let (_, body, _) = call(&f.app, "/v1/tenants/acme/records/6", Some(&f.admin)).await;
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

    /// While no other instance serves a tenant's partition (this one is still opening it after a
    /// restart and its own note names it, or no note exists), every per-tenant route answers 503
    /// `rebalancing` with `Retry-After`: never a 404, never a 421 pointing at this instance.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unserved_partition_is_503_with_retry_after_never_404_or_421_to_itself() {
        let f = fixture_with(2);
        let elsewhere = (0..100).map(|i| format!("tenant{i}")).find(|t| tally_ingest::tenant_partition(t, 2) == 1).unwrap();
        let routes = [
            ("GET", format!("/t/{elsewhere}/checkpoint"), None),
            ("GET", format!("/v1/tenants/{elsewhere}/records/0"), None),
            ("GET", format!("/v1/tenants/{elsewhere}/receipt?event_id=e1"), None),
            ("GET", format!("/v1/tenants/{elsewhere}/budget"), None),
            ("POST", format!("/v1/tenants/{elsewhere}/budget/authorize"), Some(r#"{"estimate_micros":1}"#)),
            ("POST", format!("/v1/tenants/{elsewhere}/budget/release"), Some(r#"{"reservation_id":"r"}"#)),
        ];
        for note in [None, Some(f.shared.advertise_url.clone())] {
            if let Some(url) = &note {
                super::super::write_owner(f.dir.path(), "events", 1, url).unwrap();
            }
            for (method, path, body) in &routes {
                let mut request = axum::http::Request::builder().method(*method).uri(path).header(header::AUTHORIZATION, format!("Bearer {}", f.admin));
                if body.is_some() {
                    request = request.header(header::CONTENT_TYPE, "application/json");
                }
                let response = f.app.clone().oneshot(request.body(body.map(Body::from).unwrap_or_else(Body::empty)).unwrap()).await.unwrap();
                let (status, retry) = (response.status(), response.headers().get(header::RETRY_AFTER).cloned());
                let json: serde_json::Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
                assert_eq!(
                    (status, json["error"]["code"].as_str()),
                    (StatusCode::SERVICE_UNAVAILABLE, Some("rebalancing")),
                    "{method} {path} note {note:?}: {json}"
                );
                assert_eq!(retry.as_ref().and_then(|v| v.to_str().ok()), Some("1"), "{method} {path}");
                assert!(json["error"]["message"].as_str().unwrap().contains("partition 1"), "{json}");
            }
        }
        // On a partition this instance serves, a tenant without records is a plain 404.
        let here = (0..100).map(|i| format!("tenant{i}")).find(|t| tally_ingest::tenant_partition(t, 2) == 0).unwrap();
        let (status, json) = send(&f.app, "GET", &format!("/t/{here}/checkpoint"), Some(&f.admin), None).await;
        assert_eq!((status, json["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{json}");
        assert!(json["error"]["message"].as_str().unwrap().contains("has no records yet"), "{json}");
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
        use Want::{Allowed as A, Expired as E, Forbidden as F, Unauthenticated as U};
        let f = fixture();
        // (who, token, the tenant in the path). The regulator names globex only, the gateway acme.
        let callers: [(&str, Option<&str>, &str); 11] = [
            ("tenant, own", Some(&f.acme), "acme"),
            ("tenant, other", Some(&f.acme), "globex"),
            ("regulator, named", Some(&f.regulator), "globex"),
            ("regulator, not named", Some(&f.regulator), "acme"),
            ("gateway, named", Some(&f.gateway), "acme"),
            ("gateway, not named", Some(&f.gateway), "globex"),
            ("billing", Some(&f.billing), "acme"),
            ("metrics", Some(&f.scraper), "acme"),
            ("admin", Some(&f.admin), "acme"),
            ("admin, expired", Some(&f.expired), "acme"),
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
                let code = json["error"]["code"].as_str();
                let got = match (status, code) {
                    (StatusCode::FORBIDDEN, _) => F,
                    (StatusCode::UNAUTHORIZED, Some("token_expired")) => E,
                    (StatusCode::UNAUTHORIZED, _) => U,
                    _ => A,
                };
                if got != want {
                    wrong.push(format!("{method} {path} as {who}: want {want:?}, got {status} {json}"));
                }
                match got {
                    F => assert_eq!(code, Some("forbidden"), "{method} {path} as {who}"),
                    U => assert_eq!(code, Some("unauthenticated"), "{method} {path} as {who}"),
                    A | E => {}
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        // A refused write says the same whether or not the tenant exists.
        for token in [&f.acme, &f.regulator, &f.billing, &f.gateway] {
            let (s1, e1) = send(&f.app, "POST", "/v1/tenants/globex/budget/authorize", Some(token), Some(authorize)).await;
            let (s2, e2) = send(&f.app, "POST", "/v1/tenants/nosuch/budget/authorize", Some(token), Some(authorize)).await;
            assert_eq!((s1, &e1), (s2, &e2));
        }
        // Only the allowed writes were recorded: acme's two events, the statement closing
        // November, its budget config, one admission each by acme, the gateway and admin, and
        // one freeze (admin's freeze of the same scope is acme's, not a second record); globex,
        // which only refused callers wrote to, is as it was (its two events and the statement
        // between them).
        let (_, body, _) = call(&f.app, "/t/acme/checkpoint", Some(&f.admin)).await;
        assert!(body.starts_with("tally.example.com/t/acme\n8\n"), "{body}");
        let (_, body, _) = call(&f.app, "/t/globex/checkpoint", Some(&f.admin)).await;
        assert!(body.starts_with("tally.example.com/t/globex\n3\n"), "{body}");
    }

    /// Erasing a subject over HTTP: its values leave the journal's readers and the Parquet
    /// projection, an `erasure` record names its records, and a receipt issued before still
    /// verifies against the checkpoint after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn erasing_a_subject_keeps_every_proof_and_leaves_no_value_in_the_projection() {
        use crate::service::partition::test_personal_delivery;
        let f = fixture();
        let owned = f.shared.partition(0).unwrap();
        {
            let mut p = super::super::lock(&owned);
            p.apply(&test_personal_delivery(10, "acme", "p1", "user-ann", "ann@example.com")).unwrap();
            p.apply(&test_personal_delivery(11, "acme", "p2", "user-bob", "bob@example.com")).unwrap();
            p.commit().unwrap();
        }
        let seq = super::super::lock(&owned).committed_size("acme") - 2;
        super::super::projector::project_partition(&owned, 0, true);
        let parquet = f.dir.path().join("parquet");
        assert!(scan(&parquet, "ann@example.com"), "the projection shows the value before the erasure");
        let (status, _, before) = call(&f.app, &format!("/v1/tenants/acme/records/{seq}/personal"), Some(&f.acme)).await;
        assert_eq!((status, before["fields"]["attributes.email"]["value"].as_str()), (StatusCode::OK, Some("ann@example.com")), "{before}");
        let (_, receipt, _) = call(&f.app, &format!("/v1/tenants/acme/receipt/{seq}"), Some(&f.acme)).await;
        let (_, entry, _) = call(&f.app, &format!("/v1/tenants/acme/records/{seq}"), Some(&f.acme)).await;
        // The record commits to the values, and the values and salts open the commitments.
        let tally_log::Record::Event(record) = tally_log::Record::<serde::de::IgnoredAny>::decode(seq, entry.as_bytes()).unwrap() else {
            panic!("not an event")
        };
        let openings: BTreeMap<String, tally_log::Opening> = serde_json::from_value(before["fields"].clone()).unwrap();
        record.check_openings(&openings).unwrap();

        // Bodies that name neither or both are refused.
        for body in [r#"{}"#, r#"{"subject":"user-ann","all_subjects":true}"#] {
            let (status, json) = send(&f.app, "POST", "/v1/tenants/acme/erase", Some(&f.acme), Some(body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {json}");
        }
        // `before` a date: only months wholly before it. The events are of November 2026.
        let (status, json) = send(&f.app, "POST", "/v1/tenants/acme/erase", Some(&f.acme), Some(r#"{"subject":"user-bob","before":"2026-11-30"}"#)).await;
        assert_eq!((status, json["keys"].as_u64(), json["seq"].is_null()), (StatusCode::OK, Some(0), true), "{json}");
        let (status, json) = send(&f.app, "POST", "/v1/tenants/acme/erase", Some(&f.acme), Some(r#"{"subject":"user-bob","before":"30/11/2026"}"#)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
        // Every subject at once is an operator's act.
        let (status, json) = send(&f.app, "POST", "/v1/tenants/acme/erase", Some(&f.acme), Some(r#"{"all_subjects":true}"#)).await;
        assert_eq!((status, json["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{json}");
        // One more of ann's, not committed yet: named all the same.
        super::super::lock(&owned).apply(&test_personal_delivery(12, "acme", "p3", "user-ann", "ann3@example.com")).unwrap();
        let (status, json) = send(&f.app, "POST", "/v1/tenants/acme/erase", Some(&f.acme), Some(r#"{"subject":"user-ann"}"#)).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        assert_eq!((json["keys"].as_u64(), json["records"].as_u64(), json["erasure_records"].as_u64()), (Some(1), Some(2), Some(1)), "{json}");
        let erasure_seq = json["seq"].as_u64().unwrap();
        // The rows already projected are rewritten in place; the records after them (ann's third,
        // the erasure) are projected by the next pass, with the values erased.
        let rewritten = json["projection_rows_rewritten"].as_u64().unwrap();
        assert!(rewritten > seq && rewritten < erasure_seq, "{json}");

        let (_, _, after) = call(&f.app, &format!("/v1/tenants/acme/records/{seq}/personal"), Some(&f.acme)).await;
        assert_eq!((after["erased"].as_bool(), after["fields"].as_object().map(|m| m.len())), (Some(true), Some(0)), "{after}");
        let (_, _, bob) = call(&f.app, &format!("/v1/tenants/acme/records/{}/personal", seq + 1), Some(&f.acme)).await;
        assert_eq!(bob["fields"]["actor_id"]["value"].as_str(), Some("user-bob"), "{bob}");
        // The erasure record names the record, not the subject.
        let (_, erasure, _) = call(&f.app, &format!("/v1/tenants/acme/records/{erasure_seq}"), Some(&f.acme)).await;
        assert_eq!(tally_log::Erasure::decode(erasure_seq, erasure.as_bytes()).unwrap().seqs, [seq, seq + 2], "{erasure}");
        assert!(!erasure.contains("user-ann"), "{erasure}");
        // No value is left in the projection or anywhere in the data directory.
        for gone in ["ann@example.com", "ann3@example.com", "user-ann"] {
            assert!(!scan(f.dir.path(), gone), "{gone} is still under the data directory");
        }
        assert!(scan(&parquet, "bob@example.com"), "the scan finds what is there");
        // The receipt issued before the erasure still verifies, against the checkpoint after it.
        let (_, checkpoint, _) = call(&f.app, "/t/acme/checkpoint", Some(&f.acme)).await;
        let vkeys = f.shared.keys[0].signer_for("acme").map(|s| vec![s.verifier()]).unwrap();
        Receipt::parse(&receipt).unwrap().verify(entry.as_bytes(), &vkeys, Some("tally.example.com/t/acme")).unwrap();
        let now = Checkpoint::open(&checkpoint, &vkeys, None).unwrap();
        assert_eq!(now.size, erasure_seq + 1);
    }

    /// A body past the bound is refused in the API's error shape, before anything is decided.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_over_the_limit_is_413_body_too_large_and_records_nothing() {
        let f = fixture();
        let before = super::super::lock(&f.shared.partition(0).unwrap()).ledger().next_seq("acme");
        let huge = format!(r#"{{"estimate_micros":1,"task_id":"{}"}}"#, "t".repeat(MAX_BODY_BYTES));
        let (status, json) = send(&f.app, "POST", "/v1/tenants/acme/budget/authorize", Some(&f.gateway), Some(&huge)).await;
        assert_eq!((status, json["error"]["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large")), "{json}");
        assert_eq!(super::super::lock(&f.shared.partition(0).unwrap()).ledger().next_seq("acme"), before);
    }

    /// Whether any file under `dir` holds `needle`.
    fn scan(dir: &std::path::Path, needle: &str) -> bool {
        let mut found = false;
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            found |= if path.is_dir() { scan(&path, needle) } else { std::fs::read(&path).unwrap().windows(needle.len()).any(|w| w == needle.as_bytes()) };
        }
        found
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Want {
        /// Reaches the handler: anything but 401 and 403.
        Allowed,
        Forbidden,
        Unauthenticated,
        /// 401 `token_expired`.
        Expired,
    }

    /// Every route of the API (`{t}` for the tenant) and who may call it (docs/http-api.md).
    fn route_matrix<'a>(authorize: &'a str, release: &'a str) -> [(&'static str, &'static str, Option<&'a str>, [Want; 11]); 19] {
        use Want::{Allowed as A, Expired as E, Forbidden as F, Unauthenticated as U};
        // Scoped to a task nobody runs, so the walk's later authorizes are not denied by it.
        let freeze = r#"{"reason":"matrix walk","scope":{"task_id":"walk"}}"#;
        let unfreeze = r#"{"freeze_id":"frz-none"}"#;
        // A subject nobody is: an allowed erasure finds no key and records nothing.
        let erase = r#"{"subject":"nobody"}"#;
        //                                                                        own other reg+ reg- gw+ gw- bill metr admin exp none
        [
            ("GET", "/t/{t}/checkpoint", None, /*                             */ [A, F, A, F, F, F, F, F, A, E, U]),
            ("GET", "/t/{t}/tile/0/000.p/1", None, /*                         */ [A, F, A, F, F, F, F, F, A, E, U]),
            ("GET", "/v1/tenants/{t}/records/0", None, /*                     */ [A, F, A, F, F, F, F, F, A, E, U]),
            ("GET", "/v1/tenants/{t}/records/0/personal", None, /*            */ [A, F, A, F, F, F, F, F, A, E, U]),
            ("GET", "/v1/tenants/{t}/receipt/0", None, /*                     */ [A, F, A, F, F, F, F, F, A, E, U]),
            ("GET", "/v1/tenants/{t}/receipt?event_id=e0", None, /*           */ [A, F, A, F, F, F, F, F, A, E, U]),
            ("GET", "/v1/tenants/{t}/consistency?old=0&new=1", None, /*       */ [A, F, A, F, F, F, F, F, A, E, U]),
            ("GET", "/v1/tenants/{t}/budget", None, /*                        */ [A, F, A, F, A, F, F, F, A, E, U]),
            ("GET", "/v1/tenants/{t}/statements", None, /*                    */ [A, F, A, F, F, F, A, F, A, E, U]),
            ("POST", "/v1/tenants/{t}/budget/authorize", Some(authorize), /*  */ [A, F, F, F, A, F, F, F, A, E, U]),
            ("POST", "/v1/tenants/{t}/budget/release", Some(release), /*      */ [A, F, F, F, A, F, F, F, A, E, U]),
            ("POST", "/v1/tenants/{t}/freeze", Some(freeze), /*               */ [A, F, F, F, F, F, F, F, A, E, U]),
            ("POST", "/v1/tenants/{t}/unfreeze", Some(unfreeze), /*           */ [A, F, F, F, F, F, F, F, A, E, U]),
            ("POST", "/v1/tenants/{t}/erase", Some(erase), /*                 */ [A, F, F, F, F, F, F, F, A, E, U]),
            ("GET", "/metrics", None, /*                                      */ [F, F, F, F, F, F, F, A, A, E, U]),
            ("GET", "/healthz", None, /*                                      */ [A, A, A, A, A, A, A, A, A, A, A]),
            ("GET", "/readyz", None, /*                                       */ [A, A, A, A, A, A, A, A, A, A, A]),
            ("GET", "/openapi.json", None, /*                                 */ [A, A, A, A, A, A, A, A, A, A, A]),
            ("GET", "/t/{t}/vkey", None, /*                                   */ [A, A, A, A, A, A, A, A, A, A, A]),
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
        f.shared.partitions_mut().insert(1, crate::service::OwnedPartition::new(1, p1, projection(f.dir.path(), "events-1")).unwrap());
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

    /// The projection of partition directory `unit` (`events-<n>`) under `root`.
    fn projection(root: &std::path::Path, unit: &str) -> tally_projection::Projection {
        tally_projection::Projection::new(&root.join("parquet"), unit, std::time::Duration::from_secs(1))
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

    #[tokio::test]
    async fn anyone_gets_a_tenants_vkeys_and_they_verify_its_checkpoint() {
        let f = fixture();
        let (status, vkeys, _) = call(&f.app, "/t/acme/vkey", None).await;
        assert_eq!(status, StatusCode::OK, "{vkeys}");
        let verifiers: Vec<tally_log::NoteVerifier> = vkeys.lines().map(|l| tally_log::NoteVerifier::parse(l).unwrap()).collect();
        assert_eq!(verifiers.len(), f.shared.keys.len());
        let (_, note, _) = call(&f.app, "/t/acme/checkpoint", Some(&f.admin)).await;
        let checkpoint = tally_log::Checkpoint::open(&note, &verifiers, None).unwrap();
        assert_eq!(checkpoint.origin, "tally.example.com/t/acme");
        // Another tenant's vkey does not verify acme's checkpoint; a tenant that does not exist
        // gets its vkey all the same (nothing to learn from the answer).
        let (status, other, _) = call(&f.app, "/t/nobody-here/vkey", None).await;
        assert_eq!(status, StatusCode::OK);
        let other: Vec<tally_log::NoteVerifier> = other.lines().map(|l| tally_log::NoteVerifier::parse(l).unwrap()).collect();
        assert!(tally_log::Checkpoint::open(&note, &other, None).is_err());
        assert_eq!(call(&f.app, "/t/..%2Fetc/vkey", None).await.0, StatusCode::BAD_REQUEST);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_admission_queue_answers_503_overloaded_and_appends_nothing() {
        use crate::service::admissions::{tests::fill_while_held, QUEUE_CAPACITY};
        let f = fixture();
        let owned = f.shared.partition(0).unwrap();
        let size = super::super::lock(&owned).committed_size("acme");
        // The partition is busy for as long as this thread holds it (the handler takes the
        // lock itself, before queueing, to route the tenant).
        let (held, release) = (std::sync::mpsc::channel::<()>(), std::sync::mpsc::channel::<()>());
        let busy = Arc::clone(&owned);
        let holder = std::thread::spawn(move || {
            let _guard = super::super::lock(&busy);
            held.0.send(()).unwrap();
            release.1.recv().unwrap();
        });
        held.1.recv().unwrap();
        // Fill the queue while its thread waits for the lock with the first request.
        assert!(fill_while_held(&owned.admissions) > QUEUE_CAPACITY);
        let (status, json) = send(&f.app, "POST", "/v1/tenants/acme/budget/authorize", Some(&f.admin), Some(r#"{"estimate_micros":1}"#)).await;
        assert_eq!((status, json["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("overloaded")), "{json}");
        assert_eq!(f.shared.metrics.admissions_overloaded.get(), 1);
        release.0.send(()).unwrap();
        holder.join().unwrap();
        assert_eq!(super::super::lock(&owned).committed_size("acme"), size, "nothing was appended");
        // Once the queue drains (batch by batch, from now on), the same request is served.
        let served = async {
            loop {
                let (status, json) = send(&f.app, "POST", "/v1/tenants/acme/budget/authorize", Some(&f.admin), Some(r#"{"estimate_micros":1}"#)).await;
                if json["error"]["code"] != "overloaded" {
                    return (status, json);
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        let (status, json) = tokio::time::timeout(std::time::Duration::from_secs(20), served).await.expect("the queue never drained");
        assert_eq!(status, StatusCode::OK, "{json}");
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
