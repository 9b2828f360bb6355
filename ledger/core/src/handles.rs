//! A small cache of read-only file handles, so that reading a journal does not cost an `open`
//! per frame: a proof or a tile reads dozens of frames from a few segments and indexes, and a
//! partition's open reads a few frames of every tenant.
//!
//! Invariant: it holds at most [`HandleCache::CAPACITY`] descriptors, whatever the number of
//! segments or tenants; the least recently used handle is closed first. Only immutable files (or
//! files only ever appended to, read below what is committed) may be cached: a file replaced
//! under its name would still be read through the old handle.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{Error, Result};

#[derive(Default)]
pub(crate) struct HandleCache {
    /// Most recently used last; keyed by the file's journal position.
    open: Mutex<Vec<(u64, Arc<File>)>>,
}

impl HandleCache {
    /// Descriptors kept open at most.
    pub const CAPACITY: usize = 8;

    /// The handle of the file at `path`, known as `key`, opening it if it is not cached.
    pub fn get(&self, key: u64, path: &Path) -> Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = open.iter().position(|(k, _)| *k == key) {
            let entry = open.remove(i);
            let file = Arc::clone(&entry.1);
            open.push(entry);
            return Ok(file);
        }
        let file = Arc::new(File::open(path).map_err(|e| Error::io(path, e))?);
        if open.len() >= Self::CAPACITY {
            open.remove(0);
        }
        open.push((key, Arc::clone(&file)));
        Ok(file)
    }

    /// Forgets the handle of `key` (its file is about to be replaced).
    pub fn forget(&self, key: u64) {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).retain(|(k, _)| *k != key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_capacity_handles_stay_open_and_the_least_recent_goes_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = HandleCache::default();
        let paths: Vec<_> = (0..20u64).map(|i| dir.path().join(format!("{i}"))).collect();
        for p in &paths {
            std::fs::write(p, b"x").unwrap();
        }
        let first = cache.get(0, &paths[0]).unwrap();
        for (i, p) in paths.iter().enumerate().skip(1) {
            cache.get(i as u64, p).unwrap();
            cache.get(0, &paths[0]).unwrap();
        }
        let open = cache.open.lock().unwrap();
        assert_eq!(open.len(), HandleCache::CAPACITY);
        assert!(Arc::ptr_eq(&open.last().unwrap().1, &first), "the one used all along is still the same handle");
        drop(open);
        cache.forget(0);
        assert!(!Arc::ptr_eq(&cache.get(0, &paths[0]).unwrap(), &first));
    }
}
