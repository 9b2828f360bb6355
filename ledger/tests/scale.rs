//! A partition ledger at platform scale, without a broker: 100,000 tenants × 3 events through
//! `PartitionLedger` (the ledger service's per-partition state machine), committed in groups as the
//! service commits them. Tenants are keys in one journal, not directories: the process's open
//! descriptors must stay under 1,000, every tenant's checkpoint must be signed at size 3, and a
//! reopen must find them all. `TALLY_SCALE_TENANTS` overrides the tenant count.
//!
//! The end-to-end form (through `tally ledger` from the broker) also writes the Parquet
//! projection, whose file count still grows with tenants (issue #17); this test pins what the
//! journal itself guarantees.

use std::time::Instant;

use tally_ingest::Delivery;
use tally_ledger::service::{Applied, PartitionLedger};
use tally_ledger::{Checkpoint, LedgerKey};

fn delivery(offset: i64, tenant: &str, id: &str) -> Delivery {
    let value = format!(
        r#"{{"event_id":"{id}","tenant_id":"{tenant}","occurred_at":"2026-11-02T09:15:00Z","kind":"llm_call","cost":{{"amount_micros":7,"currency":"USD"}}}}"#
    )
    .into_bytes();
    let outcome = tally_schemas::decode_message(Some(tenant.as_bytes()), &value, &[]);
    Delivery { partition: 0, offset, timestamp_ms: Some(1_700_000_000_000 + offset), key: Some(tenant.as_bytes().to_vec()), value, headers: vec![], outcome }
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_hundred_thousand_tenants_cost_no_descriptors_and_all_are_signed() {
    let tenants: usize = std::env::var("TALLY_SCALE_TENANTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let key = LedgerKey::generate("tally.example.com").unwrap();
    let names: Vec<String> = (0..tenants).map(|t| format!("t{t:06}")).collect();
    let started = Instant::now();
    let mut p = PartitionLedger::open(dir.path(), "events", 0, vec![key.clone()]).unwrap();
    let mut offset = 0i64;
    let mut peak = open_descriptors();
    for round in 0..3 {
        for (i, tenant) in names.iter().enumerate() {
            let applied = p.apply(&delivery(offset, tenant, &format!("e{round}"))).unwrap();
            assert!(matches!(applied, Applied::Appended { .. }), "{tenant} round {round}: {applied:?}");
            offset += 1;
            // A group commit every 5,000 deliveries, as a busy partition commits.
            if i % 5_000 == 4_999 {
                p.commit().unwrap();
                peak = peak.max(open_descriptors());
            }
        }
        p.commit().unwrap();
    }
    let applied_in = started.elapsed();
    peak = peak.max(open_descriptors());
    let started = Instant::now();
    for tenant in &names {
        let note = p.ledger().checkpoint_note(tenant).unwrap();
        assert_eq!(Checkpoint::parse_note(&note).unwrap().size, 3, "{tenant}");
    }
    let signed_in = started.elapsed();
    // A sample verified the way an outsider would.
    for tenant in names.iter().step_by((tenants / 100).max(1)) {
        let vkey = key.signer_for(tenant).unwrap().verifier();
        Checkpoint::open(&p.ledger().checkpoint_note(tenant).unwrap(), &[vkey], None).unwrap();
    }
    p.commit_closing().unwrap();
    drop(p);
    let started = Instant::now();
    let p = PartitionLedger::open(dir.path(), "events", 0, vec![key]).unwrap();
    let reopened_in = started.elapsed();
    assert_eq!(p.tenants().len(), tenants);
    assert_eq!(p.resume_offset(), Some(offset));
    assert!(names.iter().all(|t| p.committed_size(t) == 3));
    peak = peak.max(open_descriptors());
    eprintln!(
        "{tenants} tenants × 3 events: applied and committed in {applied_in:?}, {tenants} checkpoints signed in {signed_in:?}, reopened in {reopened_in:?}, peak open descriptors {peak}"
    );
    assert!(peak < 1_000, "{peak} open descriptors for {tenants} tenants");
}
