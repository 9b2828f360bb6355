//! Offline verification of an audit export ([`crate::reports::AuditExport`]): what `tally verify
//! export` runs, needing only the export and the tenant's verifier keys (docs/formats.md, "The
//! audit export's range proof").
//!
//! Nothing the export claims is taken on trust. The checkpoint must be signed by a given key
//! under the tenant's log origin; the entries, hashed, must rebuild its root with the range proof
//! (so they are the log's entries of exactly `from_seq ..= to_seq`, no gap); the personal values
//! given must open the entries' commitments, all of a record's or none; and the rows must be
//! exactly the rows the entries give, one per seq, column by column. The export's own verdicts
//! (`complete`, `missing_seqs`, `mismatched_seqs`, `truncated`, `next_from_seq`) must agree with
//! what is found. A record whose values are not given is reported as erased only when an
//! `erasure` record in the export names it; otherwise as withheld: the export alone cannot show
//! why. The file itself is read strictly ([`parse_export`]): no unknown member, and no member
//! repeated at any depth (a reader taking the first of two would see other content).

use std::collections::BTreeMap;

use base64::Engine as _;
use tally_log::merkle::{leaf_hash, root_from_range, Hash};
use tally_log::{Checkpoint, NoteVerifier, Record, Revealed};

use crate::reports::AuditExport;

/// Why an export does not verify: one sentence naming the first thing found wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ExportInvalid(pub String);

/// Reads an export from its JSON text, refusing a member repeated in any object and members
/// [`AuditExport`] does not have.
pub fn parse_export(text: &str) -> Result<AuditExport, ExportInvalid> {
    serde_json::from_str::<NoRepeats>(text).map_err(|e| invalid(format!("not an audit export: {e}")))?;
    serde_json::from_str(text).map_err(|e| invalid(format!("not an audit export: {e}")))
}

/// Any JSON value in which no object repeats a member.
struct NoRepeats;

impl<'de> serde::Deserialize<'de> for NoRepeats {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NoRepeats)
    }
}

impl<'de> serde::de::Visitor<'de> for NoRepeats {
    type Value = NoRepeats;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<NoRepeats, E> {
        Ok(NoRepeats)
    }
    fn visit_i64<E>(self, _: i64) -> Result<NoRepeats, E> {
        Ok(NoRepeats)
    }
    fn visit_u64<E>(self, _: u64) -> Result<NoRepeats, E> {
        Ok(NoRepeats)
    }
    fn visit_f64<E>(self, _: f64) -> Result<NoRepeats, E> {
        Ok(NoRepeats)
    }
    fn visit_str<E>(self, _: &str) -> Result<NoRepeats, E> {
        Ok(NoRepeats)
    }
    fn visit_unit<E>(self) -> Result<NoRepeats, E> {
        Ok(NoRepeats)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<NoRepeats, A::Error> {
        while seq.next_element::<NoRepeats>()?.is_some() {}
        Ok(NoRepeats)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<NoRepeats, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!("the member {key:?} is repeated")));
            }
            map.next_value::<NoRepeats>()?;
        }
        Ok(NoRepeats)
    }
}

/// What a valid export proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedExport {
    /// The tenant log's origin (`<log origin>/t/<tenant>`), as the checkpoint states it.
    pub origin: String,
    pub tree_size: u64,
    pub from_seq: u64,
    pub to_seq: u64,
    /// Records whose personal values the export gives, each opening its commitments.
    pub personal_open: u64,
    /// Records committing to personal values the export does not give, named by an `erasure`
    /// record in the export: erased.
    pub personal_erased: u64,
    /// Records committing to personal values the export does not give, named by no `erasure`
    /// record in the export (it may be outside the range): the export does not show why.
    pub personal_withheld: u64,
}

fn invalid(why: impl Into<String>) -> ExportInvalid {
    ExportInvalid(why.into())
}

/// Verifies `export` against the tenant's verifier keys (several during a key rotation).
pub fn verify_export(export: &AuditExport, vkeys: &[NoteVerifier]) -> Result<VerifiedExport, ExportInvalid> {
    let tenant = export.tenant_id.as_str();
    // A tenant id holds no "/": the origin's last two segments are then exactly "t/<tenant>".
    tally_schemas::validate_tenant_id(tenant).map_err(|r| invalid(format!("tenant_id: {}", r.detail)))?;
    let expected_suffix = format!("/t/{tenant}");
    let checkpoint = Checkpoint::open(&export.checkpoint, vkeys, None).map_err(|e| invalid(format!("checkpoint: {e}")))?;
    if !checkpoint.origin.ends_with(&expected_suffix) {
        return Err(invalid(format!("checkpoint: its origin {} is not tenant {tenant}'s log (…{expected_suffix})", checkpoint.origin)));
    }
    if checkpoint.size != export.tree_size {
        return Err(invalid(format!("tree_size is {}, the checkpoint's size is {}", export.tree_size, checkpoint.size)));
    }
    let (from, to) = (export.from_seq, export.to_seq);
    if from > to || to >= checkpoint.size {
        return Err(invalid(format!("the range {from}..={to} is not within the checkpointed log of {} records", checkpoint.size)));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let entries: Vec<Vec<u8>> =
        export.entries.iter().enumerate().map(|(i, e)| b64.decode(e).map_err(|_| invalid(format!("entries[{i}] is not base64")))).collect::<Result<_, _>>()?;
    let want = to - from + 1;
    if entries.len() as u64 != want {
        return Err(invalid(format!("the range {from}..={to} holds {want} seqs but the export has {} entries", entries.len())));
    }
    let proof: Vec<Hash> = export
        .range_proof
        .iter()
        .enumerate()
        .map(|(i, h)| b64.decode(h).ok().and_then(|h| Hash::try_from(h).ok()).ok_or_else(|| invalid(format!("range_proof[{i}] is not a base64 32-byte hash"))))
        .collect::<Result<_, _>>()?;
    let leaves: Vec<Hash> = entries.iter().map(|e| leaf_hash(e)).collect();
    if root_from_range(&leaves, from, checkpoint.size, &proof) != Some(checkpoint.root) {
        return Err(invalid("the entries' leaf hashes with range_proof do not rebuild the checkpoint's root: an entry or a proof hash is not the log's"));
    }
    // The entries are the log's: now the personal values, then the rows, against them.
    if let Some(seq) = export.personal.keys().find(|s| **s < from || **s > to) {
        return Err(invalid(format!("personal values are given for seq {seq}, outside the export's range")));
    }
    let records: Vec<Record<RecordType>> =
        (from..).zip(&entries).map(|(seq, entry)| Record::decode(seq, entry).map_err(|e| invalid(format!("entry {seq}: {e}")))).collect::<Result<_, _>>()?;
    // The seqs the range's `erasure` records name.
    let mut named = std::collections::BTreeSet::new();
    for ((seq, entry), record) in (from..).zip(&entries).zip(&records) {
        if matches!(record, Record::Budget(RecordType { record_type }) if record_type == "erasure") {
            named.extend(tally_log::Erasure::decode(seq, entry).map_err(|e| invalid(format!("entry {seq}: {e}")))?.seqs);
        }
    }
    let (mut open, mut erased, mut withheld) = (0u64, 0u64, 0u64);
    let mut revealed = Vec::with_capacity(entries.len());
    for (seq, record) in (from..).zip(&records) {
        let committed = match record {
            Record::Event(r) => r.personal.keys().cloned().collect::<Vec<_>>(),
            Record::Budget(_) => Vec::new(),
        };
        let given = export.personal.get(&seq);
        revealed.push(match (given, record) {
            (None, _) if committed.is_empty() => None,
            (None, _) => {
                if named.contains(&seq) {
                    erased += 1;
                } else {
                    withheld += 1;
                }
                Some(Revealed::Erased)
            }
            (Some(_), _) if committed.is_empty() => return Err(invalid(format!("personal values are given for seq {seq}, which commits to none"))),
            (Some(fields), Record::Event(r)) => {
                // One spelling per salt (lowercase hex), so that no changed byte goes unseen.
                if let Some((field, _)) =
                    fields.iter().find(|(_, o)| o.salt.len() != 2 * tally_log::SALT_BYTES || !o.salt.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                {
                    return Err(invalid(format!(
                        "personal values of seq {seq}: the salt of {field:?} is not {} lowercase hex digits",
                        2 * tally_log::SALT_BYTES
                    )));
                }
                r.check_openings(fields).map_err(|e| invalid(format!("personal values: {e}")))?;
                if fields.len() != committed.len() {
                    return Err(invalid(format!(
                        "personal values of seq {seq}: {} of the {} fields the record commits to are given (a record's values are all there or all erased)",
                        fields.len(),
                        committed.len()
                    )));
                }
                open += 1;
                Some(Revealed::Open(fields.clone()))
            }
            (Some(_), Record::Budget(_)) => return Err(invalid(format!("personal values are given for seq {seq}, which commits to none"))),
        });
    }
    check_rows(export, from, &entries, &revealed)?;
    let truncated_claim = (export.truncated, export.next_from_seq);
    if export.truncated && export.next_from_seq != Some(to + 1) || !export.truncated && export.next_from_seq.is_some() {
        return Err(invalid(format!("truncated and next_from_seq disagree: {truncated_claim:?} for a range ending at {to}")));
    }
    if !export.complete || !export.missing_seqs.is_empty() || !export.mismatched_seqs.is_empty() {
        return Err(invalid(format!(
            "the export says it is not complete (missing {:?}, mismatched {:?}), yet every row matches its entry",
            export.missing_seqs, export.mismatched_seqs
        )));
    }
    Ok(VerifiedExport {
        origin: checkpoint.origin,
        tree_size: checkpoint.size,
        from_seq: from,
        to_seq: to,
        personal_open: open,
        personal_erased: erased,
        personal_withheld: withheld,
    })
}

/// The type of a budget-side record (what tells an `erasure` from the rest).
#[derive(serde::Deserialize)]
struct RecordType {
    #[serde(rename = "type")]
    record_type: String,
}

/// The rows must be one per seq of the range, each equal, member by member, to the row its entry
/// gives (`tally_projection::expected_rows`, encoded as the export encodes rows).
fn check_rows(export: &AuditExport, from: u64, entries: &[Vec<u8>], revealed: &[Option<Revealed>]) -> Result<(), ExportInvalid> {
    let expected = tally_projection::expected_rows(from, entries, revealed).map_err(|e| invalid(format!("the entries give no rows: {e}")))?;
    let expected = crate::encode::json_rows(&[expected]).map_err(|e| invalid(format!("the entries' rows cannot be encoded: {e}")))?;
    let rows = export.rows.as_array().ok_or_else(|| invalid("rows is not an array"))?;
    let mut by_seq: BTreeMap<u64, &serde_json::Value> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        let seq = row.get("seq").and_then(serde_json::Value::as_u64).ok_or_else(|| invalid(format!("rows[{i}] has no seq")))?;
        if by_seq.insert(seq, row).is_some() {
            return Err(invalid(format!("seq {seq} has several rows")));
        }
    }
    for (seq, want) in (from..).zip(expected.as_array().into_iter().flatten()) {
        let got = by_seq.remove(&seq).ok_or_else(|| invalid(format!("seq {seq} has no row")))?;
        if got != want {
            let differs = first_difference(got, want);
            return Err(invalid(format!("the row of seq {seq} is not what its entry gives: {differs}")));
        }
    }
    if let Some(seq) = by_seq.keys().next() {
        return Err(invalid(format!("a row of seq {seq} is outside the export's range")));
    }
    Ok(())
}

/// Which column of a row differs from the expected one (or which is extra or missing).
fn first_difference(got: &serde_json::Value, want: &serde_json::Value) -> String {
    let (Some(got), Some(want)) = (got.as_object(), want.as_object()) else { return "it is not an object".into() };
    for (column, value) in want {
        if got.get(column) != Some(value) {
            return format!("column {column}");
        }
    }
    match got.keys().find(|c| !want.contains_key(*c)) {
        Some(column) => format!("column {column} should be null or absent"),
        None => "a column differs".into(),
    }
}
