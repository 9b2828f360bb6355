//! Errors of the log core. Messages are lowercase and say precisely what failed, because
//! `tally verify` prints them to auditors as the reason a proof was rejected.

use crate::merkle::ProofError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad key: {0}")]
    BadKey(String),
    #[error("malformed note: {0}")]
    BadNote(String),
    #[error("bad signature: {0}")]
    BadSignature(String),
    #[error("unknown key: no signature by a trusted key ({0})")]
    UnknownKey(String),
    #[error("malformed checkpoint: {0}")]
    BadCheckpoint(String),
    #[error("origin mismatch: expected {expected:?}, found {found:?}")]
    OriginMismatch { expected: String, found: String },
    #[error("malformed receipt: {0}")]
    BadReceipt(String),
    #[error(transparent)]
    Proof(#[from] ProofError),
    /// A worker thread of a group commit failed.
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("bad record: {0}")]
    BadRecord(String),
    #[error("entry is {0} bytes; an entry is at most 65535 bytes")]
    EntryTooLarge(usize),
    #[error("{0} holds tenant logs in the pre-journal layout (a directory per tenant under t/); convert it with `tally migrate --data-dir <the ledger's data_dir>` (docs/storage.md)")]
    OldLayout(String),
    #[error("corrupt log {path}: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("not a canonical tlog-tiles path: {0:?}")]
    BadTilePath(String),
    #[error("no such tile in this tree: {0}")]
    NoSuchTile(String),
    #[error("sequence number {seq} is out of range: the log has {size} entries")]
    NoSuchEntry { seq: u64, size: u64 },
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io { path: path.display().to_string(), source }
    }
}
