//! Budgets (docs/budgets.md): per-tenant limits on task, day and billing period, enforced from the same
//! log that proves what happened.
//!
//! * [`window`]: days and periods in the tenant's time zone (DST, short months, anchor days).
//! * [`config`]: plans, per-tenant overrides and price tables (TOML) → a tenant's effective
//!   [`TenantBudget`], which `config` records store.
//! * [`state`]: [`BudgetState`], the fold over a tenant's log; its decisions and the admission
//!   check. Pure: no I/O and no clock (callers pass `now`).

mod config;
mod state;
mod window;

pub use config::{BudgetFile, Price, Quota, QuotaSelector, TenantBudget};
pub use state::{
    charge, Admission, AuthorizeRequest, Basis, BudgetDecision, BudgetRecord, BudgetState, DeniedBy, Flag, FlagKind, Freeze, FreezeScope, Idempotency, Level,
    LevelState, Release, ReleaseReason, Remembered, Status, Unfreeze, Unit, UnitState, Verdict, FOLD_VERSION, MAX_ACTIVE_FREEZES, MAX_REMEMBERED_KEYS,
    REMEMBER_KEYS_FOR,
};
pub use window::Calendar;

#[cfg(test)]
mod tests;
