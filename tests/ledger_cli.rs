//! The offline ledger tools end to end: keygen, import (locking, deduplicating, skipping bad
//! lines), receipt, verify (valid and tampered), consistency between two checkpoints. No broker
//! needed.

use std::path::Path;
use std::process::{Command, Output};

fn tally(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally")).args(args).env("RUST_LOG", "warn").output().expect("run tally")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stdout: {}\nstderr: {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn events(path: &Path, from: usize, to: usize) {
    let lines: Vec<String> = (from..to)
        .map(|i| {
            serde_json::json!({"event_id": format!("e{i}"), "tenant_id": (["acme", "globex", "initech"][i % 3]),
                "occurred_at": "2026-11-02T09:15:00Z", "kind": "llm_call", "cost": {"amount_micros": i, "currency": "USD"}})
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn import_receipt_verify_and_consistency() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let origin_vkey = ok(&tally(&["keygen", "--origin", "tally.example.com", "--out", &p("ledger.key")]));
    assert!(origin_vkey.starts_with("tally.example.com+"), "{origin_vkey}");
    assert!(!tally(&["keygen", "--origin", "tally.example.com", "--out", &p("ledger.key")]).status.success(), "never overwrites a key");
    let kept = ok(&tally(&["keygen", "--origin", "tally.example.com", "--out", &p("ledger.key"), "--if-missing"]));
    assert_eq!(kept, origin_vkey, "--if-missing keeps the existing key");
    assert!(
        !tally(&["keygen", "--origin", "other.example", "--out", &p("ledger.key"), "--if-missing"]).status.success(),
        "a key of another origin is not silently kept"
    );

    events(&dir.path().join("a.jsonl"), 0, 300);
    let out = ok(&tally(&["log", "import", "--data", &p("data"), "--key", &p("ledger.key"), &p("a.jsonl")]));
    assert!(out.contains("tally.example.com/t/acme: +100 -> size 100"), "{out}");
    let vkey = ok(&tally(&["vkey", "--key", &p("ledger.key"), "--tenant", "acme"])).trim().to_string();
    assert!(vkey.starts_with("tally.example.com/t/acme+"), "{vkey}");
    let checkpoint = |data: &str, keys: &[&str]| {
        let mut args = vec!["log", "checkpoint", "--data", data, "--tenant", "acme"];
        keys.iter().for_each(|k| args.extend(["--key", k]));
        ok(&tally(&args))
    };
    std::fs::write(p("old.checkpoint"), checkpoint(&p("data"), &[&p("ledger.key")])).unwrap();

    ok(&tally(&["log", "receipt", "--data", &p("data"), "--key", &p("ledger.key"), "--tenant", "acme", "--seq", "41", "--out", &p("r41")]));
    let entry = std::fs::read_to_string(p("r41.entry")).unwrap();
    assert!(entry.starts_with(r#"{"seq":41,"type":"event","event":{"event_id":"e123""#), "{entry}");
    let verified = ok(&tally(&["verify", "receipt", "--vkey", &vkey, "--receipt", &p("r41.tlog-proof"), "--entry", &p("r41.entry")]));
    assert!(verified.contains("valid: entry 41 is in tally.example.com/t/acme at tree size 100"), "{verified}");

    // A changed entry, another tenant's key, a changed index: each rejected with its reason.
    std::fs::write(p("bad.entry"), entry.replace("e123", "e124")).unwrap();
    let out = tally(&["verify", "receipt", "--vkey", &vkey, "--receipt", &p("r41.tlog-proof"), "--entry", &p("bad.entry")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("root mismatch"), "{}", String::from_utf8_lossy(&out.stderr));
    let globex = ok(&tally(&["vkey", "--key", &p("ledger.key"), "--tenant", "globex"])).trim().to_string();
    let out = tally(&["verify", "receipt", "--vkey", &globex, "--receipt", &p("r41.tlog-proof"), "--entry", &p("r41.entry")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key"), "{}", String::from_utf8_lossy(&out.stderr));
    let receipt = std::fs::read_to_string(p("r41.tlog-proof")).unwrap();
    std::fs::write(p("far.tlog-proof"), receipt.replace("index 41", "index 100")).unwrap();
    let out = tally(&["verify", "receipt", "--vkey", &vkey, "--receipt", &p("far.tlog-proof"), "--entry", &p("r41.entry")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of range"), "{}", String::from_utf8_lossy(&out.stderr));

    // The log grows; the new checkpoint provably extends the old one.
    events(&dir.path().join("b.jsonl"), 300, 450);
    ok(&tally(&["log", "import", "--data", &p("data"), "--key", &p("ledger.key"), &p("b.jsonl")]));
    let proof = ok(&tally(&["log", "consistency", "--data", &p("data"), "--key", &p("ledger.key"), "--tenant", "acme", "--old", "100", "--new", "150"]));
    std::fs::write(p("proof"), &proof).unwrap();
    let new_cp = p("new.checkpoint");
    std::fs::write(&new_cp, checkpoint(&p("data"), &[&p("ledger.key")])).unwrap();
    let out = ok(&tally(&["verify", "consistency", "--vkey", &vkey, "--old", &p("old.checkpoint"), "--new", &new_cp, "--proof", &p("proof")]));
    assert!(out.contains("at size 150 extends size 100"), "{out}");
    let swapped = tally(&["verify", "consistency", "--vkey", &vkey, "--old", &new_cp, "--new", &p("old.checkpoint"), "--proof", &p("proof")]);
    assert!(!swapped.status.success());

    // A static tlog-tiles tree for acme at its checkpoint (150 entries: one partial tile each).
    let out = ok(&tally(&["log", "export-tiles", "--data", &p("data"), "--key", &p("ledger.key"), "--tenant", "acme", "--out", &p("tiles")]));
    assert!(out.contains("150 entries"), "{out}");
    assert_eq!(std::fs::read(p("tiles/tile/0/000.p/150")).unwrap().len(), 150 * 32);
    assert!(dir.path().join("tiles/tile/entries/000.p/150").exists());
    assert_eq!(std::fs::read_to_string(p("tiles/checkpoint")).unwrap(), std::fs::read_to_string(&new_cp).unwrap());

    // fsck: sound, then one flipped byte in an entry is found.
    let out = ok(&tally(&["log", "audit", "--data", &p("data")]));
    assert!(out.contains("audited 3 tenant logs: all sound") && out.contains("acme: 150 intact records"), "{out}");
    let segment = dir.path().join("data/journal/00000000000000000000.seg");
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = bytes.len() - 500;
    bytes[at] ^= 0x20;
    std::fs::write(&segment, bytes).unwrap();
    let out = tally(&["log", "audit", "--data", &p("data")]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("DAMAGED") && stdout.contains("checksum"), "{stdout}");
}

#[test]
fn key_rotation_both_keys_sign_then_the_new_one_alone() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    ok(&tally(&["keygen", "--origin", "tally.example.com", "--out", &p("old.key")]));
    ok(&tally(&["keygen", "--origin", "tally.example.com", "--out", &p("new.key")]));
    events(&dir.path().join("a.jsonl"), 0, 30);
    ok(&tally(&["log", "import", "--data", &p("d"), "--key", &p("old.key"), "--key", &p("new.key"), &p("a.jsonl")]));
    ok(&tally(&["log", "receipt", "--data", &p("d"), "--key", &p("old.key"), "--key", &p("new.key"), "--tenant", "acme", "--seq", "3", "--out", &p("r")]));
    for key in ["old.key", "new.key"] {
        let vkey = ok(&tally(&["vkey", "--key", &p(key), "--tenant", "acme"])).trim().to_string();
        ok(&tally(&["verify", "receipt", "--vkey", &vkey, "--receipt", &p("r.tlog-proof"), "--entry", &p("r.entry")]));
    }
    let both = ok(&tally(&["log", "checkpoint", "--data", &p("d"), "--key", &p("old.key"), "--key", &p("new.key"), "--tenant", "acme"]));
    assert_eq!(both.matches('\u{2014}').count(), 2, "both keys sign: {both}");
    // The old key retires: with the new key alone, the old vkey no longer verifies.
    ok(&tally(&["log", "receipt", "--data", &p("d"), "--key", &p("new.key"), "--tenant", "acme", "--seq", "3", "--out", &p("r2")]));
    let old_vkey = ok(&tally(&["vkey", "--key", &p("old.key"), "--tenant", "acme"])).trim().to_string();
    let out = tally(&["verify", "receipt", "--vkey", &old_vkey, "--receipt", &p("r2.tlog-proof"), "--entry", &p("r2.entry")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key"), "{}", String::from_utf8_lossy(&out.stderr));
    let new_only = ok(&tally(&["log", "checkpoint", "--data", &p("d"), "--key", &p("new.key"), "--tenant", "acme"]));
    assert_eq!(new_only.matches('\u{2014}').count(), 1, "{new_only}");
    assert_eq!(new_only.split("\n\n").next(), both.split("\n\n").next(), "the same tree, the same checkpoint body");

    // Across the rotation: a checkpoint signed by the old key alone, a later one by the new key
    // alone. The consistency proof verifies with both vkeys given, not with either one.
    let old_only = ok(&tally(&["log", "checkpoint", "--data", &p("d"), "--key", &p("old.key"), "--tenant", "acme"]));
    std::fs::write(p("old.cp"), &old_only).unwrap();
    events(&dir.path().join("b.jsonl"), 30, 45);
    ok(&tally(&["log", "import", "--data", &p("d"), "--key", &p("new.key"), &p("b.jsonl")]));
    std::fs::write(p("new.cp"), ok(&tally(&["log", "checkpoint", "--data", &p("d"), "--key", &p("new.key"), "--tenant", "acme"]))).unwrap();
    std::fs::write(
        p("proof"),
        ok(&tally(&["log", "consistency", "--data", &p("d"), "--key", &p("new.key"), "--tenant", "acme", "--old", "10", "--new", "15"])),
    )
    .unwrap();
    let new_vkey = ok(&tally(&["vkey", "--key", &p("new.key"), "--tenant", "acme"])).trim().to_string();
    let consistency = |vkeys: &[&str]| {
        let mut args = vec!["verify", "consistency"];
        for v in vkeys {
            args.extend(["--vkey", v]);
        }
        let (old, new, proof) = (p("old.cp"), p("new.cp"), p("proof"));
        args.extend(["--old", &old, "--new", &new, "--proof", &proof]);
        tally(&args)
    };
    let out = ok(&consistency(&[&old_vkey, &new_vkey]));
    assert!(out.contains("at size 15 extends size 10"), "{out}");
    for one in [&old_vkey, &new_vkey] {
        let out = consistency(&[one]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key"), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let bad = consistency(&[&old_vkey, "not a vkey"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--vkey number 2 is not a verifier key"), "{}", String::from_utf8_lossy(&bad.stderr));
}

#[test]
fn import_reports_invalid_lines_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    ok(&tally(&["keygen", "--origin", "tally.example.com", "--out", &p("k")]));
    std::fs::write(
        p("in.jsonl"),
        "{\"event_id\":\"a\",\"tenant_id\":\"acme\",\"occurred_at\":\"2026-11-02T09:15:00Z\",\"kind\":\"llm_call\"}\n{\"event_id\":\"b\",\"tenant_id\":\"acme\",\"kind\":\"llm_call\"}\n",
    )
    .unwrap();
    let out = tally(&["log", "import", "--data", &p("d"), "--key", &p("k"), &p("in.jsonl")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2: rejected: missing_field"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("acme: +1 -> size 1"));
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn importing_the_same_events_again_adds_nothing_and_reports_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    ok(&tally(&["keygen", "--origin", "tally.example.com", "--out", &p("k")]));
    let import = |file: &str| tally(&["log", "import", "--data", &p("d"), "--key", &p("k"), &p(file)]);
    events(&dir.path().join("a.jsonl"), 0, 30);
    let first = ok(&import("a.jsonl"));
    assert!(first.contains("tally.example.com/t/acme: +10 -> size 10"), "{first}");
    assert!(first.contains("30 imported, 0 duplicate(s) skipped"), "{first}");

    let second = ok(&import("a.jsonl"));
    assert!(second.contains("0 imported, 30 duplicate(s) skipped, 0 conflict(s), 0 rejected"), "{second}");
    assert!(!second.contains("-> size"), "no log grew: {second}");
    let audit = ok(&tally(&["log", "audit", "--data", &p("d")]));
    assert!(audit.contains("acme: 10 intact records") && audit.contains("globex: 10 intact records"), "{audit}");

    // An overlapping file, with one of its new events repeated (members reordered: same event).
    events(&dir.path().join("b.jsonl"), 20, 40);
    let mut b = std::fs::read_to_string(p("b.jsonl")).unwrap();
    b.push_str(r#"{"kind":"llm_call","cost":{"currency":"USD","amount_micros":39},"event_id":"e39","tenant_id":"acme","occurred_at":"2026-11-02T09:15:00Z"}"#);
    b.push('\n');
    std::fs::write(p("b.jsonl"), b).unwrap();
    let third = ok(&import("b.jsonl"));
    assert!(third.contains("tally.example.com/t/acme: +4 -> size 14"), "{third}");
    assert!(third.contains("10 imported, 11 duplicate(s) skipped"), "{third}");

    // The same event_id with other content is a conflict: reported, skipped, exit non-zero.
    std::fs::write(
        p("c.jsonl"),
        "{\"event_id\":\"e3\",\"tenant_id\":\"acme\",\"occurred_at\":\"2026-11-02T09:15:00Z\",\"kind\":\"llm_call\",\"cost\":{\"amount_micros\":999,\"currency\":\"USD\"}}\n\
         {\"event_id\":\"e3\",\"tenant_id\":\"initech\",\"occurred_at\":\"2026-11-02T09:15:00Z\",\"kind\":\"llm_call\"}\n",
    )
    .unwrap();
    let out = import("c.jsonl");
    assert!(!out.status.success());
    assert!(stderr(&out).contains(r#"line 1: conflict: event_id "e3" is already recorded for tenant acme at seq 1"#), "{}", stderr(&out));
    // The key is per tenant: initech had no e3.
    assert!(stdout(&out).contains("tally.example.com/t/initech: +1 -> size 14"), "{}", stdout(&out));
    assert!(stdout(&out).contains("1 imported, 0 duplicate(s) skipped, 1 conflict(s), 0 rejected"), "{}", stdout(&out));
}

#[test]
fn import_skips_oversized_and_non_utf8_lines_and_imports_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    ok(&tally(&["keygen", "--origin", "tally.example.com", "--out", &p("k")]));
    let event = |id: &str| format!(r#"{{"event_id":"{id}","tenant_id":"acme","occurred_at":"2026-11-02T09:15:00Z","kind":"llm_call"}}"#);
    let mut input = Vec::new();
    input.extend_from_slice(format!("{}\n", event("a")).as_bytes());
    // 4 MB on one line: far beyond the 60 KiB any message may have.
    let big = event(&"x".repeat(4 << 20));
    input.extend_from_slice(format!("{big}\n").as_bytes());
    input.extend_from_slice(&event("b\u{e9}").into_bytes().iter().map(|&b| if b == 0xc3 { 0xff } else { b }).collect::<Vec<u8>>());
    input.push(b'\n');
    input.extend_from_slice(format!("\n{}\r\n{}", event("c"), event("d")).as_bytes());
    std::fs::write(p("in.jsonl"), input).unwrap();

    let out = tally(&["log", "import", "--data", &p("d"), "--key", &p("k"), &p("in.jsonl")]);
    assert!(!out.status.success(), "rejected lines make the exit status non-zero");
    let err = stderr(&out);
    assert!(err.contains(&format!("line 2: rejected: too_large: line is {} bytes", big.len())), "{err}");
    assert!(err.contains("line 3: rejected: malformed_json: line is not UTF-8"), "{err}");
    assert!(err.contains("2 line(s) rejected"), "{err}");
    let out = stdout(&out);
    assert!(out.contains("tally.example.com/t/acme: +3 -> size 3"), "{out}");
    assert!(out.contains("3 imported, 0 duplicate(s) skipped, 0 conflict(s), 2 rejected"), "{out}");
    ok(&tally(&["log", "receipt", "--data", &p("d"), "--key", &p("k"), "--tenant", "acme", "--seq", "2", "--out", &p("r")]));
    let entry = std::fs::read_to_string(p("r.entry")).unwrap();
    assert!(entry.contains(r#""event_id":"d""#) && entry.contains(r#""line":6"#), "{entry}");
}

#[test]
fn import_refuses_a_locked_directory_and_a_service_partition() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    ok(&tally(&["keygen", "--origin", "tally.example.com", "--out", &p("k")]));
    events(&dir.path().join("a.jsonl"), 0, 3);
    let data = dir.path().join("d");
    std::fs::create_dir(&data).unwrap();
    let lock = tally_ledger::service::lock_data_dir(&data).unwrap();
    let out = tally(&["log", "import", "--data", &p("d"), "--key", &p("k"), &p("a.jsonl")]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is locked by another process"), "{}", stderr(&out));
    assert!(!data.join("journal").exists(), "nothing was written");
    drop(lock);
    ok(&tally(&["log", "import", "--data", &p("d"), "--key", &p("k"), &p("a.jsonl")]));

    // A ledger service's partition directory: its dedup store would not know imported events.
    let partition = dir.path().join("partitions/events-0");
    std::fs::create_dir_all(&partition).unwrap();
    std::fs::write(partition.join("state.redb"), b"").unwrap();
    let out = tally(&["log", "import", "--data", partition.to_str().unwrap(), "--key", &p("k"), &p("a.jsonl")]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("ledger service partition directory (it has state.redb)"), "{}", stderr(&out));
    assert!(!partition.join("journal").exists(), "nothing was written");
}

#[test]
fn token_new_appends_a_hash_and_prints_the_token_once() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    let f = file.to_str().unwrap();
    let acme = ok(&tally(&["token", "new", "--name", "acme-app", "--role", "tenant", "--tenant", "acme", "--file", f]));
    let reg = ok(&tally(&["token", "new", "--name", "auditor", "--role", "regulator", "--tenant", "acme", "--tenant", "globex", "--file", f]));
    let (acme, reg) = (acme.trim(), reg.trim());
    assert!(acme.starts_with("tally_") && reg.starts_with("tally_") && acme != reg);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains(acme) && !text.contains(reg), "the file must not hold tokens");
    assert_eq!(text.matches("[[token]]").count(), 2, "{text}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    // A duplicate name or a tenant token without its tenant is refused and nothing is written.
    for args in
        [&["token", "new", "--name", "acme-app", "--role", "admin", "--file", f][..], &["token", "new", "--name", "x", "--role", "tenant", "--file", f][..]]
    {
        let out = tally(args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("unique") || err.contains("exactly one tenant"), "{err}");
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
}

/// `token list` shows names, roles, tenants and expiry, never a secret; `token revoke` removes one
/// stanza and keeps the rest, with the file's mode; `--expires-in` sets `expires_at`.
#[test]
fn token_list_and_revoke_and_expiry() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    let f = file.to_str().unwrap();
    let gw = ok(&tally(&["token", "new", "--name", "edge", "--role", "gateway", "--tenant", "*", "--expires-in", "30d", "--file", f]));
    let ops = ok(&tally(&["token", "new", "--name", "ops", "--role", "admin", "--file", f]));
    let listed = ok(&tally(&["token", "list", "--file", f]));
    let edge_line = listed.lines().find(|l| l.starts_with("edge ")).unwrap_or_else(|| panic!("{listed}"));
    assert!(edge_line.contains("gateway") && edge_line.contains("valid") && edge_line.ends_with('*'), "{edge_line}");
    let expires: jiff::Timestamp = edge_line.split_whitespace().nth(2).unwrap().parse().unwrap();
    let days = (expires - jiff::Timestamp::now()).get_seconds() as f64 / 86_400.0;
    assert!((29.9..=30.0).contains(&days), "expires in {days} days");
    assert!(listed.lines().any(|l| l.starts_with("ops ") && l.contains("never")), "{listed}");
    assert!(!listed.contains(gw.trim()) && !listed.contains(ops.trim()), "list never shows a token");

    let out = tally(&["token", "revoke", "nobody", "--file", f]);
    assert!(!out.status.success() && stderr(&out).contains("no token named \"nobody\""), "{}", stderr(&out));
    ok(&tally(&["token", "revoke", "edge", "--file", f]));
    let listed = ok(&tally(&["token", "list", "--file", f]));
    assert!(!listed.contains("edge") && listed.contains("ops"), "{listed}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    // The services load what is left.
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(tally_ledger::auth::check_token_file(&text).unwrap(), 1);

    let out = tally(&["token", "new", "--name", "x", "--role", "admin", "--expires-in", "30y", "--file", f]);
    assert!(!out.status.success() && stderr(&out).contains("is not a lifetime"), "{}", stderr(&out));
}
