//! Tally's verifiable ledger: one append-only RFC 9162 Merkle log per tenant, with signed C2SP
//! checkpoints, inclusion/consistency proofs and `tlog-proof` receipts that verifiers nobody at
//! Tally wrote can check.
//!
//! * [`merkle`]: hashing, the append frontier, proofs and their verification.
//! * [`TenantLog`]: one tenant's durable log (checksummed frames, stored nodes, group commit,
//!   torn-tail repair); [`Ledger`]: a directory of them, committed and checkpointed together.
//! * [`NoteSigner`] / [`NoteVerifier`] / [`LedgerKey`]: C2SP signed notes with Ed25519.
//! * [`Checkpoint`]: the C2SP tlog-checkpoint of a tenant's log (origin `<log-origin>/t/<tenant>`).
//! * [`Receipt`]: `c2sp.org/tlog-proof@v1` text, verified against an entry and vkeys.
//! * [`audit_tenant`]: fsck of a tenant's log against its entries, head and checkpoint.
//! * [`event_record`]: the canonical bytes of a ledger record.
//! * [`budget`]: budget windows, configuration, and the budget state folded from a log.
//! * [`auth`]: bearer tokens (stored hashed) and the roles of docs/http-api.md.
//! * [`projection`]: the Parquet projection of the logs and its cost roll-ups (docs/parquet.md).
//! * [`service`]: the Kafka-fed ledger service (`tally ledger`) and its HTTP API.
//! * [`TilePath`]: the C2SP tlog-tiles layout; tiles and bundles come from [`TenantLog`].

mod audit;
pub mod auth;
pub mod budget;
mod checkpoint;
mod error;
mod keyfile;
mod ledger;
mod log;
pub mod merkle;
mod note;
pub mod projection;
mod receipt;
mod record;
pub mod serve;
pub mod service;
mod tiles;
mod watch;

pub use audit::{audit_tenant, AuditReport};
pub use checkpoint::{tenant_origin, Checkpoint};
pub use error::{Error, Result};
pub use keyfile::LedgerKey;
pub use ledger::{Ledger, COMMIT_THREADS};
pub use log::{find_tenant_log, LogReader, TenantLog, MAX_ENTRY_BYTES};
pub use note::{key_id, sign_note, verify_note, NoteSigner, NoteVerifier, VerifiedNote};
pub use receipt::Receipt;
pub use record::{conflict_record, event_record, EventInput, Source};
pub use tiles::{available_width, TilePath, TILE_WIDTH};
