//! Errors of the projection. Messages are lowercase and name the file or tenant at fault.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("parquet projection: {0}")]
    Projection(String),
    /// A sum of money, tokens or events would leave the 64-bit range (reported, never wrapped).
    #[error("{0}")]
    SumOverflow(String),
    #[error("bad record: {0}")]
    BadRecord(String),
    #[error("corrupt projection {path}: {detail}")]
    Corrupt { path: String, detail: String },
    /// Reading the log the projection is made from failed.
    #[error(transparent)]
    Log(#[from] tally_log::Error),
}

impl Error {
    /// An i/o failure on `path`: the log core's error, which names the path, wrapped.
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        tally_log::Error::io(path, source).into()
    }
}
