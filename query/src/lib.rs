//! The query service over the Parquet projection (docs/http-api.md): per-tenant audit trails, cost
//! roll-ups, read-only SQL, billing spend and audit exports with completeness evidence, served
//! over HTTP with DataFusion. This is the only crate that depends on DataFusion.
//!
//! * [`QueryConfig`]: the service's settings (`[query]` in its TOML file).
//! * [`run`]: serves the API on a listener until a shutdown future completes.
//! * [`Engine`]: per-request, per-tenant DataFusion contexts; the read-only SQL gate that runs
//!   before them is its own crate, `tally-sql-gate`.
//! * [`reports`]: the queries behind each route, usable without HTTP (benchmarks, tests).
//! * [`verify_export`]: checks an audit export offline (`tally verify export`).

mod bounded;
mod config;
mod encode;
mod error;
mod export_check;
mod http;
pub mod reports;
mod tables;
mod tenant_table;
mod workers;

use std::sync::Arc;

pub use config::QueryConfig;
pub use encode::Format;
pub use error::{Error, Result};
pub use export_check::{parse_export, verify_export, ExportInvalid, VerifiedExport};
pub use tables::Engine;
pub use tally_schemas::projection_schema;

/// The OpenAPI 3.1 description of the API, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Serves the query API on `listener` until `shutdown` completes.
pub async fn run(config: QueryConfig, listener: tokio::net::TcpListener, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let state = app_state(config)?;
    let config = &state.config;
    let addr = listener.local_addr().map_err(|e| Error::Internal(e.to_string()))?;
    let auth = state.tokens.is_enabled();
    tracing::info!(%addr, projection = %config.projection_root().display(), auth, query_threads = config.query_threads(), "query service listening");
    // A request may take its query's time and then some; never less than the default.
    let defaults = tally_auth::serve::ServeLimits::default();
    let limits = tally_auth::serve::ServeLimits {
        request_timeout: (std::time::Duration::from_millis(config.query_timeout_ms) + std::time::Duration::from_secs(30)).max(defaults.request_timeout),
        ..defaults
    };
    let mut app = http::router(state);
    if !auth {
        // No token file (loopback only): refuse other Host names, against DNS rebinding.
        app = app.layer(axum::middleware::from_fn(tally_auth::serve::loopback_host_only));
    }
    tally_auth::serve::serve(listener, app, limits, shutdown).await.map_err(|e| Error::Internal(format!("http server: {e}")))
}

/// The router alone, for in-process tests.
pub fn router_for_tests(config: QueryConfig) -> Result<axum::Router> {
    Ok(http::router(app_state(config)?))
}

/// Everything the handlers share, from a validated configuration.
fn app_state(config: QueryConfig) -> Result<Arc<http::AppState>> {
    config.validate()?;
    let tokens = match &config.tokens {
        Some(path) => tally_auth::TokenStore::load(path).map_err(|e| Error::Config(format!("query.tokens: {e}")))?,
        None => tally_auth::TokenStore::disabled(),
    };
    let engine = Engine::new(&config);
    let workers = workers::Workers::new(config.query_threads(), config.max_concurrent_queries, config.max_concurrent_queries_per_tenant)?;
    Ok(Arc::new(http::AppState { config, engine, tokens, workers, metrics: http::QueryMetrics::new() }))
}
