//! The README's main command (`scripts/demo.sh`) against the test broker: events land in signed
//! logs, a receipt fetched with a tenant's token verifies offline, another tenant is refused, and
//! a tenant past its day limit is denied its next call, and the query service prints a cost report,
//! the billing spend table and a complete audit export.

mod common;

#[test]
fn the_main_job_verifies_a_receipt_end_to_end() {
    let bootstrap = common::kafka().bootstrap;
    let out = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh"))
        .env("TALLY_BIN", env!("CARGO_BIN_EXE_tally"))
        .env("KAFKA_BOOTSTRAP", bootstrap)
        .output()
        .expect("run scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("66 accepted for 4 tenants, 15 dead-lettered"), "{stdout}");
    assert!(stdout.contains("acme's signed checkpoint covers its 23 valid events"), "{stdout}");
    assert!(stdout.contains("valid: entry 22 is in demo.tally.example/t/acme at tree size 23"), "{stdout}");
    assert!(stdout.contains(r#"{"error":{"code":"forbidden""#), "{stdout}");
    assert!(stdout.contains("initech's budget state (also on the tally.budget topic): exceeded"), "{stdout}");
    assert!(stdout.contains("authorize: deny (denied by the day limit;"), "{stdout}");
    assert!(stdout.contains("acme's audit trail holds 23 events"), "{stdout}");
    assert!(stdout.contains("2026-11-02  support-bot   gpt-5-mini"), "{stdout}");
    assert!(stdout.contains("total USD:"), "{stdout}");
    for tenant in ["acme", "globex", "initech"] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(tenant) && l.contains("USD") && l.contains("2026-11-01T00:00:00Z")),
            "no spend row for {tenant}: {stdout}"
        );
    }
    assert!(stdout.contains("complete=true"), "{stdout}");
}
