//! One tenant's durable, append-only log on local disk.
//!
//! Files in the tenant's directory:
//! * `entries`: frames `[u32 BE length][u32 BE CRC-32C of the entry][entry]`, append-only.
//! * `hashes`: every perfect Merkle node, 32 bytes each, in post-order (see [`crate::merkle`]).
//! * `index`: the byte offset of each entry's frame, `u64` BE, 8 bytes per entry.
//! * `head`: `<size> <base64 root> <entries length>` of the last group commit, replaced atomically
//!   after the other files are fsynced. Entries up to `head` are durable and acknowledged.
//!
//! `hashes` and `index` are derived from `entries` and are rebuilt from them when they disagree
//! with `head`. Appends are buffered in memory and written by [`TenantLog::commit`] (group commit:
//! one write and one fsync per file for the whole batch). Only committed entries are served.
//!
//! Opening costs O(log n) reads plus a scan of whatever follows the committed length: frames
//! there (from a crash between write and head update) are kept while intact and cut at the first
//! short or corrupt one. The committed range is not rescanned on open (that is `tally log audit`),
//! but every entry read checks its CRC, so damage is reported, never served. A tenant keeps no
//! per-entry state in memory.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::error::{Error, Result};
use crate::merkle::{self, leaf_hash, node_position, stored_nodes, Frontier, Hash, NodeSource};

/// Largest entry: tlog-tiles entry bundles prefix each entry with a big-endian uint16.
pub const MAX_ENTRY_BYTES: usize = 65_535;
const FRAME_HEADER: usize = 8;

/// The last group commit, as recorded in `head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub size: u64,
    pub root: Hash,
    /// Bytes of `entries` holding the committed frames.
    pub entries_len: u64,
}

pub struct TenantLog {
    dir: PathBuf,
    entries: File,
    hashes: File,
    index: File,
    head: Head,
    frontier: Frontier,
    pending_entries: Vec<u8>,
    pending_index: Vec<u8>,
    pending_hashes: Vec<Hash>,
}

impl std::fmt::Debug for TenantLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantLog").field("dir", &self.dir).field("size", &self.head.size).finish()
    }
}

fn crc(entry: &[u8]) -> u32 {
    crc32c::crc32c(entry)
}

/// Reads frames from `reader` (positioned at byte `start`) until the input ends or a frame is
/// short or fails its checksum; calls `each(offset, entry)` for every intact one. Returns the
/// byte length up to the end of the last intact frame.
fn scan_frames(reader: &mut impl Read, start: u64, mut each: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
    let mut pos = start;
    let mut entry = Vec::new();
    loop {
        let mut header = [0u8; FRAME_HEADER];
        if read_full(reader, &mut header).map_err(entries_io)? < FRAME_HEADER {
            return Ok(pos);
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > MAX_ENTRY_BYTES {
            return Ok(pos);
        }
        entry.resize(len, 0);
        if read_full(reader, &mut entry).map_err(entries_io)? < len || crc(&entry) != u32::from_be_bytes([header[4], header[5], header[6], header[7]]) {
            return Ok(pos);
        }
        each(pos, &entry)?;
        pos += (FRAME_HEADER + len) as u64;
    }
}

fn entries_io(source: std::io::Error) -> Error {
    Error::Io { path: "entries".into(), source }
}

/// Reads until `buf` is full or the data ends; how many bytes it read (short only at the end).
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

impl TenantLog {
    /// Opens (creating if needed) the log in `dir`, repairing a torn tail.
    pub fn open(dir: &Path) -> Result<TenantLog> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // A crash during a durable replace (head, checkpoint) leaves its temporary behind.
        crate::durable::remove_temporaries(dir)?;
        let open = |name: &str| {
            let path = dir.join(name);
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(|e| Error::io(&path, e))
        };
        let head = read_head(dir)?;
        let mut log = TenantLog {
            dir: dir.to_path_buf(),
            entries: open("entries")?,
            hashes: open("hashes")?,
            index: open("index")?,
            head,
            frontier: Frontier::default(),
            pending_entries: Vec::new(),
            pending_index: Vec::new(),
            pending_hashes: Vec::new(),
        };
        let entries_path = dir.join("entries");
        let file_len = log.entries.metadata().map_err(|e| Error::io(&entries_path, e))?.len();
        if file_len < head.entries_len {
            return Err(log.corrupt("entries", format!("committed length is {} bytes but the file has {file_len}", head.entries_len)));
        }
        if !log.derived_files_match_head()? {
            tracing::warn!(dir = %dir.display(), "index or hash file disagrees with the committed head; rebuilding");
            log.rebuild_derived()?;
        }
        log.frontier = Frontier::load(&log, head.size)?;
        if log.frontier.root() != head.root {
            return Err(log.corrupt("entries", format!("entries do not hash to the committed root at size {}", head.size)));
        }

        // Frames written after the last head update: keep the intact ones, cut the rest.
        let mut reader = BufReader::new(&log.entries);
        reader.seek(SeekFrom::Start(head.entries_len)).map_err(|e| Error::io(&entries_path, e))?;
        let mut tail: Vec<(u64, Hash)> = Vec::new();
        let end = scan_frames(&mut reader, head.entries_len, |offset, entry| {
            tail.push((offset, leaf_hash(entry)));
            Ok(())
        })?;
        drop(reader);
        if end < file_len {
            tracing::warn!(dir = %dir.display(), kept = tail.len(), cut_bytes = file_len - end, "torn tail cut from entries");
            log.entries.set_len(end).map_err(|e| Error::io(&entries_path, e))?;
        }
        if !tail.is_empty() {
            for (offset, leaf) in tail {
                log.pending_index.extend_from_slice(&offset.to_be_bytes());
                log.frontier.push(leaf, &mut log.pending_hashes);
            }
            // The frames are already in `entries`; committing writes their nodes, index and head.
            log.write_and_sync(end)?;
        }
        // Drop derived bytes a crash left beyond the committed state (they describe cut frames).
        for (file, name, len) in [(&log.hashes, "hashes", stored_nodes(log.head.size) * 32), (&log.index, "index", log.head.size * 8)] {
            file.set_len(len).map_err(|e| Error::io(&dir.join(name), e))?;
        }
        Ok(log)
    }

    fn corrupt(&self, file: &str, detail: String) -> Error {
        Error::Corrupt { path: self.dir.join(file).display().to_string(), detail }
    }

    /// Whether `index` and `hashes` cover the committed size and agree with `head`.
    fn derived_files_match_head(&self) -> Result<bool> {
        let size = self.head.size;
        let len = |f: &File, name: &str| f.metadata().map(|m| m.len()).map_err(|e| Error::io(&self.dir.join(name), e));
        if len(&self.index, "index")? < size * 8 || len(&self.hashes, "hashes")? < stored_nodes(size) * 32 {
            return Ok(false);
        }
        if size > 0 {
            // The last committed frame must end exactly at the committed length.
            let last = self.offset(size - 1)?;
            let mut header = [0u8; FRAME_HEADER];
            if self.entries.read_exact_at(&mut header, last).is_err() {
                return Ok(false);
            }
            let frame_len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as u64;
            if last + FRAME_HEADER as u64 + frame_len != self.head.entries_len {
                return Ok(false);
            }
            if merkle::root(self, size)? != self.head.root {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Recomputes `index` and `hashes` for the committed range from `entries`.
    fn rebuild_derived(&mut self) -> Result<()> {
        let mut reader = BufReader::new(&self.entries);
        let mut index = Vec::new();
        let mut nodes = Vec::new();
        let mut frontier = Frontier::default();
        let committed = self.head.size;
        let end = scan_frames(&mut reader, 0, |offset, entry| {
            if frontier.size() < committed {
                index.extend_from_slice(&offset.to_be_bytes());
                frontier.push(leaf_hash(entry), &mut nodes);
            }
            Ok(())
        })?;
        drop(reader);
        if frontier.size() < committed || end < self.head.entries_len {
            return Err(self.corrupt("entries", format!("committed size is {committed} but only {} entries are intact", frontier.size())));
        }
        let bytes: Vec<u8> = nodes.iter().flatten().copied().collect();
        for (file, name, data) in [(&self.index, "index", &index), (&self.hashes, "hashes", &bytes)] {
            let path = self.dir.join(name);
            file.set_len(0).map_err(|e| Error::io(&path, e))?;
            file.write_all_at(data, 0).map_err(|e| Error::io(&path, e))?;
            file.sync_data().map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Entries committed and served.
    pub fn size(&self) -> u64 {
        self.head.size
    }

    /// Root of the committed tree.
    pub fn root(&self) -> Hash {
        self.head.root
    }

    /// Entries appended but not yet committed.
    pub fn pending(&self) -> u64 {
        self.frontier.size() - self.head.size
    }

    /// Buffers one entry; returns its sequence number. Durable after [`TenantLog::commit`].
    pub fn append(&mut self, entry: &[u8]) -> Result<u64> {
        if entry.len() > MAX_ENTRY_BYTES {
            return Err(Error::EntryTooLarge(entry.len()));
        }
        let seq = self.frontier.size();
        let offset = self.head.entries_len + self.pending_entries.len() as u64;
        self.pending_index.extend_from_slice(&offset.to_be_bytes());
        self.pending_entries.extend_from_slice(&(entry.len() as u32).to_be_bytes());
        self.pending_entries.extend_from_slice(&crc(entry).to_be_bytes());
        self.pending_entries.extend_from_slice(entry);
        self.frontier.push(leaf_hash(entry), &mut self.pending_hashes);
        Ok(seq)
    }

    /// Group commit: writes every pending entry, node and offset, fsyncs, then replaces the head.
    pub fn commit(&mut self) -> Result<()> {
        if self.pending() == 0 {
            return Ok(());
        }
        let entries_path = self.dir.join("entries");
        self.entries.write_all_at(&self.pending_entries, self.head.entries_len).map_err(|e| Error::io(&entries_path, e))?;
        let end = self.head.entries_len + self.pending_entries.len() as u64;
        self.write_and_sync(end)
    }

    /// Writes pending nodes and offsets, fsyncs all files, and records the new head at `entries_len`.
    fn write_and_sync(&mut self, entries_len: u64) -> Result<()> {
        let hashes_path = self.dir.join("hashes");
        let index_path = self.dir.join("index");
        let hash_bytes: Vec<u8> = self.pending_hashes.iter().flatten().copied().collect();
        self.hashes.write_all_at(&hash_bytes, stored_nodes(self.head.size) * 32).map_err(|e| Error::io(&hashes_path, e))?;
        self.index.write_all_at(&self.pending_index, self.head.size * 8).map_err(|e| Error::io(&index_path, e))?;
        for (file, path) in [(&self.entries, self.dir.join("entries")), (&self.hashes, hashes_path), (&self.index, index_path)] {
            file.sync_data().map_err(|e| Error::io(&path, e))?;
        }
        let head = Head { size: self.frontier.size(), root: self.frontier.root(), entries_len };
        write_head(&self.dir, &head)?;
        self.head = head;
        self.pending_entries.clear();
        self.pending_index.clear();
        self.pending_hashes.clear();
        Ok(())
    }

    fn offset(&self, seq: u64) -> Result<u64> {
        let mut buf = [0u8; 8];
        self.index.read_exact_at(&mut buf, seq * 8).map_err(|e| Error::io(&self.dir.join("index"), e))?;
        Ok(u64::from_be_bytes(buf))
    }

    /// The committed entry `seq`; its checksum is verified on every read.
    pub fn entry(&self, seq: u64) -> Result<Vec<u8>> {
        if seq >= self.head.size {
            return Err(Error::NoSuchEntry { seq, size: self.head.size });
        }
        let offset = self.offset(seq)?;
        let path = self.dir.join("entries");
        let mut header = [0u8; FRAME_HEADER];
        self.entries.read_exact_at(&mut header, offset).map_err(|e| Error::io(&path, e))?;
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > MAX_ENTRY_BYTES || offset + (FRAME_HEADER + len) as u64 > self.head.entries_len {
            return Err(self.corrupt("entries", format!("entry {seq} has a damaged frame header")));
        }
        let mut entry = vec![0u8; len];
        self.entries.read_exact_at(&mut entry, offset + FRAME_HEADER as u64).map_err(|e| Error::io(&path, e))?;
        if crc(&entry) != u32::from_be_bytes([header[4], header[5], header[6], header[7]]) {
            return Err(self.corrupt("entries", format!("entry {seq} fails its checksum")));
        }
        Ok(entry)
    }
}

impl crate::entries::TenantEntries for TenantLog {
    fn size(&self) -> u64 {
        self.head.size
    }
    fn entry(&self, seq: u64) -> Result<Vec<u8>> {
        TenantLog::entry(self, seq)
    }
}

impl NodeSource for TenantLog {
    type Error = Error;
    fn node(&self, level: u32, index: u64) -> Result<Hash> {
        read_node(&self.hashes, &self.dir, level, index)
    }
}

/// A stored perfect node from a log's `hashes` file.
fn read_node(hashes: &File, dir: &Path, level: u32, index: u64) -> Result<Hash> {
    let mut hash = [0u8; 32];
    hashes.read_exact_at(&mut hash, node_position(level, index) * 32).map_err(|e| Error::io(&dir.join("hashes"), e))?;
    Ok(hash)
}

/// Read-only access to a tenant log another process (the ledger) is writing: the committed
/// head and stored nodes, for proofs. Never repairs or writes anything; nodes of any size up to
/// the head it read are immutable, so concurrent appends do not disturb it.
pub struct LogReader {
    dir: PathBuf,
    hashes: File,
    index: File,
    entries: File,
    head: Head,
}

impl LogReader {
    pub fn open(dir: &Path) -> Result<LogReader> {
        let head = read_head(dir)?;
        let open = |name: &str| {
            let path = dir.join(name);
            File::open(&path).map_err(|e| Error::io(&path, e))
        };
        Ok(LogReader { dir: dir.to_path_buf(), hashes: open("hashes")?, index: open("index")?, entries: open("entries")?, head })
    }

    /// Committed entry `seq` (below the size read at open), checksum verified.
    pub fn entry(&self, seq: u64) -> Result<Vec<u8>> {
        if seq >= self.head.size {
            return Err(Error::NoSuchEntry { seq, size: self.head.size });
        }
        let mut buf = [0u8; 8];
        self.index.read_exact_at(&mut buf, seq * 8).map_err(|e| Error::io(&self.dir.join("index"), e))?;
        let offset = u64::from_be_bytes(buf);
        let path = self.dir.join("entries");
        let mut header = [0u8; FRAME_HEADER];
        self.entries.read_exact_at(&mut header, offset).map_err(|e| Error::io(&path, e))?;
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > MAX_ENTRY_BYTES {
            return Err(Error::Corrupt { path: path.display().to_string(), detail: format!("entry {seq} has a damaged frame header") });
        }
        let mut entry = vec![0u8; len];
        self.entries.read_exact_at(&mut entry, offset + FRAME_HEADER as u64).map_err(|e| Error::io(&path, e))?;
        if crc(&entry) != u32::from_be_bytes([header[4], header[5], header[6], header[7]]) {
            return Err(Error::Corrupt { path: path.display().to_string(), detail: format!("entry {seq} fails its checksum") });
        }
        Ok(entry)
    }

    /// Committed size when opened.
    pub fn size(&self) -> u64 {
        self.head.size
    }

    /// The root its head records for that size.
    pub fn root(&self) -> Hash {
        self.head.root
    }
}

impl NodeSource for LogReader {
    type Error = Error;
    fn node(&self, level: u32, index: u64) -> Result<Hash> {
        read_node(&self.hashes, &self.dir, level, index)
    }
}

fn read_head(dir: &Path) -> Result<Head> {
    let path = dir.join("head");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Head { size: 0, root: merkle::empty_root(), entries_len: 0 }),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let corrupt = || Error::Corrupt { path: path.display().to_string(), detail: format!("unreadable head {text:?}") };
    // Strict: exactly `<size> <base64 root> <length>\n`, so any damage to the file is noticed.
    let fields: Vec<&str> = text.strip_suffix('\n').ok_or_else(corrupt)?.split(' ').collect();
    let [size, root, len] = fields[..] else { return Err(corrupt()) };
    let decimal = |s: &str| -> Option<u64> {
        (!s.is_empty() && (s.len() == 1 || !s.starts_with('0')) && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    let root: Hash = B64.decode(root).ok().and_then(|r| r.try_into().ok()).ok_or_else(corrupt)?;
    Ok(Head { size: decimal(size).ok_or_else(corrupt)?, root, entries_len: decimal(len).ok_or_else(corrupt)? })
}

fn write_head(dir: &Path, head: &Head) -> Result<()> {
    crate::durable::replace_file(&dir.join("head"), format!("{} {} {}\n", head.size, B64.encode(head.root), head.entries_len).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entries::TenantEntries;
    use crate::merkle::{verify_consistency, verify_inclusion, MemoryTree};

    fn entry(i: u64) -> Vec<u8> {
        format!("{{\"seq\":{i},\"payload\":\"{}\"}}", "x".repeat((i % 50) as usize)).into_bytes()
    }

    #[test]
    fn appends_commit_and_reopen_with_the_same_root() {
        let dir = tempfile::tempdir().unwrap();
        let mut reference = MemoryTree::new();
        {
            let mut log = TenantLog::open(dir.path()).unwrap();
            for i in 0..1000 {
                assert_eq!(log.append(&entry(i)).unwrap(), i);
                reference.push_entry(&entry(i));
                if i % 97 == 0 {
                    log.commit().unwrap();
                    assert_eq!(log.root(), merkle::root(&reference, i + 1).unwrap());
                }
            }
            assert_eq!(log.size(), 971, "uncommitted appends are not served");
            log.commit().unwrap();
        }
        let log = TenantLog::open(dir.path()).unwrap();
        assert_eq!(log.size(), 1000);
        assert_eq!(log.root(), reference.root());
        for (seq, size) in [(0, 1), (5, 1000), (999, 1000), (500, 777)] {
            let proof = log.inclusion_proof(seq, size).unwrap();
            verify_inclusion(&leaf_hash(&entry(seq)), seq, size, &proof, &log.root_at(size).unwrap()).unwrap();
        }
        let proof = log.consistency_proof(300, 1000).unwrap();
        verify_consistency(300, 1000, &log.root_at(300).unwrap(), &log.root(), &proof).unwrap();
        assert_eq!(log.entry(42).unwrap(), entry(42));
        assert!(matches!(log.entry(1000), Err(Error::NoSuchEntry { .. })));
    }

    #[test]
    fn oversized_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = TenantLog::open(dir.path()).unwrap();
        assert!(matches!(log.append(&vec![0; MAX_ENTRY_BYTES + 1]), Err(Error::EntryTooLarge(_))));
        assert_eq!(log.append(&vec![0; MAX_ENTRY_BYTES]).unwrap(), 0);
    }

    /// Writes a committed prefix and then the frames of one more batch *without* its head update,
    /// as a crash between write and commit leaves them; returns (dir, committed root, last batch range).
    fn crashed_log(committed: u64, extra: u64) -> (tempfile::TempDir, Hash, u64) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = TenantLog::open(dir.path()).unwrap();
        for i in 0..committed {
            log.append(&entry(i)).unwrap();
        }
        log.commit().unwrap();
        let root = log.root();
        let start = log.head.entries_len;
        let mut frames = Vec::new();
        for i in committed..committed + extra {
            let e = entry(i);
            frames.extend_from_slice(&(e.len() as u32).to_be_bytes());
            frames.extend_from_slice(&crc(&e).to_be_bytes());
            frames.extend_from_slice(&e);
        }
        log.entries.write_all_at(&frames, start).unwrap();
        drop(log);
        (dir, root, start)
    }

    #[test]
    fn a_torn_or_corrupt_last_write_at_every_byte_opens_at_an_intact_prefix() {
        let (template, committed_root, start) = crashed_log(40, 3);
        let full = std::fs::read(template.path().join("entries")).unwrap();
        let mut reference = MemoryTree::new();
        for i in 0..43 {
            reference.push_entry(&entry(i));
        }
        for cut in start as usize..full.len() {
            for corrupt in [false, true] {
                let dir = tempfile::tempdir().unwrap();
                for f in ["hashes", "head", "index"] {
                    std::fs::copy(template.path().join(f), dir.path().join(f)).unwrap();
                }
                let mut bytes = full.clone();
                if corrupt {
                    bytes[cut] ^= 0x40;
                } else {
                    bytes.truncate(cut);
                }
                std::fs::write(dir.path().join("entries"), &bytes).unwrap();
                let mut log = TenantLog::open(dir.path()).unwrap();
                let size = log.size();
                assert!((40..=43).contains(&size), "cut {cut}: size {size}");
                assert_eq!(log.root(), merkle::root(&reference, size).unwrap(), "cut {cut} corrupt {corrupt}");
                assert_eq!(log.root_at(40).unwrap(), committed_root);
                // Appends continue from there.
                log.append(&entry(size)).unwrap();
                log.commit().unwrap();
                assert_eq!(log.root(), merkle::root(&reference, size + 1).unwrap());
            }
        }
    }

    #[test]
    fn damage_inside_the_committed_range_is_reported_when_read_never_served() {
        let (dir, root, start) = crashed_log(10, 0);
        let mut bytes = std::fs::read(dir.path().join("entries")).unwrap();
        bytes[(start / 2) as usize] ^= 1;
        std::fs::write(dir.path().join("entries"), &bytes).unwrap();
        // Open does not rescan committed entries (that is the audit's job) ...
        let log = TenantLog::open(dir.path()).unwrap();
        assert_eq!(log.root(), root);
        // ... but the damaged entry is never served.
        let damaged: Vec<u64> = (0..10).filter(|&i| matches!(log.entry(i), Err(Error::Corrupt { .. }))).collect();
        assert_eq!(damaged.len(), 1, "exactly the damaged entry is refused: {damaged:?}");
    }

    #[test]
    fn a_lost_or_damaged_index_is_rebuilt_from_the_entries() {
        let (dir, root, _) = crashed_log(300, 0);
        std::fs::write(dir.path().join("index"), b"").unwrap();
        let log = TenantLog::open(dir.path()).unwrap();
        assert_eq!((log.size(), log.root()), (300, root));
        assert_eq!(log.entry(299).unwrap(), entry(299));
        drop(log);
        let mut index = std::fs::read(dir.path().join("index")).unwrap();
        index[299 * 8 + 7] ^= 1;
        std::fs::write(dir.path().join("index"), &index).unwrap();
        let log = TenantLog::open(dir.path()).unwrap();
        assert_eq!(log.entry(299).unwrap(), entry(299));
    }

    #[test]
    fn a_damaged_hash_file_is_rebuilt_from_the_entries() {
        let (dir, root, _) = crashed_log(100, 0);
        let mut hashes = std::fs::read(dir.path().join("hashes")).unwrap();
        let last = hashes.len() - 1;
        hashes[last] ^= 1;
        std::fs::write(dir.path().join("hashes"), &hashes).unwrap();
        let log = TenantLog::open(dir.path()).unwrap();
        assert_eq!(log.root(), root);
        assert_eq!(log.size(), 100);
    }
}
