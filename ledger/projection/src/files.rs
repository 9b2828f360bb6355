//! The projection's files on disk, shared by the ledger (writer) and the query service (reader).
//!
//! ```text
//! <root>/events/tenant_id=<t>/date=<YYYY-MM-DD>/<first>-<last>-<rows>.parquet   record rows
//! <root>/events/tenant_id=<t>/_projection.json                                  watermark
//! <root>/events/tenant_id=<t>/_statements.json                                  its statements
//! <root>/rollups/tenant_id=<t>/month=<YYYY-MM>/<first>-<last>-<rows>.parquet    15-minute sums
//! <root>/daily/tenant_id=<t>/month=<YYYY-MM>/<first>-<last>-<rows>.parquet      daily sums per zone
//! ```
//!
//! `first`/`last` are the seq range of the flush (or merged flushes) a file came from, not of its
//! own rows: one flush writes one file per date it touches, all named with the flush's range.
//! Invariants the readers and the recovery rely on:
//! * A file appears under its final name only complete: it is written as a hidden `.tmp` file,
//!   synced, then renamed; its directory is synced.
//! * `_projection.json` says every record below `next_seq` has its rows on disk; it is replaced
//!   only after a flush's files are all in place. Files with `first >= next_seq` are leftovers of
//!   an unfinished flush and are deleted on recovery (the flush is redone identically).
//! * Readers ([`list_files`], [`read_statements`]) see only files and statements below the
//!   watermark.
//! * Within one directory, flush ranges are disjoint; a merge replaces a contiguous run of files
//!   by one whose range covers exactly theirs. A file covered by another is redundant: readers
//!   skip it, and it is deleted only [`REPLACED_FILE_GRACE`] after the merge, so a query that
//!   listed it before the merge never finds it gone.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which of the two trees a file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    /// One row per record, in `date=` directories.
    Events,
    /// Cost sums per 15-minute UTC bucket, in `month=` directories.
    Rollups,
    /// Cost sums per local day in each report zone, in `month=` directories (local month).
    Daily,
}

impl Tree {
    /// Every tree, in the order a flush writes them.
    pub const ALL: [Tree; 3] = [Tree::Events, Tree::Rollups, Tree::Daily];
}

impl Tree {
    fn dir_name(self) -> &'static str {
        match self {
            Tree::Events => "events",
            Tree::Rollups => "rollups",
            Tree::Daily => "daily",
        }
    }

    fn partition_key(self) -> &'static str {
        match self {
            Tree::Events => "date=",
            Tree::Rollups | Tree::Daily => "month=",
        }
    }
}

/// One visible projection file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionFile {
    pub path: PathBuf,
    /// The hive value of its directory: `YYYY-MM-DD` (events) or `YYYY-MM` (roll-ups).
    pub partition: String,
    pub first: u64,
    pub last: u64,
    pub rows: u64,
}

/// `<root>/<tree>/tenant_id=<t>`.
pub fn tenant_dir(root: &Path, tree: Tree, tenant: &str) -> PathBuf {
    root.join(tree.dir_name()).join(format!("tenant_id={tenant}"))
}

/// `<root>/<tree>/tenant_id=<t>/<date|month>=<value>`.
pub fn partition_dir(root: &Path, tree: Tree, tenant: &str, value: &str) -> PathBuf {
    tenant_dir(root, tree, tenant).join(format!("{}{value}", tree.partition_key()))
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

/// Tenants that have a projection under `root`, sorted.
pub fn projected_tenants(root: &Path) -> Result<Vec<String>> {
    let mut out: Vec<String> = names_in(&root.join(Tree::Events.dir_name()))?
        .into_iter()
        .filter_map(|name| name.strip_prefix("tenant_id=").map(str::to_string))
        .filter(|t| tally_schemas::validate_tenant_id(t).is_ok())
        .collect();
    out.sort();
    Ok(out)
}

/// Partition values (dates or months) of a tenant's tree, sorted.
pub fn partitions(root: &Path, tree: Tree, tenant: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> =
        names_in(&tenant_dir(root, tree, tenant))?.into_iter().filter_map(|name| name.strip_prefix(tree.partition_key()).map(str::to_string)).collect();
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

/// The visible files of one tenant's tree whose partition value passes `wanted`, sorted by
/// partition then range.
pub fn list_files(root: &Path, tree: Tree, tenant: &str, wanted: impl Fn(&str) -> bool) -> Result<Vec<ProjectionFile>> {
    // Files of a flush appear before its watermark; until then (or forever, if the flush was cut
    // short by a crash) they are not part of the projection.
    let next_seq = read_watermark(root, tenant)?.next_seq;
    let mut out = Vec::new();
    for value in partitions(root, tree, tenant)?.into_iter().filter(|v| wanted(v)) {
        let (keep, _) = split_redundant(dir_files(&partition_dir(root, tree, tenant, &value), &value)?);
        out.extend(keep.into_iter().filter(|f| f.first < next_seq));
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

/// `_projection.json`: how far the tenant's projection is complete, and the signed checkpoint
/// (C2SP note) of the log at exactly that size, if the flush reached the log's end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watermark {
    pub next_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Report zones with daily roll-ups, each with the first seq they cover: a zone's daily
    /// roll-ups are complete only if that is 0 (a zone added later is filled by a rebuild).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub daily_zones: std::collections::BTreeMap<String, u64>,
    /// Whether `_statements.json` holds every `statement` record below `next_seq`: true for a
    /// projection started (or rebuilt) by a version that keeps them, false for an older one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub statements: bool,
}

fn watermark_path(root: &Path, tenant: &str) -> PathBuf {
    tenant_dir(root, Tree::Events, tenant).join("_projection.json")
}

/// The tenant's watermark (zero when it has never been projected).
pub fn read_watermark(root: &Path, tenant: &str) -> Result<Watermark> {
    let path = watermark_path(root, tenant);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt { path: path.display().to_string(), detail: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Watermark::default()),
        Err(e) => Err(Error::io(&path, e)),
    }
}

pub(crate) fn write_watermark(root: &Path, tenant: &str, mark: &Watermark) -> Result<()> {
    let bytes = serde_json::to_vec(mark).map_err(|e| Error::Projection(e.to_string()))?;
    write_atomically(&watermark_path(root, tenant), |file| {
        use std::io::Write;
        file.write_all(&bytes)
    })
}

/// A `statement` record the projection holds for billing readers: its seq and its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectedStatement {
    pub seq: u64,
    pub statement: tally_log::Statement,
}

fn statements_path(root: &Path, tenant: &str) -> PathBuf {
    tenant_dir(root, Tree::Events, tenant).join("_statements.json")
}

/// The tenant's statements below seq `below` (its watermark's `next_seq`: one a crash left past
/// the watermark is not yet projected), in seq order.
pub fn read_statements(root: &Path, tenant: &str, below: u64) -> Result<Vec<ProjectedStatement>> {
    let path = statements_path(root, tenant);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let all: Vec<ProjectedStatement> =
                serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt { path: path.display().to_string(), detail: e.to_string() })?;
            Ok(all.into_iter().filter(|s| s.seq < below).collect())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Adds `new`, the statements of a flush from seq `first`, to the tenant's statements file. What
/// the file holds from `first` on is left over from a flush that did not finish (or from a log
/// since replaced), and is dropped. Written once a billing period, so rewritten whole.
pub(crate) fn add_statements(root: &Path, tenant: &str, first: u64, new: Vec<ProjectedStatement>) -> Result<()> {
    if new.is_empty() {
        return Ok(());
    }
    let mut all: std::collections::BTreeMap<u64, ProjectedStatement> = read_statements(root, tenant, first)?.into_iter().map(|s| (s.seq, s)).collect();
    all.extend(new.into_iter().map(|s| (s.seq, s)));
    let bytes = serde_json::to_vec(&all.into_values().collect::<Vec<_>>()).map_err(|e| Error::Projection(e.to_string()))?;
    write_atomically(&statements_path(root, tenant), |file| {
        use std::io::Write;
        file.write_all(&bytes)
    })
}

/// Writes `path` durably (tally-log's one replace helper), creating its directory durably first.
pub(crate) fn write_atomically(path: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    let dir = path.parent().ok_or_else(|| Error::Projection(format!("{} has no parent directory", path.display())))?;
    tally_log::durable::create_dir_durably(dir)?;
    Ok(tally_log::durable::replace_file_with(path, write)?)
}

/// Deletes what a crash can leave in a tenant's trees: temporary files, files of a flush that
/// did not finish (`first >= next_seq`) and files made redundant by a merge. Returns how many.
pub(crate) fn recover_tenant(root: &Path, tenant: &str, next_seq: u64) -> Result<usize> {
    let mut removed = 0;
    for tree in Tree::ALL {
        // The watermark's temporary lives in the tenant's directory itself.
        removed += tally_log::durable::remove_temporaries(&tenant_dir(root, tree, tenant))?;
        for value in partitions(root, tree, tenant)? {
            let dir = partition_dir(root, tree, tenant, &value);
            for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?.flatten() {
                if entry.file_name().to_str().is_some_and(tally_log::durable::is_temporary) {
                    remove(&entry.path())?;
                    removed += 1;
                }
            }
            // Files of an unfinished flush were never visible to readers: delete them now.
            // Files a merge replaced may still be read by a query that listed them before.
            let (keep, _) = split_redundant(dir_files(&dir, &value)?);
            for f in keep.iter().filter(|f| f.first >= next_seq) {
                remove(&f.path)?;
                removed += 1;
            }
            removed += sweep_replaced(&dir, &value, REPLACED_FILE_GRACE)?;
        }
    }
    Ok(removed)
}

/// Deletes a tenant's whole projection (both trees and the watermark), for a rebuild.
pub(crate) fn remove_tenant(root: &Path, tenant: &str) -> Result<()> {
    // The watermark goes first: a crash midway leaves files that recovery deletes.
    remove(&watermark_path(root, tenant))?;
    for tree in Tree::ALL {
        let dir = tenant_dir(root, tree, tenant);
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
pub(crate) fn merge_candidates(root: &Path, tree: Tree, tenant: &str, value: &str, min_files: usize, max_rows: u64) -> Result<Vec<ProjectionFile>> {
    let (files, _) = split_redundant(dir_files(&partition_dir(root, tree, tenant, value), value)?);
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
    fn covered_files_are_invisible_and_recovery_deletes_them_and_unfinished_flushes() {
        let root = tempfile::tempdir().unwrap();
        let dir = partition_dir(root.path(), Tree::Events, "acme", "2026-11-01");
        touch(&dir, 0, 9, 5);
        touch(&dir, 10, 19, 5);
        touch(&dir, 0, 19, 10); // a merge whose inputs were not yet deleted
        touch(&dir, 20, 29, 3); // a flush the watermark does not cover
        std::fs::write(dir.join(".00-tmp.parquet.tmp"), b"half").unwrap();
        // A watermark replace cut short by a crash leaves its temporary in the tenant directory.
        let watermark_tmp = tenant_dir(root.path(), Tree::Events, "acme").join("._projection.json.0123456789abcdef.tmp");
        std::fs::write(&watermark_tmp, b"{").unwrap();
        // Without a watermark, nothing is visible yet.
        assert!(list_files(root.path(), Tree::Events, "acme", |_| true).unwrap().is_empty());
        write_watermark(root.path(), "acme", &Watermark { next_seq: 20, ..Watermark::default() }).unwrap();
        let visible = list_files(root.path(), Tree::Events, "acme", |_| true).unwrap();
        assert_eq!(visible.iter().map(|f| (f.first, f.last)).collect::<Vec<_>>(), vec![(0, 19)], "the unfinished flush 20-29 is not visible");
        // Recovery deletes the unfinished flush and the temporary file at once, the replaced
        // files only once the merge is older than the grace period.
        assert_eq!(recover_tenant(root.path(), "acme", 20).unwrap(), 3);
        assert!(!watermark_tmp.exists());
        let names = |dir: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            v.sort();
            v
        };
        assert_eq!(names(&dir).len(), 3);
        assert_eq!(sweep_replaced(&dir, "2026-11-01", std::time::Duration::ZERO).unwrap(), 2);
        assert_eq!(names(&dir), vec![file_name(0, 19, 10)]);
    }

    #[test]
    fn merges_take_a_trailing_run_of_one_tier() {
        let root = tempfile::tempdir().unwrap();
        let dir = partition_dir(root.path(), Tree::Rollups, "acme", "2026-11");
        touch(&dir, 0, 99, 5000);
        for i in 0..7 {
            touch(&dir, 100 + i * 10, 109 + i * 10, 3);
        }
        assert!(merge_candidates(root.path(), Tree::Rollups, "acme", "2026-11", 8, 1 << 20).unwrap().is_empty());
        touch(&dir, 170, 179, 2);
        let run = merge_candidates(root.path(), Tree::Rollups, "acme", "2026-11", 8, 1 << 20).unwrap();
        assert_eq!((run.len(), run[0].first, run[7].last), (8, 100, 179));
    }

    #[test]
    fn watermarks_round_trip_and_default_to_zero() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(read_watermark(root.path(), "acme").unwrap(), Watermark::default());
        let mark = Watermark { next_seq: 7, checkpoint: Some("note".into()), daily_zones: [("UTC".to_string(), 0)].into(), statements: true };
        write_watermark(root.path(), "acme", &mark).unwrap();
        assert_eq!(read_watermark(root.path(), "acme").unwrap(), mark);
        assert_eq!(projected_tenants(root.path()).unwrap(), vec!["acme".to_string()]);
    }
}
