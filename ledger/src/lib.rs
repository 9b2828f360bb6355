//! Tally's ledger service (`tally ledger`): consumes the events topic and keeps every tenant's
//! signed log (the [`tally_log`] core) up to date exactly once, enforces budgets, writes the
//! Parquet projection ([`tally_projection`]) and serves proofs and admissions over HTTP behind
//! [`tally_auth`].
//!
//! * [`service`]: configuration, the consume/commit loop, partitions, the dedup store, HTTP.
//! * [`budget`]: budget windows, configuration, and the budget state folded from a log
//!   (docs/budgets.md): the `tally-budget` crate, re-exported.
//!
//! The crates it builds on are re-exported under the paths the binary and the tests use
//! (`tally_ledger::Checkpoint`, `tally_ledger::auth`, `tally_ledger::projection`), so code that
//! needs only the log core, the projection or auth depends on those crates alone.

mod error;
pub mod service;

pub use error::{Error, Result};
pub use tally_auth as auth;
pub use tally_budget as budget;
pub use tally_log::{
    audit_ledger, available_width, conflict_record, event_record, find_tenant_ledger, key_id, merkle, migrate, parse_entry_bundle, sign_note, tenant_origin,
    verify_note, AuditReport, Charge, ChargeBasis, Checkpoint, EventInput, Ledger, LedgerKey, Migrated, NoteSigner, NoteVerifier, Receipt, Record, Source,
    TenantEntries, TilePath, VerifiedNote, JOURNAL_DIR, MAX_ENTRY_BYTES, TILE_WIDTH,
};
pub use tally_projection as projection;
