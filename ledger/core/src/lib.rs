//! Tally's verifiable log core: one append-only RFC 9162 Merkle log per tenant, with signed C2SP
//! checkpoints, inclusion/consistency proofs and `tlog-proof` receipts that verifiers nobody at
//! Tally wrote can check. Pure storage and cryptography: no Kafka, Parquet or async runtime, so an
//! auditor's tool can depend on it alone.
//!
//! * [`merkle`]: hashing, the append frontier, proofs and their verification.
//! * [`TenantLog`]: one tenant's durable log (checksummed frames, stored nodes, group commit,
//!   torn-tail repair); [`Ledger`]: a directory of them, committed and checkpointed together;
//!   [`LogReader`]: read-only access that never repairs.
//! * [`NoteSigner`] / [`NoteVerifier`] / [`LedgerKey`]: C2SP signed notes with Ed25519.
//! * [`Checkpoint`]: the C2SP tlog-checkpoint of a tenant's log (origin `<log-origin>/t/<tenant>`).
//! * [`Receipt`]: `c2sp.org/tlog-proof@v1` text, verified against an entry and vkeys.
//! * [`audit_tenant`]: fsck of a tenant's log against its entries, head and checkpoint.
//! * [`Record`]: the one codec of a ledger record's bytes ([`event_record`], [`budget_record`],
//!   [`Record::decode`]; docs/records.md).
//! * [`Journal`]: a partition's append-only, checksummed journal: every tenant's records of a
//!   group commit made durable with one `fdatasync` (the storage issue #13 is moving to).
//! * [`PartitionLog`]: every tenant log of a partition over one journal, with per-segment
//!   indexes: tenants are keys, not directories.
//! * [`durable`]: the one durable whole-file replace (temporary, fsync, rename, fsync the directory).
//! * [`Commitment`] / [`SubjectKeys`]: salted commitments to personal fields and the per-subject
//!   keys their salts derive from; erasing a key erases a subject (docs/privacy.md).
//! * [`TilePath`]: the C2SP tlog-tiles layout; tiles and bundles come from [`TenantLog`].

mod audit;
mod checkpoint;
pub mod durable;
mod entries;
mod error;
mod handles;
mod journal;
mod keyfile;
mod ledger;
mod log;
pub mod merkle;
mod note;
mod partition_log;
mod privacy;
mod receipt;
mod record;
mod tiles;

pub use audit::{audit_ledger, AuditReport};
pub use checkpoint::{tenant_origin, Checkpoint};
pub use entries::TenantEntries;
pub use error::{Error, Result};
pub use journal::{CommitFrame, Frame, Journal, Opened, RecordFrame, WrittenCommit, DEFAULT_SEGMENT_BYTES, SEGMENT_MAGIC};
pub use keyfile::LedgerKey;
pub use ledger::{find_tenant_ledger, migrate, ErasurePlan, ErasureScan, Ledger, Migrated, JOURNAL_DIR, SUBJECT_KEYS_DIR};
pub use log::{LogReader, TenantLog, MAX_ENTRY_BYTES};
pub use note::{key_id, sign_note, verify_note, NoteSigner, NoteVerifier, VerifiedNote};
pub use partition_log::{IndexMerge, IndexSpan, MergedIndex, PartitionLog, PendingCommit, TenantView, INDEX_MAGIC, MAX_MERGED_SEGMENTS, MERGE_FAN};
pub use privacy::{period_of, Commitment, KeyRef, Opening, Revealed, Salt, SealedHeader, SubjectKey, SubjectKeys, SALT_BYTES};
pub use receipt::Receipt;
pub use record::{
    budget_record, conflict_record, erasure_record, event_record, input_time, split_personal, Charge, ChargeBasis, Erasure, EventInput, EventRecord,
    EventRecordType, PersonalFields, Record, Source, Statement, StatementTotal, ERASED, MAX_ERASED_KEYS_PER_RECORD, MAX_ERASED_SEQS_PER_RECORD, PAYLOAD_FIELD,
    SUBJECT_FIELD,
};
pub use tiles::{available_width, parse_entry_bundle, TilePath, TILE_WIDTH};
