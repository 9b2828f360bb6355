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
