//! The ledger's read API over HTTP (axum): per tenant, the C2SP tlog-tiles paths, records,
//! receipts and consistency proofs; `/healthz`, `/readyz` and Prometheus `/metrics`.
//!
//! Errors are JSON `{"error": {"code": "...", "message": "..."}}` with stable codes:
//! `bad_request`, `not_found`, `internal`. Tenant ids are validated before any path is built.
//! Bearer-token authorization (SPEC §5) is not implemented yet, so the default listen address
//! is loopback only.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use serde::Deserialize;

use super::Shared;
use crate::checkpoint::Checkpoint;
use crate::error::Error;
use crate::receipt::Receipt;
use crate::tiles::TilePath;

pub(super) async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, shutdown: impl std::future::Future<Output = ()> + Send + 'static) {
    let app = router(shared);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "http server failed");
    }
}

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/t/{tenant}/checkpoint", get(checkpoint))
        .route("/t/{tenant}/tile/{*rest}", get(tile))
        .route("/v1/tenants/{tenant}/records/{seq}", get(record))
        .route("/v1/tenants/{tenant}/receipt/{seq}", get(receipt))
        .route("/v1/tenants/{tenant}/consistency", get(consistency))
        .with_state(shared)
}

struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.1, "message": self.2}});
        (self.0, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::NoSuchEntry { .. } | Error::NoSuchTile(_) => ApiError(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            Error::BadTilePath(_) => ApiError(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
            other => {
                tracing::error!(error = %other, "request failed");
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error".into())
            }
        }
    }
}

type ApiResult = Result<Response, ApiError>;

/// Runs `f` on the tenant's log, wherever its partition is open here.
fn with_tenant<T>(shared: &Shared, tenant: &str, f: impl FnOnce(&mut crate::ledger::Ledger) -> crate::error::Result<T>) -> Result<T, ApiError> {
    if tally_schemas::validate_tenant_id(tenant).is_err() {
        return Err(ApiError(StatusCode::BAD_REQUEST, "bad_request", "not a valid tenant id".into()));
    }
    let mut parts = shared.partitions();
    for p in parts.values_mut() {
        if p.ledger().has_tenant(tenant) {
            return f(p.ledger()).map_err(ApiError::from);
        }
    }
    Err(ApiError(StatusCode::NOT_FOUND, "not_found", format!("no log for tenant {tenant} on this instance")))
}

fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

async fn checkpoint(State(shared): State<Arc<Shared>>, Path(tenant): Path<String>) -> ApiResult {
    let note = with_tenant(&shared, &tenant, |l| l.checkpoint_note(&tenant))?;
    Ok(([(header::CACHE_CONTROL, "no-cache")], text(note)).into_response())
}

async fn tile(State(shared): State<Arc<Shared>>, Path((tenant, rest)): Path<(String, String)>) -> ApiResult {
    let path = TilePath::parse(&format!("tile/{rest}"))?;
    let bytes = with_tenant(&shared, &tenant, |l| {
        let log = l.tenant(&tenant)?;
        match path {
            TilePath::Hashes { level, index, width } => log.hash_tile(level, index, width),
            TilePath::Entries { index, width } => log.entry_bundle(index, width),
        }
    })?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream"), (header::CACHE_CONTROL, "public, max-age=31536000, immutable")], bytes).into_response())
}

async fn record(State(shared): State<Arc<Shared>>, Path((tenant, seq)): Path<(String, u64)>) -> ApiResult {
    let entry = with_tenant(&shared, &tenant, |l| l.tenant(&tenant)?.entry(seq))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], entry).into_response())
}

async fn receipt(State(shared): State<Arc<Shared>>, Path((tenant, seq)): Path<(String, u64)>) -> ApiResult {
    let (receipt, _entry): (Receipt, Vec<u8>) = with_tenant(&shared, &tenant, |l| l.receipt(&tenant, seq))?;
    Ok(text(receipt.to_text()))
}

#[derive(Deserialize)]
struct Sizes {
    old: u64,
    new: u64,
}

async fn consistency(State(shared): State<Arc<Shared>>, Path(tenant): Path<String>, Query(sizes): Query<Sizes>) -> ApiResult {
    let proof = with_tenant(&shared, &tenant, |l| {
        let verifiers = l.verifiers_for(&tenant)?;
        let note = l.checkpoint_note(&tenant)?;
        let latest = Checkpoint::open(&note, &verifiers, None)?;
        if sizes.new > latest.size {
            return Err(Error::NoSuchEntry { seq: sizes.new, size: latest.size });
        }
        l.tenant(&tenant)?.consistency_proof(sizes.old, sizes.new)
    })?;
    let mut body = String::new();
    for h in proof {
        body.push_str(&base64::engine::general_purpose::STANDARD.encode(h));
        body.push('\n');
    }
    Ok(text(body))
}

/// Ready once this instance owns at least one partition and nothing has failed: a member that
/// has not (yet) been assigned anything can serve no tenant.
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.fatal.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some() {
        return (StatusCode::SERVICE_UNAVAILABLE, "failed\n").into_response();
    }
    match shared.partitions().len() {
        0 => (StatusCode::SERVICE_UNAVAILABLE, "no partitions assigned\n").into_response(),
        n => format!("ready: {n} partitions\n").into_response(),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let m = &shared.metrics;
    let mut out = String::new();
    for (name, help, value) in [
        ("tally_ledger_events_accepted_total", "Events appended to tenant logs.", &m.accepted),
        ("tally_ledger_events_deduplicated_total", "Identical retries recorded once.", &m.deduplicated),
        ("tally_ledger_conflicts_total", "Same idempotency key, different content.", &m.conflicts),
        ("tally_ledger_dead_lettered_total", "Messages sent to the DLQ.", &m.dead_lettered),
        ("tally_ledger_reread_total", "Messages re-read after a restart, already recorded.", &m.reread),
        ("tally_ledger_commits_total", "Group commits (each signs checkpoints).", &m.commits),
    ] {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n", value.load(Ordering::Relaxed)));
    }
    out.push_str(&format!("# HELP tally_ledger_partitions Partitions owned by this instance.\n# TYPE tally_ledger_partitions gauge\ntally_ledger_partitions {}\n", shared.partitions().len()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
