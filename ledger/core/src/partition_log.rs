//! The logs of every tenant of one partition, stored in one [`Journal`] (issue #13): tenants are
//! keys, not directories. Appends from any tenant go to the journal; a group commit makes all of
//! them durable with one `fdatasync`; reads of an entry or of a stored Merkle node find their
//! frame through an index.
//!
//! Index: a tenant's records in one segment are a contiguous run of seqs (a partition appends a
//! tenant's records in order). When a segment is sealed, `<first>.idx` is written beside it
//! (durably replaced): magic [`INDEX_MAGIC`], the number of tenants, then per tenant (sorted)
//! `[id len u8][id][first seq u64][count u32]`, then every record's journal position (`u64`),
//! tenant after tenant, and a CRC-32C of all that. Memory per tenant is a head (sizes, the Merkle
//! frontier, read lazily for tenants an open finds only in sealed segments) and one small run
//! descriptor per live index file it appears in; the positions of sealed runs are read from the
//! index file when needed. The active segment's positions are in memory. An index that is
//! missing or damaged is derived data: it is rebuilt from its segment.
//!
//! Merged indexes: a tenant's records over consecutive segments are still one contiguous run of
//! seqs, so [`MERGE_FAN`] consecutive index files covering the same number of segments are merged
//! into one, `<first>-<end>.idx` (the same format; it covers the sealed segments that start in
//! `[first, end)`), up to [`MAX_MERGED_SEGMENTS`] segments per file. The live files then form a
//! short tail of tiers (at most `MERGE_FAN - 1` of each size below the largest), so a tenant
//! costs one run descriptor per live index file, not per segment, and an open parses a handful
//! of tenant tables, not one per segment. A merge reads only immutable index files and writes
//! its output durably without the log ([`IndexMerge::run`]); the log then swaps the runs in and
//! deletes the inputs ([`PartitionLog::adopt_index_merge`]). A crash between the two leaves
//! both: an open prefers the widest index file that begins at a segment and ends on a segment
//! boundary, and deletes the files it covers; a damaged merged file is replaced by its segments'
//! own indexes (rebuilt if they are gone).
//!
//! A stored node is found through the record that completed it: node (level `l`, index `i`) is
//! completed by leaf `(i + 1)·2^l − 1`, whose frame lists the nodes it completed, level by level.
//!
//! Invariants checked at open, so a damaged journal is reported rather than served: a tenant's
//! seqs follow each other without gaps across segments, and every frame of the active segment
//! of a tenant first seen there has the leaf hash and nodes its frontier computes. Frames are
//! checked by their CRCs on every read (a full check of every hash is fsck's job).
//! A failed index write after a durable commit stops further writes until the log is reopened.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::journal::{Frame, Journal, RecordFrame};
use crate::merkle::{leaf_hash, Frontier, Hash, NodeSource};

/// The first bytes of a segment index: the format and its version.
pub const INDEX_MAGIC: &[u8; 8] = b"TALLYX1\n";
/// How many index files of one size a merge combines.
pub const MERGE_FAN: u32 = 4;
/// No merged index covers more segments: it bounds what a merge (and `tally log audit`) holds in
/// memory, the positions of that many segments (about 85 MB for 64 segments of 300-byte entries).
pub const MAX_MERGED_SEGMENTS: u32 = 64;

/// A tenant's records in the sealed segments of one index file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    /// The first position its index file covers (the key of `PartitionLog::index_files`), or
    /// [`MEMORY_RUN`].
    index: u64,
    first_seq: u64,
    count: u64,
    /// Byte offset of this run's positions in the index file.
    positions_at: u64,
}

#[derive(Debug, Clone, Default)]
struct TenantHead {
    /// Committed entries.
    size: u64,
    /// Over every appended entry, committed or not.
    frontier: Frontier,
    /// Over the committed entries.
    committed: Frontier,
    runs: Vec<Run>,
    /// Journal positions of this tenant's records in the active segment (committed, then
    /// appended), starting at seq `active_first`.
    active: Vec<u64>,
    active_first: u64,
    /// Appended to since the last commit was written (listed in `PartitionLog::dirty`).
    in_batch: bool,
    /// `frontier` and `committed` are not read yet (a cold tenant after an open): they hold
    /// nothing, and `size` is the truth. See `PartitionLog::read_frontier`.
    frontier_unread: bool,
}

/// A commit written but not yet durable (see [`PartitionLog::write_commit`]).
pub struct PendingCommit {
    /// None when there was nothing to write.
    written: Option<crate::journal::WrittenCommit>,
    /// Each changed tenant's frontier as of this commit.
    heads: Vec<(String, Frontier)>,
    next_offset: Option<i64>,
}

impl PendingCommit {
    /// The tenants with records in this commit.
    pub fn tenants(&self) -> impl Iterator<Item = &str> {
        self.heads.iter().map(|(t, _)| t.as_str())
    }

    /// The journal's end once this commit is durable (None when it writes nothing).
    pub fn journal_end(&self) -> Option<u64> {
        self.written.as_ref().map(|w| w.end_position())
    }

    /// The commit's one `fdatasync`; needs no access to the log.
    pub fn sync(&self) -> Result<()> {
        self.written.as_ref().map_or(Ok(()), |w| w.sync())
    }
}

/// Every tenant log of a partition, over one journal.
pub struct PartitionLog {
    dir: PathBuf,
    journal: Journal,
    tenants: HashMap<String, TenantHead>,
    /// Tenants with appends since the last commit.
    dirty: Vec<String>,
    /// Scratch space for the nodes an append completes.
    nodes: Vec<Hash>,
    /// The source's next offset, as the last commit that named one recorded it.
    next_offset: Option<i64>,
    /// Set when a segment's index could not be written after its commit was durable: no more
    /// writes until reopened (the open rebuilds the index); or when opened read-only.
    poisoned: Option<String>,
    /// Positions of runs a read-only open indexed itself (their index file was missing or
    /// damaged, and a reader writes nothing).
    memory_positions: Vec<u64>,
    /// Read handles of index files, keyed by the first position they cover.
    indexes: crate::handles::HandleCache,
    /// The live index files, by the first position they cover.
    index_files: BTreeMap<u64, IndexSpan>,
    /// A read-only log's index files, held open from its open: the writer may merge and delete
    /// them meanwhile, and an open file stays readable after it is unlinked. A handful of
    /// descriptors once merged; empty for a writer, which deletes only what it no longer reads.
    pinned: HashMap<u64, std::sync::Arc<std::fs::File>>,
}

/// An index file: it covers the sealed segments that start in `[first, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexSpan {
    pub first: u64,
    pub end: u64,
    pub segments: u32,
}

impl IndexSpan {
    pub(crate) fn path(&self, dir: &Path) -> PathBuf {
        if self.segments == 1 {
            index_path(dir, self.first)
        } else {
            dir.join(format!("{:020}-{:020}.idx", self.first, self.end))
        }
    }
}

/// The index files an open uses for the sealed segments starting at `starts[..sealed]`
/// (`starts` also holds the active segment's start): at each segment the widest merged file
/// that begins there and ends on a segment boundary, else the segment's own (which may be
/// missing). Returns them in order, and every index file found.
pub(crate) fn choose_indexes(dir: &Path, starts: &[u64]) -> Result<(Vec<IndexSpan>, Vec<PathBuf>)> {
    let sealed = starts.len().saturating_sub(1);
    let mut merged: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for e in entries {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".idx")) else { continue };
        let number = |n: &str| if n.len() == 20 { n.parse::<u64>().ok() } else { None };
        match stem.split_once('-') {
            None if number(stem).is_some() => found.push(e.path()),
            Some((a, b)) => {
                if let (Some(a), Some(b)) = (number(a), number(b)) {
                    merged.entry(a).or_default().push(b);
                    found.push(e.path());
                }
            }
            None => {}
        }
    }
    let mut spans = Vec::new();
    let mut i = 0;
    while i < sealed {
        let first = starts[i];
        // The widest merged file starting here whose end is a later sealed segment boundary:
        // `starts[i + 1 + j]`, covering `j + 1` segments.
        let widest = merged.get(&first).and_then(|ends| ends.iter().filter_map(|end| starts[i + 1..=sealed].iter().position(|s| s == end)).max());
        let span = match widest {
            Some(j) if j > 0 => IndexSpan { first, end: starts[i + 1 + j], segments: j as u32 + 1 },
            _ => IndexSpan { first, end: starts[i + 1], segments: 1 },
        };
        i += span.segments as usize;
        spans.push(span);
    }
    Ok((spans, found))
}

/// A merge of index files that is due (see [`PartitionLog::index_merge_due`]).
#[derive(Debug, Clone)]
pub struct IndexMerge {
    dir: PathBuf,
    inputs: Vec<IndexSpan>,
}

/// A merged index written by [`IndexMerge::run`], for [`PartitionLog::adopt_index_merge`].
pub struct MergedIndex {
    span: IndexSpan,
    inputs: Vec<IndexSpan>,
    runs: TenantRuns,
}

impl IndexMerge {
    /// The span the merged file covers.
    pub fn span(&self) -> IndexSpan {
        let first = self.inputs.first().map_or(0, |s| s.first);
        let end = self.inputs.last().map_or(0, |s| s.end);
        IndexSpan { first, end, segments: self.inputs.iter().map(|s| s.segments).sum() }
    }

    /// Reads the input index files and writes the merged one durably. Needs no access to the
    /// log (its inputs are immutable), so it runs without whatever guards the log.
    pub fn run(self) -> Result<MergedIndex> {
        let span = self.span();
        let mut files = Vec::with_capacity(self.inputs.len());
        for input in &self.inputs {
            let path = input.path(&self.dir);
            files.push((std::fs::read(&path).map_err(|e| Error::io(&path, e))?, path));
        }
        let mut table: BTreeMap<&str, (u64, Vec<u64>)> = BTreeMap::new();
        for (bytes, path) in &files {
            for (tenant, run) in parse_index(bytes).map_err(|why| corrupt(path, why))? {
                let (first, positions) = table.entry(tenant).or_insert_with(|| (run.first_seq, Vec::new()));
                let next = *first + positions.len() as u64;
                if next != run.first_seq {
                    return Err(corrupt(path, format!("{tenant}: seqs jump from {next} to {}", run.first_seq)));
                }
                let at = run.positions_at as usize;
                let raw = bytes.get(at..at + 8 * run.count as usize).ok_or_else(|| corrupt(path, "positions end early"))?;
                positions.extend(raw.chunks_exact(8).map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])));
            }
        }
        let view: BTreeMap<&str, (u64, &[u64])> = table.iter().map(|(t, (first, p))| (*t, (*first, p.as_slice()))).collect();
        let runs = write_index(&span.path(&self.dir), &view)?;
        Ok(MergedIndex { span, inputs: self.inputs, runs })
    }
}

/// Each tenant's run in one segment index.
pub(crate) type TenantRuns = Vec<(String, Run)>;

/// The `segment` of a [`Run`] whose positions are in [`PartitionLog::memory_positions`].
const MEMORY_RUN: u64 = u64::MAX;

pub(crate) fn index_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.idx"))
}

fn corrupt(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::Corrupt { path: path.display().to_string(), detail: detail.to_string() }
}

impl PartitionLog {
    /// Opens the partition's journal in `dir` (see [`Journal::open`]) and its indexes,
    /// rebuilding any index that is missing or damaged. `segment_bytes` is the roll size.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<PartitionLog> {
        Self::open_with(dir, Journal::open(dir, segment_bytes)?, true)
    }

    /// [`PartitionLog::open`] for a caller that recorded the journal durable through position
    /// `acknowledged`: damage short of it is refused, nothing cut (see
    /// [`Journal::open_acknowledged`]).
    pub fn open_acknowledged(dir: &Path, segment_bytes: u64, acknowledged: u64) -> Result<PartitionLog> {
        Self::open_with(dir, Journal::open_acknowledged(dir, segment_bytes, acknowledged)?, true)
    }

    /// Opens a partition log another process may be writing, to read it (see
    /// [`Journal::open_read_only`]): what it holds up to its last commit. A missing or damaged
    /// index is rebuilt in memory, not written. Every write fails.
    pub fn open_read_only(dir: &Path) -> Result<PartitionLog> {
        Self::open_with(dir, Journal::open_read_only(dir)?, false)
    }

    fn open_with(dir: &Path, (journal, opened): (Journal, crate::journal::Opened), write: bool) -> Result<PartitionLog> {
        if opened.cut_bytes > 0 {
            tracing::warn!(dir = %dir.display(), cut_bytes = opened.cut_bytes, "journal tail after the last whole commit cut at open");
        }
        let mut log = PartitionLog {
            dir: dir.to_path_buf(),
            journal,
            tenants: HashMap::new(),
            dirty: Vec::new(),
            nodes: Vec::with_capacity(64),
            next_offset: opened.next_offset,
            poisoned: (!write).then(|| "opened read-only".to_string()),
            memory_positions: Vec::new(),
            indexes: crate::handles::HandleCache::default(),
            index_files: BTreeMap::new(),
            pinned: HashMap::new(),
        };
        if write {
            // A merge's output half-written when the process died.
            crate::durable::remove_temporaries(dir)?;
        }
        let starts = log.journal.segment_starts();
        let active = starts.last().copied();
        let (spans, found) = choose_indexes(dir, &starts)?;
        // Spans still to load, in journal order; a damaged merged file is replaced here by its
        // segments' own.
        let mut queue: std::collections::VecDeque<IndexSpan> = spans.into();
        while let Some(span) = queue.pop_front() {
            let path = span.path(dir);
            // Tenant ids are borrowed from the file's bytes: a tenant appears in many index
            // files, and its key is allocated once, when first seen.
            let bytes = read_index_file(&path).map_err(|e| e.to_string()).map(|(file, bytes)| {
                if !write {
                    log.pinned.insert(span.first, std::sync::Arc::new(file));
                }
                bytes
            });
            let rebuilt;
            let runs: Vec<(&str, Run)> = match bytes.as_deref().map_err(String::clone).and_then(parse_index) {
                Ok(runs) => runs,
                Err(why) if span.segments > 1 => {
                    tracing::warn!(index = %path.display(), error = %why, "merged index damaged; using its segments' own indexes");
                    if write {
                        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                    }
                    let at = starts.iter().position(|s| *s == span.first).unwrap_or_default();
                    for k in (at..at + span.segments as usize).rev() {
                        queue.push_front(IndexSpan { first: starts[k], end: starts[k + 1], segments: 1 });
                    }
                    continue;
                }
                Err(why) => {
                    if write {
                        tracing::warn!(segment = span.first, error = %why, "segment index missing or damaged; rebuilding it from the segment");
                    }
                    rebuilt = log.rebuild_index(span.first, span.end, write)?;
                    rebuilt.iter().map(|(t, r)| (t.as_str(), *r)).collect()
                }
            };
            log.index_files.insert(span.first, span);
            for (tenant, mut run) in runs {
                if run.index != MEMORY_RUN {
                    run.index = span.first;
                }
                let head = match log.tenants.get_mut(tenant) {
                    Some(head) => head,
                    None => log.tenants.entry(tenant.to_string()).or_default(),
                };
                if run.first_seq != head.size {
                    return Err(corrupt(&path, format!("{tenant}: seqs jump from {} to {}", head.size, run.first_seq)));
                }
                head.size += run.count;
                head.active_first = head.size;
                head.runs.push(run);
            }
        }
        if write {
            // Files a merged index covers (its inputs, when a crash came before they were
            // deleted), or that end on no segment boundary: any file found but not used.
            let used: std::collections::HashSet<PathBuf> = log.index_files.values().map(|s| s.path(dir)).collect();
            for path in found.into_iter().filter(|p| !used.contains(p)) {
                tracing::info!(index = %path.display(), "removing an index file a merged one covers");
                match std::fs::remove_file(&path) {
                    // Gone already: a damaged merged file, removed above.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    // Unused, so not a reason to refuse the partition: the next open tries again.
                    Err(e) => tracing::warn!(index = %path.display(), error = %e, "unused index file not removed"),
                    Ok(()) => {}
                }
            }
        }
        // A tenant's frontier over what the sealed segments hold is read (popcount(size) stored
        // nodes) when it is first needed, not here: most tenants of a large partition are cold.
        for head in log.tenants.values_mut() {
            head.frontier_unread = true;
        }
        if let Some(start) = active {
            let mut frames = Vec::new();
            log.journal.replay(start, |position, frame| {
                if let Frame::Record(r) = frame {
                    frames.push((position, r));
                }
                Ok(())
            })?;
            for (position, r) in frames {
                log.index_committed(position, &r)?;
            }
            for head in log.tenants.values_mut().filter(|h| !h.frontier_unread && h.committed.size() != h.size) {
                head.committed = head.frontier.clone();
            }
        }
        Ok(log)
    }

    /// Reads the tenant's frontier from its stored nodes if the open left it unread.
    fn read_frontier(&mut self, tenant: &str) -> Result<()> {
        let Some(size) = self.tenants.get(tenant).filter(|h| h.frontier_unread).map(|h| h.size) else { return Ok(()) };
        let frontier = Frontier::load(&self.view(tenant), size)?;
        if let Some(head) = self.tenants.get_mut(tenant) {
            head.frontier = frontier.clone();
            head.committed = frontier;
            head.frontier_unread = false;
        }
        Ok(())
    }

    /// Adds a committed record found in the active segment at open, checking it.
    /// The caller sets each head's `committed` frontier once, after the last record.
    ///
    /// A tenant first seen in the active segment has its frontier in memory, so every node the
    /// record stores is checked against the ones its entry completes. A tenant the sealed
    /// segments already hold keeps its frontier unread (reading it costs a few random reads,
    /// which at 10^5 tenants would dominate an open), and its record, as in a sealed segment,
    /// is checked by the frame's CRC and its seq: hashing every entry of a 64 MiB active
    /// segment again would cost about 50 ms per partition at every open (`tally log audit`
    /// recomputes every hash).
    fn index_committed(&mut self, position: u64, r: &RecordFrame) -> Result<()> {
        let head = match self.tenants.get_mut(&r.tenant) {
            Some(head) => head,
            None => self.tenants.entry(r.tenant.clone()).or_default(),
        };
        if r.seq != head.size {
            return Err(corrupt(&self.dir, format!("journal position {position}: {} record {} follows {} records", r.tenant, r.seq, head.size)));
        }
        if !head.frontier_unread {
            self.nodes.clear();
            head.frontier.push(leaf_hash(&r.entry), &mut self.nodes);
        }
        if !head.frontier_unread && self.nodes != r.nodes {
            return Err(corrupt(&self.dir, format!("journal position {position}: {} record {}: stored hashes differ from the entry's", r.tenant, r.seq)));
        }
        head.size += 1;
        head.active.push(position);
        Ok(())
    }

    /// Appends `entry` to `tenant`'s log; returns its seq. Durable, and readable, once
    /// [`PartitionLog::commit`] returns.
    pub fn append(&mut self, tenant: &str, entry: &[u8]) -> Result<u64> {
        self.append_sealed(tenant, entry, None)
    }

    /// [`PartitionLog::append`], with the record's personal values sealed (`privacy.rs`) kept
    /// beside the entry in the same journal frame: durable with it, outside its leaf hash, read
    /// back by [`PartitionLog::sealed`].
    pub fn append_sealed(&mut self, tenant: &str, entry: &[u8], sealed: Option<&[u8]>) -> Result<u64> {
        if let Some(why) = &self.poisoned {
            return Err(Error::Commit(format!("{}: reopen the partition log: {why}", self.dir.display())));
        }
        // Checked first: past this point nothing fails, so the head never runs ahead of the journal.
        Journal::check_record(tenant, entry, 64, sealed)?;
        self.read_frontier(tenant)?;
        let head = match self.tenants.get_mut(tenant) {
            Some(h) => h,
            None => self.tenants.entry(tenant.to_string()).or_default(),
        };
        let seq = head.frontier.size();
        if !head.in_batch {
            head.in_batch = true;
            self.dirty.push(tenant.to_string());
        }
        self.nodes.clear();
        head.frontier.push(leaf_hash(entry), &mut self.nodes);
        let position = self.journal.append_parts(tenant, seq, entry, &self.nodes, sealed)?;
        head.active.push(position);
        Ok(seq)
    }

    /// Makes every append durable with one `fdatasync` (with the source's next offset), and
    /// writes the index of a segment the commit sealed. Returns the tenants whose size changed.
    /// A commit with no appends and no new offset writes nothing.
    pub fn commit(&mut self, next_offset: Option<i64>) -> Result<Vec<String>> {
        let written = self.write_commit(next_offset)?;
        let synced = written.sync();
        self.finish_commit(written, synced)
    }

    /// Whether a commit may begin now: refused (and nothing forgotten) when the log takes no
    /// more writes until reopened, or while another commit is being synced.
    pub fn check_commit(&self) -> Result<()> {
        if let Some(why) = &self.poisoned {
            return Err(Error::Commit(format!("{}: reopen the partition log: {why}", self.dir.display())));
        }
        if self.journal.commit_in_flight() {
            // A caller error, not a failed write: nothing is forgotten.
            return Err(Error::Commit(format!("{}: a commit is already being synced; commits are one at a time", self.dir.display())));
        }
        Ok(())
    }

    /// The first half of [`PartitionLog::commit`]: writes every append and the commit frame
    /// (see [`Journal::write_commit`]). Sync the result without holding whatever guards this
    /// log, then call [`PartitionLog::finish_commit`]; meanwhile reads see the previous commit
    /// and appends go to the next one.
    pub fn write_commit(&mut self, next_offset: Option<i64>) -> Result<PendingCommit> {
        self.check_commit()?;
        if self.dirty.is_empty() && (next_offset.is_none() || next_offset == self.next_offset) {
            // Nothing new to make durable: no write, no fsync.
            return Ok(PendingCommit { written: None, heads: Vec::new(), next_offset: None });
        }
        let before = self.journal.active_segment();
        let changed = std::mem::take(&mut self.dirty);
        let written = match self.journal.write_commit(next_offset) {
            Ok(w) => w,
            Err(e) => {
                self.forget_uncommitted();
                return Err(e);
            }
        };
        let heads = changed
            .into_iter()
            .filter_map(|tenant| {
                let head = self.tenants.get_mut(&tenant)?;
                head.in_batch = false;
                let frontier = head.frontier.clone();
                Some((tenant, frontier))
            })
            .collect();
        let after = self.journal.active_segment();
        if after != before {
            // The sealed segment's commits are all durable (commits are one at a time): a
            // failed index write stops further writes until the log is reopened, which
            // rebuilds the index, but does not fail this commit.
            if let Err(e) = self.seal(before, after) {
                tracing::error!(dir = %self.dir.display(), segment = before, error = %e, "segment index not written; the partition log takes no more writes until reopened");
                self.poisoned = Some(format!("segment {before}'s index not written: {e}"));
            }
        }
        Ok(PendingCommit { written: Some(written), heads, next_offset })
    }

    /// The second half of [`PartitionLog::commit`], with `synced` the outcome of
    /// [`PendingCommit::sync`]: the commit's records become readable. Returns the tenants whose
    /// size changed. After a failed sync, every append not yet durable is forgotten and the log
    /// takes no more writes until reopened.
    pub fn finish_commit(&mut self, pending: PendingCommit, synced: Result<()>) -> Result<Vec<String>> {
        let Some(written) = pending.written else { return Ok(Vec::new()) };
        if let Err(e) = self.journal.finish_commit(written, synced) {
            self.forget_uncommitted();
            return Err(e);
        }
        let mut changed = Vec::with_capacity(pending.heads.len());
        for (tenant, frontier) in pending.heads {
            if let Some(head) = self.tenants.get_mut(&tenant) {
                head.size = frontier.size();
                head.committed = frontier;
            }
            changed.push(tenant);
        }
        if pending.next_offset.is_some() {
            self.next_offset = pending.next_offset;
        }
        Ok(changed)
    }

    /// The next merge of index files that is due, if any: the oldest [`MERGE_FAN`] consecutive
    /// live index files that cover the same number of segments, when the merged file stays
    /// within [`MAX_MERGED_SEGMENTS`]. Cheap; run it with [`IndexMerge::run`] (no lock needed)
    /// and hand the result to [`PartitionLog::adopt_index_merge`]. None for a log that takes no
    /// writes.
    pub fn index_merge_due(&self) -> Option<IndexMerge> {
        if self.poisoned.is_some() {
            return None;
        }
        let spans: Vec<IndexSpan> = self.index_files.values().copied().collect();
        spans
            .windows(MERGE_FAN as usize)
            .find(|w| {
                let size = w[0].segments;
                size * MERGE_FAN <= MAX_MERGED_SEGMENTS && w.iter().all(|s| s.segments == size) && w.windows(2).all(|p| p[0].end == p[1].first)
            })
            .map(|w| IndexMerge { dir: self.dir.clone(), inputs: w.to_vec() })
    }

    /// Swaps in a merged index written by [`IndexMerge::run`]: each tenant's runs in its inputs
    /// become one run, and the input files are deleted. Returns false, changing nothing, when
    /// the inputs are no longer the live files (the merged file is left: it is valid, and an
    /// open uses or removes it). A merged index that disagrees with the heads is an error, and
    /// changes nothing either.
    pub fn adopt_index_merge(&mut self, merged: MergedIndex) -> Result<bool> {
        let MergedIndex { span, inputs, runs } = merged;
        let live: Vec<IndexSpan> = self.index_files.range(span.first..span.end).map(|(_, s)| *s).collect();
        if live != inputs || self.poisoned.is_some() {
            return Ok(false);
        }
        let path = span.path(&self.dir);
        let mut splices = Vec::with_capacity(runs.len());
        for (tenant, run) in &runs {
            let head = self.tenants.get(tenant).ok_or_else(|| corrupt(&path, format!("{tenant}: not in this log")))?;
            let from = head.runs.partition_point(|r| r.index < span.first);
            let to = head.runs.partition_point(|r| r.index < span.end);
            let covered = &head.runs[from..to];
            let count: u64 = covered.iter().map(|r| r.count).sum();
            if covered.first().map(|r| r.first_seq) != Some(run.first_seq) || count != run.count {
                return Err(corrupt(&path, format!("{tenant}: the merged run ({} from {}) is not what the inputs hold ({count})", run.count, run.first_seq)));
            }
            splices.push((from, to));
        }
        for ((tenant, run), (from, to)) in runs.into_iter().zip(splices) {
            if let Some(head) = self.tenants.get_mut(&tenant) {
                head.runs.splice(from..to, [Run { index: span.first, ..run }]);
            }
        }
        for input in &inputs {
            self.index_files.remove(&input.first);
            self.indexes.forget(input.first);
        }
        self.index_files.insert(span.first, span);
        for input in &inputs {
            let old = input.path(&self.dir);
            if let Err(e) = std::fs::remove_file(&old) {
                tracing::warn!(index = %old.display(), error = %e, "merged index file not removed; the next open removes it");
            }
        }
        Ok(true)
    }

    /// Runs every index merge that is due, here and now (for tools, benchmarks and tests; the
    /// ledger service runs them on its background thread). Returns how many were adopted.
    pub fn merge_indexes(&mut self) -> Result<usize> {
        let mut adopted = 0;
        while let Some(merge) = self.index_merge_due() {
            if !self.adopt_index_merge(merge.run()?)? {
                break;
            }
            adopted += 1;
        }
        Ok(adopted)
    }

    /// The live index files, oldest first.
    pub fn index_spans(&self) -> Vec<IndexSpan> {
        self.index_files.values().copied().collect()
    }

    /// After a failed commit: every head back to what is durable (the journal dropped the rest).
    fn forget_uncommitted(&mut self) {
        self.dirty.clear();
        for head in self.tenants.values_mut() {
            head.in_batch = false;
            if !head.frontier_unread && head.frontier.size() != head.size {
                head.frontier = head.committed.clone();
                head.active.truncate((head.size - head.active_first) as usize);
            }
        }
    }

    /// The source's next offset recorded by the last commit that named one: where consumption
    /// resumes.
    pub fn next_offset(&self) -> Option<i64> {
        self.next_offset
    }

    /// Writes the index of the sealed segment `[segment, end)` from the active positions below
    /// `end`, and moves them to runs (positions past `end` are in the new segment).
    fn seal(&mut self, segment: u64, end: u64) -> Result<()> {
        let mut table: BTreeMap<&str, (u64, &[u64])> = BTreeMap::new();
        for (tenant, head) in &self.tenants {
            let sealed = head.active.partition_point(|&p| p < end);
            if sealed > 0 {
                table.insert(tenant.as_str(), (head.active_first, &head.active[..sealed]));
            }
        }
        self.indexes.forget(segment);
        let runs = write_index(&index_path(&self.dir, segment), &table)?;
        self.index_files.insert(segment, IndexSpan { first: segment, end, segments: 1 });
        for (tenant, mut run) in runs {
            run.index = segment;
            if let Some(head) = self.tenants.get_mut(&tenant) {
                head.active.drain(..run.count as usize);
                head.active_first += run.count;
                head.runs.push(run);
            }
        }
        Ok(())
    }

    /// Scans the sealed segment `[segment, end)` and writes its index again (when `write`; a
    /// reader keeps the positions in memory instead).
    fn rebuild_index(&mut self, segment: u64, end: u64, write: bool) -> Result<Vec<(String, Run)>> {
        let mut found: BTreeMap<String, (u64, Vec<u64>)> = BTreeMap::new();
        self.journal.replay_until(segment, end, |position, frame| {
            if let Frame::Record(r) = frame {
                let (first, positions) = found.entry(r.tenant).or_insert((r.seq, Vec::new()));
                if r.seq != *first + positions.len() as u64 {
                    return Err(corrupt(&self.dir, format!("journal position {position}: seq {} out of order", r.seq)));
                }
                positions.push(position);
            }
            Ok(())
        })?;
        if !write {
            // A run whose positions live in memory: read them back through `memory_runs`.
            let mut runs = Vec::with_capacity(found.len());
            for (tenant, (first, positions)) in found {
                let at = self.memory_positions.len() as u64;
                runs.push((tenant, Run { index: MEMORY_RUN, first_seq: first, count: positions.len() as u64, positions_at: at }));
                self.memory_positions.extend(positions);
            }
            return Ok(runs);
        }
        let table: BTreeMap<&str, (u64, &[u64])> = found.iter().map(|(t, (first, p))| (t.as_str(), (*first, p.as_slice()))).collect();
        self.indexes.forget(segment);
        write_index(&index_path(&self.dir, segment), &table)
    }

    /// The journal position just past the last commit.
    pub fn journal_end(&self) -> u64 {
        self.journal.end()
    }

    /// Calls `f(tenant, seq, entry)` for every committed record from journal position `from` (a
    /// position [`PartitionLog::journal_end`] returned) to the end, in journal order.
    pub fn replay<E: From<Error>>(&self, from: u64, mut f: impl FnMut(&str, u64, &[u8]) -> std::result::Result<(), E>) -> std::result::Result<(), E> {
        let mut failed = None;
        let replayed = self.journal.replay(from, |_, frame| {
            if let Frame::Record(r) = frame {
                if let Err(e) = f(&r.tenant, r.seq, &r.entry) {
                    failed = Some(e);
                    return Err(Error::Commit("replay stopped by its caller".into()));
                }
            }
            Ok(())
        });
        match failed {
            Some(e) => Err(e),
            None => replayed.map_err(E::from),
        }
    }

    /// Tenants with at least one committed record, sorted.
    pub fn tenants(&self) -> Vec<String> {
        let mut out: Vec<String> = self.tenants.iter().filter(|(_, h)| h.size > 0).map(|(t, _)| t.clone()).collect();
        out.sort();
        out
    }

    /// The committed size of `tenant`'s log (0 for a tenant never seen).
    pub fn size(&self, tenant: &str) -> u64 {
        self.tenants.get(tenant).map_or(0, |h| h.size)
    }

    /// The seq `tenant`'s next append gets: its committed size plus its appends not yet committed.
    pub fn next_seq(&self, tenant: &str) -> u64 {
        self.tenants.get(tenant).map_or(0, |h| if h.frontier_unread { h.size } else { h.frontier.size() })
    }

    /// How many tenants the partition holds (committed or appended).
    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    /// The root of `tenant`'s committed log.
    pub fn root(&self, tenant: &str) -> Result<Hash> {
        match self.tenants.get(tenant) {
            None => Ok(crate::merkle::empty_root()),
            // A cold tenant: from its stored nodes (popcount(size) reads).
            Some(h) if h.frontier_unread => crate::merkle::root(&self.view(tenant), h.size),
            Some(h) => Ok(h.committed.root()),
        }
    }

    /// Journal position of committed record `seq` of `tenant`.
    fn position(&self, tenant: &str, seq: u64) -> Result<u64> {
        let head = self.tenants.get(tenant).filter(|h| seq < h.size).ok_or(Error::NoSuchEntry { seq, size: self.size(tenant) })?;
        if seq >= head.active_first {
            return head.active.get((seq - head.active_first) as usize).copied().ok_or_else(|| corrupt(&self.dir, format!("{tenant} {seq}: not indexed")));
        }
        let i = head.runs.partition_point(|r| r.first_seq <= seq);
        let run = i.checked_sub(1).and_then(|i| head.runs.get(i)).ok_or_else(|| corrupt(&self.dir, format!("{tenant} {seq}: in no run")))?;
        if run.index == MEMORY_RUN {
            let at = (run.positions_at + (seq - run.first_seq)) as usize;
            return self.memory_positions.get(at).copied().ok_or_else(|| corrupt(&self.dir, format!("{tenant} {seq}: not indexed")));
        }
        let span = self.index_files.get(&run.index).ok_or_else(|| corrupt(&self.dir, format!("{tenant} {seq}: its index file is gone")))?;
        let path = span.path(&self.dir);
        let file = match self.pinned.get(&run.index) {
            Some(file) => std::sync::Arc::clone(file),
            None => self.indexes.get(run.index, &path)?,
        };
        let mut bytes = [0u8; 8];
        file.read_exact_at(&mut bytes, run.positions_at + 8 * (seq - run.first_seq)).map_err(|e| Error::io(&path, e))?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn record(&self, tenant: &str, seq: u64) -> Result<RecordFrame> {
        match self.journal.read_at(self.position(tenant, seq)?)? {
            Frame::Record(r) if r.tenant == tenant && r.seq == seq => Ok(r),
            _ => Err(corrupt(&self.dir, format!("the index points {tenant} {seq} at another frame"))),
        }
    }

    /// Committed entry `seq` of `tenant`.
    pub fn entry(&self, tenant: &str, seq: u64) -> Result<Vec<u8>> {
        Ok(self.record(tenant, seq)?.entry)
    }

    /// The sealed personal values kept beside committed entry `seq` of `tenant`, if it has any.
    pub fn sealed(&self, tenant: &str, seq: u64) -> Result<Option<Vec<u8>>> {
        Ok(self.record(tenant, seq)?.sealed)
    }

    /// Committed entry `seq` of `tenant` and its sealed personal values, in one read.
    pub fn entry_and_sealed(&self, tenant: &str, seq: u64) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
        let r = self.record(tenant, seq)?;
        Ok((r.entry, r.sealed))
    }

    /// Read access to `tenant`'s stored nodes, for [`crate::merkle`] proofs and roots.
    pub fn view<'a>(&'a self, tenant: &'a str) -> TenantView<'a> {
        TenantView { log: self, tenant }
    }
}

/// One tenant's stored nodes, read through the partition's journal.
pub struct TenantView<'a> {
    log: &'a PartitionLog,
    tenant: &'a str,
}

impl crate::TenantEntries for TenantView<'_> {
    fn size(&self) -> u64 {
        self.log.size(self.tenant)
    }
    fn entry(&self, seq: u64) -> Result<Vec<u8>> {
        self.log.entry(self.tenant, seq)
    }
}

impl NodeSource for TenantView<'_> {
    type Error = Error;
    fn node(&self, level: u32, index: u64) -> Result<Hash> {
        let leaf = ((index + 1) << level) - 1;
        let record = self.log.record(self.tenant, leaf)?;
        record.nodes.get(level as usize).copied().ok_or_else(|| corrupt(&self.log.dir, format!("{} {leaf}: no node at level {level}", self.tenant)))
    }
}

/// Opens an index file and reads it whole, keeping the handle.
pub(crate) fn read_index_file(path: &Path) -> std::io::Result<(std::fs::File, Vec<u8>)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok((file, bytes))
}

/// Writes a segment index (see the module docs) durably; returns each tenant's run.
fn write_index(path: &Path, table: &BTreeMap<&str, (u64, &[u64])>) -> Result<Vec<(String, Run)>> {
    let (bytes, runs) = index_bytes(table)?;
    crate::durable::replace_file(path, &bytes)?;
    Ok(runs)
}

/// The bytes of a segment index over `table` (tenant → first seq and journal positions), and
/// each tenant's run in it.
pub(crate) fn index_bytes(table: &BTreeMap<&str, (u64, &[u64])>) -> Result<(Vec<u8>, TenantRuns)> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(INDEX_MAGIC);
    bytes.extend_from_slice(&(table.len() as u32).to_le_bytes());
    for (tenant, (first, positions)) in table {
        let len = u8::try_from(tenant.len()).map_err(|_| Error::BadRecord(format!("tenant id of {} bytes", tenant.len())))?;
        bytes.push(len);
        bytes.extend_from_slice(tenant.as_bytes());
        bytes.extend_from_slice(&first.to_le_bytes());
        let count = u32::try_from(positions.len()).map_err(|_| Error::BadRecord(format!("{tenant}: {} records in one index file", positions.len())))?;
        bytes.extend_from_slice(&count.to_le_bytes());
    }
    let mut runs = Vec::with_capacity(table.len());
    for (tenant, (first, positions)) in table {
        runs.push(((*tenant).to_string(), Run { index: 0, first_seq: *first, count: positions.len() as u64, positions_at: bytes.len() as u64 }));
        for p in *positions {
            bytes.extend_from_slice(&p.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok((bytes, runs))
}

/// Parses a segment index's runs, checking its magic, CRC and shape.
fn parse_index(bytes: &[u8]) -> std::result::Result<Vec<(&str, Run)>, String> {
    let body_len = bytes.len().checked_sub(4).filter(|l| *l >= INDEX_MAGIC.len() + 4).ok_or("too short")?;
    let (body, crc) = bytes.split_at(body_len);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err("checksum mismatch".into());
    }
    if &body[..8] != INDEX_MAGIC {
        return Err("bad magic".into());
    }
    let mut at = 8;
    let take = |at: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let s = body.get(*at..*at + n).ok_or("ends early")?;
        *at += n;
        Ok(s)
    };
    let count = u32::from_le_bytes(take(&mut at, 4)?.try_into().map_err(|_| "count")?) as usize;
    let mut table = Vec::with_capacity(count.min(1 << 20));
    for _ in 0..count {
        let len = take(&mut at, 1)?[0] as usize;
        let tenant = std::str::from_utf8(take(&mut at, len)?).map_err(|_| "tenant id is not UTF-8")?;
        let first = u64::from_le_bytes(take(&mut at, 8)?.try_into().map_err(|_| "first seq")?);
        let n = u32::from_le_bytes(take(&mut at, 4)?.try_into().map_err(|_| "count")?) as u64;
        table.push((tenant, first, n));
    }
    let mut runs = Vec::with_capacity(table.len());
    for (tenant, first_seq, count) in table {
        runs.push((tenant, Run { index: 0, first_seq, count, positions_at: at as u64 }));
        at += 8 * count as usize;
    }
    if at != body.len() {
        return Err(format!("positions end at {at}, the file's content at {}", body.len()));
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{consistency_proof, inclusion_proof, verify_consistency, verify_inclusion, MemoryTree};

    fn entry(tenant: &str, seq: u64) -> Vec<u8> {
        format!("{{\"seq\":{seq},\"tenant\":\"{tenant}\",\"pad\":\"{}\"}}", "x".repeat((seq % 37) as usize)).into_bytes()
    }

    /// Appends `rounds` records to each of `tenants`, committing every `every` appends; returns
    /// the in-memory trees the logs must equal.
    fn fill(log: &mut PartitionLog, tenants: &[&str], rounds: u64, every: usize, trees: &mut BTreeMap<String, MemoryTree>) {
        let mut n = 0;
        for _ in 0..rounds {
            for t in tenants {
                let tree = trees.entry(t.to_string()).or_default();
                let seq = log.append(t, &entry(t, tree.size())).unwrap();
                assert_eq!(seq, tree.size());
                tree.push_entry(&entry(t, seq));
                n += 1;
                if n % every == 0 {
                    log.commit(Some(n as i64)).unwrap();
                }
            }
        }
        log.commit(Some(n as i64)).unwrap();
    }

    fn check(log: &PartitionLog, trees: &BTreeMap<String, MemoryTree>) {
        assert_eq!(log.tenants(), trees.keys().cloned().collect::<Vec<_>>());
        for (t, tree) in trees {
            let n = tree.size();
            assert_eq!(log.size(t), n, "{t}");
            assert_eq!(log.root(t).unwrap(), tree.root(), "{t}");
            let view = log.view(t);
            assert_eq!(crate::merkle::root(&view, n).unwrap(), tree.root(), "{t}: root from stored nodes");
            for i in [0, n / 3, n / 2, n - 1] {
                assert_eq!(log.entry(t, i).unwrap(), entry(t, i), "{t} {i}");
                let proof = inclusion_proof(&view, i, n).unwrap();
                verify_inclusion(&leaf_hash(&entry(t, i)), i, n, &proof, &tree.root()).unwrap();
            }
            let m = n / 2 + 1;
            let old_root = crate::merkle::root(&view, m).unwrap();
            verify_consistency(m, n, &old_root, &tree.root(), &consistency_proof(&view, m, n).unwrap()).unwrap();
            assert!(matches!(log.entry(t, n), Err(Error::NoSuchEntry { .. })));
        }
    }

    #[test]
    fn tenants_share_one_journal_and_every_proof_verifies_across_segments_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let tenants = ["acme", "globex", "initech", "umbrella", "tiny"];
        let mut trees = BTreeMap::new();
        let mut log = PartitionLog::open(dir.path(), 8192).unwrap();
        fill(&mut log, &tenants[..4], 120, 17, &mut trees);
        fill(&mut log, &tenants[4..], 1, 1, &mut trees);
        let segments = log.journal.segment_starts().len();
        assert!(segments > 5, "{segments} segments");
        check(&log, &trees);
        drop(log);
        let mut log = PartitionLog::open(dir.path(), 8192).unwrap();
        check(&log, &trees);
        fill(&mut log, &tenants, 30, 7, &mut trees);
        check(&log, &trees);
        drop(log);
        check(&PartitionLog::open(dir.path(), 8192).unwrap(), &trees);
        // Descriptors never grow with tenants: segments and indexes are opened per read.
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(files >= 2 * segments - 1, "{files} files for {segments} segments");
    }

    /// Appends and reads go on while a commit is being synced: reads see the previous commit,
    /// appends made meanwhile belong to the next one, and segments roll only between commits.
    #[test]
    fn appends_and_reads_go_on_while_a_commit_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let mut trees: BTreeMap<String, MemoryTree> = BTreeMap::new();
        let mut log = PartitionLog::open(dir.path(), 4096).unwrap();
        let append = |log: &mut PartitionLog, t: &str, trees: &mut BTreeMap<String, MemoryTree>| {
            let tree = trees.entry(t.to_string()).or_default();
            let seq = log.append(t, &entry(t, tree.size())).unwrap();
            assert_eq!(seq, tree.size());
            tree.push_entry(&entry(t, seq));
        };
        let mut committed: BTreeMap<String, u64> = BTreeMap::new();
        for round in 0..200u64 {
            for t in ["acme", "globex", "initech"] {
                append(&mut log, t, &mut trees);
            }
            let pending = log.write_commit(Some(round as i64)).unwrap();
            // While it syncs: more appends, and reads of what was durable before.
            append(&mut log, "acme", &mut trees);
            append(&mut log, "umbrella", &mut trees);
            for (t, n) in &committed {
                assert_eq!(log.size(t), *n, "{t}: only what is durable is visible");
                if *n > 0 {
                    assert_eq!(log.entry(t, n - 1).unwrap(), entry(t, n - 1));
                }
            }
            pending.sync().unwrap();
            let mut changed = log.finish_commit(pending, Ok(())).unwrap();
            changed.sort();
            assert_eq!(changed, if round == 0 { vec!["acme", "globex", "initech"] } else { vec!["acme", "globex", "initech", "umbrella"] });
            for t in ["acme", "globex", "initech", "umbrella"] {
                committed.insert(t.to_string(), log.size(t));
            }
        }
        log.commit(Some(200)).unwrap();
        assert!(log.journal.segment_starts().len() > 5, "rolled between commits");
        check(&log, &trees);
        drop(log);
        let log = PartitionLog::open(dir.path(), 4096).unwrap();
        assert_eq!(log.next_offset(), Some(200));
        check(&log, &trees);
    }

    #[test]
    fn a_second_commit_while_one_syncs_is_refused_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PartitionLog::open(dir.path(), 8192).unwrap();
        log.append("acme", b"one").unwrap();
        let first = log.write_commit(Some(1)).unwrap();
        log.append("acme", b"two").unwrap();
        assert!(log.write_commit(Some(2)).is_err(), "commits are one at a time");
        first.sync().unwrap();
        log.finish_commit(first, Ok(())).unwrap();
        assert_eq!(log.commit(Some(2)).unwrap(), vec!["acme".to_string()]);
        assert_eq!((log.size("acme"), log.entry("acme", 1).unwrap()), (2, b"two".to_vec()));
    }

    #[test]
    fn a_failed_sync_forgets_what_was_not_durable_and_stops_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PartitionLog::open(dir.path(), 8192).unwrap();
        log.append("acme", b"one").unwrap();
        log.commit(Some(1)).unwrap();
        let root = log.root("acme").unwrap();
        log.append("acme", b"two").unwrap();
        let pending = log.write_commit(Some(2)).unwrap();
        log.append("acme", b"three").unwrap();
        let failed = Err(Error::Commit("injected fsync failure".into()));
        assert!(log.finish_commit(pending, failed).is_err());
        assert_eq!((log.size("acme"), log.next_seq("acme"), log.root("acme").unwrap()), (1, 1, root));
        assert!(log.append("acme", b"four").is_ok_and(|_| log.commit(Some(3)).is_err()), "no more writes until reopened");
        drop(log);
        // The commit whose sync failed may or may not have reached the disk (it was never
        // acknowledged); either way its records and its offset agree.
        let log = PartitionLog::open(dir.path(), 8192).unwrap();
        let reopened = (log.size("acme"), log.next_offset());
        assert!(reopened == (1, Some(1)) || reopened == (2, Some(2)), "{reopened:?}");
    }

    #[test]
    fn sealed_values_sit_beside_their_entry_outside_its_hash_across_segments_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let mut trees: BTreeMap<String, MemoryTree> = BTreeMap::new();
        let mut log = PartitionLog::open(dir.path(), 4096).unwrap();
        let sealed_of = |t: &str, seq: u64| seq.is_multiple_of(2).then(|| format!("sealed {t} {seq}").into_bytes());
        for round in 0..120u64 {
            for t in ["acme", "globex"] {
                let tree = trees.entry(t.to_string()).or_default();
                let seq = log.append_sealed(t, &entry(t, tree.size()), sealed_of(t, tree.size()).as_deref()).unwrap();
                tree.push_entry(&entry(t, seq));
            }
            if round % 7 == 6 {
                log.commit(Some(round as i64)).unwrap();
            }
        }
        log.commit(Some(120)).unwrap();
        assert!(log.journal.segment_starts().len() > 3, "spans sealed segments");
        // The sealed values change no leaf: roots are those of the entries alone.
        check(&log, &trees);
        let read_all = |log: &PartitionLog| {
            for t in ["acme", "globex"] {
                for seq in 0..120 {
                    assert_eq!(log.sealed(t, seq).unwrap(), sealed_of(t, seq), "{t} {seq}");
                    assert_eq!(log.entry(t, seq).unwrap(), entry(t, seq));
                }
            }
        };
        read_all(&log);
        log.merge_indexes().unwrap();
        read_all(&log);
        drop(log);
        let log = PartitionLog::open(dir.path(), 4096).unwrap();
        check(&log, &trees);
        read_all(&log);
        let too_long = vec![0u8; crate::journal::MAX_SEALED_BYTES + 1];
        let mut log = log;
        assert!(log.append_sealed("acme", b"x", Some(&too_long)).is_err());
        assert_eq!(log.size("acme"), 120, "a refused append leaves nothing");
    }

    #[test]
    fn uncommitted_appends_are_invisible_and_gone_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PartitionLog::open(dir.path(), 8192).unwrap();
        log.append("acme", b"one").unwrap();
        assert_eq!(log.commit(Some(7)).unwrap(), vec!["acme".to_string()]);
        assert_eq!(log.next_offset(), Some(7));
        assert_eq!(log.append("acme", b"two").unwrap(), 1);
        assert_eq!(log.size("acme"), 1, "not committed yet");
        assert!(matches!(log.entry("acme", 1), Err(Error::NoSuchEntry { .. })));
        let root = log.root("acme").unwrap();
        drop(log);
        let log = PartitionLog::open(dir.path(), 8192).unwrap();
        assert_eq!((log.size("acme"), log.root("acme").unwrap()), (1, root));
        assert_eq!(log.next_offset(), Some(7), "where consumption resumes is durable with the commit");
    }

    #[test]
    fn a_missing_or_damaged_index_is_rebuilt_from_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut trees = BTreeMap::new();
        let mut log = PartitionLog::open(dir.path(), 4096).unwrap();
        fill(&mut log, &["acme", "globex"], 80, 5, &mut trees);
        let starts = log.journal.segment_starts();
        drop(log);
        let first = index_path(dir.path(), starts[0]);
        let second = index_path(dir.path(), starts[1]);
        let original = std::fs::read(&first).unwrap();
        std::fs::remove_file(&first).unwrap();
        let mut damaged = std::fs::read(&second).unwrap();
        damaged[12] ^= 1;
        std::fs::write(&second, damaged).unwrap();
        let log = PartitionLog::open(dir.path(), 4096).unwrap();
        check(&log, &trees);
        assert_eq!(std::fs::read(&first).unwrap(), original, "rebuilt byte for byte");
        assert!(parse_index(&std::fs::read(&second).unwrap()).is_ok());
    }

    /// Every entry of every tenant, read back and checked (not only the few `check` samples):
    /// a merged run must point each seq at its own frame.
    fn check_every_entry(log: &PartitionLog, trees: &BTreeMap<String, MemoryTree>) {
        for (t, tree) in trees {
            for i in 0..tree.size() {
                assert_eq!(log.entry(t, i).unwrap(), entry(t, i), "{t} {i}");
            }
        }
    }

    fn index_files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).filter(|n| n.ends_with(".idx")).collect();
        names.sort();
        names
    }

    #[test]
    fn index_files_merge_into_tiers_and_every_seq_still_reads_its_own_frame() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(crate::ledger::JOURNAL_DIR);
        let dir = dir.as_path();
        let tenants = ["acme", "globex", "initech", "umbrella", "tiny"];
        let mut trees = BTreeMap::new();
        let mut log = PartitionLog::open(dir, 4096).unwrap();
        fill(&mut log, &tenants[..4], 320, 7, &mut trees);
        fill(&mut log, &tenants[4..], 1, 1, &mut trees);
        let sealed = log.journal.segment_starts().len() - 1;
        assert!(sealed >= 2 * (MERGE_FAN * MERGE_FAN) as usize, "{sealed} sealed segments: enough for two tiers");
        assert_eq!(log.index_spans().len(), sealed, "nothing merges until asked");
        let adopted = log.merge_indexes().unwrap();
        let spans = log.index_spans();
        assert!(adopted > 0 && spans.len() < sealed, "{adopted} merges, {} files for {sealed} segments", spans.len());
        // Tiers: contiguous, sizes non-increasing, fewer than MERGE_FAN of any size below the cap.
        assert!(spans.windows(2).all(|w| w[0].end == w[1].first && w[0].segments >= w[1].segments), "{spans:?}");
        for size in spans.iter().map(|s| s.segments).filter(|s| s * MERGE_FAN <= MAX_MERGED_SEGMENTS) {
            assert!(spans.iter().filter(|s| s.segments == size).count() < MERGE_FAN as usize, "{spans:?}");
        }
        assert_eq!(spans.iter().map(|s| s.segments as usize).sum::<usize>(), sealed);
        assert_eq!(index_files_in(dir).len(), spans.len(), "the inputs are deleted");
        let most = log.tenants.values().map(|h| h.runs.len()).max().unwrap();
        assert!(most <= spans.len(), "a tenant has one run per live index file at most, not one per segment: {most}");
        check(&log, &trees);
        check_every_entry(&log, &trees);
        // Appends go on after merges, into new segments and new merges.
        fill(&mut log, &tenants[..2], 40, 5, &mut trees);
        log.merge_indexes().unwrap();
        check_every_entry(&log, &trees);
        drop(log);
        let log = PartitionLog::open(dir, 4096).unwrap();
        check(&log, &trees);
        check_every_entry(&log, &trees);
        let reader = PartitionLog::open_read_only(dir).unwrap();
        check(&reader, &trees);
        assert!(reader.index_merge_due().is_none(), "a reader never merges");
        let report = crate::audit::audit_ledger(root.path(), &mut |_| {});
        assert!(report.problems.is_empty(), "merged index files audit clean: {:?}", report.problems);
        assert_eq!(report.tenants.values().sum::<u64>(), trees.values().map(|t| t.size()).sum::<u64>());
    }

    #[test]
    fn readers_and_audits_keep_the_index_files_a_writer_merges_away_under_them() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(crate::ledger::JOURNAL_DIR);
        let tenants = ["acme", "globex", "initech"];
        let mut trees = BTreeMap::new();
        let mut log = PartitionLog::open(&dir, 2048).unwrap();
        fill(&mut log, &tenants, 150, 4, &mut trees);
        let reader = PartitionLog::open_read_only(&dir).unwrap();
        assert!(log.merge_indexes().unwrap() > 0);
        check_every_entry(&reader, &trees);
        // An audit that chose its index files before a merge deleted them.
        let mut log = PartitionLog::open(&dir, 2048).unwrap();
        fill(&mut log, &tenants, 150, 4, &mut trees);
        let mut merged = 0;
        let report = crate::audit::audit_ledger(root.path(), &mut |_| {
            if merged == 0 {
                merged = log.merge_indexes().unwrap();
            }
        });
        assert!(merged > 0, "a merge ran during the audit");
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }

    #[test]
    fn a_crash_between_a_merge_and_adopting_it_or_a_damaged_merged_index_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let tenants = ["acme", "globex", "initech"];
        let mut trees = BTreeMap::new();
        let mut log = PartitionLog::open(dir.path(), 2048).unwrap();
        fill(&mut log, &tenants, 150, 4, &mut trees);
        let singles = index_files_in(dir.path());
        // The merged file is written, then the process dies before adopting it: both remain.
        let merge = log.index_merge_due().unwrap();
        let span = merge.span();
        let _written = merge.run().unwrap();
        drop(log);
        assert_eq!(index_files_in(dir.path()).len(), singles.len() + 1);
        let log = PartitionLog::open(dir.path(), 2048).unwrap();
        assert_eq!(log.index_spans()[0], span, "the open prefers the merged file");
        assert_eq!(index_files_in(dir.path()).len(), singles.len() + 1 - MERGE_FAN as usize, "and removes the files it covers");
        check_every_entry(&log, &trees);
        drop(log);
        // A crash again between writing a merged file and adopting it, and the merged file is
        // damaged: the inputs, still there, are used and kept.
        let log = PartitionLog::open(dir.path(), 2048).unwrap();
        let merge = log.index_merge_due().unwrap();
        let second = merge.span();
        let _written = merge.run().unwrap();
        drop(log);
        let mut bytes = std::fs::read(second.path(dir.path())).unwrap();
        bytes[20] ^= 0xff;
        std::fs::write(second.path(dir.path()), &bytes).unwrap();
        let before = index_files_in(dir.path());
        let log = PartitionLog::open(dir.path(), 2048).unwrap();
        let mut kept = before.clone();
        kept.retain(|n| *n != second.path(dir.path()).file_name().unwrap().to_str().unwrap());
        assert_eq!(index_files_in(dir.path()), kept, "only the damaged file is removed");
        check_every_entry(&log, &trees);
        drop(log);
        // A damaged merged file whose inputs are gone: its segments' own indexes are rebuilt.
        let merged = span.path(dir.path());
        let mut bytes = std::fs::read(&merged).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&merged, &bytes).unwrap();
        let mut log = PartitionLog::open(dir.path(), 2048).unwrap();
        assert!(!merged.exists(), "the damaged file is removed");
        assert_eq!(index_files_in(dir.path()), singles, "every segment has its own index again");
        check(&log, &trees);
        check_every_entry(&log, &trees);
        // A merge whose inputs are no longer live is not adopted.
        let stale = log.index_merge_due().unwrap().run().unwrap();
        log.merge_indexes().unwrap();
        assert!(!log.adopt_index_merge(stale).unwrap(), "another merge already covered these files");
        check_every_entry(&log, &trees);
    }

    #[test]
    fn a_journal_whose_hashes_do_not_match_its_entries_is_refused() {
        // The error opening a journal that holds just this frame.
        let open_with = |frame: RecordFrame| {
            let dir = tempfile::tempdir().unwrap();
            let (mut journal, _) = Journal::open(dir.path(), 1 << 20).unwrap();
            journal.append(&frame).unwrap();
            journal.commit(None).unwrap();
            drop(journal);
            PartitionLog::open(dir.path(), 1 << 20).err().unwrap().to_string()
        };
        let err = open_with(RecordFrame { tenant: "acme".into(), seq: 0, entry: b"real".to_vec(), nodes: vec![leaf_hash(b"forged")], sealed: None });
        assert!(err.contains("stored hashes differ"), "{err}");
        let err = open_with(RecordFrame { tenant: "acme".into(), seq: 5, entry: b"x".to_vec(), nodes: vec![leaf_hash(b"x")], sealed: None });
        assert!(err.contains("acme record 5 follows 0 records"), "{err}");
    }
}
