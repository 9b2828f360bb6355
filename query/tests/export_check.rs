//! `tally_query::verify_export`, the check behind `tally verify export`, on a real export: a
//! tenant log with plain, personal and erased records and an `erasure` record, projected and
//! exported by the query service. Every single-bit change to the export's rows, entries, range
//! proof, checkpoint or personal values is refused.

mod common;

use base64::Engine as _;
use common::{event, get_json, Fixture};
use tally_log::{erasure_record, EventInput, Ledger, LedgerKey, Source};
use tally_projection::Projection;
use tally_query::reports::AuditExport;

/// acme's log: seq 0 plain, 1 user-ann's (erased), 2 user-bob's, 3 plain, 4 the erasure of
/// user-ann, 5 plain, 6 a `conflict` with seq 2 (bob's, other values); projected.
fn fixture() -> Fixture {
    let f = Fixture::new();
    let partitions = f.data_dir().join("partitions");
    std::fs::create_dir_all(&partitions).unwrap();
    std::fs::write(partitions.join("tally.events.partition-count"), "1\n").unwrap();
    let mut ledger = Ledger::open(&partitions.join("tally.events-0"), vec![LedgerKey::parse(&f.key.to_text().unwrap()).unwrap()]).unwrap();
    let at: jiff::Timestamp = "2026-11-02T10:00:00Z".parse().unwrap();
    let personal = |id: &str, actor: &str, email: &str| {
        let mut e = event("acme", id, at, "llm_call", "planner", "gpt-x", "task-1", Some((1_500, "USD")));
        e.actor_id = Some(actor.to_string());
        e.attributes.insert("email".into(), email.into());
        e
    };
    let events = [
        event("acme", "e0", at, "llm_call", "planner", "gpt-x", "task-1", Some((1_000, "USD"))),
        personal("e1", "user-ann", "ann@example.com"),
        personal("e2", "user-bob", "bob@example.com"),
        event("acme", "e3", at, "tool_call", "coder", "search", "task-2", None),
    ];
    for (i, e) in events.iter().enumerate() {
        let source = Source::Kafka { topic: "tally.events".into(), partition: 0, offset: i as i64, timestamp_ms: Some(1_700_000_000_000) };
        ledger.append_event(EventInput { event: e, ce_source: None, payload_sha256: &[7; 32], source: &source }, None, None).unwrap();
    }
    ledger.commit(Some(4)).unwrap();
    let plan = ledger.erasure_plan("acme", Some("user-ann"), None, at, "ops").unwrap();
    ledger.append("acme", &erasure_record(4, &plan.erasure).unwrap()).unwrap();
    ledger.commit(None).unwrap();
    ledger.forget_keys("acme", &plan.erasure.keys).unwrap();
    let last = event("acme", "e5", at, "llm_call", "planner", "gpt-x", "task-1", Some((2_000, "USD")));
    let source = Source::Kafka { topic: "tally.events".into(), partition: 0, offset: 4, timestamp_ms: None };
    ledger.append_event(EventInput { event: &last, ce_source: None, payload_sha256: &[8; 32], source: &source }, None, None).unwrap();
    let conflict = personal("e2", "user-bob", "bob2@example.com");
    let source = Source::Kafka { topic: "tally.events".into(), partition: 0, offset: 5, timestamp_ms: Some(1_700_000_000_123) };
    ledger.append_event(EventInput { event: &conflict, ce_source: None, payload_sha256: &[9; 32], source: &source }, None, Some(2)).unwrap();
    ledger.commit(Some(6)).unwrap();
    Projection::new(&f.data_dir().join("parquet"), common::UNIT, std::time::Duration::ZERO).catch_up(&ledger).unwrap();
    f
}

async fn export(f: &Fixture, range: &str) -> AuditExport {
    serde_json::from_value(get_json(&f.router(), &format!("/v1/tenants/acme/audit-export{range}"), &f.tokens["regulator"]).await).unwrap()
}

#[tokio::test]
async fn a_real_export_verifies_and_says_what_it_proves() {
    let f = fixture();
    let whole = export(&f, "").await;
    let v = tally_query::verify_export(&whole, &f.verifiers("acme")).unwrap();
    assert_eq!((v.from_seq, v.to_seq, v.tree_size), (0, 6, 7));
    assert_eq!((v.personal_open, v.personal_erased, v.personal_withheld), (2, 1, 0), "bob's event and conflict open, ann's erased");
    assert_eq!(v.origin, "tally.test/t/acme");
    // Another tenant's key, or none of the right ones, proves nothing.
    assert!(tally_query::verify_export(&whole, &f.verifiers("globex")).is_err());
    // A part of the log verifies on its own, with its proof.
    let part = export(&f, "?from_seq=1&to_seq=3").await;
    assert_eq!(part.range_proof.len(), 2);
    let v = tally_query::verify_export(&part, &f.verifiers("acme")).unwrap();
    assert_eq!((v.personal_open, v.personal_erased, v.personal_withheld), (1, 0, 1), "the erasure record is outside the part: ann's values are only withheld");

    // The file is read strictly: a member repeated at any depth, or one the export has not, is
    // refused (a reader taking the first of two members would see other content).
    let text = serde_json::to_string(&whole).unwrap();
    assert!(tally_query::parse_export(&text).is_ok());
    let repeated = text.replacen(r#""seq":0,"#, r#""seq":0,"seq":0,"#, 1);
    assert!(repeated.len() > text.len(), "a row's seq repeated");
    assert!(tally_query::parse_export(&repeated).unwrap_err().to_string().contains(r#"the member "seq" is repeated"#));
    let unknown = text.replacen(r#"{"tenant_id""#, r#"{"note":"trust me","tenant_id""#, 1);
    assert!(tally_query::parse_export(&unknown).unwrap_err().to_string().contains("unknown field"));

    // The reference verifier, written from docs/formats.md alone, agrees on both.
    let vkey = f.verifiers("acme")[0].to_string();
    let whole_line = "valid: seqs 0..=6 of tally.test/t/acme at tree size 7: 7 entries in the checkpoint's tree, each row what its entry gives; personal values: 2 records verified, 1 erased\n";
    let part_line = "valid: seqs 1..=3 of tally.test/t/acme at tree size 7: 3 entries in the checkpoint's tree, each row what its entry gives; personal values: 1 records verified, 0 erased, 1 not given (no erasure record in the export names them)\n";
    for (name, export, want) in [("whole", &whole, whole_line), ("part", &part, part_line)] {
        let (code, out) = python_verify(&f, name, &serde_json::to_value(export).unwrap(), &vkey);
        assert!(code == Some(0) && out == want, "{name}: {out}");
    }
    // And refuses what Rust's verifier refuses: a row not what its entry gives,
    let mut forged = serde_json::to_value(&whole).unwrap();
    forged["rows"][2]["attributes"]["email"] = "eve@example.com".into();
    let (code, out) = python_verify(&f, "forged", &forged, &vkey);
    assert!(code == Some(1) && out.contains("the row of seq 2 is not what its entry gives"), "{out}");
    // a boolean for an integer, a seq spelled another way,
    let mut forged = serde_json::to_value(&whole).unwrap();
    forged["rows"][1]["seq"] = true.into();
    assert_eq!(python_verify(&f, "bool-seq", &forged, &vkey).0, Some(1));
    let mut forged = serde_json::to_value(&whole).unwrap();
    let bob = forged["personal"]["2"].take();
    forged["personal"].as_object_mut().unwrap().remove("2");
    forged["personal"]["+2"] = bob;
    let (code, out) = python_verify(&f, "plus-seq", &forged, &vkey);
    assert!(code == Some(1) && out.contains("is not a seq"), "{out}");
    // and another tenant's checkpoint with its signature line renamed to acme's key: one key
    // signs every tenant, so the key's name must be the checkpoint's origin.
    let globex_note = {
        let dir = f.data_dir().join("partitions/tally.events-0");
        let mut ledger = Ledger::open(&dir, vec![LedgerKey::parse(&f.key.to_text().unwrap()).unwrap()]).unwrap();
        let e = event("globex", "g0", "2026-11-02T10:00:00Z".parse().unwrap(), "llm_call", "a", "m", "t", None);
        let source = Source::File { file: "g.jsonl".into(), line: 1 };
        ledger.append_event(EventInput { event: &e, ce_source: None, payload_sha256: &[1; 32], source: &source }, None, None).unwrap();
        ledger.commit(None).unwrap();
        ledger.checkpoint_note("globex").unwrap()
    };
    let acme_id = f.verifiers("acme")[0].id().to_be_bytes();
    let (text, signature) = globex_note.rsplit_once("\n\u{2014} ").unwrap();
    let sig = base64::engine::general_purpose::STANDARD.decode(signature.trim_end().rsplit_once(' ').unwrap().1).unwrap();
    let mut renamed_sig = acme_id.to_vec();
    renamed_sig.extend_from_slice(&sig[4..]);
    let renamed = format!("{text}\n\u{2014} tally.test/t/acme {}\n", base64::engine::general_purpose::STANDARD.encode(renamed_sig));
    let mut forged = serde_json::to_value(&whole).unwrap();
    forged["checkpoint"] = renamed.into();
    forged["tenant_id"] = "globex".into();
    let (code, out) = python_verify(&f, "renamed-key", &forged, &vkey);
    assert!(code == Some(1) && out.contains("is not the name of a key that signed it"), "{out}");
    let export: AuditExport = serde_json::from_value(forged).unwrap();
    assert!(tally_query::verify_export(&export, &f.verifiers("acme")).is_err());
}

/// `verifiers/python/tally_verify.py export` on `export`: its exit code and output.
fn python_verify(f: &Fixture, name: &str, export: &serde_json::Value, vkey: &str) -> (Option<i32>, String) {
    let path = f.dir.path().join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec(export).unwrap()).unwrap();
    let out = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../verifiers/python/tally_verify.py"))
        .args(["export", "--vkey", vkey])
        .arg(&path)
        .output()
        .unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Flips each bit of `bytes` in turn, and asks `refused` whether the result is refused.
fn every_flip(what: &str, bytes: &[u8], mut refused: impl FnMut(Vec<u8>) -> bool) -> usize {
    let mut flips = 0;
    for i in 0..bytes.len() * 8 {
        let mut changed = bytes.to_vec();
        changed[i / 8] ^= 1 << (i % 8);
        assert!(refused(changed), "{what}: bit {i} (byte {}) flipped, and the export still verifies", i / 8);
        flips += 1;
    }
    flips
}

#[tokio::test]
async fn every_single_bit_change_to_an_export_is_refused() {
    let f = fixture();
    let export = export(&f, "?from_seq=1&to_seq=4").await;
    let vkeys = f.verifiers("acme");
    tally_query::verify_export(&export, &vkeys).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    // What a verifier reads is the JSON file: a change that leaves it unreadable is refused too.
    let check = |json: serde_json::Value| serde_json::from_value::<AuditExport>(json).map_or(true, |e| tally_query::verify_export(&e, &vkeys).is_err());
    let as_json = serde_json::to_value(&export).unwrap();
    let mut flips = 0;

    let rows = serde_json::to_vec(&export.rows).unwrap();
    flips += every_flip("rows", &rows, |changed| {
        let Ok(rows) = serde_json::from_slice::<serde_json::Value>(&changed) else { return true };
        let mut json = as_json.clone();
        json["rows"] = rows;
        check(json)
    });
    for (i, entry) in export.entries.iter().enumerate() {
        flips += every_flip(&format!("entries[{i}]"), &b64.decode(entry).unwrap(), |changed| {
            let mut json = as_json.clone();
            json["entries"][i] = b64.encode(changed).into();
            check(json)
        });
    }
    for (i, hash) in export.range_proof.iter().enumerate() {
        flips += every_flip(&format!("range_proof[{i}]"), &b64.decode(hash).unwrap(), |changed| {
            let mut json = as_json.clone();
            json["range_proof"][i] = b64.encode(changed).into();
            check(json)
        });
    }
    flips += every_flip("checkpoint", export.checkpoint.as_bytes(), |changed| {
        let Ok(text) = String::from_utf8(changed) else { return true };
        let mut json = as_json.clone();
        json["checkpoint"] = text.into();
        check(json)
    });
    let personal = serde_json::to_vec(&export.personal).unwrap();
    assert!(!export.personal.is_empty(), "the range holds a record with its values");
    flips += every_flip("personal", &personal, |changed| {
        let Ok(personal) = serde_json::from_slice::<serde_json::Value>(&changed) else { return true };
        let mut json = as_json.clone();
        json["personal"] = personal;
        check(json)
    });
    assert!(flips > 10_000, "{flips} flips");
}
