//! The HTTP edge both Tally services share: who is calling and what it may do, and how
//! connections are served.
//!
//! * [`TokenStore`], [`Principal`], [`Role`], [`AuthError`]: bearer tokens (stored as SHA-256
//!   hashes), their roles (docs/http-api.md has the matrix), and a token file that is re-read on
//!   any change and fails closed.
//! * [`FileWatch`]: noticing that a configuration file changed (tokens, budgets).
//! * [`serve`]: bounded HTTP serving (connection cap, header, idle and request timeouts) and the
//!   `Host` check for services without a token file.

mod error;
pub mod serve;
mod tokens;
mod watch;

pub use error::{Error, Result};
pub use tokens::{check_token_file, new_token, stanza, AuthError, Principal, Role, TokenEntry, TokenStore, TOKEN_PREFIX};
pub use watch::FileWatch;
