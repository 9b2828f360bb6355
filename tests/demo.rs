//! The README's main command (`scripts/demo.sh`) against the test broker: events land in signed
//! logs, a receipt fetched with a tenant's token verifies offline, another tenant is refused, and
//! a tenant past its day limit is denied its next call, a gateway's retried, throttled and frozen
//! calls are answered as docs/gateways.md says, and the query service prints a cost report,
//! the billing spend table (a tokens-only call charged from the table), a statement verified
//! offline, an end user's erasure after which a receipt from before still verifies, and a
//! complete audit export that `tally verify export` and the Python verifier both accept.

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
    assert!(stdout.contains("70 accepted for 4 tenants, 15 dead-lettered"), "{stdout}");
    assert!(stdout.contains("acme's signed checkpoint covers its 25 records: 24 valid events"), "{stdout}");
    assert!(stdout.contains("valid: entry 24 is in demo.tally.example/t/acme at tree size 25"), "{stdout}");
    assert!(stdout.contains(r#"{"error":{"code":"forbidden""#), "{stdout}");
    assert!(stdout.contains("initech's budget state (also on the tally.budget topic): exceeded"), "{stdout}");
    assert!(stdout.contains("authorize: deny (denied by the day limit;"), "{stdout}");
    // The gateway: two emails allowed, a retried call answered with its first reservation, the
    // third email throttled; no audit reads; a freeze denies the frozen agent only.
    let gateway: Vec<&str> = stdout.lines().skip_while(|l| !l.contains("globex's gateway")).collect();
    let decisions: Vec<&str> = gateway.iter().filter_map(|l| l.split_whitespace().next().filter(|w| ["allow", "throttled", "deny"].contains(w))).collect();
    assert_eq!(decisions, ["allow", "allow", "allow", "throttled", "deny", "throttled"], "{stdout}");
    assert!(gateway.iter().any(|l| l.contains("(a retry: the first answer again)")), "{stdout}");
    assert!(gateway.iter().any(|l| l.contains("throttled by action:send_email, retry after")), "{stdout}");
    assert!(gateway.iter().any(|l| l.contains("denied by freeze")), "{stdout}");
    assert!(gateway.iter().any(|l| l.contains("active freeze frz-") && l.contains("runaway emails")), "{stdout}");
    assert!(gateway.iter().any(|l| l.contains("this tenant's audit trail")), "{stdout}");
    assert!(stdout.contains("acme's audit trail holds 24 events"), "{stdout}");
    assert!(stdout.contains("2026-11-02  support-bot   gpt-5-mini"), "{stdout}");
    assert!(stdout.contains("total USD:"), "{stdout}");
    for tenant in ["acme", "globex", "initech"] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(tenant) && l.contains("USD") && l.contains("2026-11-01T00:00:00Z")),
            "no spend row for {tenant}: {stdout}"
        );
    }
    // The erasure: values verified before, erased after, the same receipt still valid.
    assert!(stdout.contains("personal values: all 3 verified against their commitments"), "{stdout}");
    assert!(stdout.contains("erased: 1 key, the personal values of 2 records"), "{stdout}");
    assert!(stdout.contains("personal values: 0 verified, erased: actor_id, attributes.email, payload_sha256"), "{stdout}");
    assert!(stdout.contains("a byte scan of the ledger's data directory finds no ann@example.com"), "{stdout}");
    assert!(stdout.contains("    personal values: erased: actor_id, attributes.email, payload_sha256"), "the independent verifier: {stdout}");
    assert!(stdout.contains("complete=true"), "{stdout}");
    // Checked offline by `tally verify export` and by the Python verifier: the same line twice.
    let verified: Vec<&str> = stdout.lines().filter(|l| l.trim_start().starts_with("valid: seqs 0..=") && l.contains("of demo.tally.example/t/acme")).collect();
    assert_eq!(verified.len(), 2, "{stdout}");
    assert!(verified.iter().all(|l| l.contains("each row what its entry gives") && l.contains("erased")), "{stdout}");
    // Rated once, in the log: initech's tokens-only call (20,000 in, 2,000 out at 0.25 and 2 USD
    // per million) is charged 9,000 micros from its table, beside 20 calls with their own cost.
    let claimed: i64 = (0..60).filter(|i| i % 3 == 2).map(|i| 1_200 + i).sum();
    let initech = format!("gpt-5-mini        21  {claimed:>14}  {:>14}", claimed + 9_000);
    assert!(stdout.contains(&initech), "want {initech:?} in\n{stdout}");
    assert!(stdout.lines().any(|l| l.trim_start().starts_with("initech") && l.contains(" table ")), "no table-charged spend row: {stdout}");
    let valid = "valid: statement of period 2026-11-01 (2026-11-01T00:00:00Z to 2026-12-01T00:00:00Z, UTC)";
    assert_eq!(stdout.matches(valid).count(), 2, "verified from the tiles and from the audit export: {stdout}");
    assert!(
        stdout.lines().any(|l| l.trim_start().starts_with("invoice initech") && l.contains("2026-11-01T00:00:00Z .. 2026-12-01T00:00:00Z  statement seq")),
        "no billing-period invoice line for initech: {stdout}"
    );
}
