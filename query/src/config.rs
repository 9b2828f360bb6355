//! `[query]` in the query service's TOML configuration, validated at start.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryConfig {
    /// The ledger's `data_dir` (read-only here): the projection is `<data_dir>/parquet`, and the
    /// logs under it give the audit export its proofs.
    pub data_dir: PathBuf,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Token file (`tally token new`). Without one, authorization is off and `listen` must be a
    /// loopback address.
    #[serde(default)]
    pub tokens: Option<PathBuf>,
    /// Most rows one response returns (`/events` pages, SQL results).
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    /// Most rows one audit export returns.
    #[serde(default = "default_max_export_rows")]
    pub max_export_rows: u64,
    /// Wall-clock limit of one query.
    #[serde(default = "default_query_timeout_ms")]
    pub query_timeout_ms: u64,
    /// Memory one query may hold for sorts, joins and aggregations.
    #[serde(default = "default_query_memory_mb")]
    pub query_memory_mb: usize,
    /// Longest SQL text accepted.
    #[serde(default = "default_max_sql_bytes")]
    pub max_sql_bytes: usize,
    /// Memory all running queries together may hold (each also within `query_memory_mb`).
    #[serde(default = "default_query_memory_total_mb")]
    pub query_memory_total_mb: usize,
    /// Queries (of any route) running at once; one more is answered 429 `too_many_queries`.
    #[serde(default = "default_max_concurrent_queries")]
    pub max_concurrent_queries: usize,
    /// Queries running at once for one tenant (or one billing caller).
    #[serde(default = "default_max_concurrent_queries_per_tenant")]
    pub max_concurrent_queries_per_tenant: usize,
    /// Threads of the query runtime (default: the machine's cores). HTTP requests, `/healthz`
    /// included, are served by other threads.
    #[serde(default)]
    pub query_threads: Option<usize>,
    /// Most bytes of result rows one response holds, before encoding (`query_too_large` past it).
    #[serde(default = "default_max_response_mb")]
    pub max_response_mb: usize,
    /// Most bytes of log entries one audit export holds; a longer range is cut, and the answer
    /// says where the next one starts.
    #[serde(default = "default_max_export_mb")]
    pub max_export_mb: usize,
    /// Who invoices the tenants and provides the service: the spend export's FOCUS
    /// `InvoiceIssuerName`, `ProviderName` and `PublisherName` (the platform running Tally).
    #[serde(default = "default_invoice_issuer")]
    pub invoice_issuer: String,
}

fn default_invoice_issuer() -> String {
    "Tally".into()
}

fn default_query_memory_total_mb() -> usize {
    2048
}
fn default_max_concurrent_queries() -> usize {
    4
}
fn default_max_concurrent_queries_per_tenant() -> usize {
    2
}
fn default_max_response_mb() -> usize {
    64
}
fn default_max_export_mb() -> usize {
    16
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}
fn default_max_rows() -> usize {
    100_000
}
fn default_max_export_rows() -> u64 {
    100_000
}
fn default_query_timeout_ms() -> u64 {
    30_000
}
fn default_query_memory_mb() -> usize {
    512
}
fn default_max_sql_bytes() -> usize {
    64 * 1024
}

impl QueryConfig {
    /// Checks every setting, naming the bad key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err(Error::Config(format!("query.{key} {why}")));
        if self.max_rows == 0 || self.max_rows > 10_000_000 {
            return bad("max_rows", format!("= {} must be 1..=10000000", self.max_rows));
        }
        if self.max_export_rows == 0 {
            return bad("max_export_rows", "must be at least 1".into());
        }
        // Files a merge replaced are deleted REPLACED_FILE_GRACE after it: no query may outlive that.
        let max_timeout = tally_projection::REPLACED_FILE_GRACE.as_millis() as u64 / 2;
        if self.query_timeout_ms == 0 || self.query_timeout_ms > max_timeout {
            return bad("query_timeout_ms", format!("= {} must be 1..={max_timeout}", self.query_timeout_ms));
        }
        if self.query_memory_mb < 16 {
            return bad("query_memory_mb", format!("= {} must be at least 16", self.query_memory_mb));
        }
        if self.max_sql_bytes == 0 {
            return bad("max_sql_bytes", "must be at least 1".into());
        }
        if self.query_memory_total_mb < self.query_memory_mb {
            return bad("query_memory_total_mb", format!("= {} must be at least query.query_memory_mb ({})", self.query_memory_total_mb, self.query_memory_mb));
        }
        if self.max_concurrent_queries == 0 || self.max_concurrent_queries > 1024 {
            return bad("max_concurrent_queries", format!("= {} must be 1..=1024", self.max_concurrent_queries));
        }
        if self.max_concurrent_queries_per_tenant == 0 || self.max_concurrent_queries_per_tenant > self.max_concurrent_queries {
            return bad("max_concurrent_queries_per_tenant", format!("= {} must be 1..=max_concurrent_queries", self.max_concurrent_queries_per_tenant));
        }
        if self.query_threads.is_some_and(|t| t == 0 || t > 256) {
            return bad("query_threads", "must be 1..=256".into());
        }
        if self.max_response_mb == 0 || self.max_export_mb == 0 {
            return bad(if self.max_response_mb == 0 { "max_response_mb" } else { "max_export_mb" }, "must be at least 1".into());
        }
        if self.invoice_issuer.trim().is_empty() || self.invoice_issuer.len() > 256 {
            return bad("invoice_issuer", "must be 1..=256 bytes and not blank".into());
        }
        if self.tokens.is_none() && !self.listen.ip().is_loopback() {
            return bad("tokens", format!("is required when query.listen ({}) is not a loopback address", self.listen));
        }
        Ok(())
    }

    /// The projection's root.
    pub fn projection_root(&self) -> PathBuf {
        self.data_dir.join("parquet")
    }

    /// Threads of the query runtime.
    pub fn query_threads(&self) -> usize {
        self.query_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<QueryConfig> {
        let c: QueryConfig = toml::from_str(&format!("data_dir = \"/d\"\n{extra}")).map_err(|e| Error::Config(e.to_string()))?;
        c.validate().map(|_| c)
    }

    #[test]
    fn defaults_are_valid_and_bad_keys_are_named() {
        let c = parse("").unwrap();
        assert_eq!((c.max_rows, c.query_timeout_ms), (100_000, 30_000));
        for (extra, key) in [
            ("max_rows = 0", "query.max_rows"),
            ("query_timeout_ms = 0", "query.query_timeout_ms"),
            ("query_memory_mb = 1", "query.query_memory_mb"),
            ("listen = \"0.0.0.0:1\"", "query.tokens"),
            ("query_memory_total_mb = 100", "query.query_memory_total_mb"),
            ("max_concurrent_queries = 0", "query.max_concurrent_queries"),
            ("max_concurrent_queries_per_tenant = 9", "query.max_concurrent_queries_per_tenant"),
            ("max_export_mb = 0", "query.max_export_mb"),
            ("invoice_issuer = \" \"", "query.invoice_issuer"),
            ("nonsense = 1", "nonsense"),
        ] {
            let err = parse(extra).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }
}
