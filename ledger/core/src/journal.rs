//! The partition journal: the one append-only, checksummed file sequence that makes a group
//! commit of every tenant's records durable with a single `fdatasync` (issue #13; the choice
//! and its measurements are in ARCHITECTURE.md, "Storage at platform scale").
//!
//! Layout: `<dir>/<position>.seg` segments, where `<position>` is the journal position (a byte
//! count over the whole journal, 20 decimal digits) of the segment's first byte. A segment
//! starts with the 8-byte magic [`SEGMENT_MAGIC`]; then frames `[len u32 LE][crc32c u32 LE]
//! [body]`, where the CRC covers the body:
//!
//! * record `0x01`: `[tenant len u16][tenant][seq u64][entry len u32][entry][node count u8]
//!   [nodes, 32 bytes each]`, then optionally `[sealed len u32][sealed]`: entry `seq` of the
//!   tenant's log, the perfect Merkle nodes it completes, in post-order (leaf hash first), and
//!   the record's personal values sealed under its subject's key (`privacy.rs`), kept beside the
//!   entry and outside its leaf hash. Frames written before sealed values existed end after the
//!   nodes and read as having none;
//! * commit `0x02`: `[next offset i64, i64::MIN for none][records u32]`: everything since the
//!   previous commit frame (that many record frames) is one durable group commit; the source's
//!   next offset is durable with it.
//!
//! Invariants:
//! * Only a prefix of frames that ends in a commit frame is the journal. [`Journal::open`] cuts
//!   anything after the last intact commit of the last segment (a torn frame, or frames whose
//!   commit never became durable), so an unacknowledged commit leaves no trace.
//! * A commit writes its frames and its commit frame, then calls `fdatasync` once, before it
//!   returns. Frames are written nowhere else.
//! * A segment is rolled only between commits: the first frame placed after a commit that left
//!   the segment at the roll size goes to a new segment, created when the commit holding it is
//!   written.
//!   So every segment but the last ends with a commit frame and is never written again. The
//!   directory is synced when a segment is created.
//! * A commit is written, then synced ([`Journal::write_commit`], [`WrittenCommit::sync`],
//!   [`Journal::finish_commit`]); the sync needs no access to the journal, so appends and reads
//!   go on meanwhile. One commit at a time.
//! * Every frame read is checked against its CRC and its declared length; a damaged frame is an
//!   error naming the segment and offset, never skipped.
//!
//! A torn tail and damage inside the last segment's committed frames look the same to the scan
//! (it stops at the first bad frame). A crash can only tear the one commit that was not yet
//! acknowledged, so a caller that recorded how far the journal was acknowledged durable opens
//! with [`Journal::open_acknowledged`]: intact commits ending short of that position are damage,
//! refused with an error naming the segment and byte, and nothing is cut, created or repaired.
//! The partition service records that position with its state (`state.redb`). Without one
//! ([`Journal::open`]), both are cut and [`Opened::cut_bytes`] says how much; records a cut
//! removes come back from the source (Kafka), since the next offset goes back with them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::log::MAX_ENTRY_BYTES;
use crate::merkle::Hash;

/// The first bytes of every segment: the format and its version.
pub const SEGMENT_MAGIC: &[u8; 8] = b"TALLYJ1\n";
/// A segment is rolled once a commit leaves it at least this long.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
const FRAME_HEADER: usize = 8;
const RECORD: u8 = 0x01;
const COMMIT: u8 = 0x02;
/// An append completes at most one node per level of a tree of up to 2^64 leaves.
const MAX_NODES: usize = 64;
/// Sealed personal values of one record are at most this long (a 64 KiB entry's worth).
pub const MAX_SEALED_BYTES: usize = MAX_ENTRY_BYTES + 64;
/// No frame body is longer: a record holds at most a 255-byte tenant id, a 64 KiB entry,
/// [`MAX_NODES`] nodes and [`MAX_SEALED_BYTES`] of sealed values.
const MAX_BODY: usize = 1 + 2 + 255 + 8 + 4 + MAX_ENTRY_BYTES + 1 + MAX_NODES * 32 + 4 + MAX_SEALED_BYTES;

/// A record frame: entry `seq` of `tenant`'s log and the Merkle nodes it completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordFrame {
    pub tenant: String,
    pub seq: u64,
    pub entry: Vec<u8>,
    pub nodes: Vec<Hash>,
    /// The record's personal values, sealed (`privacy.rs`); not part of the entry or its hash.
    pub sealed: Option<Vec<u8>>,
}

/// A group commit whose frames are written but not yet synced (see [`Journal::write_commit`]).
pub struct WrittenCommit {
    file: File,
    path: PathBuf,
    /// The active segment's first position.
    segment: u64,
    /// The active segment's committed length once synced.
    end: u64,
}

impl WrittenCommit {
    /// The journal's end once this commit is durable.
    pub fn end_position(&self) -> u64 {
        self.segment + self.end
    }

    /// The commit's one `fdatasync`. Needs no access to the journal, so the caller can run it
    /// without the lock that guards the journal.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }
}

/// A commit frame: the records since the previous commit are durable, with the source's next
/// offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitFrame {
    pub next_offset: Option<i64>,
    pub records: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Record(RecordFrame),
    Commit(CommitFrame),
}

/// What [`Journal::open`] found and repaired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Opened {
    /// Bytes cut from the end of the last segment (a torn frame, or an unfinished commit).
    pub cut_bytes: u64,
    /// The next offset named by the last commit, if any commit names one.
    pub next_offset: Option<i64>,
}

#[derive(Debug, Clone)]
struct Segment {
    first: u64,
    path: PathBuf,
}

/// A partition's journal, open for appending.
pub struct Journal {
    dir: PathBuf,
    /// Every segment, oldest first; the last is the one being written.
    segments: Vec<Segment>,
    active: File,
    /// Committed bytes of the active segment (magic included).
    active_len: u64,
    /// Frames appended since the last commit, not yet written.
    pending: Vec<u8>,
    pending_records: u32,
    /// The active segment's length once the commit in flight (written, not yet synced) is
    /// durable.
    in_flight: Option<u64>,
    /// Where the next segment starts, once decided: the pending frames go there, so the
    /// positions handed out for them are already in it.
    roll_at: Option<u64>,
    segment_bytes: u64,
    /// Set after a failed write, fsync or roll: no more writes until reopened.
    poisoned: Option<String>,
    /// Read handles of segments, keyed by their first position.
    handles: crate::handles::HandleCache,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

fn corrupt(path: &Path, offset: u64, detail: impl std::fmt::Display) -> Error {
    Error::Corrupt { path: path.display().to_string(), detail: format!("at byte {offset}: {detail}") }
}

/// The error of an open whose intact commits end at byte `committed` of the last segment (which
/// starts at journal position `first`), short of the position acknowledged durable.
fn lost_acknowledged(path: &Path, first: u64, committed: u64, acknowledged: u64) -> Error {
    corrupt(
        path,
        committed,
        format!(
            "the intact commits end here (journal position {}), but the journal was acknowledged durable through position {acknowledged}: \
             acknowledged records are damaged or missing, and nothing was cut or repaired: restore the segment from a backup",
            first + committed
        ),
    )
}

impl Journal {
    /// Opens the journal in `dir` (creating it when empty) and cuts whatever follows the last
    /// intact commit of its last segment. `segment_bytes` is the roll size.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(Journal, Opened)> {
        Self::open_with(dir, segment_bytes, Access::Write, 0)
    }

    /// [`Journal::open`] for a caller that knows the journal was durable through position
    /// `acknowledged` (a position it recorded after a commit's sync). Intact commits ending
    /// short of it mean the disk lost or damaged acknowledged data, not a torn tail: the open
    /// fails naming the segment and the byte, and nothing is cut, created or repaired, so the
    /// damaged file is there to restore or examine.
    pub fn open_acknowledged(dir: &Path, segment_bytes: u64, acknowledged: u64) -> Result<(Journal, Opened)> {
        Self::open_with(dir, segment_bytes, Access::Write, acknowledged)
    }

    /// Opens a journal another process may be writing, to read it: nothing is created, cut or
    /// repaired, and only what ends in the last intact commit is seen (frames after it are a
    /// commit still being written). Every write fails.
    pub fn open_read_only(dir: &Path) -> Result<(Journal, Opened)> {
        Self::open_with(dir, DEFAULT_SEGMENT_BYTES, Access::Read, 0)
    }

    fn open_with(dir: &Path, segment_bytes: u64, access: Access, acknowledged: u64) -> Result<(Journal, Opened)> {
        let write = access == Access::Write;
        if write && acknowledged == 0 {
            crate::durable::create_dir_durably(dir)?;
        }
        let mut segments = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let e = e.map_err(|e| Error::io(dir, e))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(first) = name.strip_suffix(".seg").filter(|n| n.len() == 20).and_then(|n| n.parse::<u64>().ok()) {
                segments.push(Segment { first, path: e.path() });
            }
        }
        segments.sort_by_key(|s| s.first);
        // Sealed segments are never written again: each must end exactly where the next starts.
        for pair in segments.windows(2) {
            let len = std::fs::metadata(&pair[0].path).map_err(|e| Error::io(&pair[0].path, e))?.len();
            if pair[0].first + len != pair[1].first {
                return Err(corrupt(
                    &pair[0].path,
                    len,
                    format!("a sealed segment of {len} bytes, but the next one starts at journal position {}", pair[1].first),
                ));
            }
        }
        if segments.is_empty() {
            if acknowledged > 0 {
                return Err(corrupt(dir, 0, format!("no journal segment, but the journal was acknowledged durable through position {acknowledged}")));
            }
            if !write {
                return Err(Error::io(&segment_path(dir, 0), std::io::Error::new(std::io::ErrorKind::NotFound, "no journal segment")));
            }
            let path = segment_path(dir, 0);
            create_segment(dir, &path)?;
            segments.push(Segment { first: 0, path });
        }
        let last = segments.last().cloned().ok_or_else(|| corrupt(dir, 0, "no segment"))?;
        let mut active = OpenOptions::new().read(true).write(write).open(&last.path).map_err(|e| Error::io(&last.path, e))?;
        let file_len = active.metadata().map_err(|e| Error::io(&last.path, e))?.len();
        let mut opened = Opened::default();
        // The last intact commit: scan the whole last segment (it is at most about one roll size).
        let mut committed = SEGMENT_MAGIC.len() as u64;
        let mut magic = [0u8; 8];
        let whole_magic = active.read_exact(&mut magic).is_ok();
        if !whole_magic || &magic != SEGMENT_MAGIC {
            if file_len > SEGMENT_MAGIC.len() as u64 || (whole_magic && &magic != SEGMENT_MAGIC) {
                return Err(corrupt(&last.path, 0, "not a journal segment (bad magic)"));
            }
            if !write {
                return Err(corrupt(&last.path, 0, "a segment still being created"));
            }
            if last.first + committed < acknowledged {
                return Err(lost_acknowledged(&last.path, last.first, 0, acknowledged));
            }
            // A segment whose creation was cut short: write its magic again.
            active.set_len(0).and_then(|_| active.write_all_at(SEGMENT_MAGIC, 0)).and_then(|_| active.sync_data()).map_err(|e| Error::io(&last.path, e))?;
        } else {
            let mut reader = std::io::BufReader::new(&active);
            reader.seek(SeekFrom::Start(committed)).map_err(|e| Error::io(&last.path, e))?;
            let mut at = committed;
            let mut records = 0u32;
            loop {
                let (frame, len) = match read_frame(&mut reader) {
                    Ok(Some(read)) => read,
                    Ok(None) | Err(FrameError::Damaged(_)) => break,
                    Err(FrameError::Io(e)) => return Err(Error::io(&last.path, e)),
                };
                at += len;
                match frame {
                    Frame::Record(_) => records = records.saturating_add(1),
                    Frame::Commit(c) if c.records == records => {
                        committed = at;
                        records = 0;
                        if c.next_offset.is_some() {
                            opened.next_offset = c.next_offset;
                        }
                    }
                    // A commit that does not count the records before it: stop trusting here.
                    Frame::Commit(_) => break,
                }
            }
        }
        if last.first + committed < acknowledged {
            return Err(lost_acknowledged(&last.path, last.first, committed, acknowledged));
        }
        if file_len > committed && write {
            opened.cut_bytes = file_len - committed;
            active.set_len(committed).and_then(|_| active.sync_data()).map_err(|e| Error::io(&last.path, e))?;
        }
        if opened.next_offset.is_none() {
            // The last segment may hold no commit naming an offset; the ones before it do.
            for s in segments.iter().rev().skip(1) {
                if let Some(o) = last_next_offset(s)? {
                    opened.next_offset = Some(o);
                    break;
                }
            }
        }
        active.seek(SeekFrom::Start(committed)).map_err(|e| Error::io(&last.path, e))?;
        let journal = Journal {
            dir: dir.to_path_buf(),
            segments,
            active,
            active_len: committed,
            pending: Vec::new(),
            pending_records: 0,
            in_flight: None,
            roll_at: None,
            segment_bytes: segment_bytes.max(4096),
            poisoned: (!write).then(|| "opened read-only".to_string()),
            handles: crate::handles::HandleCache::default(),
        };
        Ok((journal, opened))
    }

    /// The journal position just past the last commit.
    pub fn end(&self) -> u64 {
        self.active_segment() + self.active_len
    }

    /// The first position of the segment being written.
    pub fn active_segment(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.first)
    }

    /// Appends a record frame to the next commit; returns the position it will have.
    pub fn append(&mut self, record: &RecordFrame) -> Result<u64> {
        self.append_parts(&record.tenant, record.seq, &record.entry, &record.nodes, record.sealed.as_deref())
    }

    /// Whether a record of this shape can be appended (what [`Journal::append_parts`] checks
    /// before it writes anything).
    pub fn check_record(tenant: &str, entry: &[u8], nodes: usize, sealed: Option<&[u8]>) -> Result<()> {
        if entry.len() > MAX_ENTRY_BYTES {
            return Err(Error::EntryTooLarge(entry.len()));
        }
        if let Some(sealed) = sealed.filter(|s| s.len() > MAX_SEALED_BYTES) {
            return Err(Error::BadRecord(format!("sealed personal values are {} bytes; at most {MAX_SEALED_BYTES}", sealed.len())));
        }
        if tenant.len() > 255 || nodes > MAX_NODES {
            return Err(Error::BadRecord(format!(
                "a journal record holds a tenant id of at most 255 bytes and at most {MAX_NODES} nodes ({} bytes, {nodes} nodes)",
                tenant.len()
            )));
        }
        Ok(())
    }

    /// [`Journal::append`] from borrowed parts (no copy of the entry).
    pub fn append_parts(&mut self, tenant: &str, seq: u64, entry: &[u8], nodes: &[Hash], sealed: Option<&[u8]>) -> Result<u64> {
        Self::check_record(tenant, entry, nodes.len(), sealed)?;
        let position = self.next_position();
        let start = self.pending.len();
        self.pending.extend_from_slice(&[0; FRAME_HEADER]);
        self.pending.push(RECORD);
        self.pending.extend_from_slice(&(tenant.len() as u16).to_le_bytes());
        self.pending.extend_from_slice(tenant.as_bytes());
        self.pending.extend_from_slice(&seq.to_le_bytes());
        self.pending.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        self.pending.extend_from_slice(entry);
        self.pending.push(nodes.len() as u8);
        for n in nodes {
            self.pending.extend_from_slice(n);
        }
        if let Some(sealed) = sealed {
            self.pending.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
            self.pending.extend_from_slice(sealed);
        }
        seal_frame(&mut self.pending, start);
        self.pending_records += 1;
        Ok(position)
    }

    /// The position the next appended frame gets. When the pending frames are the first since a
    /// commit and the segment is full, the next segment is decided here, so every position handed
    /// out stays true: segments roll only between commits, never under frames already placed.
    pub fn next_position(&mut self) -> u64 {
        let written = self.in_flight.unwrap_or(self.active_len);
        if self.pending.is_empty() && self.roll_at.is_none() && written >= self.segment_bytes {
            self.roll_at = Some(self.active_segment() + written);
        }
        match self.roll_at {
            Some(at) => at + SEGMENT_MAGIC.len() as u64 + self.pending.len() as u64,
            None => self.active_segment() + written + self.pending.len() as u64,
        }
    }

    /// Writes every appended record and a commit frame naming `next_offset`, with one
    /// `fdatasync`. Returns the new end.
    pub fn commit(&mut self, next_offset: Option<i64>) -> Result<u64> {
        let written = self.write_commit(next_offset)?;
        let synced = written.sync();
        self.finish_commit(written, synced)
    }

    /// The first half of [`Journal::commit`]: writes the pending frames and a commit frame (in
    /// a new segment when one was decided), without syncing them. The caller syncs the returned
    /// [`WrittenCommit`] (no lock needed: it is a file handle of its own), then calls
    /// [`Journal::finish_commit`]. Until then reads stop at the previous commit, appends go on
    /// (they will be the next commit), and no other commit can be written.
    pub fn write_commit(&mut self, next_offset: Option<i64>) -> Result<WrittenCommit> {
        let path = self.segments.last().map(|s| s.path.clone()).unwrap_or_default();
        let refuse = |j: &mut Journal, why: String| {
            j.pending.clear();
            j.pending_records = 0;
            Err(Error::Commit(format!("{}: {why}", path.display())))
        };
        if let Some(why) = self.poisoned.clone() {
            return refuse(self, format!("the journal must be reopened: {why}"));
        }
        if self.in_flight.is_some() {
            // The pending frames belong to the next commit: refused, not dropped.
            return Err(Error::Commit(format!("{}: a commit is already being synced; commits are one at a time", path.display())));
        }
        // Placing the commit frame may decide a roll, like any frame.
        self.next_position();
        let start = self.pending.len();
        self.pending.extend_from_slice(&[0; FRAME_HEADER]);
        self.pending.push(COMMIT);
        self.pending.extend_from_slice(&next_offset.unwrap_or(i64::MIN).to_le_bytes());
        self.pending.extend_from_slice(&self.pending_records.to_le_bytes());
        seal_frame(&mut self.pending, start);
        if let Some(at) = self.roll_at.take() {
            // The previous commit is durable (commits are one at a time), so the sealed segment
            // ends with a commit frame.
            if let Err(e) = self.roll(at) {
                self.poisoned = Some(format!("segment roll failed: {e}"));
                return refuse(self, format!("segment roll failed: {e}"));
            }
        }
        let path = self.segments.last().map(|s| s.path.clone()).unwrap_or_default();
        // At the committed length, whatever a failed write left behind: positions handed out
        // by `append` stay true.
        let handle = self.active.write_all_at(&self.pending, self.active_len).and_then(|_| self.active.try_clone());
        let file = match handle {
            Ok(file) => file,
            Err(e) => {
                // After a failed write the file's state is unknown: nothing more is written
                // until the journal is reopened, whose scan keeps exactly the intact commits.
                self.poisoned = Some(format!("commit failed: {e}"));
                return refuse(self, format!("commit failed: {e}"));
            }
        };
        let end = self.active_len + self.pending.len() as u64;
        self.in_flight = Some(end);
        self.pending.clear();
        self.pending_records = 0;
        Ok(WrittenCommit { file, path, segment: self.active_segment(), end })
    }

    /// The second half of [`Journal::commit`]: with `synced` the outcome of
    /// [`WrittenCommit::sync`], makes the commit's frames readable. A failed sync poisons the
    /// journal (the kernel may have dropped the dirty pages): nothing more is written until it is
    /// reopened. Returns the new end.
    pub fn finish_commit(&mut self, written: WrittenCommit, synced: Result<()>) -> Result<u64> {
        self.in_flight = None;
        if let Err(e) = synced {
            self.poisoned = Some(format!("commit failed: {e}"));
            return Err(e);
        }
        self.active_len = written.end;
        Ok(self.end())
    }

    /// Whether a commit is written and not yet finished (see [`Journal::write_commit`]).
    pub fn commit_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Why the journal refuses writes until it is reopened, if it does.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// Starts a new segment at `first`, the current end.
    fn roll(&mut self, first: u64) -> Result<()> {
        if first != self.end() {
            return Err(corrupt(&self.dir, first, format!("a new segment must start at the journal's end {}", self.end())));
        }
        let path = segment_path(&self.dir, first);
        create_segment(&self.dir, &path)?;
        self.active = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| Error::io(&path, e))?;
        self.segments.push(Segment { first, path });
        self.active_len = SEGMENT_MAGIC.len() as u64;
        Ok(())
    }

    /// The segment holding `position` and the offset within it.
    fn locate(&self, position: u64) -> Result<(&Segment, u64)> {
        let i = self.segments.partition_point(|s| s.first <= position);
        let segment = i.checked_sub(1).and_then(|i| self.segments.get(i)).ok_or_else(|| corrupt(&self.dir, position, "before the journal's first segment"))?;
        Ok((segment, position - segment.first))
    }

    /// The committed frame at `position` (as [`Journal::append`] returned it).
    pub fn read_at(&self, position: u64) -> Result<Frame> {
        if position >= self.end() {
            return Err(corrupt(&self.dir, position, format!("past the committed end {}", self.end())));
        }
        let (segment, offset) = self.locate(position)?;
        let file = self.handles.get(segment.first, &segment.path)?;
        let mut header = [0u8; FRAME_HEADER];
        file.read_exact_at(&mut header, offset).map_err(|e| Error::io(&segment.path, e))?;
        let (len, crc) = frame_header(&header);
        if len == 0 || len > MAX_BODY {
            return Err(corrupt(&segment.path, offset, format!("frame length {len}")));
        }
        let mut body = vec![0u8; len];
        file.read_exact_at(&mut body, offset + FRAME_HEADER as u64).map_err(|e| Error::io(&segment.path, e))?;
        if crc32c::crc32c(&body) != crc {
            return Err(corrupt(&segment.path, offset, "frame checksum mismatch"));
        }
        decode_body(&body).map_err(|d| corrupt(&segment.path, offset, d))
    }

    /// Calls `f(position, frame)` for every committed frame from `from` (a frame position, or
    /// the end of the journal) to the end, in order.
    pub fn replay(&self, from: u64, f: impl FnMut(u64, Frame) -> Result<()>) -> Result<()> {
        self.replay_until(from, self.end(), f)
    }

    /// The start position of every segment, oldest first; the last is being written.
    pub fn segment_starts(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.first).collect()
    }

    /// [`Journal::replay`] up to `to` (a frame or segment boundary) instead of the end.
    pub fn replay_until(&self, from: u64, to: u64, mut f: impl FnMut(u64, Frame) -> Result<()>) -> Result<()> {
        let end = self.end().min(to);
        let mut position = from;
        while position < end {
            let (segment, offset) = self.locate(position)?;
            let segment = segment.clone();
            let segment_end = self.segments.iter().find(|s| s.first > segment.first).map_or(end, |s| s.first).min(end);
            let mut reader = std::io::BufReader::with_capacity(1 << 20, File::open(&segment.path).map_err(|e| Error::io(&segment.path, e))?);
            let start = if offset == 0 { SEGMENT_MAGIC.len() as u64 } else { offset };
            reader.seek(SeekFrom::Start(start)).map_err(|e| Error::io(&segment.path, e))?;
            position = segment.first + start;
            while position < segment_end {
                let (frame, len) = read_frame(&mut reader)
                    .map_err(|d| corrupt(&segment.path, position - segment.first, d))?
                    .ok_or_else(|| corrupt(&segment.path, position - segment.first, "the segment ends inside a committed frame"))?;
                f(position, frame)?;
                position += len;
            }
        }
        Ok(())
    }
}

fn create_segment(dir: &Path, path: &Path) -> Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| Error::io(path, e))?;
    if let Err(e) = f.write_all(SEGMENT_MAGIC).and_then(|_| f.sync_data()) {
        // A half-made segment would be taken for the last one at the next open.
        let _ = std::fs::remove_file(path);
        return Err(Error::io(path, e));
    }
    crate::durable::sync_dir(dir)
}

/// The next offset named by the last commit of a sealed segment that names one.
fn last_next_offset(segment: &Segment) -> Result<Option<i64>> {
    let mut reader = std::io::BufReader::new(File::open(&segment.path).map_err(|e| Error::io(&segment.path, e))?);
    reader.seek(SeekFrom::Start(SEGMENT_MAGIC.len() as u64)).map_err(|e| Error::io(&segment.path, e))?;
    let mut found = None;
    let mut at = SEGMENT_MAGIC.len() as u64;
    while let Some((frame, len)) = read_frame(&mut reader).map_err(|d| corrupt(&segment.path, at, d))? {
        if let Frame::Commit(CommitFrame { next_offset: Some(o), .. }) = frame {
            found = Some(o);
        }
        at += len;
    }
    Ok(found)
}

fn frame_header(header: &[u8; FRAME_HEADER]) -> (usize, u32) {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    (len, crc)
}

/// Fills in the length and CRC of the frame that starts at `start` of `buf`.
fn seal_frame(buf: &mut [u8], start: usize) {
    let body = &buf[start + FRAME_HEADER..];
    let (len, crc) = (body.len() as u32, crc32c::crc32c(body));
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Why a frame could not be read.
#[derive(Debug)]
enum FrameError {
    /// The disk would not give the bytes: never taken for a torn tail.
    Io(std::io::Error),
    /// The bytes are there but are not a whole, intact frame.
    Damaged(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Io(e) => write!(f, "read failed: {e}"),
            FrameError::Damaged(why) => f.write_str(why),
        }
    }
}

impl From<String> for FrameError {
    fn from(why: String) -> Self {
        FrameError::Damaged(why)
    }
}

/// The next frame and its length: `Ok(None)` at a clean end of the data, `Err` for a frame
/// that is torn or damaged, or bytes the disk would not give.
fn read_frame(reader: &mut impl Read) -> std::result::Result<Option<(Frame, u64)>, FrameError> {
    let mut header = [0u8; FRAME_HEADER];
    match read_full(reader, &mut header)? {
        0 => return Ok(None),
        n if n < FRAME_HEADER => return Err(format!("torn frame header ({n} of {FRAME_HEADER} bytes)").into()),
        _ => {}
    }
    let (len, crc) = frame_header(&header);
    if len == 0 || len > MAX_BODY {
        return Err(format!("frame length {len}").into());
    }
    let mut body = vec![0u8; len];
    let got = read_full(reader, &mut body)?;
    if got < len {
        return Err(format!("torn frame ({got} of {len} bytes)").into());
    }
    if crc32c::crc32c(&body) != crc {
        return Err(FrameError::Damaged("frame checksum mismatch".into()));
    }
    Ok(Some((decode_body(&body)?, (FRAME_HEADER + len) as u64)))
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::result::Result<usize, FrameError> {
    crate::log::read_full(reader, buf).map_err(FrameError::Io)
}

/// Decodes a frame body whose CRC already matched.
fn decode_body(body: &[u8]) -> std::result::Result<Frame, String> {
    let mut r = Cursor(body);
    let frame = match r.u8()? {
        RECORD => {
            let tenant_len = r.u16()? as usize;
            let tenant = String::from_utf8(r.take(tenant_len)?.to_vec()).map_err(|_| "tenant id is not UTF-8".to_string())?;
            let seq = r.u64()?;
            let entry_len = r.u32()? as usize;
            let entry = r.take(entry_len)?.to_vec();
            let count = r.u8()? as usize;
            let mut nodes = Vec::with_capacity(count);
            for _ in 0..count {
                nodes.push(r.take(32)?.try_into().map_err(|_| "short node".to_string())?);
            }
            let sealed = if r.0.is_empty() {
                None
            } else {
                let len = r.u32()? as usize;
                Some(r.take(len)?.to_vec())
            };
            Frame::Record(RecordFrame { tenant, seq, entry, nodes, sealed })
        }
        COMMIT => {
            let next = r.u64()? as i64;
            let records = r.u32()?;
            Frame::Commit(CommitFrame { next_offset: (next != i64::MIN).then_some(next), records })
        }
        other => return Err(format!("unknown frame type {other:#04x}")),
    };
    if !r.0.is_empty() {
        return Err(format!("{} bytes after the frame's content", r.0.len()));
    }
    Ok(frame)
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("frame content ends early ({} bytes left, {n} needed)", self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> std::result::Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| "short u16")?))
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "short u32")?))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| "short u64")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tenant: &str, seq: u64, fill: u8) -> RecordFrame {
        // Every third record carries sealed values.
        let sealed = (seq % 3 == 1).then(|| vec![fill ^ 0x5a; 30 + seq as usize % 5]);
        RecordFrame { tenant: tenant.into(), seq, entry: vec![fill; 40 + seq as usize % 7], nodes: vec![[fill; 32]; 1 + (seq as usize % 3)], sealed }
    }

    fn frames(j: &Journal) -> Vec<(u64, Frame)> {
        let mut out = Vec::new();
        j.replay(0, |p, f| {
            out.push((p, f));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn commits_survive_reopen_and_frames_read_back_by_position() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, opened) = Journal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        assert_eq!(opened, Opened::default());
        let a = j.append(&record("acme", 0, 1)).unwrap();
        let b = j.append(&record("globex", 0, 2)).unwrap();
        j.commit(Some(7)).unwrap();
        let c = j.append(&record("acme", 1, 3)).unwrap();
        let end = j.commit(None).unwrap();
        drop(j);
        let (j, opened) = Journal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        assert_eq!(opened, Opened { cut_bytes: 0, next_offset: Some(7) });
        assert_eq!(j.end(), end);
        assert_eq!(j.read_at(a).unwrap(), Frame::Record(record("acme", 0, 1)));
        assert_eq!(j.read_at(b).unwrap(), Frame::Record(record("globex", 0, 2)));
        assert_eq!(j.read_at(c).unwrap(), Frame::Record(record("acme", 1, 3)));
        let all = frames(&j);
        assert_eq!(all.len(), 5);
        assert_eq!(all[2].1, Frame::Commit(CommitFrame { next_offset: Some(7), records: 2 }));
        assert_eq!(all[4].1, Frame::Commit(CommitFrame { next_offset: None, records: 1 }));
        assert!(j.read_at(end).is_err(), "nothing is read past the committed end");
    }

    #[test]
    fn an_unfinished_commit_is_cut_at_open_and_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        j.append(&record("acme", 0, 1)).unwrap();
        let committed = j.commit(Some(1)).unwrap();
        drop(j);
        // Frames of a commit whose commit frame never reached the disk.
        let path = segment_path(dir.path(), 0);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        let mut tail = Vec::new();
        tail.extend_from_slice(&[0; FRAME_HEADER]);
        tail.extend_from_slice(&[RECORD, 1, 0, b'x']);
        tail.extend_from_slice(&5u64.to_le_bytes());
        tail.extend_from_slice(&0u32.to_le_bytes());
        tail.push(0);
        seal_frame(&mut tail, 0);
        f.write_all(&tail).unwrap();
        drop(f);
        let (j, opened) = Journal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        assert_eq!(opened, Opened { cut_bytes: tail.len() as u64, next_offset: Some(1) });
        assert_eq!(j.end(), committed);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), committed);
    }

    #[test]
    fn damage_short_of_the_acknowledged_position_is_refused_and_nothing_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        let mut ends = Vec::new();
        for c in 0..3u64 {
            j.append(&record("acme", c, c as u8)).unwrap();
            ends.push(j.commit(Some(c as i64)).unwrap());
        }
        drop(j);
        let path = segment_path(dir.path(), 0);
        let intact = std::fs::read(&path).unwrap();
        // One bit flipped in the first commit's record: the scan stops there.
        let mut damaged = intact.clone();
        damaged[SEGMENT_MAGIC.len() + FRAME_HEADER + 4] ^= 0x01;
        std::fs::write(&path, &damaged).unwrap();
        let err = Journal::open_acknowledged(dir.path(), DEFAULT_SEGMENT_BYTES, ends[2]).err().expect("damage is refused");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()) && text.contains("acknowledged durable through position"), "{text}");
        assert_eq!(std::fs::read(&path).unwrap(), damaged, "nothing cut or repaired");
        // Cut short at a commit boundary: whole commits, but not as many as were acknowledged.
        std::fs::write(&path, &intact[..ends[0] as usize]).unwrap();
        assert!(Journal::open_acknowledged(dir.path(), DEFAULT_SEGMENT_BYTES, ends[1]).is_err());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), ends[0]);
        // A torn tail past the acknowledged position is still cut.
        std::fs::write(&path, &intact[..ends[2] as usize - 3]).unwrap();
        let (j, opened) = Journal::open_acknowledged(dir.path(), DEFAULT_SEGMENT_BYTES, ends[1]).unwrap();
        assert_eq!((j.end(), opened.cut_bytes), (ends[1], ends[2] - 3 - ends[1]));
        drop(j);
        // No segment at all, though one was acknowledged: refused, and nothing is created.
        std::fs::remove_file(&path).unwrap();
        assert!(Journal::open_acknowledged(dir.path(), DEFAULT_SEGMENT_BYTES, ends[0]).is_err());
        assert!(!path.exists());
        let gone = dir.path().join("gone");
        assert!(Journal::open_acknowledged(&gone, DEFAULT_SEGMENT_BYTES, ends[0]).is_err());
        assert!(!gone.exists(), "a missing journal directory is not created");
    }

    #[test]
    fn every_torn_prefix_reopens_to_the_last_whole_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        let mut ends = vec![j.end()];
        for c in 0..4u64 {
            for s in 0..3 {
                j.append(&record("t", c * 3 + s, c as u8)).unwrap();
            }
            ends.push(j.commit(Some(c as i64)).unwrap());
        }
        drop(j);
        let whole = std::fs::read(segment_path(dir.path(), 0)).unwrap();
        for cut in SEGMENT_MAGIC.len()..=whole.len() {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(segment_path(d.path(), 0), &whole[..cut]).unwrap();
            let (j, opened) = Journal::open(d.path(), DEFAULT_SEGMENT_BYTES).unwrap();
            let expected = *ends.iter().rev().find(|e| **e <= cut as u64).unwrap();
            assert_eq!(j.end(), expected, "cut at {cut}");
            assert_eq!(opened.cut_bytes, cut as u64 - expected, "cut at {cut}");
            let commits = ends.iter().filter(|e| **e <= expected).count() as i64 - 1;
            assert_eq!(opened.next_offset, (commits > 0).then_some(commits - 1), "cut at {cut}");
        }
    }

    #[test]
    fn damage_inside_committed_frames_is_an_error_never_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), 4096).unwrap();
        let mut positions = Vec::new();
        for s in 0..200 {
            positions.push(j.append(&record("acme", s, 9)).unwrap());
            if s % 10 == 9 {
                j.commit(Some(s as i64)).unwrap();
            }
        }
        let segments = j.segments.len();
        assert!(segments > 3, "rolled into {segments} segments");
        drop(j);
        // Flip one byte inside a record of the first (sealed) segment.
        let path = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = positions[1] as usize + FRAME_HEADER + 5;
        bytes[at] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (j, _) = Journal::open(dir.path(), 4096).unwrap();
        assert_eq!(j.segments.len(), segments);
        let err = j.read_at(positions[1]).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch") && err.contains("00000000000000000000.seg"), "{err}");
        let err = j.replay(0, |_, _| Ok(())).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
        assert_eq!(j.read_at(positions[150]).unwrap(), Frame::Record(record("acme", 150, 9)), "other segments still read");
    }

    #[test]
    fn segments_roll_after_commits_and_replay_crosses_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), 4096).unwrap();
        let mut expected = Vec::new();
        for s in 0..300u64 {
            let r = record(&format!("t{}", s % 5), s, (s % 251) as u8);
            let p = j.append(&r).unwrap();
            expected.push((p, Frame::Record(r)));
            if s % 25 == 24 {
                let records = 25;
                let p = j.next_position();
                j.commit(Some(s as i64 + 1)).unwrap();
                expected.push((p, Frame::Commit(CommitFrame { next_offset: Some(s as i64 + 1), records })));
            }
        }
        drop(j);
        let (j, opened) = Journal::open(dir.path(), 4096).unwrap();
        assert_eq!(opened.next_offset, Some(300));
        assert!(j.segments.len() > 5);
        assert_eq!(frames(&j), expected);
        let middle = expected[expected.len() / 2].0;
        let mut from_middle = Vec::new();
        j.replay(middle, |p, f| {
            from_middle.push((p, f));
            Ok(())
        })
        .unwrap();
        assert_eq!(from_middle, expected[expected.len() / 2..]);
    }

    #[test]
    fn records_past_the_limits_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        let big = RecordFrame { tenant: "acme".into(), seq: 0, entry: vec![0; MAX_ENTRY_BYTES + 1], nodes: vec![], sealed: None };
        assert!(matches!(j.append(&big), Err(Error::EntryTooLarge(_))));
        let long = RecordFrame { tenant: "x".repeat(256), seq: 0, entry: vec![], nodes: vec![], sealed: None };
        assert!(j.append(&long).is_err());
        assert_eq!(j.commit(None).unwrap(), SEGMENT_MAGIC.len() as u64 + (FRAME_HEADER + 13) as u64, "only the commit frame");
    }

    #[test]
    fn a_sealed_segment_that_lost_its_end_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), 4096).unwrap();
        for s in 0..100 {
            j.append(&record("acme", s, 3)).unwrap();
            j.commit(None).unwrap();
        }
        assert!(j.segments.len() > 2);
        drop(j);
        let first = segment_path(dir.path(), 0);
        let len = std::fs::metadata(&first).unwrap().len();
        OpenOptions::new().write(true).open(&first).unwrap().set_len(len - 10).unwrap();
        let err = Journal::open(dir.path(), 4096).err().unwrap().to_string();
        assert!(err.contains("sealed segment") && err.contains("00000000000000000000.seg"), "{err}");
    }

    #[test]
    fn after_a_failed_commit_nothing_is_written_until_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        j.append(&record("acme", 0, 1)).unwrap();
        let end = j.commit(None).unwrap();
        j.poisoned = Some("commit failed: injected".into());
        j.append(&record("acme", 1, 1)).unwrap();
        let err = j.commit(None).unwrap_err().to_string();
        assert!(err.contains("must be reopened") && err.contains("injected"), "{err}");
        assert_eq!(std::fs::metadata(segment_path(dir.path(), 0)).unwrap().len(), end, "nothing written");
        drop(j);
        let (j, _) = Journal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        assert_eq!((j.end(), j.poisoned()), (end, None));
    }

    #[test]
    fn a_file_that_is_not_a_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(segment_path(dir.path(), 0), b"PARQUET1 and more bytes").unwrap();
        let err = Journal::open(dir.path(), DEFAULT_SEGMENT_BYTES).err().unwrap().to_string();
        assert!(err.contains("bad magic"), "{err}");
    }
}
