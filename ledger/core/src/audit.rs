//! `fsck` for tenant logs: re-derive every node and root from the entries and compare with what is
//! stored (node file, head, signed checkpoint). Reads files directly, never through
//! [`crate::TenantLog::open`], which would repair what the audit must report.
//!
//! One streaming pass per tenant: frames are checked (length, CRC-32C) and hashed in order, and the
//! frontier emits perfect nodes in post-order, which is the node file's order, so both files are
//! compared front to back in O(1) memory.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::log::{read_head, MAX_ENTRY_BYTES};
use crate::merkle::{leaf_hash, stored_nodes, Frontier, Hash};
use crate::note::NoteVerifier;

/// What an audit of one tenant's log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// Intact entries.
    pub entries: u64,
    /// Everything that is wrong; empty means the log is sound.
    pub problems: Vec<String>,
}

/// Most node mismatches listed one by one (the count is always reported).
const MAX_LISTED: usize = 10;

/// Audits the log in `dir`. With `verifiers`, the stored checkpoint's signatures are checked too.
/// `progress` receives the number of entry bytes processed as the audit advances.
pub fn audit_tenant(dir: &Path, verifiers: &[NoteVerifier], progress: &mut dyn FnMut(u64)) -> AuditReport {
    let mut report = AuditReport::default();
    let head = match read_head(dir) {
        Ok(h) => Some(h),
        Err(e) => {
            report.problems.push(format!("head: {e}"));
            None
        }
    };
    let checkpoint = read_checkpoint(dir, verifiers, &mut report.problems);
    let targets = [head.map(|h| h.size), checkpoint.as_ref().map(|c| c.size)];
    let mut roots_at: Vec<(u64, Hash)> = Vec::new();
    // Byte offset at the end of the entry that completes the committed size.
    let mut offset_at_head = (head.map(|h| h.size) == Some(0)).then_some(0u64);

    let open = |name: &str| File::open(dir.join(name)).map(BufReader::new);
    let (mut entries, mut hashes, mut index) = match (open("entries"), open("hashes"), open("index")) {
        (Ok(e), Ok(h), Ok(i)) => (e, h, i),
        (e, h, i) => {
            for (name, r) in [("entries", e.err()), ("hashes", h.err()), ("index", i.err())] {
                if let Some(err) = r {
                    report.problems.push(format!("{name}: cannot open: {err}"));
                }
            }
            return report;
        }
    };

    let mut frontier = Frontier::default();
    let mut nodes = Vec::new();
    let mut node_pos: u64 = 0;
    let mut mismatches = 0u64;
    let mut offset: u64 = 0;
    let mut entry = Vec::new();
    if targets.contains(&Some(0)) {
        roots_at.push((0, frontier.root()));
    }
    loop {
        let mut header = [0u8; 8];
        match read_full(&mut entries, &mut header) {
            Ok(0) => break,
            Ok(8) => {}
            Ok(n) => {
                report.problems.push(format!("entries: {n} stray bytes at offset {offset} (a torn frame)"));
                break;
            }
            Err(e) => {
                report.problems.push(format!("entries: read error at offset {offset}: {e}"));
                break;
            }
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let sum = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_ENTRY_BYTES {
            report.problems.push(format!("entries: entry {} at offset {offset} claims {len} bytes", report.entries));
            break;
        }
        entry.resize(len, 0);
        if read_full(&mut entries, &mut entry).ok() != Some(len) || crc32c::crc32c(&entry) != sum {
            report.problems.push(format!("entries: entry {} at offset {offset} fails its checksum", report.entries));
            break;
        }
        let mut stored_offset = [0u8; 8];
        if read_full(&mut index, &mut stored_offset).ok() != Some(8) || u64::from_be_bytes(stored_offset) != offset {
            report.problems.push(format!("index: offset of entry {} is wrong or missing", report.entries));
            break;
        }
        offset += 8 + len as u64;
        nodes.clear();
        frontier.push(leaf_hash(&entry), &mut nodes);
        for node in &nodes {
            let mut stored = [0u8; 32];
            if read_full(&mut hashes, &mut stored).ok() != Some(32) {
                report.problems.push(format!("hashes: file ends at node {node_pos}; {} expected", stored_nodes(frontier.size())));
                return report;
            }
            if &stored != node {
                mismatches += 1;
                if mismatches as usize <= MAX_LISTED {
                    report.problems.push(format!("hashes: node {node_pos} differs from the one derived from the entries"));
                }
            }
            node_pos += 1;
        }
        report.entries += 1;
        if head.map(|h| h.size) == Some(report.entries) {
            offset_at_head = Some(offset);
        }
        if targets.contains(&Some(report.entries)) {
            roots_at.push((report.entries, frontier.root()));
        }
        progress(8 + len as u64);
    }
    if mismatches as usize > MAX_LISTED {
        report.problems.push(format!("hashes: {mismatches} nodes differ in all"));
    }
    let mut trailing = [0u8; 1];
    if read_full(&mut hashes, &mut trailing).ok() == Some(1) {
        report.problems.push(format!("hashes: more nodes stored than {} entries produce", report.entries));
    }
    if read_full(&mut index, &mut trailing).ok() == Some(1) {
        report.problems.push(format!("index: more offsets stored than {} entries", report.entries));
    }
    let root_at = |size: u64| roots_at.iter().find(|(s, _)| *s == size).map(|(_, r)| *r);
    if let Some(crate::log::Head { size, root, entries_len }) = head {
        if offset_at_head.is_some_and(|o| o != entries_len) {
            report.problems.push(format!("head: committed length {entries_len} is not where entry {size} ends"));
        }
        match root_at(size) {
            None => report.problems.push(format!("head: committed size {size} but only {} intact entries", report.entries)),
            Some(r) if r != root => report.problems.push(format!("head: root at size {size} differs from the entries' root")),
            Some(_) => {}
        }
    }
    if let Some(cp) = checkpoint {
        match root_at(cp.size) {
            None => report.problems.push(format!("checkpoint: size {} is beyond the {} intact entries", cp.size, report.entries)),
            Some(r) if r != cp.root => report.problems.push(format!("checkpoint: root at size {} differs from the entries' root", cp.size)),
            Some(_) => {}
        }
    }
    report
}

fn read_checkpoint(dir: &Path, verifiers: &[NoteVerifier], problems: &mut Vec<String>) -> Option<Checkpoint> {
    let path = dir.join("checkpoint");
    let note = match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            problems.push(format!("checkpoint: {e}"));
            return None;
        }
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(_) => {
                problems.push("checkpoint: not UTF-8".into());
                return None;
            }
        },
    };
    let parsed = match verifiers.first() {
        // Every configured key must have signed: a missing signature is a finding too.
        Some(first) => verifiers
            .iter()
            .map(|v| Checkpoint::open(&note, std::slice::from_ref(v), Some(first.name())))
            .collect::<crate::error::Result<Vec<_>>>()
            .map(|mut all| all.remove(0)),
        None => crate::note::split_note(&note).and_then(|(text, _)| Checkpoint::parse_text(text)),
    };
    parsed.map_err(|e| problems.push(format!("checkpoint: {e}"))).ok()
}

/// Reads until `buf` is full or the input ends; returns how many bytes were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyfile::LedgerKey;
    use crate::ledger::Ledger;
    use rand::{Rng, SeedableRng};

    fn build(dir: &Path, key: &LedgerKey) {
        let mut ledger = Ledger::open(dir, vec![key.clone()]).unwrap();
        for i in 0..600u32 {
            let tenant = ["acme", "globex"][(i % 2) as usize];
            ledger.tenant(tenant).unwrap().append(format!("{{\"seq\":{i},\"pad\":\"{}\"}}", "p".repeat((i % 40) as usize)).as_bytes()).unwrap();
            if i % 150 == 149 {
                ledger.commit().unwrap();
            }
        }
    }

    #[test]
    fn a_sound_log_has_no_problems() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        build(dir.path(), &key);
        let mut seen = 0;
        let v = key.signer_for("acme").unwrap().verifier();
        let report = audit_tenant(&dir.path().join("t/acme"), &[v], &mut |n| seen += n);
        assert_eq!(report, AuditReport { entries: 300, problems: vec![] });
        assert_eq!(seen, std::fs::metadata(dir.path().join("t/acme/entries")).unwrap().len());
    }

    #[test]
    fn finds_every_random_single_byte_flip() {
        let template = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        build(template.path(), &key);
        let v = key.signer_for("globex").unwrap().verifier();
        let mut rng = rand::rngs::StdRng::seed_from_u64(6962);
        for trial in 0..500 {
            let dir = tempfile::tempdir().unwrap();
            for f in ["entries", "hashes", "index", "head", "checkpoint"] {
                std::fs::create_dir_all(dir.path().join("t/globex")).unwrap();
                std::fs::copy(template.path().join("t/globex").join(f), dir.path().join("t/globex").join(f)).unwrap();
            }
            let file = ["entries", "hashes", "index", "head", "checkpoint"][trial % 5];
            let path = dir.path().join("t/globex").join(file);
            let mut bytes = std::fs::read(&path).unwrap();
            let at = rng.gen_range(0..bytes.len());
            bytes[at] ^= rng.gen_range(1..=255u8);
            std::fs::write(&path, &bytes).unwrap();
            let report = audit_tenant(&dir.path().join("t/globex"), std::slice::from_ref(&v), &mut |_| {});
            assert!(!report.problems.is_empty(), "trial {trial}: flip at byte {at} of {file} went unnoticed");
        }
    }
}
