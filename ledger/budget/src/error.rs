//! Errors of the budget crate: a budgets file or setting that is not valid (naming the key and,
//! when it came from a file, the file), and failures of the log core below, wrapped unchanged.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad budget configuration: {0}")]
    BadBudget(String),
    #[error(transparent)]
    Log(#[from] tally_log::Error),
}

impl Error {
    /// An i/o failure on `path` (reading a budgets file), naming it.
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        tally_log::Error::io(path, source).into()
    }
}
