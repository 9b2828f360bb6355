//! The HTTP edge both Tally services share: who is calling and what it may do, and how
//! connections are served.
//!
//! * [`TokenStore`], [`Principal`], [`Role`], [`AuthError`]: bearer tokens (stored as SHA-256
//!   hashes), their roles (docs/http-api.md has the matrix), and a token file that is re-read on
//!   any change and fails closed.
//! * [`FileWatch`]: noticing that a configuration file changed (tokens, budgets).
//! * [`serve`]: bounded HTTP serving (connection cap, header, idle and request timeouts) and the
//!   `Host` check for services without a token file.
//! * [`Telemetry`]: a service's Prometheus registry, per-route request latency and
//!   `tower-http` request spans and logs.

mod error;
pub mod serve;
mod telemetry;
mod tokens;
mod watch;

pub use error::{Error, Result};
/// The metric types [`Telemetry`] hands out, for the services' own metric structs.
pub use prometheus;
pub use telemetry::{latency_buckets, ErrorCode, Telemetry};
pub use tokens::{
    check_token_file, new_token, new_token_expiring, parse_token_file, render_token_file, stanza, Action, AuthError, Principal, Reach, Role, TokenEntry,
    TokenStore, ALL_TENANTS, TOKEN_PREFIX,
};
pub use watch::FileWatch;
