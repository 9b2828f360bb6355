//! Tally's verifiable ledger: one append-only RFC 9162 Merkle log per tenant.
//!
//! * [`merkle`]: hashing, the append frontier, inclusion and consistency proofs and their
//!   verification.

pub mod merkle;
