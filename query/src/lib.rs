//! The query service over the Parquet projection (SPEC §5): per-tenant audit trails, cost
//! roll-ups, read-only SQL and billing spend, served with DataFusion.
//!
//! This crate is where DataFusion will live, and only here (it is the slowest dependency to
//! compile). Its first piece, the projection's Arrow schema, is defined in `tally-schemas`
//! ([`tally_schemas::projection_schema`]) because the ledger writes what this crate reads; the
//! service itself arrives with the query issue. Nothing else in the workspace depends on it yet.

pub use tally_schemas::projection_schema;
