//! Noticing that a configuration file changed (tokens, budgets), cheaply enough to ask on every
//! request: the file is looked at no more than once a second, and a change is reported once,
//! whether or not the new content turns out to be valid.
//!
//! A change is any difference in the file's [`Fingerprint`]: its device and inode (an atomic
//! rename puts a new file in place), its size, and its modification and status-change times to
//! the nanosecond. The status-change time cannot be set from user space, so even a rewrite of the
//! same size within the same second, with its modification time put back, is noticed. A file
//! that disappears (or cannot be looked at) is a change too.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

const RECHECK: Duration = Duration::from_secs(1);

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

pub struct FileWatch {
    path: PathBuf,
    /// When the file was last looked at, and its fingerprint then (`None`: no such file).
    seen: Mutex<(Instant, Option<Fingerprint>)>,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = std::fs::metadata(path).ok()?;
    Some(Fingerprint { dev: m.dev(), ino: m.ino(), len: m.len(), mtime: (m.mtime(), m.mtime_nsec()), ctime: (m.ctime(), m.ctime_nsec()) })
}

impl FileWatch {
    /// Watches `path` from its current state on.
    pub fn new(path: &Path) -> Self {
        FileWatch { path: path.to_path_buf(), seen: Mutex::new((Instant::now(), fingerprint(path))) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once per change of the file (see the module docs for what counts as one).
    pub fn changed(&self) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.0.elapsed() < RECHECK {
            return false;
        }
        let now = fingerprint(&self.path);
        let changed = now != seen.1;
        *seen = (Instant::now(), now);
        changed
    }

    /// Lets the next `changed` look at the file at once.
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

    /// Each of these keeps the size and the modification time, so a watch on those misses it.
    #[test]
    fn same_size_same_mtime_rewrites_renames_and_deletions_are_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, "a").unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let watch = FileWatch::new(&path);
        let set_mtime = |p: &Path| std::fs::File::options().write(true).open(p).unwrap().set_modified(mtime).unwrap();

        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, "b").unwrap();
        set_mtime(&path);
        watch.recheck_now();
        assert!(watch.changed(), "rewritten in place, mtime put back");

        let tmp = dir.path().join("f.toml.tmp");
        std::fs::write(&tmp, "c").unwrap();
        set_mtime(&tmp);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::rename(&tmp, &path).unwrap();
        watch.recheck_now();
        assert!(watch.changed(), "atomically replaced");

        std::fs::remove_file(&path).unwrap();
        watch.recheck_now();
        assert!(watch.changed(), "deleted");
        watch.recheck_now();
        assert!(!watch.changed(), "still deleted: no new change");
        std::fs::write(&path, "c").unwrap();
        watch.recheck_now();
        assert!(watch.changed(), "back");
    }
}
