//! The query service's one error type. Every variant has a stable `code` and an HTTP status;
//! messages are lowercase and never name a file path or another tenant (DataFusion's messages
//! are scrubbed of the projection root before they are shown).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Auth(#[from] tally_auth::AuthError),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("sql rejected: {0}")]
    SqlRejected(String),
    #[error("query failed: {0}")]
    Query(String),
    #[error("query exceeded its time limit of {0} ms")]
    Timeout(u64),
    #[error("query exceeded its memory limit: {0}")]
    ResourcesExhausted(String),
    #[error("too many queries: {0}; retry in a moment")]
    TooManyQueries(String),
    #[error("{0}; a sum is never wrapped or clamped, so narrow the report")]
    SumOverflow(String),
    #[error("{0}")]
    NotFound(String),
    #[error("no signed checkpoint covers the projection of this tenant yet")]
    NoCheckpoint,
    /// A request body over the service's limit.
    #[error("the request body is over {0} bytes")]
    BodyTooLarge(usize),
    #[error("bad configuration: {0}")]
    Config(String),
    /// The detail is logged, not shown: it can name server paths.
    #[error("internal error; the service log has the detail")]
    Internal(String),
}

impl Error {
    /// Stable, machine-readable.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Auth(e) => e.code(),
            Error::BadRequest(_) => "bad_request",
            Error::SqlRejected(_) => "sql_rejected",
            Error::Query(_) => "query_failed",
            Error::Timeout(_) => "query_timeout",
            Error::ResourcesExhausted(_) => "query_too_large",
            Error::BodyTooLarge(_) => "body_too_large",
            Error::TooManyQueries(_) => "too_many_queries",
            Error::SumOverflow(_) => "sum_overflow",
            Error::NotFound(_) => "not_found",
            Error::NoCheckpoint => "no_checkpoint",
            Error::Config(_) => "bad_config",
            Error::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Auth(e) => StatusCode::from_u16(e.status()).unwrap_or(StatusCode::FORBIDDEN),
            Error::BadRequest(_) | Error::SqlRejected(_) | Error::Query(_) => StatusCode::BAD_REQUEST,
            Error::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::ResourcesExhausted(_) | Error::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::TooManyQueries(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::SumOverflow(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::NoCheckpoint => StatusCode::CONFLICT,
            Error::Config(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A DataFusion error as callers may see it: classified, and with `root` (the projection's
    /// directory) cut out of the text.
    pub(crate) fn from_datafusion(e: datafusion::error::DataFusionError, root: &std::path::Path) -> Error {
        use datafusion::error::DataFusionError as D;
        let scrub = |s: String| {
            let root = root.display().to_string();
            let s = if root.is_empty() { s } else { s.replace(&root, "<projection>") };
            let s = s.replace("file://", "");
            // A path spelled differently from the configured root still names server files.
            if s.contains("tenant_id=") || s.contains(".parquet") {
                tracing::warn!(error = %s, "query failed on a projection file");
                return "reading the projection failed; the service log has the detail".to_string();
            }
            s
        };
        match e.find_root() {
            // The process-wide pool is busy with other queries: this one may succeed later.
            D::ResourcesExhausted(m) if m.contains(crate::workers::GLOBAL_POOL_BUSY) => Error::TooManyQueries(scrub(m.clone())),
            D::ResourcesExhausted(m) => Error::ResourcesExhausted(scrub(m.clone())),
            D::SQL(..) | D::Plan(_) | D::SchemaError(..) | D::NotImplemented(_) => Error::Query(scrub(e.to_string().to_lowercase_first())),
            _ => {
                tracing::warn!(error = %e, "query execution failed");
                Error::Query(scrub(e.to_string().to_lowercase_first()))
            }
        }
    }
}

trait LowercaseFirst {
    fn to_lowercase_first(self) -> String;
}

impl LowercaseFirst for String {
    fn to_lowercase_first(self) -> String {
        let mut chars = self.chars();
        match chars.next() {
            Some(c) => c.to_lowercase().chain(chars).collect(),
            None => self,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        match &self {
            Error::Internal(detail) => tracing::error!(error = %detail, "query service error"),
            Error::Config(detail) => tracing::error!(error = %detail, "query service configuration error"),
            _ => {}
        }
        let body = serde_json::json!({ "error": { "code": self.code(), "message": self.to_string() } });
        let mut response = (self.status(), axum::Json(body)).into_response();
        response.extensions_mut().insert(tally_auth::ErrorCode(self.code()));
        if let Error::TooManyQueries(_) = self {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<tally_projection::Error> for Error {
    fn from(e: tally_projection::Error) -> Self {
        match e {
            tally_projection::Error::SumOverflow(m) => Error::SumOverflow(m),
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<tally_log::Error> for Error {
    fn from(e: tally_log::Error) -> Self {
        Error::Internal(e.to_string())
    }
}
