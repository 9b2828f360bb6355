//! `fsck` for a ledger directory's journal: every record frame is read in journal order (length
//! and CRC-32C checked), each tenant's seqs must follow each other, every stored Merkle node is
//! re-derived from the entries and compared, and every live index file (a segment's own, or a
//! merged one) must be exactly the index its segments' frames give. Reads through a read-only
//! journal, which never repairs what the audit must report.
//!
//! Memory: one Merkle frontier per tenant (at most 64 hashes each) and the positions of one
//! index file's segments at a time (at most `MAX_MERGED_SEGMENTS`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::journal::{Frame, Journal};
use crate::merkle::{leaf_hash, Frontier};
use crate::partition_log::{choose_indexes, index_bytes};

/// What an audit of a ledger directory found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// Intact records per tenant (a prefix of each tenant's log).
    pub tenants: BTreeMap<String, u64>,
    /// Everything that is wrong; empty means the journal is sound.
    pub problems: Vec<String>,
}

/// Most problems listed one by one (the count is always reported).
const MAX_LISTED: usize = 20;

/// Audits the journal of the ledger directory `dir`. `progress` receives the number of journal
/// bytes processed as the audit advances.
pub fn audit_ledger(dir: &Path, progress: &mut dyn FnMut(u64)) -> AuditReport {
    let mut report = AuditReport::default();
    let journal_dir = dir.join(crate::ledger::JOURNAL_DIR);
    let journal = match Journal::open_read_only(&journal_dir) {
        Ok((journal, _)) => journal,
        Err(e) => {
            report.problems.push(format!("journal: {e}"));
            return report;
        }
    };
    let starts = journal.segment_starts();
    let mut frontiers: HashMap<String, Frontier> = HashMap::new();
    let mut found = 0usize;
    let mut problem = |report: &mut AuditReport, text: String| {
        found += 1;
        if found <= MAX_LISTED {
            report.problems.push(text);
        }
    };
    let mut done = 0u64;
    // Each index file is opened now and read when its segments have been replayed: a service
    // running meanwhile may merge and delete it, and an open file stays readable.
    let mut spans = match choose_indexes(&journal_dir, &starts) {
        Ok((spans, _)) => spans.into_iter().map(|s| (s, std::fs::File::open(s.path(&journal_dir)))).collect::<Vec<_>>().into_iter(),
        Err(e) => {
            report.problems.push(format!("index files: {e}"));
            return report;
        }
    };
    let mut span = spans.next();
    // The records of the current index file's segments (and of the active segment, unused).
    let mut table: BTreeMap<String, (u64, Vec<u64>)> = BTreeMap::new();
    let mut nodes = Vec::new();
    for (i, &start) in starts.iter().enumerate() {
        let sealed_end = starts.get(i + 1).copied();
        let end = sealed_end.unwrap_or(journal.end());
        let replayed = journal.replay_until(start, end, |position, frame| {
            progress(position.saturating_sub(done));
            done = position;
            let Frame::Record(r) = frame else { return Ok(()) };
            let frontier = frontiers.entry(r.tenant.clone()).or_default();
            if r.seq != frontier.size() {
                problem(&mut report, format!("journal position {position}: {} record {} follows {} records", r.tenant, r.seq, frontier.size()));
                return Ok(());
            }
            nodes.clear();
            frontier.push(leaf_hash(&r.entry), &mut nodes);
            if nodes != r.nodes {
                problem(&mut report, format!("journal position {position}: {} record {}: stored hashes differ from the entry's", r.tenant, r.seq));
            }
            let (_, positions) = table.entry(r.tenant).or_insert((r.seq, Vec::new()));
            positions.push(position);
            Ok(())
        });
        if let Err(e) = replayed {
            problem(&mut report, format!("segment at journal position {start}: {e}; the records after it were not audited"));
            break;
        }
        if let Some((covered, file)) = span.take_if(|(s, _)| Some(s.end) == sealed_end) {
            let view: BTreeMap<&str, (u64, &[u64])> = table.iter().map(|(t, (first, p))| (t.as_str(), (*first, p.as_slice()))).collect();
            let path = covered.path(&journal_dir);
            let read = file.and_then(|mut f| {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut f, &mut bytes).map(|_| bytes)
            });
            match (index_bytes(&view), read) {
                (Ok((want, _)), Ok(got)) if want == got => {}
                (Ok(_), Ok(_)) => problem(&mut report, format!("{}: does not index its segments' records (rebuilt if removed)", path.display())),
                (_, Err(e)) => problem(&mut report, format!("{}: {e} (rebuilt at the next open)", path.display())),
                (Err(e), _) => problem(&mut report, format!("{}: {e}", path.display())),
            }
            table.clear();
            span = spans.next();
        }
    }
    progress(journal.end().saturating_sub(done));
    // A read-only open stops at the last intact commit: whatever follows it in the last segment
    // is a commit cut short by a crash, or damage to committed frames.
    if let Some(&last) = starts.last() {
        let path = journal_dir.join(format!("{last:020}.seg"));
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let tail = (last + len).saturating_sub(journal.end());
        if tail > 0 {
            problem(
                &mut report,
                format!(
                    "{}: {tail} bytes after the last intact commit (journal position {}): a frame that fails its length or checksum check, or a commit cut short by a crash; the next open for writing cuts them",
                    path.display(),
                    journal.end()
                ),
            );
        }
    }
    if found > MAX_LISTED {
        report.problems.push(format!("… and {} more problems", found - MAX_LISTED));
    }
    report.tenants = frontiers.into_iter().map(|(t, f)| (t, f.size())).collect();
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ledger, LedgerKey};

    fn ledger(dir: &Path) -> Ledger {
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut ledger = Ledger::open_with(dir, vec![key], 4096, 0).unwrap();
        for i in 0..300u64 {
            let tenant = ["acme", "globex", "initech"][(i % 3) as usize];
            ledger.append(tenant, format!("{{\"seq\":{i},\"pad\":\"{}\"}}", "p".repeat((i % 40) as usize)).as_bytes()).unwrap();
            if i % 7 == 6 {
                ledger.commit(Some(i as i64)).unwrap();
            }
        }
        ledger.commit(Some(300)).unwrap();
        ledger
    }

    #[test]
    fn a_sound_journal_passes_and_every_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        drop(ledger(dir.path()));
        let mut bytes = 0;
        let report = audit_ledger(dir.path(), &mut |n| bytes += n);
        assert_eq!(report.problems, Vec::<String>::new());
        assert_eq!(report.tenants.values().sum::<u64>(), 300);
        let journal = dir.path().join("journal");
        let mut files: Vec<_> = std::fs::read_dir(&journal).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let total: u64 = files.iter().filter(|p| p.extension().is_some_and(|e| e == "seg")).map(|p| std::fs::metadata(p).unwrap().len()).sum();
        assert_eq!(bytes, total, "progress adds up to the journal's bytes");

        // An index that names the wrong positions.
        let index = files.iter().find(|p| p.extension().is_some_and(|e| e == "idx")).unwrap();
        let mut damaged = std::fs::read(index).unwrap();
        let n = damaged.len();
        damaged[n - 8] ^= 1;
        std::fs::write(index, &damaged).unwrap();
        // A flipped byte inside an entry of a later segment.
        let segment = files.iter().filter(|p| p.extension().is_some_and(|e| e == "seg")).nth(2).unwrap();
        let mut seg = std::fs::read(segment).unwrap();
        seg[100] ^= 0x20;
        std::fs::write(segment, &seg).unwrap();
        let report = audit_ledger(dir.path(), &mut |_| {});
        assert!(report.problems.iter().any(|p| p.contains("idx")), "{:?}", report.problems);
        // Damage in the active segment ends what a reader trusts there: reported too.
        let active = files.iter().rfind(|p| p.extension().is_some_and(|e| e == "seg")).unwrap();
        let mut seg = std::fs::read(active).unwrap();
        seg[20] ^= 0x20;
        std::fs::write(active, &seg).unwrap();
        let report = audit_ledger(dir.path(), &mut |_| {});
        assert!(report.problems.iter().any(|p| p.contains("after the last intact commit")), "{:?}", report.problems);
        assert!(report.problems.iter().any(|p| p.contains("checksum") || p.contains("frame")), "{:?}", report.problems);
    }
}
