//! Tally's verifiable ledger: one append-only RFC 9162 Merkle log per tenant, with signed C2SP
//! checkpoints, inclusion/consistency proofs and `tlog-proof` receipts that verifiers nobody at
//! Tally wrote can check.
//!
//! * [`merkle`]: hashing, the append frontier, proofs and their verification.
//! * [`NoteSigner`] / [`NoteVerifier`]: C2SP signed notes with Ed25519, vkeys, key IDs.
//! * [`Checkpoint`]: the C2SP tlog-checkpoint of a tenant's log (origin `<log-origin>/t/<tenant>`).
//! * [`Receipt`]: `c2sp.org/tlog-proof@v1` text, verified against an entry and vkeys.

mod checkpoint;
mod error;
mod log;
pub mod merkle;
mod note;
mod receipt;

pub use checkpoint::{tenant_origin, Checkpoint};
pub use error::{Error, Result};
pub use note::{key_id, sign_note, verify_note, NoteSigner, NoteVerifier, VerifiedNote};
pub use log::{TenantLog, MAX_ENTRY_BYTES};
pub use receipt::Receipt;
