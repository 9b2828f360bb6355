//! Period close: the totals of a tenant's billing period, kept while it is open and written into
//! its log as a `statement` record once it has ended plus a grace (docs/billing.md).
//!
//! Invariants: a period's totals are the sum of the `charge` of every `event` record whose
//! `charge.period` is that period, and they are all below the statement's seq (a late event is
//! billed in the open period, as a correction, never in a closed one). So anyone holding the
//! tenant's entries can recompute a statement ([`recompute`]), which is what `tally verify
//! statement` does.

use std::collections::BTreeMap;

use jiff::civil::Date;
use serde::{Deserialize, Serialize};
use tally_log::merkle::{leaf_hash, root_from_range, Frontier, Hash};
use tally_log::{available_width, parse_entry_bundle, Charge, Checkpoint, NoteVerifier, Record, TILE_WIDTH};
pub use tally_log::{Statement, StatementTotal};
use tally_schemas::Usage;

/// The charges of one billing period not yet closed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenPeriod {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Sorted by (currency, basis, correction); a handful of lines.
    pub totals: Vec<StatementTotal>,
}

impl OpenPeriod {
    /// Adds the charge of the event record at `seq` and its event's tokens. Sums saturate: a
    /// period's micros past 2^63 would be a bill no one can pay, and a wrapped one would be a
    /// wrong bill.
    pub fn add(&mut self, seq: u64, charge: &Charge, usage: Option<&Usage>) {
        if self.totals.is_empty() {
            self.first_seq = seq;
        }
        self.last_seq = seq;
        let key = (charge.currency.as_str(), charge.basis, charge.corrects.is_some());
        let at = self.totals.binary_search_by(|t| (t.currency.as_str(), t.basis, t.correction).cmp(&key));
        let index = at.unwrap_or_else(|i| {
            let line = StatementTotal {
                currency: charge.currency.clone(),
                basis: charge.basis,
                correction: key.2,
                events: 0,
                micros: 0,
                input_tokens: Some(0),
                output_tokens: Some(0),
            };
            self.totals.insert(i, line);
            i
        });
        let line = &mut self.totals[index];
        line.events = line.events.saturating_add(1);
        line.micros = line.micros.saturating_add(charge.micros);
        let usage = usage.copied().unwrap_or_default();
        line.input_tokens = Some(line.input_tokens.unwrap_or(0).saturating_add(usage.input_tokens));
        line.output_tokens = Some(line.output_tokens.unwrap_or(0).saturating_add(usage.output_tokens));
    }
}

/// Why a statement does not verify: bad evidence, or entries that do not add up to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("the checkpoint covers {size} entries: seq {seq} is not among them")]
    BeyondCheckpoint { seq: u64, size: u64 },
    #[error("entry bundle {index}: {why}")]
    Bundle { index: u64, why: String },
    #[error("entry {0} is not a statement record")]
    NotAStatement(u64),
    #[error("the statement at seq {seq} says it covers {said} entries")]
    TreeSize { seq: u64, said: u64 },
    #[error("the entries do not hash to the checkpoint's root: they are not the log it signs")]
    Root,
    #[error("the statement's bounds do not name its period: {0}")]
    Bounds(String),
    #[error("entry {0} is not a record: {1}")]
    BadEntry(u64, String),
    #[error("no record is charged in period {0}")]
    Empty(Date),
    #[error("record {seq} is charged in period {period} but lies after the statement (seq {statement_seq})")]
    AfterClose { seq: u64, period: Date, statement_seq: u64 },
    #[error("the statement says seqs {said:?}; the charged records span {found:?}")]
    Range { said: (u64, u64), found: (u64, u64) },
    #[error("the statement's totals differ from its records: it says {said}; the records give {found}")]
    Totals { said: String, found: String },
    #[error("the export holds seqs {from}..={to}: a statement needs every entry from seq 0 up to its own ({seq})")]
    ExportRange { from: u64, to: u64, seq: u64 },
}

/// Recomputes a statement (the record at `statement_seq`) from the tenant's entries, fed in seq
/// order from 0 ([`StatementCheck::push`]), so a log of any size is checked in bounded memory:
/// every `event` charged in its period must lie in its seq range, below it, and sum to its
/// totals.
#[derive(Debug)]
pub struct StatementCheck<'a> {
    statement: &'a Statement,
    statement_seq: u64,
    period: String,
    found: OpenPeriod,
}

impl<'a> StatementCheck<'a> {
    pub fn new(statement: &'a Statement, statement_seq: u64) -> Self {
        StatementCheck { statement, statement_seq, period: statement.period.to_string(), found: OpenPeriod::default() }
    }

    /// Takes entry `seq`; the entries must come in seq order.
    pub fn push(&mut self, seq: u64, entry: &[u8]) -> Result<(), Mismatch> {
        let record = Record::<serde::de::IgnoredAny>::decode(seq, entry).map_err(|e| Mismatch::BadEntry(seq, e.to_string()))?;
        let Record::Event(r) = record else { return Ok(()) };
        let Some(charge) = r.charge.as_ref().filter(|c| c.period == self.period && !r.is_conflict()) else { return Ok(()) };
        if seq > self.statement_seq {
            return Err(Mismatch::AfterClose { seq, period: self.statement.period, statement_seq: self.statement_seq });
        }
        self.found.add(seq, charge, r.event.usage.as_ref());
        Ok(())
    }

    /// Whether what was pushed adds up to the statement.
    pub fn finish(self) -> Result<(), Mismatch> {
        let (statement, found) = (self.statement, self.found);
        if found.totals.is_empty() {
            return Err(Mismatch::Empty(statement.period));
        }
        if (found.first_seq, found.last_seq) != (statement.first_seq, statement.last_seq) {
            return Err(Mismatch::Range { said: (statement.first_seq, statement.last_seq), found: (found.first_seq, found.last_seq) });
        }
        // A statement written before its lines carried tokens is checked without them.
        let mut found_totals = found.totals;
        for (line, said) in found_totals.iter_mut().zip(&statement.totals) {
            if said.input_tokens.is_none() && said.output_tokens.is_none() {
                (line.input_tokens, line.output_tokens) = (None, None);
            }
        }
        if found_totals != statement.totals {
            let text = |t: &[StatementTotal]| serde_json::to_string(t).unwrap_or_default();
            return Err(Mismatch::Totals { said: text(&statement.totals), found: text(&found_totals) });
        }
        Ok(())
    }
}

/// [`StatementCheck`] over entries held in memory (`entries[i]` is seq `i`).
pub fn recompute(statement: &Statement, statement_seq: u64, entries: &[Vec<u8>]) -> Result<(), Mismatch> {
    let mut check = StatementCheck::new(statement, statement_seq);
    for (seq, entry) in (0u64..).zip(entries) {
        check.push(seq, entry)?;
    }
    check.finish()
}

/// A statement that verified, with the checkpoint it verified against.
#[derive(Debug, Clone)]
pub struct VerifiedStatement {
    pub statement: Statement,
    pub origin: String,
    pub tree_size: u64,
    /// The entries checked, from seq 0: the tree size from tiles; an export's length, which may
    /// stop before it (records after it were not seen).
    pub checked: u64,
}

/// Verifies the statement at `seq` offline from a signed checkpoint note and the log's entry
/// bundles (`bundle(index, width)` returns the bytes of `tile/entries/<index>[.p/<width>]`): the
/// checkpoint's signature by one of `verifiers`; every entry up to its size, whose tree must have its
/// root (so a changed byte anywhere in the evidence fails); the statement record, which must
/// cover exactly the entries below it; and its totals and seq range, recomputed from the
/// entries ([`StatementCheck`]). Streams the bundles: bounded memory for any log size.
pub fn verify_statement(
    verifiers: &[NoteVerifier],
    checkpoint_note: &str,
    bundle: &mut dyn FnMut(u64, u64) -> Result<Vec<u8>, String>,
    seq: u64,
) -> Result<VerifiedStatement, Mismatch> {
    let checkpoint = checkpoint_covering(verifiers, checkpoint_note, seq)?;
    let size = checkpoint.size;
    let mut entries = |index: u64| -> Result<Vec<Vec<u8>>, Mismatch> {
        let width = available_width(0, index, size);
        let bytes = bundle(index, width).map_err(|why| Mismatch::Bundle { index, why })?;
        parse_entry_bundle(&bytes, width).map_err(|e| Mismatch::Bundle { index, why: e.to_string() })
    };
    let mut first = entries(seq / TILE_WIDTH)?;
    let statement_entry = first.swap_remove((seq % TILE_WIDTH) as usize);
    let statement = statement_at(seq, &statement_entry)?;
    let mut check = StatementCheck::new(&statement, seq);
    let (mut frontier, mut scratch) = (Frontier::default(), Vec::new());
    for index in 0..size.div_ceil(TILE_WIDTH) {
        for (i, entry) in (index * TILE_WIDTH..).zip(entries(index)?) {
            // The statement decoded above must be the entry hashed here: a source that answers
            // differently the second time proves nothing.
            if i == seq && entry != statement_entry {
                return Err(Mismatch::Bundle { index, why: format!("entry {seq} differs from the statement read before") });
            }
            frontier.push(leaf_hash(&entry), &mut scratch);
            scratch.clear();
            check.push(i, &entry)?;
        }
    }
    if frontier.root() != checkpoint.root {
        return Err(Mismatch::Root);
    }
    check.finish()?;
    Ok(VerifiedStatement { statement, origin: checkpoint.origin, tree_size: size, checked: size })
}

/// Verifies the statement at `seq` offline from an audit export of the tenant's log (`GET
/// /v1/tenants/{t}/export`): its signed checkpoint (by one of `verifiers`); its entries, which must start
/// at seq 0 and reach the statement, and with its range proof rebuild the checkpoint's root; then
/// the statement's totals and seq range, recomputed from those entries. Records after the
/// export's last seq are not seen: an export up to the checkpoint's size also shows that none of
/// them is charged in the closed period.
pub fn verify_statement_in_export(
    verifiers: &[NoteVerifier],
    checkpoint_note: &str,
    from_seq: u64,
    entries: &[Vec<u8>],
    range_proof: &[Hash],
    seq: u64,
) -> Result<VerifiedStatement, Mismatch> {
    let checkpoint = checkpoint_covering(verifiers, checkpoint_note, seq)?;
    let size = checkpoint.size;
    let to = from_seq.saturating_add(entries.len() as u64).saturating_sub(1);
    if from_seq != 0 || entries.len() as u64 <= seq {
        return Err(Mismatch::ExportRange { from: from_seq, to, seq });
    }
    let leaves: Vec<Hash> = entries.iter().map(|e| leaf_hash(e)).collect();
    if root_from_range(&leaves, 0, size, range_proof) != Some(checkpoint.root) {
        return Err(Mismatch::Root);
    }
    let statement = statement_at(seq, &entries[seq as usize])?;
    let mut check = StatementCheck::new(&statement, seq);
    for (i, entry) in (0..).zip(entries) {
        check.push(i, entry)?;
    }
    check.finish()?;
    Ok(VerifiedStatement { statement, origin: checkpoint.origin, tree_size: size, checked: entries.len() as u64 })
}

/// The checkpoint `note`, signed by one of `verifiers`, of a tree that holds entry `seq`.
fn checkpoint_covering(verifiers: &[NoteVerifier], note: &str, seq: u64) -> Result<Checkpoint, Mismatch> {
    let checkpoint = Checkpoint::open(note, verifiers, None).map_err(|e| Mismatch::Checkpoint(e.to_string()))?;
    if seq >= checkpoint.size {
        return Err(Mismatch::BeyondCheckpoint { seq, size: checkpoint.size });
    }
    Ok(checkpoint)
}

/// The `statement` record at `seq`, which must cover exactly the entries below it and name its
/// period with its bounds.
fn statement_at(seq: u64, entry: &[u8]) -> Result<Statement, Mismatch> {
    let statement = Statement::decode(seq, entry).map_err(|_| Mismatch::NotAStatement(seq))?;
    if statement.tree_size != seq {
        return Err(Mismatch::TreeSize { seq, said: statement.tree_size });
    }
    check_bounds(&statement)?;
    Ok(statement)
}

/// The statement's instants must bound its period: `period_start` before `period_end`, and
/// `period_start` the start of the day `period` in `time_zone`.
fn check_bounds(statement: &Statement) -> Result<(), Mismatch> {
    let bad = |why: String| Err(Mismatch::Bounds(why));
    if statement.period_start >= statement.period_end {
        return bad(format!("period_start {} is not before period_end {}", statement.period_start, statement.period_end));
    }
    let zone = match jiff::tz::TimeZone::get(&statement.time_zone) {
        Ok(zone) => zone,
        Err(e) => return bad(format!("time_zone {:?}: {e}", statement.time_zone)),
    };
    let local = statement.period_start.to_zoned(zone);
    let day_starts = local.start_of_day().ok().map(|d| d.timestamp());
    if local.date() != statement.period || day_starts != Some(statement.period_start) {
        return bad(format!("period_start {} is not the start of {} in {}", statement.period_start, statement.period, statement.time_zone));
    }
    Ok(())
}

/// Statements kept in a tenant's budget state for the route that lists them (20 years of
/// monthly periods); older ones stay in the log.
pub const MAX_LISTED_STATEMENTS: usize = 240;

/// Periods by first day → what is kept for each: the open ones' charges.
pub type OpenPeriods = BTreeMap<Date, OpenPeriod>;
