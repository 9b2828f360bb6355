//! Budgets (docs/budgets.md): per-tenant limits on task, day and billing period, enforced from the same
//! log that proves what happened. A crate of its own, on the log core and the event schema only
//! (no Kafka, no I/O but reading the budgets file), so the ledger service, the offline verifiers
//! and the fuzz targets (`fuzz/fuzz_targets/budgets_file.rs`) use the same code.
//!
//! * [`window`]: days and periods in the tenant's time zone (DST, short months, anchor days).
//! * [`config`]: plans, per-tenant overrides and price tables (TOML) → a tenant's effective
//!   [`TenantBudget`], which `config` records store.
//! * [`rating`]: what an event is charged, once, when the ledger appends it ([`rate`]).
//! * [`statement`]: period close, the `statement` record, and recomputing one from entries.
//! * [`state`]: [`BudgetState`], the fold over a tenant's log; its decisions and the admission
//!   check. Pure: no I/O and no clock (callers pass `now`).

mod config;
mod error;
mod rating;
mod state;
mod statement;
mod window;

pub use config::{BudgetFile, Price, Quota, QuotaSelector, TenantBudget};
pub use error::{Error, Result};
pub use rating::{rate, Catalog};
pub use state::{
    Admission, AuthorizeRequest, BudgetDecision, BudgetRecord, BudgetState, DeniedBy, Flag, FlagKind, Freeze, FreezeScope, Idempotency, Level, LevelState,
    Release, ReleaseReason, Remembered, Status, Unfreeze, Unit, UnitState, Verdict, FOLD_VERSION, MAX_ACTIVE_FREEZES, MAX_REMEMBERED_KEYS, REMEMBER_KEYS_FOR,
};
pub use statement::{
    recompute, verify_statement, verify_statement_in_export, Mismatch, Statement, StatementCheck, StatementTotal, VerifiedStatement, MAX_LISTED_STATEMENTS,
};
pub use window::Calendar;

#[cfg(test)]
mod tests;
