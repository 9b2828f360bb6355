//! One tenant's durable, append-only log on local disk.
//!
//! Files in the tenant's directory:
//! * `entries`: frames `[u32 BE length][u32 BE CRC-32C of the entry][entry]`, append-only.
//! * `hashes`: every perfect Merkle node, 32 bytes each, in post-order (see [`crate::merkle`]);
//!   derived from `entries`, so it can always be repaired from them.
//! * `head`: `<size> <base64 root>` of the last group commit, replaced atomically after both files
//!   are fsynced. Entries up to `head` are durable and acknowledged.
//!
//! Appends are buffered in memory and written by [`TenantLog::commit`] (group commit: one write and
//! one fsync per file for the whole batch). Only committed entries are served: sizes, proofs and
//! entry reads stop at the durable size, so nothing that a crash could take back is ever shown.
//!
//! Opening repairs a torn tail: frames after the last good one (short or failing their checksum)
//! are cut off, the hash file is cut back and recomputed for the uncommitted tail, and the root at
//! `head` is checked against the stored nodes. Damage *inside* the committed range is never
//! repaired silently: it is an [`Error::Corrupt`].

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::error::{Error, Result};
use crate::merkle::{self, leaf_hash, node_position, stored_nodes, Frontier, Hash, NodeSource};

/// Largest entry: tlog-tiles entry bundles prefix each entry with a big-endian uint16.
pub const MAX_ENTRY_BYTES: usize = 65_535;
const FRAME_HEADER: usize = 8;

pub struct TenantLog {
    dir: PathBuf,
    entries: File,
    hashes: File,
    /// Byte offset of every durable entry's frame in `entries`.
    offsets: Vec<u64>,
    entries_len: u64,
    frontier: Frontier,
    durable_size: u64,
    durable_root: Hash,
    pending_entries: Vec<u8>,
    pending_offsets: Vec<u64>,
    pending_hashes: Vec<Hash>,
}

impl std::fmt::Debug for TenantLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantLog").field("dir", &self.dir).field("size", &self.durable_size).finish()
    }
}

fn crc(entry: &[u8]) -> u32 {
    crc32c::crc32c(entry)
}

impl TenantLog {
    /// Opens (creating if needed) the log in `dir`, repairing a torn tail.
    pub fn open(dir: &Path) -> Result<TenantLog> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let open = |name: &str| {
            let path = dir.join(name);
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(|e| Error::io(&path, e))
        };
        let entries = open("entries")?;
        let hashes = open("hashes")?;
        let (head_size, head_root) = read_head(dir)?;

        // 1. Scan frames; stop at the first short or corrupt one.
        let mut raw = Vec::new();
        (&entries).read_to_end(&mut raw).map_err(|e| Error::io(&dir.join("entries"), e))?;
        let mut offsets = Vec::new();
        let mut leaves = Vec::new();
        let mut pos = 0usize;
        while pos + FRAME_HEADER <= raw.len() {
            let len = u32::from_be_bytes(raw[pos..pos + 4].try_into().unwrap_or_default()) as usize;
            let sum = u32::from_be_bytes(raw[pos + 4..pos + 8].try_into().unwrap_or_default());
            let end = pos + FRAME_HEADER + len;
            if len > MAX_ENTRY_BYTES || end > raw.len() || crc(&raw[pos + FRAME_HEADER..end]) != sum {
                break;
            }
            offsets.push(pos as u64);
            leaves.push(leaf_hash(&raw[pos + FRAME_HEADER..end]));
            pos = end;
        }
        let size = offsets.len() as u64;
        if size < head_size {
            return Err(Error::Corrupt {
                path: dir.join("entries").display().to_string(),
                detail: format!("committed size is {head_size} but only {size} entries are intact"),
            });
        }
        if (pos as u64) < raw.len() as u64 {
            tracing::warn!(dir = %dir.display(), kept = size, cut_bytes = raw.len() - pos, "torn tail cut from entries");
            entries.set_len(pos as u64).map_err(|e| Error::io(&dir.join("entries"), e))?;
        }

        // 2. Keep stored nodes for the committed prefix; recompute the rest from the entries.
        let hashes_path = dir.join("hashes");
        let stored = hashes.metadata().map_err(|e| Error::io(&hashes_path, e))?.len() / 32;
        let keep = if stored >= stored_nodes(head_size) { head_size } else { 0 };
        hashes.set_len(stored_nodes(keep) * 32).map_err(|e| Error::io(&hashes_path, e))?;
        let mut log = TenantLog {
            dir: dir.to_path_buf(),
            entries,
            hashes,
            offsets: Vec::new(),
            entries_len: pos as u64,
            frontier: Frontier::default(),
            durable_size: keep,
            durable_root: merkle::empty_root(),
            pending_entries: Vec::new(),
            pending_offsets: Vec::new(),
            pending_hashes: Vec::new(),
        };
        log.offsets = offsets[..keep as usize].to_vec();
        log.frontier = Frontier::load(&log, keep)?;
        if keep > 0 && log.frontier.root() != head_root {
            // The hash file does not match the committed head: rebuild it from the entries.
            tracing::warn!(dir = %dir.display(), "hash file disagrees with the committed head; rebuilding");
            log.hashes.set_len(0).map_err(|e| Error::io(&hashes_path, e))?;
            log.durable_size = 0;
            log.offsets.clear();
            log.frontier = Frontier::default();
            return log.replay(&offsets, &leaves, size, head_size, head_root);
        }
        log.durable_root = log.frontier.root();
        log.replay(&offsets[keep as usize..], &leaves[keep as usize..], size, head_size, head_root)
    }

    /// Re-adds already-written entries (their hashes) and commits them.
    fn replay(mut self, offsets: &[u64], leaves: &[Hash], size: u64, head_size: u64, head_root: Hash) -> Result<TenantLog> {
        let mut nodes = Vec::new();
        for (&offset, &leaf) in offsets.iter().zip(leaves) {
            self.frontier.push(leaf, &mut nodes);
            self.offsets.push(offset);
        }
        // The committed prefix must still hash to the committed root, whichever way it was rebuilt.
        if head_size > self.durable_size {
            let at_head = root_of_prefix(&self, &nodes, head_size)?;
            if at_head != head_root {
                return Err(Error::Corrupt {
                    path: self.dir.display().to_string(),
                    detail: format!("entries do not hash to the committed root at size {head_size}"),
                });
            }
        }
        self.pending_hashes = nodes;
        debug_assert_eq!(self.frontier.size(), size);
        self.write_and_sync()?;
        Ok(self)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Entries committed and served.
    pub fn size(&self) -> u64 {
        self.durable_size
    }

    /// Root of the committed tree.
    pub fn root(&self) -> Hash {
        self.durable_root
    }

    /// Entries appended but not yet committed.
    pub fn pending(&self) -> u64 {
        self.frontier.size() - self.durable_size
    }

    /// Buffers one entry; returns its sequence number. Durable after [`TenantLog::commit`].
    pub fn append(&mut self, entry: &[u8]) -> Result<u64> {
        if entry.len() > MAX_ENTRY_BYTES {
            return Err(Error::EntryTooLarge(entry.len()));
        }
        let seq = self.frontier.size();
        self.pending_offsets.push(self.entries_len + self.pending_entries.len() as u64);
        self.pending_entries.extend_from_slice(&(entry.len() as u32).to_be_bytes());
        self.pending_entries.extend_from_slice(&crc(entry).to_be_bytes());
        self.pending_entries.extend_from_slice(entry);
        self.frontier.push(leaf_hash(entry), &mut self.pending_hashes);
        Ok(seq)
    }

    /// Group commit: writes every pending entry and node, fsyncs both files, then the head.
    pub fn commit(&mut self) -> Result<()> {
        if self.pending() == 0 {
            return Ok(());
        }
        self.write_and_sync()
    }

    fn write_and_sync(&mut self) -> Result<()> {
        let entries_path = self.dir.join("entries");
        let hashes_path = self.dir.join("hashes");
        if !self.pending_entries.is_empty() {
            self.entries.write_all_at(&self.pending_entries, self.entries_len).map_err(|e| Error::io(&entries_path, e))?;
        }
        let hash_bytes: Vec<u8> = self.pending_hashes.iter().flatten().copied().collect();
        let hash_offset = stored_nodes(self.durable_size) * 32;
        self.hashes.write_all_at(&hash_bytes, hash_offset).map_err(|e| Error::io(&hashes_path, e))?;
        self.entries.sync_data().map_err(|e| Error::io(&entries_path, e))?;
        self.hashes.sync_data().map_err(|e| Error::io(&hashes_path, e))?;
        let size = self.frontier.size();
        let root = self.frontier.root();
        write_head(&self.dir, size, &root)?;
        self.entries_len += self.pending_entries.len() as u64;
        self.offsets.append(&mut self.pending_offsets);
        self.pending_entries.clear();
        self.pending_hashes.clear();
        self.durable_size = size;
        self.durable_root = root;
        Ok(())
    }

    /// The committed entry `seq`.
    pub fn entry(&self, seq: u64) -> Result<Vec<u8>> {
        let offset = *self.offsets.get(seq as usize).filter(|_| seq < self.durable_size).ok_or(Error::NoSuchEntry { seq, size: self.durable_size })?;
        let path = self.dir.join("entries");
        let mut header = [0u8; FRAME_HEADER];
        self.entries.read_exact_at(&mut header, offset).map_err(|e| Error::io(&path, e))?;
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let mut entry = vec![0u8; len];
        self.entries.read_exact_at(&mut entry, offset + FRAME_HEADER as u64).map_err(|e| Error::io(&path, e))?;
        if crc(&entry) != u32::from_be_bytes([header[4], header[5], header[6], header[7]]) {
            return Err(Error::Corrupt { path: path.display().to_string(), detail: format!("entry {seq} fails its checksum") });
        }
        Ok(entry)
    }

    /// Root of the committed tree at `size` (≤ the committed size).
    pub fn root_at(&self, size: u64) -> Result<Hash> {
        self.check_size(size)?;
        merkle::root(self, size)
    }

    pub fn inclusion_proof(&self, seq: u64, size: u64) -> Result<Vec<Hash>> {
        self.check_size(size)?;
        if seq >= size {
            return Err(Error::NoSuchEntry { seq, size });
        }
        merkle::inclusion_proof(self, seq, size)
    }

    pub fn consistency_proof(&self, old_size: u64, new_size: u64) -> Result<Vec<Hash>> {
        self.check_size(new_size)?;
        if old_size == 0 || old_size > new_size {
            return Err(Error::NoSuchEntry { seq: old_size, size: new_size });
        }
        merkle::consistency_proof(self, old_size, new_size)
    }

    /// A hash tile of the committed tree (`tile/<level>/<index>[.p/<width>]`).
    pub fn hash_tile(&self, level: u8, index: u64, width: u16) -> Result<Vec<u8>> {
        crate::tiles::hash_tile(self, level, index, width, self.durable_size)
    }

    /// An entry bundle (`tile/entries/<index>[.p/<width>]`): each entry as `u16 BE length || bytes`.
    pub fn entry_bundle(&self, index: u64, width: u16) -> Result<Vec<u8>> {
        use crate::tiles::{available_width, TilePath};
        if u64::from(width) > available_width(0, index, self.durable_size) {
            return Err(Error::NoSuchTile(TilePath::Entries { index, width }.to_path()));
        }
        let mut out = Vec::new();
        for seq in index * 256..index * 256 + u64::from(width) {
            let entry = self.entry(seq)?;
            out.extend_from_slice(&(entry.len() as u16).to_be_bytes());
            out.extend_from_slice(&entry);
        }
        Ok(out)
    }

    fn check_size(&self, size: u64) -> Result<()> {
        if size > self.durable_size {
            return Err(Error::NoSuchEntry { seq: size, size: self.durable_size });
        }
        Ok(())
    }
}

/// Root at `size` while some nodes are still only in `pending` (used during open).
fn root_of_prefix(log: &TenantLog, pending: &[Hash], size: u64) -> Result<Hash> {
    struct WithPending<'a> {
        log: &'a TenantLog,
        pending: &'a [Hash],
        base: u64,
    }
    impl NodeSource for WithPending<'_> {
        type Error = Error;
        fn node(&self, level: u32, index: u64) -> Result<Hash> {
            let pos = node_position(level, index);
            if pos < self.base {
                self.log.node(level, index)
            } else {
                self.pending.get((pos - self.base) as usize).copied().ok_or_else(|| Error::Corrupt {
                    path: self.log.dir.display().to_string(),
                    detail: format!("node {level}/{index} missing"),
                })
            }
        }
    }
    merkle::root(&WithPending { log, pending, base: stored_nodes(log.durable_size) }, size)
}

impl NodeSource for TenantLog {
    type Error = Error;
    fn node(&self, level: u32, index: u64) -> Result<Hash> {
        let mut hash = [0u8; 32];
        let path = self.dir.join("hashes");
        self.hashes.read_exact_at(&mut hash, node_position(level, index) * 32).map_err(|e| Error::io(&path, e))?;
        Ok(hash)
    }
}

pub(crate) fn read_head(dir: &Path) -> Result<(u64, Hash)> {
    let path = dir.join("head");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, merkle::empty_root())),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let corrupt = || Error::Corrupt { path: path.display().to_string(), detail: format!("unreadable head {text:?}") };
    // Strict: exactly `<decimal size> <base64 root>\n`, so any damage to the file is noticed.
    let (size, root) = text.strip_suffix('\n').and_then(|t| t.split_once(' ')).ok_or_else(corrupt)?;
    if size.is_empty() || (size.len() > 1 && size.starts_with('0')) || !size.bytes().all(|b| b.is_ascii_digit()) {
        return Err(corrupt());
    }
    let size = size.parse().map_err(|_| corrupt())?;
    let root: Hash = B64.decode(root).ok().and_then(|r| r.try_into().ok()).ok_or_else(corrupt)?;
    Ok((size, root))
}

fn write_head(dir: &Path, size: u64, root: &Hash) -> Result<()> {
    let tmp = dir.join("head.tmp");
    let path = dir.join("head");
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(format!("{size} {}\n", B64.encode(root)).as_bytes()).map_err(|e| Error::io(&tmp, e))?;
    f.sync_data().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    // The rename itself must survive a crash: sync the directory.
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let start = log.entries_len;
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
                for f in ["hashes", "head"] {
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
    fn damage_inside_the_committed_range_is_an_error_not_a_silent_cut() {
        let (dir, _, start) = crashed_log(10, 0);
        let mut bytes = std::fs::read(dir.path().join("entries")).unwrap();
        bytes[(start / 2) as usize] ^= 1;
        std::fs::write(dir.path().join("entries"), &bytes).unwrap();
        assert!(matches!(TenantLog::open(dir.path()), Err(Error::Corrupt { .. })));
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
