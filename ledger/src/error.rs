//! Errors of the ledger crate. Messages are lowercase and say precisely what failed, because
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
    #[error("bad budget configuration: {0}")]
    BadBudget(String),
    #[error("bad token file: {0}")]
    BadTokens(String),
    #[error("ledger service: {0}")]
    Service(String),
    #[error("bad record: {0}")]
    BadRecord(String),
    #[error("entry is {0} bytes; an entry is at most 65535 bytes")]
    EntryTooLarge(usize),
    #[error("corrupt log {path}: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("not a canonical tlog-tiles path: {0:?}")]
    BadTilePath(String),
    #[error("no such tile in this tree: {0}")]
    NoSuchTile(String),
    #[error("sequence number {seq} is out of range: the log has {size} entries")]
    NoSuchEntry { seq: u64, size: u64 },
    #[error("partition state {0} is locked by another ledger instance")]
    PartitionBusy(String),
    #[error("no record of event {0:?} in this log")]
    NoSuchEvent(String),
    /// The consumer was handed offsets below what this ledger recorded: the topic was recreated
    /// or the broker lost data. Reading on would take new messages for recorded ones.
    #[error("partition {partition} of {topic} delivered offset {offset}, but this ledger has already recorded every offset below {next}: the topic was recreated or the broker lost data; stopping rather than skipping messages as already recorded (see README, \"When the events topic is recreated\")")]
    OffsetRegression { topic: String, partition: i32, offset: i64, next: i64 },
    #[error("parquet projection: {0}")]
    Projection(String),
    /// A sum of money, tokens or events would leave the 64-bit range (reported, never wrapped).
    #[error("{0}")]
    SumOverflow(String),
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io { path: path.display().to_string(), source }
    }
}
