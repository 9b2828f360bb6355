//! Writes the seed corpora: valid inputs of each target, so the fuzzer starts past the first
//! check (a signed checkpoint and a receipt by the seed key, canonical tile paths, an event, a
//! token file). Run from `fuzz/`: `cargo run --bin seeds`.

use std::path::Path;

use tally_log::merkle::leaf_hash;
use tally_log::{Checkpoint, Receipt};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed written");
}

fn main() {
    let signer = tally_fuzz::signer();
    // A log of one entry: its root is the entry's leaf hash, and the receipt's proof is empty.
    let checkpoint = Checkpoint { origin: tally_fuzz::ORIGIN.to_string(), size: 1, root: leaf_hash(b"entry 0") };
    let note = checkpoint.sign(std::slice::from_ref(&signer)).expect("signed");
    write("signed_note", "checkpoint", note.as_bytes());
    write("signed_note", "vkey", signer.verifier().vkey().as_bytes());
    let receipt = Receipt { index: 0, proof: Vec::new(), checkpoint: note };
    write("receipt", "one-entry", receipt.to_text().as_bytes());
    write("tile", "hashes", b"tile/0/x001/234");
    write("tile", "entries", b"tile/entries/000.p/8");
    // The first byte is the width less one: two entries.
    let mut bundle = vec![1u8];
    for entry in [&b"entry 0"[..], b"{\"type\":\"event\"}"] {
        bundle.extend_from_slice(&(entry.len() as u16).to_be_bytes());
        bundle.extend_from_slice(entry);
    }
    write("tile", "bundle", &bundle);
    write("token_file", "two", b"[[token]]\nname = \"acme-app\"\nrole = \"tenant\"\ntenants = [\"acme\"]\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n");
    let event = br#"{"event_id":"e1","tenant_id":"acme","occurred_at":"2026-11-02T09:15:00Z","kind":"llm_call","action":"gpt-5-mini","cost":{"amount_micros":10,"currency":"USD"},"attributes":{"email":"ann@example.com"}}"#;
    // decode_message's framing: key "acme", no headers, then the value.
    let mut message = vec![4u8, b'a', b'c', b'm', b'e', 0];
    message.extend_from_slice(event);
    write("decode_message", "event", &message);
    // The same as a structured CloudEvent: ce_* headers, no key.
    let mut cloud = vec![255u8, 3];
    for (name, value) in [("ce_specversion", "1.0"), ("ce_type", "llm_call"), ("ce_source", "gw-1")] {
        cloud.push(name.len() as u8);
        cloud.extend_from_slice(name.as_bytes());
        cloud.push(value.len() as u8);
        cloud.extend_from_slice(value.as_bytes());
    }
    cloud.extend_from_slice(event);
    write("decode_message", "cloudevent", &cloud);
    // The budgets file of docs/budgets.md's example: plans, overrides, prices and quotas.
    write(
        "budgets_file",
        "plans",
        b"default_plan = \"standard\"\n[plans.standard]\ntask_micros = 2_000_000\nday_micros = 20_000_000\nsoft_threshold = 0.8\nday_tokens = 2_000_000\ntask_calls = 50\ntime_zone = \"UTC\"\nperiod_anchor_day = 1\ncurrency = \"USD\"\nceiling = { input_per_million_micros = 15_000_000, output_per_million_micros = 60_000_000 }\n[plans.standard.prices.\"gpt-5-mini\"]\ninput_per_million_micros = 250_000\noutput_per_million_micros = 2_000_000\n[plans.standard.quotas]\ncalls = \"600/m\"\n\"action:send_email\" = \"50/h\"\n[tenants.acme]\nplan = \"standard\"\nday_micros = 5_000_000\ntime_zone = \"Europe/Berlin\"\npersonal_data_days = 30\n",
    );
    // Queries the gate accepts, and a few it refuses for each reason.
    for (name, sql) in [
        ("count", "SELECT count(*) FROM events"),
        ("group", "select kind, sum(cost_micros) from Events where occurred_at > now() - interval '1 day' group by kind"),
        ("cte", "WITH x AS (SELECT * FROM events) SELECT * FROM x JOIN events e ON x.seq = e.seq"),
        ("window", "SELECT seq, sum(cost_micros) OVER (PARTITION BY kind ORDER BY seq) FROM events ORDER BY 2 DESC LIMIT 10"),
        ("table-function", "SELECT * FROM read_parquet('/etc/passwd')"),
        ("other-table", "SELECT * FROM events UNION ALL SELECT * FROM other_tenant"),
        ("two", "SELECT 1; SELECT 2"),
    ] {
        write("sql_gate", name, sql.as_bytes());
    }
    println!("seeds written under corpus/");
}
