//! Errors of the ledger service. Its own failures (configuration, budgets, partitions, offsets)
//! have their variants here; failures of the crates below arrive wrapped, unchanged.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad configuration: {0}")]
    BadKey(String),
    #[error("ledger service: {0}")]
    Service(String),
    #[error("bad record: {0}")]
    BadRecord(String),
    #[error("corrupt state {path}: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("partition state {0} is locked by another ledger instance")]
    PartitionBusy(String),
    #[error("no record of event {0:?} in this log")]
    NoSuchEvent(String),
    /// An authorize without `estimated_tokens` for a tenant whose tokens are limited.
    #[error("estimated_tokens is required: this tenant's budget limits tokens (a limit or a tokens quota)")]
    MissingEstimatedTokens,
    /// A freeze past the per-tenant bound (`MAX_ACTIVE_FREEZES`).
    #[error("this tenant already has {active} active freezes, the most allowed; unfreeze some, or freeze a wider scope")]
    TooManyFreezes { active: usize },
    /// An `Idempotency-Key` reused for a different request.
    #[error("Idempotency-Key {key:?} was first used for a different request (answered by record {seq}); use a new key for a new request")]
    IdempotencyConflict { key: String, seq: u64 },
    /// The consumer was handed offsets below what this ledger recorded: the topic was recreated
    /// or the broker lost data. Reading on would take new messages for recorded ones.
    #[error("partition {partition} of {topic} delivered offset {offset}, but this ledger has already recorded every offset below {next}: the topic was recreated or the broker lost data; stopping rather than skipping messages as already recorded (see README, \"When the events topic is recreated\")")]
    OffsetRegression { topic: String, partition: i32, offset: i64, next: i64 },
    #[error(transparent)]
    Log(#[from] tally_log::Error),
    #[error(transparent)]
    Projection(#[from] tally_projection::Error),
    #[error(transparent)]
    Budget(#[from] tally_budget::Error),
    #[error(transparent)]
    Auth(#[from] tally_auth::Error),
}

impl Error {
    /// Whether this is a failure of the partition's storage (a write, sync or read of its files
    /// failed: a full or failing disk), as opposed to bad input or bad state. A partition that
    /// meets one stops and is opened again once its files can be written (docs/storage.md,
    /// "When the disk fills up"); any other error stops the service.
    pub fn is_storage(&self) -> bool {
        matches!(self, Error::Log(tally_log::Error::Io { .. } | tally_log::Error::Commit(_)))
    }

    /// An i/o failure on `path`: the log core's error, which names the path, wrapped.
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        tally_log::Error::io(path, source).into()
    }
}
