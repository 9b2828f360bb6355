//! The projection's files on disk, shared by the ledger (writer) and the query service (reader).
//!
//! ```text
//! <root>/events/partition=<p>/date=<YYYY-MM-DD>/<first>-<last>-<rows>.parquet   record rows
//! <root>/events/partition=<p>/_projection.json                                  the watermark
//! <root>/rollups/partition=<p>/month=<YYYY-MM>/<first>-<last>-<rows>.parquet    15-minute sums
//! <root>/daily/partition=<p>/month=<YYYY-MM>/<first>-<last>-<rows>.parquet      daily sums per zone
//! <root>/billing/partition=<p>/month=<YYYY-MM>/<first>-<last>-<rows>.parquet    billing lines
//! <root>/tenants/partition=<p>/<first>-<last>-<rows>.parquet                    tenant states
//! <root>/statements/partition=<p>/<first>-<last>-<rows>.parquet                 statements
//! ```
//!
//! `<p>` is a *unit*: the ledger directory of one Kafka partition (`<topic>-<n>`), whose tenants
//! share every file. A flush writes one file per directory it touches for all the tenants it
//! projects, rows sorted by tenant then seq, so the number of files grows with partitions and
//! time, never with tenants. `first`/`last` are the range of flush numbers (the unit's flushes
//! are numbered 0, 1, 2, …) a file holds, not seqs. Invariants the readers and the recovery rely
//! on:
//! * A file appears under its final name only complete: it is written as a hidden `.tmp` file,
//!   synced, then renamed; its directory is synced.
//! * `_projection.json` says every flush below `next_flush` has all its files on disk; it is
//!   replaced only after a flush's files are all in place. Files with `first >= next_flush` are
//!   leftovers of an unfinished flush and are deleted on recovery (the flush is redone).
//! * Readers ([`list_files`]) see only files below the watermark. A tenant's state (how far its
//!   rows reach, its checkpoint) is the row of the newest visible `tenants` file naming it.
//! * Within one directory, flush ranges are disjoint; a merge replaces a contiguous run of files
//!   by one whose range covers exactly theirs. A file covered by another is redundant: readers
//!   skip it, and it is deleted only [`REPLACED_FILE_GRACE`] after the merge, so a query that
//!   listed it before the merge never finds it gone.
//! * A file may be rewritten under its own name with the same rows re-derived from the log (an
//!   erasure): an atomic replace, so a reader that opens it sees the old file or the new one,
//!   whole. A query that listed it before may fail reading it (its offsets are the old file's).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which tree a file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tree {
    /// One row per record, in `date=` directories.
    Events,
    /// Cost sums per 15-minute UTC bucket, in `month=` directories.
    Rollups,
    /// Cost sums per local day in each report zone, in `month=` directories (local month).
    Daily,
    /// What the spend export bills: sums per tenant and billing line, in `month=` directories
    /// (UTC month).
    Billing,
    /// Each tenant's state after a flush (watermark, checkpoint), in the unit's directory.
    Tenants,
    /// `statement` records, whole, in the unit's directory.
    Statements,
}

impl Tree {
    /// Every tree, in the order a flush writes them.
    pub const ALL: [Tree; 6] = [Tree::Events, Tree::Rollups, Tree::Daily, Tree::Billing, Tree::Statements, Tree::Tenants];
}

impl Tree {
    fn dir_name(self) -> &'static str {
        match self {
            Tree::Events => "events",
            Tree::Rollups => "rollups",
            Tree::Daily => "daily",
            Tree::Billing => "billing",
            Tree::Tenants => "tenants",
            Tree::Statements => "statements",
        }
    }

    /// The hive key of its subdirectories; none for the trees whose files sit in the unit's
    /// directory itself.
    fn partition_key(self) -> Option<&'static str> {
        match self {
            Tree::Events => Some("date="),
            Tree::Rollups | Tree::Daily | Tree::Billing => Some("month="),
            Tree::Tenants | Tree::Statements => None,
        }
    }
}

/// One visible projection file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionFile {
    pub path: PathBuf,
    /// The hive value of its directory: `YYYY-MM-DD` (events), `YYYY-MM` (roll-ups) or empty.
    pub partition: String,
    /// The range of flush numbers it holds.
    pub first: u64,
    pub last: u64,
    pub rows: u64,
}

/// Whether `unit` can name a unit directory: a ledger directory name (`<topic>-<n>`), ASCII
/// letters, digits, `.`, `_` and `-`, not starting with a dot.
pub fn valid_unit(unit: &str) -> bool {
    !unit.is_empty() && unit.len() <= 255 && !unit.starts_with('.') && unit.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `<root>/<tree>/partition=<unit>`.
pub fn unit_dir(root: &Path, tree: Tree, unit: &str) -> PathBuf {
    root.join(tree.dir_name()).join(format!("partition={unit}"))
}

/// `<root>/<tree>/partition=<unit>/<date|month>=<value>` (the unit's directory itself for the
/// trees without subdirectories).
pub fn partition_dir(root: &Path, tree: Tree, unit: &str, value: &str) -> PathBuf {
    match tree.partition_key() {
        Some(key) => unit_dir(root, tree, unit).join(format!("{key}{value}")),
        None => unit_dir(root, tree, unit),
    }
}

pub(crate) fn file_name(first: u64, last: u64, rows: u64) -> String {
    format!("{first:020}-{last:020}-{rows}.parquet")
}

fn parse_file_name(name: &str) -> Option<(u64, u64, u64)> {
    let stem = name.strip_suffix(".parquet")?;
    let mut parts = stem.split('-');
    let first = parts.next()?.parse().ok()?;
    let last = parts.next()?.parse().ok()?;
    let rows = parts.next()?.parse().ok()?;
    (parts.next().is_none() && first <= last).then_some((first, last, rows))
}

/// The (UTF-8) names in a directory; none if it does not exist.
fn names_in(dir: &Path) -> Result<Vec<String>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Units that have a projection under `root`, sorted.
pub fn projected_units(root: &Path) -> Result<Vec<String>> {
    let mut out: Vec<String> = names_in(&root.join(Tree::Events.dir_name()))?
        .into_iter()
        .filter_map(|name| name.strip_prefix("partition=").map(str::to_string))
        .filter(|u| valid_unit(u))
        .collect();
    out.sort();
    Ok(out)
}

/// Partition values (dates or months) of a unit's tree, sorted; `[""]` for the trees without
/// subdirectories.
pub fn partitions(root: &Path, tree: Tree, unit: &str) -> Result<Vec<String>> {
    let Some(key) = tree.partition_key() else { return Ok(vec![String::new()]) };
    let mut out: Vec<String> = names_in(&unit_dir(root, tree, unit))?.into_iter().filter_map(|name| name.strip_prefix(key).map(str::to_string)).collect();
    out.sort();
    Ok(out)
}

/// Every complete file of one directory, sorted by range; redundant ones included.
fn dir_files(dir: &Path, partition: &str) -> Result<Vec<ProjectionFile>> {
    let mut out: Vec<ProjectionFile> = names_in(dir)?
        .into_iter()
        .filter_map(|name| {
            let (first, last, rows) = parse_file_name(&name)?;
            Some(ProjectionFile { path: dir.join(&name), partition: partition.to_string(), first, last, rows })
        })
        .collect();
    out.sort_by_key(|f| (f.first, std::cmp::Reverse(f.last)));
    Ok(out)
}

/// Every complete file of one directory of a unit's tree, redundant ones included.
pub(crate) fn all_files(root: &Path, tree: Tree, unit: &str, value: &str) -> Result<Vec<ProjectionFile>> {
    dir_files(&partition_dir(root, tree, unit, value), value)
}

/// Splits a directory's files into the visible ones and the redundant ones (covered by another).
fn split_redundant(files: Vec<ProjectionFile>) -> (Vec<ProjectionFile>, Vec<ProjectionFile>) {
    // Sorted by first ascending, widest first: a file is covered iff an earlier kept file
    // reaches at least as far.
    let mut keep: Vec<ProjectionFile> = Vec::with_capacity(files.len());
    let mut redundant = Vec::new();
    for f in files {
        match keep.last() {
            Some(k) if k.last >= f.last => redundant.push(f),
            _ => keep.push(f),
        }
    }
    (keep, redundant)
}

/// The visible files of one unit's tree whose partition value passes `wanted`, sorted by
/// partition then range.
pub fn list_files(root: &Path, tree: Tree, unit: &str, wanted: impl Fn(&str) -> bool) -> Result<Vec<ProjectionFile>> {
    // Files of a flush appear before its watermark; until then (or forever, if the flush was cut
    // short by a crash) they are not part of the projection.
    let next_flush = read_unit_mark(root, unit)?.next_flush;
    list_files_below(root, tree, unit, next_flush, wanted)
}

/// As [`list_files`], with the watermark given.
pub(crate) fn list_files_below(root: &Path, tree: Tree, unit: &str, next_flush: u64, wanted: impl Fn(&str) -> bool) -> Result<Vec<ProjectionFile>> {
    let mut out = Vec::new();
    for value in partitions(root, tree, unit)?.into_iter().filter(|v| wanted(v)) {
        let (keep, _) = split_redundant(dir_files(&partition_dir(root, tree, unit, &value), &value)?);
        out.extend(keep.into_iter().filter(|f| f.first < next_flush));
    }
    Ok(out)
}

/// How long a file replaced by a merge stays on disk: longer than any query may run, so a query
/// that listed it before the merge can still read it. Readers skip it from the merge on.
pub const REPLACED_FILE_GRACE: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Deletes the files of a directory that a merge replaced more than `grace` ago (by the merged
/// file's age). Returns how many.
pub(crate) fn sweep_replaced(dir: &Path, partition: &str, grace: std::time::Duration) -> Result<usize> {
    let files = dir_files(dir, partition)?;
    let mut removed = 0;
    let mut cover: Option<&ProjectionFile> = None;
    for f in &files {
        match cover {
            Some(c) if c.last >= f.last => {
                let age = std::fs::metadata(&c.path).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                if age.is_some_and(|a| a >= grace) {
                    remove(&f.path)?;
                    removed += 1;
                }
            }
            _ => cover = Some(f),
        }
    }
    Ok(removed)
}

/// `_projection.json`: how many of the unit's flushes are complete.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitMark {
    /// Every flush below it has all its files on disk; files of later flushes are not part of
    /// the projection.
    pub next_flush: u64,
}

fn unit_mark_path(root: &Path, unit: &str) -> PathBuf {
    unit_dir(root, Tree::Events, unit).join("_projection.json")
}

/// The unit's watermark (zero when nothing was ever projected).
pub fn read_unit_mark(root: &Path, unit: &str) -> Result<UnitMark> {
    let path = unit_mark_path(root, unit);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt { path: path.display().to_string(), detail: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(UnitMark::default()),
        Err(e) => Err(Error::io(&path, e)),
    }
}

pub(crate) fn write_unit_mark(root: &Path, unit: &str, mark: &UnitMark) -> Result<()> {
    let bytes = serde_json::to_vec(mark).map_err(|e| Error::Projection(e.to_string()))?;
    write_atomically(&unit_mark_path(root, unit), |file| {
        use std::io::Write;
        file.write_all(&bytes)
    })
}

/// A tenant's state in the projection: how far its rows reach, the signed checkpoint (C2SP note)
/// of its log at exactly that size, and which report zones its daily roll-ups cover. Kept as a
/// row of the unit's `tenants` tree, written by every flush that projects the tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub next_seq: u64,
    pub checkpoint: Option<String>,
    /// Report zones with daily roll-ups, each with the first seq they cover: a zone's daily
    /// roll-ups are complete only if that is 0 (a zone added later is filled by a rebuild).
    pub daily_zones: std::collections::BTreeMap<String, u64>,
    /// Whether the `statements` tree holds every `statement` record below `next_seq`: always
    /// true in this layout, which keeps them from the tenant's first flush.
    pub statements: bool,
}

/// A `statement` record the projection holds for billing readers: its seq and its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectedStatement {
    pub seq: u64,
    pub statement: tally_log::Statement,
}

/// Writes `path` durably (tally-log's one replace helper), creating its directory durably first.
pub(crate) fn write_atomically(path: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    let dir = path.parent().ok_or_else(|| Error::Projection(format!("{} has no parent directory", path.display())))?;
    tally_log::durable::create_dir_durably(dir)?;
    Ok(tally_log::durable::replace_file_with(path, write)?)
}

/// Deletes what a crash can leave in a unit's trees: temporary files, files of a flush that did
/// not finish (`first >= next_flush`) and files made redundant by a merge past the grace.
/// Returns how many.
pub(crate) fn recover_unit(root: &Path, unit: &str, next_flush: u64) -> Result<usize> {
    let mut removed = 0;
    for tree in Tree::ALL {
        // The watermark's temporary lives in the unit's directory itself.
        removed += tally_log::durable::remove_temporaries(&unit_dir(root, tree, unit))?;
        for value in partitions(root, tree, unit)? {
            let dir = partition_dir(root, tree, unit, &value);
            if tree.partition_key().is_some() {
                removed += tally_log::durable::remove_temporaries(&dir)?;
            }
            // Files of an unfinished flush were never visible to readers: delete them now.
            // Files a merge replaced may still be read by a query that listed them before.
            let (keep, _) = split_redundant(dir_files(&dir, &value)?);
            for f in keep.iter().filter(|f| f.first >= next_flush) {
                remove(&f.path)?;
                removed += 1;
            }
            removed += sweep_replaced(&dir, &value, REPLACED_FILE_GRACE)?;
        }
    }
    Ok(removed)
}

/// Deletes a unit's whole projection (every tree and the watermark), for a rebuild.
pub(crate) fn remove_unit(root: &Path, unit: &str) -> Result<()> {
    // The watermark goes first: a crash midway leaves files that recovery deletes.
    remove(&unit_mark_path(root, unit))?;
    for tree in Tree::ALL {
        let dir = unit_dir(root, tree, unit);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&dir, e)),
        }
    }
    Ok(())
}

pub(crate) fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Files a merge should replace in `dir`: the longest run at the end (by range) of files of one
/// size tier (powers of 8 rows) below `max_rows`, when it is at least `min_files` long. Size
/// tiers keep the rewrite cost per row logarithmic; taking only a trailing run keeps every
/// merged range free of other files' rows.
pub(crate) fn merge_candidates(root: &Path, tree: Tree, unit: &str, value: &str, min_files: usize, max_rows: u64) -> Result<Vec<ProjectionFile>> {
    let (files, _) = split_redundant(dir_files(&partition_dir(root, tree, unit, value), value)?);
    let tier = |rows: u64| (64 - rows.max(1).leading_zeros()) / 3;
    let Some(last) = files.last() else { return Ok(Vec::new()) };
    let t = tier(last.rows);
    let run: Vec<ProjectionFile> = files.iter().rev().take_while(|f| tier(f.rows) == t && f.rows < max_rows).cloned().collect();
    if run.len() < min_files {
        return Ok(Vec::new());
    }
    let mut run: Vec<ProjectionFile> = run.into_iter().rev().collect();
    // Never grow a file past max_rows: keep the newest files that fit.
    while run.len() > 1 && run.iter().map(|f| f.rows).sum::<u64>() > max_rows {
        run.remove(0);
    }
    Ok(if run.len() >= 2 { run } else { Vec::new() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, first: u64, last: u64, rows: u64) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(file_name(first, last, rows)), b"x").unwrap();
    }

    #[test]
    fn names_round_trip_and_junk_is_not_a_file() {
        assert_eq!(parse_file_name(&file_name(3, 9, 4)), Some((3, 9, 4)));
        for junk in ["x.parquet", "1-2.parquet", "9-3-1.parquet", ".1-2-3.parquet.tmp", "1-2-3-4.parquet"] {
            assert_eq!(parse_file_name(junk), None, "{junk}");
        }
    }

    #[test]
    fn unit_names_are_plain_directory_names() {
        for good in ["tally.events-0", "a", "topic_x-12"] {
            assert!(valid_unit(good), "{good}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a\\b", "a b", "a=b", "é"] {
            assert!(!valid_unit(bad), "{bad}");
        }
    }

    #[test]
    fn covered_files_are_invisible_and_recovery_deletes_them_and_unfinished_flushes() {
        let root = tempfile::tempdir().unwrap();
        let dir = partition_dir(root.path(), Tree::Events, "t-0", "2026-11-01");
        touch(&dir, 0, 9, 5);
        touch(&dir, 10, 19, 5);
        touch(&dir, 0, 19, 10); // a merge whose inputs were not yet deleted
        touch(&dir, 20, 29, 3); // a flush the watermark does not cover
        std::fs::write(dir.join(".00-tmp.parquet.tmp"), b"half").unwrap();
        // A watermark replace cut short by a crash leaves its temporary in the unit's directory.
        let watermark_tmp = unit_dir(root.path(), Tree::Events, "t-0").join("._projection.json.0123456789abcdef.tmp");
        std::fs::write(&watermark_tmp, b"{").unwrap();
        // The trees without subdirectories hold their files in the unit's directory.
        let tenants = partition_dir(root.path(), Tree::Tenants, "t-0", "");
        touch(&tenants, 0, 19, 2);
        touch(&tenants, 20, 20, 1);
        // Without a watermark, nothing is visible yet.
        assert!(list_files(root.path(), Tree::Events, "t-0", |_| true).unwrap().is_empty());
        write_unit_mark(root.path(), "t-0", &UnitMark { next_flush: 20 }).unwrap();
        let visible = list_files(root.path(), Tree::Events, "t-0", |_| true).unwrap();
        assert_eq!(visible.iter().map(|f| (f.first, f.last)).collect::<Vec<_>>(), vec![(0, 19)], "the unfinished flush 20-29 is not visible");
        let visible = list_files(root.path(), Tree::Tenants, "t-0", |_| true).unwrap();
        assert_eq!(visible.iter().map(|f| (f.first, f.last)).collect::<Vec<_>>(), vec![(0, 19)]);
        // Recovery deletes the unfinished flushes and the temporary files at once, the replaced
        // files only once the merge is older than the grace period.
        assert_eq!(recover_unit(root.path(), "t-0", 20).unwrap(), 4);
        assert!(!watermark_tmp.exists());
        let names = |dir: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            v.sort();
            v
        };
        assert_eq!(names(&dir).len(), 3);
        assert_eq!(names(&tenants), vec![file_name(0, 19, 2)]);
        assert_eq!(sweep_replaced(&dir, "2026-11-01", std::time::Duration::ZERO).unwrap(), 2);
        assert_eq!(names(&dir), vec![file_name(0, 19, 10)]);
    }

    #[test]
    fn merges_take_a_trailing_run_of_one_tier() {
        let root = tempfile::tempdir().unwrap();
        let dir = partition_dir(root.path(), Tree::Rollups, "t-0", "2026-11");
        touch(&dir, 0, 99, 5000);
        for i in 0..7 {
            touch(&dir, 100 + i * 10, 109 + i * 10, 3);
        }
        assert!(merge_candidates(root.path(), Tree::Rollups, "t-0", "2026-11", 8, 1 << 20).unwrap().is_empty());
        touch(&dir, 170, 179, 2);
        let run = merge_candidates(root.path(), Tree::Rollups, "t-0", "2026-11", 8, 1 << 20).unwrap();
        assert_eq!((run.len(), run[0].first, run[7].last), (8, 100, 179));
    }

    #[test]
    fn unit_marks_round_trip_and_default_to_zero() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(read_unit_mark(root.path(), "t-0").unwrap(), UnitMark::default());
        write_unit_mark(root.path(), "t-0", &UnitMark { next_flush: 7 }).unwrap();
        assert_eq!(read_unit_mark(root.path(), "t-0").unwrap(), UnitMark { next_flush: 7 });
        assert_eq!(projected_units(root.path()).unwrap(), vec!["t-0".to_string()]);
    }
}
