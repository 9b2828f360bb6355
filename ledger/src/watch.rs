//! Noticing that a configuration file changed (tokens, budgets), cheaply enough to ask on every
//! request: the file's modification time is looked at no more than once a second, and a change
//! is reported once, whether or not the new content turns out to be valid.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

const RECHECK: Duration = Duration::from_secs(1);

pub(crate) struct FileWatch {
    path: PathBuf,
    /// When the file was last looked at, and its modification time then.
    seen: Mutex<(Instant, Option<SystemTime>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl FileWatch {
    /// Watches `path` from its current state on.
    pub fn new(path: &Path) -> Self {
        FileWatch { path: path.to_path_buf(), seen: Mutex::new((Instant::now(), modified(path))) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once per change of the file's modification time.
    pub fn changed(&self) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.0.elapsed() < RECHECK {
            return false;
        }
        let now = modified(&self.path);
        let changed = now != seen.1;
        *seen = (Instant::now(), now);
        changed
    }

    /// Lets the next `changed` look at the file at once.
    #[cfg(test)]
    pub fn recheck_now(&self) {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).0 = Instant::now() - RECHECK;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, "a").unwrap();
        let watch = FileWatch::new(&path);
        watch.recheck_now();
        assert!(!watch.changed(), "unchanged");
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, "b").unwrap();
        assert!(!watch.changed(), "not looked at again within a second");
        watch.recheck_now();
        assert!(watch.changed());
        watch.recheck_now();
        assert!(!watch.changed(), "reported once");
    }
}
