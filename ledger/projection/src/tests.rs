use std::collections::{BTreeMap, BTreeSet};

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
    append_for(log, "acme", from, to);
}

fn append_for(log: &mut Ledger, tenant: &str, from: u64, to: u64) {
    for i in from..to {
        let mut e = event(i);
        e.tenant_id = tenant.to_string();
        let source = Source::Kafka { topic: "t".into(), partition: 0, offset: i as i64, timestamp_ms: Some(1) };
        let seq = log.next_seq(tenant);
        log.append(tenant, &event_record(seq, EventInput { event: &e, ce_source: None, payload_sha256: &[7; 32], source: &source }, None).unwrap()).unwrap();
        if i % 3 == 2 {
            let seq = log.next_seq(tenant);
            // A budget record as the ledger service writes it (docs/records.md).
            let record = format!(
                r#"{{"type":"budget","seq":{seq},"at":"{}","status":"warning","level":"day","scope":"2025-12-01","limit_micros":1,"spent_micros":1}}"#,
                e.occurred_at
            );
            log.append(tenant, record.as_bytes()).unwrap();
        }
    }
    log.commit(None).unwrap();
}

/// The unit every test projects into.
const UNIT: &str = "t-0";

fn projection(root: &Path) -> Projection {
    Projection::new(root, UNIT, Duration::ZERO)
}

/// (seq, leaf hash, record type) of every visible row of `tenant`.
fn projected_of(root: &Path, tenant: &str) -> Vec<(u64, [u8; 32], String)> {
    let mut out = Vec::new();
    for f in list_files(root, Tree::Events, UNIT, |_| true).unwrap() {
        for b in read_parquet(&f.path).unwrap() {
            for (t, offset, len) in shared::tenant_runs(&b).unwrap() {
                if t != tenant {
                    continue;
                }
                let b = shared::without_tenant(&b.slice(offset, len)).unwrap();
                let seq = b.column_by_name("seq").unwrap().as_any().downcast_ref::<UInt64Array>().unwrap();
                let leaf = b.column_by_name("leaf_hash").unwrap().as_any().downcast_ref::<FixedSizeBinaryArray>().unwrap();
                let ty = b.column_by_name("record_type").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
                for i in 0..b.num_rows() {
                    out.push((seq.value(i), leaf.value(i).try_into().unwrap(), ty.value(i).to_string()));
                }
            }
        }
    }
    out.sort();
    out
}

fn projected(root: &Path) -> Vec<(u64, [u8; 32], String)> {
    projected_of(root, "acme")
}

fn rollup_total_of(root: &Path, tenant: &str) -> RollupSums {
    let mut total = RollupSums::default();
    for f in list_files(root, Tree::Rollups, UNIT, |_| true).unwrap() {
        for b in read_parquet(&f.path).unwrap() {
            for (t, offset, len) in shared::tenant_runs(&b).unwrap() {
                if t == tenant {
                    let mut r = Rollup::new();
                    rows::fold_rollup_batch(&mut r, &b.slice(offset, len)).unwrap();
                    r.values().for_each(|s| total.add(*s).unwrap());
                }
            }
        }
    }
    total
}

fn rollup_total(root: &Path) -> RollupSums {
    rollup_total_of(root, "acme")
}

fn check_matches_log_of(root: &Path, log: &Ledger, tenant: &str) {
    let rows = projected_of(root, tenant);
    assert_eq!(rows.len() as u64, log.size(tenant));
    for (i, (seq, leaf, _)) in rows.iter().enumerate() {
        assert_eq!(*seq, i as u64);
        assert_eq!(*leaf, leaf_hash(&log.tenant(tenant).entry(*seq).unwrap()));
    }
}

fn check_matches_log(root: &Path, log: &Ledger) {
    check_matches_log_of(root, log, "acme");
}

/// Sets the unit's watermark back, as a crash after a flush's files and before its watermark
/// leaves it.
fn crash_back_to(root: &Path, mark: &UnitMark) {
    files::write_unit_mark(root, UNIT, mark).unwrap();
}

#[test]
fn every_record_becomes_one_row_with_its_leaf_hash_and_rollups_sum_the_events() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with(&dir.path().join("log"), 9);
    let root = dir.path().join("parquet");
    let mut p = projection(&root);
    assert!(p.due(false).unwrap());
    assert_eq!(p.catch_up(&log).unwrap(), 12);
    check_matches_log(&root, &log);
    // Nine events over three UTC days.
    assert_eq!(partitions(&root, Tree::Events, UNIT).unwrap(), vec!["2025-12-01", "2025-12-02", "2025-12-03"]);
    let types: BTreeSet<String> = projected(&root).into_iter().map(|r| r.2).collect();
    assert_eq!(types, ["budget", "event"].into_iter().map(String::from).collect());
    let total = rollup_total(&root);
    // Records without a `charge` (as before rating) are charged their own cost.
    let cost: i64 = (0..9).map(|i| 1000 + i).sum();
    assert_eq!(total, RollupSums { events: 9, cost_micros: cost, charge_micros: cost, input_tokens: 90, output_tokens: 36 });
    let mark = read_watermark(&root, UNIT, "acme").unwrap();
    assert_eq!(mark.next_seq, 12);
    assert_eq!(read_watermark(&root, UNIT, "nobody").unwrap(), Watermark::default());
}

#[test]
fn the_tenants_of_a_unit_share_their_files_grouped_by_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open_ledger(&dir.path().join("log"));
    let tenants: Vec<String> = (0..200).map(|i| format!("tenant-{i:03}")).collect();
    for t in tenants.iter().rev() {
        append_for(&mut log, t, 0, 3);
    }
    let root = dir.path().join("parquet");
    let mut p = projection(&root);
    p.catch_up(&log).unwrap();
    // One flush: a file per date and month, one tenants file; never a file per tenant.
    let events = list_files(&root, Tree::Events, UNIT, |_| true).unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].rows, 200 * 4);
    assert_eq!(list_files(&root, Tree::Rollups, UNIT, |_| true).unwrap().len(), 1);
    assert_eq!(list_files(&root, Tree::Tenants, UNIT, |_| true).unwrap().len(), 1);
    let batch = shared::concat(read_parquet(&events[0].path).unwrap()[0].schema(), &read_parquet(&events[0].path).unwrap()).unwrap();
    let runs = shared::tenant_runs(&batch).unwrap();
    assert_eq!(runs.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), tenants, "one run per tenant, in tenant order");
    for t in &tenants {
        check_matches_log_of(&root, &log, t);
        assert_eq!(rollup_total_of(&root, t).events, 3);
    }
    assert_eq!(read_watermarks(&root, UNIT).unwrap().len(), 200);
}

#[test]
fn many_small_flushes_are_merged_and_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(&dir.path().join("log"), 1);
    let root = dir.path().join("parquet");
    let mut p = projection(&root);
    for i in 1..40 {
        append(&mut log, i, i + 1);
        // Another tenant in every other flush: merges regroup rows by tenant.
        if i % 2 == 0 {
            append_for(&mut log, "beta", i / 2 - 1, i / 2);
        }
        p.catch_up(&log).unwrap();
    }
    check_matches_log(&root, &log);
    check_matches_log_of(&root, &log, "beta");
    assert_eq!(rollup_total(&root).events, 40);
    assert_eq!(rollup_total_of(&root, "beta").events, 19);
    let visible = list_files(&root, Tree::Events, UNIT, |_| true).unwrap();
    for date in partitions(&root, Tree::Events, UNIT).unwrap() {
        let n = visible.iter().filter(|f| f.partition == date).count();
        assert!(n < MERGE_MIN_FILES + 2, "{date}: {n} files");
    }
    let tenants = list_files(&root, Tree::Tenants, UNIT, |_| true).unwrap();
    assert!(tenants.len() < MERGE_MIN_FILES + 2, "{} tenants files", tenants.len());
    assert_eq!(read_watermark(&root, UNIT, "acme").unwrap().next_seq, log.size("acme"));
    // Replaced files stay for queries that listed them, until the grace period has passed. (Each
    // flush writes a tenants file: 40 of them were merged.)
    let dir = partition_dir(&root, Tree::Tenants, UNIT, "");
    let on_disk = std::fs::read_dir(&dir).unwrap().count();
    let swept = files::sweep_replaced(&dir, "", Duration::ZERO).unwrap();
    assert!(swept >= MERGE_MIN_FILES, "{swept}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), on_disk - swept);
    check_matches_log(&root, &log);
}

#[test]
fn a_flush_interrupted_before_its_watermark_is_redone_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(&dir.path().join("log"), 6);
    let root = dir.path().join("parquet");
    projection(&root).catch_up(&log).unwrap();
    let mark = read_unit_mark(&root, UNIT).unwrap();
    append(&mut log, 6, 12);
    append_for(&mut log, "beta", 0, 2);
    projection(&root).catch_up(&log).unwrap();
    // Simulate a crash after the second flush's files but before its watermark.
    crash_back_to(&root, &mark);
    std::fs::write(partition_dir(&root, Tree::Events, UNIT, "2025-12-01").join(".x.parquet.tmp"), b"half").unwrap();
    assert_eq!(read_watermark(&root, UNIT, "beta").unwrap().next_seq, 0, "the unfinished flush's tenant states are not visible");
    let mut p = projection(&root);
    assert_eq!(p.behind("acme", &log).unwrap(), log.size("acme") - 8);
    p.catch_up(&log).unwrap();
    check_matches_log(&root, &log);
    check_matches_log_of(&root, &log, "beta");
    assert_eq!(rollup_total(&root).events, 12);
}

#[test]
fn a_rebuild_reproduces_the_projection_and_repairs_a_damaged_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(&dir.path().join("log"), 20);
    append_for(&mut log, "beta", 0, 5);
    let root = dir.path().join("parquet");
    projection(&root).catch_up(&log).unwrap();
    let before = (projected(&root), projected_of(&root, "beta"));
    let victim = list_files(&root, Tree::Events, UNIT, |_| true).unwrap().remove(0);
    std::fs::remove_file(&victim.path).unwrap();
    assert_ne!((projected(&root), projected_of(&root, "beta")), before);
    let mut calls = Vec::new();
    let total = log.size("acme") + log.size("beta");
    assert_eq!(rebuild_unit(&root, UNIT, &log, report_zones(&["UTC".into()]).unwrap(), |done, total| calls.push((done, total))).unwrap(), total);
    assert_eq!(calls.last(), Some(&(total, total)));
    assert_eq!((projected(&root), projected_of(&root, "beta")), before);
}

#[test]
fn rewriting_a_tenant_replaces_only_its_rows_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(&dir.path().join("log"), 9);
    append_for(&mut log, "beta", 0, 9);
    let root = dir.path().join("parquet");
    let mut p = projection(&root);
    p.catch_up(&log).unwrap();
    let names = |root: &Path| list_files(root, Tree::Events, UNIT, |_| true).unwrap().into_iter().map(|f| f.path).collect::<Vec<_>>();
    let (files_before, acme, beta) = (names(&root), projected(&root), projected_of(&root, "beta"));
    assert_eq!(p.rewrite_tenant("beta", &log).unwrap(), log.size("beta"));
    assert_eq!(names(&root), files_before, "the same files, rewritten under their names");
    assert_eq!((projected(&root), projected_of(&root, "beta")), (acme, beta));
    assert_eq!(p.rewrite_tenant("nobody", &log).unwrap(), 0);
}

#[test]
fn the_watermark_keeps_the_checkpoint_of_exactly_the_projected_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(&dir.path().join("log"), 6);
    let root = dir.path().join("parquet");
    let mut p = projection(&root);
    p.catch_up(&log).unwrap();
    let projected = log.size("acme");
    // More records after the flush: the watermark's checkpoint stays of the projected size.
    append(&mut log, 6, 9);
    let mark = read_watermark(&root, UNIT, "acme").unwrap();
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
    append_records(&root, UNIT, vec![("acme".into(), a.to_vec())], &zones).unwrap();
    append_records(&root, UNIT, vec![("acme".into(), b.to_vec())], &zones).unwrap();
    check_matches_log(&root, &log);
    let mark = read_watermark(&root, UNIT, "acme").unwrap();
    assert_eq!(mark.next_seq, log.size("acme"));
    assert_eq!(mark.checkpoint, None, "records from no log have no checkpoint");
    assert_eq!(mark.daily_zones, [("Asia/Tokyo".to_string(), 0), ("UTC".to_string(), 0)].into());
}

#[test]
fn a_watermark_past_the_log_is_an_error_not_silence() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("parquet");
    projection(&root).catch_up(&log_with(&dir.path().join("long"), 9)).unwrap();
    // Another, shorter log of the same tenant under the same projection.
    let short = log_with(&dir.path().join("short"), 2);
    let err = projection(&root).catch_up(&short).unwrap_err();
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
    let mut p = projection(&root);
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
        p.catch_up(&log).unwrap();
    }
    assert_eq!(read_watermark(&root, UNIT, "acme").unwrap().next_seq, 16, "every flush went through");
    let rollups = list_files(&root, Tree::Rollups, UNIT, |_| true).unwrap();
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
    projection(&root).catch_up(&log).unwrap();
    let mark = read_watermark(&root, UNIT, "acme").unwrap();
    assert!(mark.statements, "a projection from seq 0 holds every statement");
    let held = read_statements(&root, UNIT, "acme", mark.next_seq).unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].seq, held[0].statement.period.to_string(), held[0].statement.totals[0].micros), (first, "2026-11-01".to_string(), 2001));
    assert_eq!(held[0].statement, tally_log::Statement::decode(first, &log.tenant("acme").entry(first).unwrap()).unwrap());
    assert!(read_statements(&root, UNIT, "beta", u64::MAX).unwrap().is_empty(), "statements are the tenant's own");

    // A second statement whose flush crashed before its watermark: not visible, then redone.
    let unit_mark = read_unit_mark(&root, UNIT).unwrap();
    append(&mut log, 2, 3);
    let second = append_statement(&mut log, "2026-10-01");
    projection(&root).catch_up(&log).unwrap();
    crash_back_to(&root, &unit_mark);
    assert_eq!(read_statements(&root, UNIT, "acme", u64::MAX).unwrap().len(), 1, "past the watermark");
    projection(&root).catch_up(&log).unwrap();
    let mark = read_watermark(&root, UNIT, "acme").unwrap();
    let held = read_statements(&root, UNIT, "acme", mark.next_seq).unwrap();
    assert_eq!(held.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![first, second]);

    // A rebuild holds the same statements.
    rebuild_unit(&root, UNIT, &log, report_zones(&["UTC".into()]).unwrap(), |_, _| ()).unwrap();
    assert_eq!(read_statements(&root, UNIT, "acme", u64::MAX).unwrap(), held);
}

#[test]
fn a_flush_that_fails_midway_is_redone_exactly_by_the_same_projection() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(&dir.path().join("log"), 6);
    let root = dir.path().join("parquet");
    let mut p = projection(&root);
    p.catch_up(&log).unwrap();
    append(&mut log, 6, 12);
    append_for(&mut log, "beta", 0, 3);
    // The daily tree cannot be created: the flush fails after its events and 15-minute files.
    std::fs::remove_dir_all(root.join("daily")).unwrap();
    std::fs::write(root.join("daily"), b"in the way").unwrap();
    assert!(p.catch_up(&log).is_err());
    std::fs::remove_file(root.join("daily")).unwrap();
    // A retry with other tenants' records in the same flush number must not meet the failed
    // flush's files.
    append_for(&mut log, "gamma", 0, 2);
    p.catch_up(&log).unwrap();
    for tenant in ["acme", "beta", "gamma"] {
        check_matches_log_of(&root, &log, tenant);
    }
    assert_eq!(rollup_total(&root).events, 12);
    assert_eq!(rollup_total_of(&root, "beta").events, 3);
}

#[test]
fn the_billing_roll_up_holds_every_charged_event_once_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(&dir.path().join("log"), 9);
    append_for(&mut log, "beta", 0, 4);
    let root = dir.path().join("parquet");
    let mut p = projection(&root);
    // Many flushes, so the billing files are merged too.
    for i in 9..30 {
        append(&mut log, i, i + 1);
        p.catch_up(&log).unwrap();
    }
    let mut billed: BTreeMap<String, RollupSums> = BTreeMap::new();
    for f in list_files(&root, Tree::Billing, UNIT, |_| true).unwrap() {
        for (tenant, lines) in currency_sums(&f.path, None, None, |_| true).unwrap() {
            for sums in lines.into_values() {
                billed.entry(tenant.clone()).or_default().add(sums).unwrap();
            }
        }
    }
    assert_eq!(billed.get("acme"), Some(&rollup_total(&root)));
    assert_eq!(billed.get("beta"), Some(&rollup_total_of(&root, "beta")));
    assert_eq!(billed["acme"].events, 30);
}
