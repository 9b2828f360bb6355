//! The data directory's check at start, before the broker is contacted or any partition is
//! opened: it exists (or is created, one level only, inside a directory that exists), it is a
//! directory, and this process can create files in it.
//!
//! Why one level only: a data directory that is missing because of a typo or a volume that was
//! not mounted must not be taken for a new, empty ledger, which would start every tenant's log
//! again from seq 0 beside the real ones. Why a probe file rather than permission bits: root
//! ignores the bits, and a read-only mount, a full inode table or an ACL all show up as the one
//! thing that matters, a create that fails. The probe is removed at once, so a failed start
//! leaves the directory as it was.

use std::path::Path;

use crate::error::{Error, Result};

/// The probe's name; a crash between its creation and removal leaves an empty file that the next
/// start removes.
const PROBE: &str = ".tally-write-check";

/// Checks (and when allowed, creates) `dir`, the `ledger.data_dir`. Errors name the key and
/// the path.
pub(crate) fn prepare(dir: &Path) -> Result<()> {
    let bad = |detail: String| Error::BadKey(format!("ledger.data_dir = {:?}: {detail}", dir.display().to_string()));
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(bad("not a directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(bad(format!(
                    "it does not exist, nor does {:?}; the ledger creates its data directory only inside an existing one, so that a typo or an \
                     unmounted volume is not taken for a new, empty ledger",
                    parent.display().to_string()
                )));
            }
            std::fs::create_dir(dir).map_err(|e| bad(format!("cannot create it: {e}")))?;
            tracing::info!(data_dir = %dir.display(), "created the data directory");
        }
        Err(e) => return Err(bad(format!("cannot read it: {e}"))),
    }
    let probe = dir.join(PROBE);
    std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&probe).map_err(|e| bad(format!("cannot create files in it: {e}")))?;
    std::fs::remove_file(&probe).map_err(|e| bad(format!("cannot remove {PROBE} from it: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_directory_is_created_only_inside_an_existing_one() {
        let root = tempfile::tempdir().unwrap();
        let fresh = root.path().join("data");
        prepare(&fresh).unwrap();
        assert!(fresh.is_dir());
        assert_eq!(std::fs::read_dir(&fresh).unwrap().count(), 0, "the probe is gone");
        prepare(&fresh).unwrap();

        let deep = root.path().join("not-mounted").join("data");
        let err = prepare(&deep).unwrap_err().to_string();
        assert!(err.contains("ledger.data_dir") && err.contains("not-mounted") && err.contains("does not exist"), "{err}");
        assert!(!root.path().join("not-mounted").exists(), "nothing is created");
    }

    #[test]
    fn a_file_in_its_place_is_named() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("data");
        std::fs::write(&file, b"x").unwrap();
        let err = prepare(&file).unwrap_err().to_string();
        assert!(err.contains("not a directory") && err.contains("data"), "{err}");
    }
}
