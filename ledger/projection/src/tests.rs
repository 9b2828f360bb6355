use std::collections::BTreeSet;

use arrow_array::{Array, FixedSizeBinaryArray, StringArray, UInt64Array};
use tally_schemas::Event;

use super::*;
use tally_log::merkle::leaf_hash;
use tally_log::{event_record, EventInput, Source};

fn event(i: u64) -> Event {
    serde_json::from_value(serde_json::json!({
        "event_id": format!("e{i}"),
        "tenant_id": "acme",
        // Three days, 8 hours apart.
        "occurred_at": jiff::Timestamp::from_second(1_764_547_200 + (i as i64) * 8 * 3600).unwrap().to_string(),
        "kind": "llm_call",
        "decision": "allow",
        "agent_id": format!("agent-{}", i % 3),
        "action": "gpt-x",
        "task_id": format!("task-{}", i % 2),
        "delegation": ["outer", "inner"],
        "usage": {"input_tokens": 10, "output_tokens": i},
        "cost": {"amount_micros": 1000 + i as i64, "currency": "USD"},
        "attributes": {"k": "v"}
    }))
    .unwrap()
}

/// A committed log of `n` event records plus a budget record after each third one.
fn log_with(dir: &Path, n: u64) -> Ledger {
    let mut log = open_ledger(dir);
    append(&mut log, 0, n);
    log
}

fn open_ledger(dir: &Path) -> Ledger {
    Ledger::open(dir, vec![tally_log::LedgerKey::generate("example.com").unwrap()]).unwrap()
}

fn append(log: &mut Ledger, from: u64, to: u64) {
    for i in from..to {
        let e = event(i);
        let source = Source::Kafka { topic: "t".into(), partition: 0, offset: i as i64, timestamp_ms: Some(1) };
        let seq = log.next_seq("acme");
        log.append("acme", &event_record(seq, EventInput { event: &e, ce_source: None, payload_sha256: &[7; 32], source: &source }, None).unwrap()).unwrap();
        if i % 3 == 2 {
            let seq = log.next_seq("acme");
            // A budget record as the ledger service writes it (docs/records.md).
            let record = format!(
                r#"{{"type":"budget","seq":{seq},"at":"{}","status":"warning","level":"day","scope":"2025-12-01","limit_micros":1,"spent_micros":1}}"#,
                e.occurred_at
            );
            log.append("acme", record.as_bytes()).unwrap();
        }
    }
    log.commit(None).unwrap();
}

/// (seq, leaf hash, record type) of every visible row of the tenant.
fn projected(root: &Path) -> Vec<(u64, [u8; 32], String)> {
    let mut out = Vec::new();
    for f in list_files(root, Tree::Events, "acme", |_| true).unwrap() {
        for b in read_parquet(&f.path).unwrap() {
            let seq = b.column_by_name("seq").unwrap().as_any().downcast_ref::<UInt64Array>().unwrap();
            let leaf = b.column_by_name("leaf_hash").unwrap().as_any().downcast_ref::<FixedSizeBinaryArray>().unwrap();
            let ty = b.column_by_name("record_type").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
            for i in 0..b.num_rows() {
                out.push((seq.value(i), leaf.value(i).try_into().unwrap(), ty.value(i).to_string()));
            }
        }
    }
    out.sort();
    out
}

fn rollup_total(root: &Path) -> RollupSums {
    let mut total = RollupSums::default();
    for f in list_files(root, Tree::Rollups, "acme", |_| true).unwrap() {
        for b in read_parquet(&f.path).unwrap() {
            let mut r = Rollup::new();
            rows::fold_rollup_batch(&mut r, &b).unwrap();
            r.values().for_each(|s| total.add(*s).unwrap());
        }
    }
    total
}

fn check_matches_log(root: &Path, log: &Ledger) {
    let rows = projected(root);
    assert_eq!(rows.len() as u64, log.size("acme"));
    for (i, (seq, leaf, _)) in rows.iter().enumerate() {
        assert_eq!(*seq, i as u64);
        assert_eq!(*leaf, leaf_hash(&log.tenant("acme").entry(*seq).unwrap()));
    }
}

#[test]
fn every_record_becomes_one_row_with_its_leaf_hash_and_rollups_sum_the_events() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with(&dir.path().join("log"), 9);
    let root = dir.path().join("parquet");
    let mut p = Projection::new(&root, Duration::ZERO);
    let report = p.flush("acme", &log, false).unwrap().unwrap();
    assert_eq!(report.records, 12);
    check_matches_log(&root, &log);
    // Nine events over three UTC days.
    assert_eq!(partitions(&root, Tree::Events, "acme").unwrap(), vec!["2025-12-01", "2025-12-02", "2025-12-03"]);
    let types: BTreeSet<String> = projected(&root).into_iter().map(|r| r.2).collect();
    assert_eq!(types, ["budget", "event"].into_iter().map(String::from).collect());
    let total = rollup_total(&root);
    // Records without a `charge` (as before rating) are charged their own cost.
    let cost: i64 = (0..9).map(|i| 1000 + i).sum();
    assert_eq!(total, RollupSums { events: 9, cost_micros: cost, charge_micros: cost, input_tokens: 90, output_tokens: 36 });
    let mark = read_watermark(&root, "acme").unwrap();
    assert_eq!(mark.next_seq, 12);
}

#[test]
fn many_small_flushes_are_merged_and_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(&dir.path().join("log"), 1);
    let root = dir.path().join("parquet");
    let mut p = Projection::new(&root, Duration::ZERO);
    let mut merged = 0;
    for i in 1..40 {
        append(&mut log, i, i + 1);
        merged += p.flush("acme", &log, false).unwrap().unwrap().merged;
    }
    assert!(merged >= 8, "merged {merged}");
    check_matches_log(&root, &log);
    assert_eq!(rollup_total(&root).events, 40);
    let visible = list_files(&root, Tree::Events, "acme", |_| true).unwrap();
    for date in partitions(&root, Tree::Events, "acme").unwrap() {
        let n = visible.iter().filter(|f| f.partition == date).count();
        assert!(n < MERGE_MIN_FILES + 2, "{date}: {n} files");
    }
    // Replaced files stay for queries that listed them, until the grace period has passed.
    let dir = partition_dir(&root, Tree::Events, "acme", &visible[0].partition);
    let on_disk = std::fs::read_dir(&dir).unwrap().count();
    let swept = files::sweep_replaced(&dir, &visible[0].partition, Duration::ZERO).unwrap();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), on_disk - swept);
    check_matches_log(&root, &log);
}

#[test]
fn a_flush_interrupted_before_its_watermark_is_redone_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(&dir.path().join("log"), 6);
    let root = dir.path().join("parquet");
    Projection::new(&root, Duration::ZERO).flush("acme", &log, false).unwrap();
    let mark = read_watermark(&root, "acme").unwrap();
    append(&mut log, 6, 12);
    Projection::new(&root, Duration::ZERO).flush("acme", &log, false).unwrap();
    // Simulate a crash after the second flush's files but before its watermark.
    files::write_watermark(&root, "acme", &mark).unwrap();
    std::fs::write(partition_dir(&root, Tree::Events, "acme", "2025-12-01").join(".x.parquet.tmp"), b"half").unwrap();
    let mut p = Projection::new(&root, Duration::ZERO);
    assert_eq!(p.behind("acme", &log).unwrap(), log.size("acme") - mark.next_seq);
    p.flush("acme", &log, false).unwrap();
    check_matches_log(&root, &log);
    assert_eq!(rollup_total(&root).events, 12);
}

#[test]
fn a_rebuild_reproduces_the_projection_and_repairs_a_damaged_one() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with(&dir.path().join("log"), 20);
    let root = dir.path().join("parquet");
    Projection::new(&root, Duration::ZERO).flush("acme", &log, false).unwrap();
    let before = projected(&root);
    let victim = list_files(&root, Tree::Events, "acme", |_| true).unwrap().remove(0);
    std::fs::remove_file(&victim.path).unwrap();
    assert_ne!(projected(&root), before);
    let mut calls = Vec::new();
    assert_eq!(rebuild_tenant(&root, "acme", &log, report_zones(&["UTC".into()]).unwrap(), |done, total| calls.push((done, total))).unwrap(), log.size("acme"));
    assert_eq!(calls.last(), Some(&(log.size("acme"), log.size("acme"))));
    assert_eq!(projected(&root), before);
}

#[test]
fn the_watermark_keeps_the_checkpoint_of_exactly_the_projected_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(&dir.path().join("log"), 6);
    let root = dir.path().join("parquet");
    let mut p = Projection::new(&root, Duration::ZERO);
    p.flush("acme", &log, false).unwrap();
    let projected = log.size("acme");
    // More records after the flush: the watermark's checkpoint stays of the projected size.
    append(&mut log, 6, 9);
    let mark = read_watermark(&root, "acme").unwrap();
    let checkpoint = tally_log::Checkpoint::open(mark.checkpoint.as_deref().unwrap(), &log.verifiers_for("acme").unwrap(), None).unwrap();
    assert_eq!(checkpoint.size, projected);
    assert_eq!(checkpoint.root, log.tenant("acme").root_at(projected).unwrap());
    assert!(log.size("acme") > projected);
}

#[test]
fn appended_records_continue_from_the_watermark_like_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with(&dir.path().join("log"), 10);
    let entries: Vec<Vec<u8>> = (0..log.size("acme")).map(|s| log.tenant("acme").entry(s).unwrap()).collect();
    let root = dir.path().join("parquet");
    let (a, b) = entries.split_at(5);
    let zones = report_zones(&["UTC".into(), "Asia/Tokyo".into()]).unwrap();
    append_records(&root, "acme", a, &zones).unwrap();
    append_records(&root, "acme", b, &zones).unwrap();
    check_matches_log(&root, &log);
    let mark = read_watermark(&root, "acme").unwrap();
    assert_eq!(mark.next_seq, log.size("acme"));
    assert_eq!(mark.daily_zones, [("Asia/Tokyo".to_string(), 0), ("UTC".to_string(), 0)].into());
}

#[test]
fn a_watermark_past_the_log_is_an_error_not_silence() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with(&dir.path().join("log"), 2);
    let root = dir.path().join("parquet");
    files::write_watermark(&root, "acme", &files::Watermark { next_seq: 99, ..files::Watermark::default() }).unwrap();
    let err = Projection::new(&root, Duration::ZERO).flush("acme", &log, true).unwrap_err();
    assert!(err.to_string().contains("rebuild"), "{err}");
}

#[test]
fn sums_past_64_bits_are_refused_never_wrapped() {
    let near = RollupSums { events: 1, cost_micros: i64::MAX - 1, charge_micros: 0, input_tokens: 0, output_tokens: 0 };
    let mut total = near;
    let err = total.add(RollupSums { events: 1, cost_micros: 2, charge_micros: 0, input_tokens: 0, output_tokens: 0 }).unwrap_err();
    assert!(matches!(err, crate::Error::SumOverflow(_)), "{err}");
    assert!(err.to_string().contains("cost"), "{err}");
    assert_eq!(total, near, "a refused addition leaves the sums as they were");
    total.add(RollupSums { events: 1, cost_micros: 1, charge_micros: 0, input_tokens: 5, output_tokens: 0 }).unwrap();
    assert_eq!(total.cost_micros, i64::MAX);
}

#[test]
fn roll_ups_whose_merged_sum_would_overflow_stay_unmerged_and_flushes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open_ledger(&dir.path().join("log"));
    let root = dir.path().join("parquet");
    let mut p = Projection::new(&root, Duration::ZERO);
    // Sixteen one-event flushes in one 15-minute bucket, each of 1/4 of i64::MAX: their merge
    // would overflow (amounts this large bypass validation, as in an older log).
    for i in 0..16u64 {
        let mut e = event(0);
        e.event_id = format!("big-{i}");
        e.cost.as_mut().unwrap().amount_micros = i64::MAX / 4;
        let source = Source::Kafka { topic: "t".into(), partition: 0, offset: i as i64, timestamp_ms: Some(1) };
        let seq = log.next_seq("acme");
        log.append("acme", &event_record(seq, EventInput { event: &e, ce_source: None, payload_sha256: &[7; 32], source: &source }, None).unwrap()).unwrap();
        log.commit(None).unwrap();
        p.flush("acme", &log, false).unwrap();
    }
    assert_eq!(read_watermark(&root, "acme").unwrap().next_seq, 16, "every flush went through");
    let rollups = list_files(&root, Tree::Rollups, "acme", |_| true).unwrap();
    assert!(rollups.len() >= 4, "the overflowing run stays in separate files: {}", rollups.len());
    check_matches_log(&root, &log);
}

/// A `statement` record as the ledger's budget module writes it (docs/billing.md).
fn append_statement(log: &mut Ledger, period: &str) -> u64 {
    let seq = log.next_seq("acme");
    let record = format!(
        r#"{{"type":"statement","seq":{seq},"at":"2026-12-02T00:00:00Z","period":"{period}","period_start":"{period}T00:00:00Z","period_end":"2026-12-01T00:00:00Z","time_zone":"UTC","first_seq":0,"last_seq":1,"tree_size":{seq},"totals":[{{"currency":"USD","basis":"event","events":2,"micros":2001,"input_tokens":20,"output_tokens":1}}]}}"#
    );
    log.append("acme", record.as_bytes()).unwrap();
    log.commit(None).unwrap();
    seq
}

#[test]
fn statements_are_kept_whole_below_the_watermark_and_a_redone_flush_keeps_one_each() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(&dir.path().join("log"), 2);
    let root = dir.path().join("parquet");
    let first = append_statement(&mut log, "2026-11-01");
    Projection::new(&root, Duration::ZERO).flush("acme", &log, false).unwrap();
    let mark = read_watermark(&root, "acme").unwrap();
    assert!(mark.statements, "a projection from seq 0 holds every statement");
    let held = read_statements(&root, "acme", mark.next_seq).unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].seq, held[0].statement.period.to_string(), held[0].statement.totals[0].micros), (first, "2026-11-01".to_string(), 2001));
    assert_eq!(held[0].statement, tally_log::Statement::decode(first, &log.tenant("acme").entry(first).unwrap()).unwrap());

    // A second statement whose flush crashed before its watermark: not visible, then redone.
    append(&mut log, 2, 3);
    let second = append_statement(&mut log, "2026-10-01");
    Projection::new(&root, Duration::ZERO).flush("acme", &log, false).unwrap();
    files::write_watermark(&root, "acme", &mark).unwrap();
    assert_eq!(read_statements(&root, "acme", mark.next_seq).unwrap().len(), 1, "past the watermark");
    Projection::new(&root, Duration::ZERO).flush("acme", &log, false).unwrap();
    let mark = read_watermark(&root, "acme").unwrap();
    let seqs: Vec<u64> = read_statements(&root, "acme", mark.next_seq).unwrap().iter().map(|s| s.seq).collect();
    assert_eq!(seqs, vec![first, second]);

    // A rebuild writes the same file.
    let before = std::fs::read(tenant_dir(&root, Tree::Events, "acme").join("_statements.json")).unwrap();
    rebuild_tenant(&root, "acme", &log, report_zones(&["UTC".into()]).unwrap(), |_, _| ()).unwrap();
    assert_eq!(std::fs::read(tenant_dir(&root, Tree::Events, "acme").join("_statements.json")).unwrap(), before);
}
