//! Durable whole-file replacement: the one way Tally replaces a small file (a log head, a
//! checkpoint, a watermark, a pinned partition count, an owner note, a subject key shard) so that
//! after a crash or a power loss the path holds either the old bytes or the new bytes, never a
//! mix, an empty file or nothing. Secrets ([`replace_secret_file`]) are mode 0600 from the
//! temporary's first byte.
//!
//! The steps are the classic ones: write a hidden temporary file beside the target, `fsync` it,
//! `rename` it over the target, `fsync` the directory (the rename is a directory change and is
//! only durable once the directory is). The temporary name carries a random suffix, so two
//! processes that share a volume (two containers are both pid 1) never write the same temporary.
//! A crash can leave a `.<name>.<hex>.tmp` behind; [`is_temporary`] recognises them for sweeps.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Replaces `path` with the bytes `write` produces, durably (see the module docs). The parent
/// directory must exist; use [`create_dir_durably`] first when it may not.
pub fn replace_file_with(path: &Path, write: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    replace_with_mode(path, 0o644, write)
}

/// [`replace_file`] for a secret (keys): the file, and its temporary from the start, are readable
/// and writable by the owner only (mode 0600).
pub fn replace_secret_file(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_with_mode(path, 0o600, |f| f.write_all(bytes))
}

fn replace_with_mode(path: &Path, mode: u32, write: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = parent(path)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        write(&mut file)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    sync_dir(dir)
}

/// Replaces `path` with `bytes`, durably.
pub fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_file_with(path, |f| f.write_all(bytes))
}

/// Whether `name` is a temporary file [`replace_file`] writes (left behind only by a crash).
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Deletes the temporaries a crash left in `dir` (not its subdirectories); returns how many.
/// Only for a directory whose writer is the caller: a live writer's temporary would vanish.
pub fn remove_temporaries(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for e in entries.flatten() {
        if e.file_name().to_str().is_some_and(is_temporary) && e.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(e.path()).map_err(|err| Error::io(&e.path(), err))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// `fsync`s a directory, making the renames and creations inside it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

/// `create_dir_all`, then `fsync`s the parent of every directory it created, so a new directory
/// survives a power loss along with the files later written into it.
pub fn create_dir_durably(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut d = Some(dir);
    while let Some(p) = d.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(p.to_path_buf());
        d = p.parent();
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for created in missing.iter().rev() {
        if let Some(parent) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

fn parent(path: &Path) -> Result<&Path> {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Ok(Path::new(".")),
        Some(p) => Ok(p),
        None => Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::InvalidInput, "a file to replace needs a parent directory"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("head");
        replace_file(&path, b"one").unwrap();
        replace_file(&path, b"two, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two, longer");
        let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, ["head"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_bytes_and_removes_its_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint");
        replace_file(&path, b"old").unwrap();
        let err = replace_file_with(&path, |f| {
            f.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn creates_missing_directories_and_recognises_its_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        create_dir_durably(&deep).unwrap();
        replace_file(&deep.join("x"), b"1").unwrap();
        assert_eq!(std::fs::read(deep.join("x")).unwrap(), b"1");
        assert!(is_temporary(".watermark.json.00000000deadbeef.tmp"));
        assert!(!is_temporary("watermark.json"));
    }

    #[test]
    fn temporaries_left_by_a_crash_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".head.0123456789abcdef.tmp"), b"half").unwrap();
        std::fs::write(dir.path().join("head"), b"whole").unwrap();
        std::fs::create_dir(dir.path().join(".sub.tmp")).unwrap();
        assert_eq!(remove_temporaries(dir.path()).unwrap(), 1);
        let mut names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, [".sub.tmp", "head"]);
        assert_eq!(remove_temporaries(&dir.path().join("absent")).unwrap(), 0);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = replace_file(&dir.path().join("nope/file"), b"x").unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
