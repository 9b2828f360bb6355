//! The Parquet projection of every tenant's log (docs/parquet.md), and the cost roll-ups beside it.
//!
//! The log is the truth; the projection is derived from committed records only and can always be
//! rebuilt from it ([`rebuild_tenant`]). [`Projection::flush`] appends a tenant's records past its
//! watermark: one Parquet file per date they fall on, one roll-up file per month, then the
//! watermark (with the checkpoint of the log at that size); `statement` records are also kept
//! whole in one small file per tenant ([`read_statements`]). Daily roll-ups per report zone (UTC
//! by default) sit beside the 15-minute ones. Small files are merged in size tiers
//! after each flush. See [`files`] for the on-disk invariants that make a crash at any instant
//! leave only complete files visible, and re-running the flush exact.

mod error;
mod files;
mod rows;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

pub use files::{
    list_files, partition_dir, partitions, projected_tenants, read_statements, read_watermark, tenant_dir, ProjectedStatement, ProjectionFile, Tree, Watermark,
    REPLACED_FILE_GRACE,
};
pub use rows::{add_event, add_event_daily, bucket_of, epoch_days, from_epoch_days, Daily, DailyKey, Rollup, RollupKey, RollupSums};

pub use error::{Error, Result};
use rows::Row;
use tally_log::{Ledger, Revealed, TenantEntries};

/// Records projected per flush at most, to bound memory (a catch-up takes several flushes).
const MAX_FLUSH_RECORDS: u64 = 250_000;
/// A directory's run of same-tier files is merged once it is this long.
const MERGE_MIN_FILES: usize = 8;
/// Merges never make a file larger than this many rows.
const MERGE_MAX_ROWS: u64 = 1 << 20;

/// The Parquet settings of every projection file: zstd, row groups of up to 128 Ki rows
/// (pruning granularity for seq and time filters), page statistics.
fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
        .set_max_row_group_row_count(Some(128 * 1024))
        .set_statistics_enabled(parquet::file::properties::EnabledStatistics::Page)
        .build()
}

fn write_parquet(path: &Path, batches: &[arrow_array::RecordBatch]) -> Result<()> {
    let schema = batches.first().map(|b| b.schema()).ok_or_else(|| Error::Projection("nothing to write".into()))?;
    files::write_atomically(path, |file| {
        let mut writer = ArrowWriter::try_new(file, schema, Some(writer_properties())).map_err(std::io::Error::other)?;
        for batch in batches {
            writer.write(batch).map_err(std::io::Error::other)?;
        }
        writer.close().map_err(std::io::Error::other)?;
        Ok(())
    })
}

/// Reads a whole projection file.
pub fn read_parquet(path: &Path) -> Result<Vec<arrow_array::RecordBatch>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).and_then(|b| b.build()).map_err(|e| Error::Projection(format!("{}: {e}", path.display())))?;
    reader.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| Error::Projection(format!("{}: {e}", path.display())))
}

/// The projection rows `entries` (a tenant's records from seq `first` on) must have, as one
/// batch under the projection schema: what an audit compares projected rows with.
pub fn expected_rows(first: u64, entries: &[Vec<u8>], revealed: &[Option<Revealed>]) -> Result<arrow_array::RecordBatch> {
    let rows = parse_rows(first, entries, revealed)?;
    rows::rows_batch(&rows.iter().collect::<Vec<_>>())
}

/// The sums per currency, charge basis (`None`: a cost that was not charged, which only records
/// from before rating can hold) and correction (whether the charges correct a closed period) of
/// one roll-up file (15-minute or daily; for daily files,
/// of `zone`'s rows only; with `billing_period`, of rows charged in the period starting that day
/// only). Rows without a currency (events with no charge and no cost) are left out. Reads only
/// the columns it sums.
pub fn currency_sums(path: &Path, zone: Option<&str>, billing_period: Option<jiff::civil::Date>) -> Result<BTreeMap<SpendKey, RollupSums>> {
    use arrow_array::{Array, Date32Array, StringArray};
    let bad = |e: &dyn std::fmt::Display| Error::Projection(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| bad(&e))?;
    let wanted =
        ["zone", "currency", "billing_period", "charge_basis", "corrects_period", "events", "cost_micros", "charge_micros", "input_tokens", "output_tokens"];
    let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), wanted.iter().copied());
    let want_period = billing_period.map(epoch_days);
    let mut out: BTreeMap<SpendKey, RollupSums> = BTreeMap::new();
    for batch in builder.with_projection(mask).build().map_err(|e| bad(&e))? {
        let batch = batch.map_err(|e| bad(&e))?;
        let text = |name: &str| batch.column_by_name(name).and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
        let currency = text("currency").ok_or_else(|| bad(&"no column currency"))?;
        let zones = text("zone");
        let basis = text("charge_basis").ok_or_else(|| bad(&"no column charge_basis"))?;
        let corrects = batch.column_by_name("corrects_period").ok_or_else(|| bad(&"no column corrects_period"))?;
        let period = batch
            .column_by_name("billing_period")
            .and_then(|c| c.as_any().downcast_ref::<Date32Array>().cloned())
            .ok_or_else(|| bad(&"no column billing_period"))?;
        let sums = rows::SumColumns::of(&batch)?;
        for i in 0..batch.num_rows() {
            if currency.is_null(i) || zone.is_some_and(|z| zones.as_ref().is_none_or(|zs| zs.value(i) != z)) {
                continue;
            }
            if want_period.is_some_and(|p| period.is_null(i) || period.value(i) != p) {
                continue;
            }
            let basis = (!basis.is_null(i)).then(|| basis.value(i).to_string());
            let key = SpendKey { currency: currency.value(i).to_string(), basis, correction: !corrects.is_null(i) };
            out.entry(key).or_default().add(sums.row(i))?;
        }
    }
    Ok(out)
}

/// What a spend line is keyed by, besides its tenant and period.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SpendKey {
    pub currency: String,
    /// `event`, `table` or `ceiling`; `None` for a cost recorded before rating.
    pub basis: Option<String>,
    /// Charges of late events that correct a closed period.
    pub correction: bool,
}

/// What one flush did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushReport {
    pub records: u64,
    pub files: usize,
    pub merged: usize,
}

struct TenantProjection {
    mark: files::Watermark,
    last_flush: Option<Instant>,
}

/// The projection of the tenants of one ledger directory (a partition), under `root`.
pub struct Projection {
    root: PathBuf,
    flush_every: Duration,
    /// Report zones daily roll-ups are kept for.
    zones: Vec<(String, jiff::tz::TimeZone)>,
    tenants: HashMap<String, TenantProjection>,
}

/// Parses report zone names (IANA); the error names the bad one.
pub fn report_zones(names: &[String]) -> Result<Vec<(String, jiff::tz::TimeZone)>> {
    names
        .iter()
        .map(|n| jiff::tz::TimeZone::get(n).map(|tz| (n.clone(), tz)).map_err(|_| Error::Projection(format!("{n:?} is not a known IANA time zone"))))
        .collect()
}

impl Projection {
    /// `root` is the projection's root (`<data_dir>/parquet`); a tenant is flushed at most once
    /// per `flush_every` unless forced.
    /// Daily roll-ups are kept for UTC only; see [`Projection::with_zones`].
    pub fn new(root: &Path, flush_every: Duration) -> Projection {
        Projection { root: root.to_path_buf(), flush_every, zones: vec![("UTC".into(), jiff::tz::TimeZone::UTC)], tenants: HashMap::new() }
    }

    /// Keeps daily roll-ups for these zones (from [`report_zones`]).
    pub fn with_zones(mut self, zones: Vec<(String, jiff::tz::TimeZone)>) -> Projection {
        self.zones = zones;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Rewrites the tenant's projection from `ledger` ([`rebuild_tenant`], with this
    /// projection's zones), as after an erasure: rows then show what the log reveals now.
    /// Returns how many records it holds.
    pub fn rebuild(&mut self, tenant: &str, ledger: &Ledger) -> Result<u64> {
        // Its state is read from disk again at its next use.
        self.tenants.remove(tenant);
        rebuild_tenant(&self.root, tenant, ledger, self.zones.clone(), |_, _| {})
    }

    /// The tenant's state, recovered from disk on first use in this process.
    fn tenant(&mut self, tenant: &str) -> Result<&mut TenantProjection> {
        if !self.tenants.contains_key(tenant) {
            let mark = files::read_watermark(&self.root, tenant)?;
            let removed = files::recover_tenant(&self.root, tenant, mark.next_seq)?;
            if removed > 0 {
                tracing::info!(tenant_id = %tenant, removed, next_seq = mark.next_seq, "projection recovered from an interrupted flush or merge");
            }
            self.tenants.insert(tenant.to_string(), TenantProjection { mark, last_flush: None });
        }
        self.tenants.get_mut(tenant).ok_or_else(|| Error::Projection(tenant.to_string()))
    }

    /// Records of the tenant's committed log not yet projected.
    pub fn behind(&mut self, tenant: &str, ledger: &Ledger) -> Result<u64> {
        Ok(ledger.size(tenant).saturating_sub(self.tenant(tenant)?.mark.next_seq))
    }

    /// Projects the tenant's committed records past its watermark, at most
    /// [`MAX_FLUSH_RECORDS`] of them; does nothing if the last flush was under `flush_every` ago
    /// and `force` is false. Returns None when not due. ([`Projection::due`],
    /// [`read_flush`] and [`Projection::write`] in one step.)
    pub fn flush(&mut self, tenant: &str, ledger: &Ledger, force: bool) -> Result<Option<FlushReport>> {
        let Some(first) = self.due(tenant, force)? else { return Ok(None) };
        match read_flush(ledger, tenant, first, usize::MAX)? {
            Some(input) => self.write(input).map(Some),
            None => Ok(Some(FlushReport::default())),
        }
    }

    /// Where the tenant's next flush starts, if one is due: its state is loaded (and recovered
    /// from an interrupted flush) on first use, which touches only its projection files, never
    /// the log. None while the last flush is under `flush_every` old and `force` is false.
    pub fn due(&mut self, tenant: &str, force: bool) -> Result<Option<u64>> {
        let flush_every = self.flush_every;
        let state = self.tenant(tenant)?;
        if !force && state.last_flush.is_some_and(|t| t.elapsed() < flush_every) {
            return Ok(None);
        }
        Ok(Some(state.mark.next_seq))
    }

    /// Writes a flush read by [`read_flush`]: its rows and roll-ups, then the watermark. Needs no
    /// access to the log. A flush that no longer starts at the watermark (another flush
    /// wrote it meanwhile) is skipped.
    pub fn write(&mut self, input: FlushInput) -> Result<FlushReport> {
        let root = self.root.clone();
        let zones = self.zones.clone();
        let FlushInput { tenant, first, entries, revealed, checkpoint } = input;
        let state = self.tenant(&tenant)?;
        if state.mark.next_seq != first || entries.is_empty() {
            return Ok(FlushReport::default());
        }
        let last = first + entries.len() as u64 - 1;
        let (mut report, touched) = write_flush(&root, &tenant, first, &entries, &revealed, &zones)?;
        let mark = files::Watermark {
            next_seq: last + 1,
            checkpoint: Some(checkpoint),
            daily_zones: zone_coverage(&state.mark, first, &zones),
            statements: state.mark.statements || first == 0,
        };
        files::write_watermark(&root, &tenant, &mark)?;
        state.mark = mark;
        state.last_flush = Some(Instant::now());
        report.merged = merge_touched(&root, &tenant, &touched)?;
        Ok(report)
    }
}

/// One tenant's records to project, read from its log: what [`Projection::write`] needs.
pub struct FlushInput {
    tenant: String,
    first: u64,
    entries: Vec<Vec<u8>>,
    /// Each entry's personal values ([`Ledger::entry_revealed`]): rows show them, or `"erased"`.
    revealed: Vec<Option<Revealed>>,
    /// The signed checkpoint of exactly the projected size: with it the projection alone can
    /// prove any of its ranges complete.
    checkpoint: String,
}

impl FlushInput {
    /// Bytes of entries it holds.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(Vec::len).sum()
    }

    /// Whether it holds an `erasure` record: rows already written may show values it erased,
    /// so the tenant's projection is rebuilt rather than appended to (docs/privacy.md).
    pub fn has_erasure(&self) -> bool {
        // Budget-side records start with their type (docs/records.md).
        self.entries.iter().any(|e| e.starts_with(br#"{"type":"erasure""#))
    }
}

/// Reads the tenant's committed records from seq `first` on, at most [`MAX_FLUSH_RECORDS`] of
/// them and, past the first, no more than `max_bytes` of entries: the input of one flush. None
/// when there is nothing new. The only step of a flush that reads the log.
pub fn read_flush(ledger: &Ledger, tenant: &str, first: u64, max_bytes: usize) -> Result<Option<FlushInput>> {
    let log = ledger.tenant(tenant);
    let size = log.size();
    if first > size {
        return Err(Error::Projection(format!("{tenant}: projected to {first} but the log holds {size}; rebuild it (tally parquet rebuild)")));
    }
    if first == size {
        return Ok(None);
    }
    let end = (first + MAX_FLUSH_RECORDS).min(size);
    let (mut entries, mut revealed, mut bytes) = (Vec::new(), Vec::new(), 0usize);
    for seq in first..end {
        if !entries.is_empty() && bytes >= max_bytes {
            break;
        }
        let (entry, values) = ledger.entry_revealed(tenant, seq)?;
        bytes += entry.len();
        entries.push(entry);
        revealed.push(values);
    }
    let checkpoint = ledger.checkpoint_at(tenant, first + entries.len() as u64)?;
    Ok(Some(FlushInput { tenant: tenant.to_string(), first, entries, revealed, checkpoint }))
}

/// The directories a flush wrote to: (tree, date or month).
type Touched = Vec<(Tree, String)>;

/// Writes the rows of `entries` (the tenant's records from seq `first` on) and their roll-ups as
/// one flush: a file per date and per month, all named with the flush's seq range.
/// The rows of `entries` (from seq `first` on), each with its personal values from `revealed`
/// (parallel to `entries`; shorter, or empty, for entries without any).
fn parse_rows(first: u64, entries: &[Vec<u8>], revealed: &[Option<Revealed>]) -> Result<Vec<Row>> {
    entries.iter().zip(first..).enumerate().map(|(i, (entry, seq))| Row::parse(seq, entry, revealed.get(i).and_then(Option::as_ref))).collect()
}

fn write_flush(
    root: &Path,
    tenant: &str,
    first: u64,
    entries: &[Vec<u8>],
    revealed: &[Option<Revealed>],
    zones: &[(String, jiff::tz::TimeZone)],
) -> Result<(FlushReport, Touched)> {
    let last = first + entries.len() as u64 - 1;
    let rows = parse_rows(first, entries, revealed)?;
    let mut by_date: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
    let mut by_month: BTreeMap<String, Rollup> = BTreeMap::new();
    let mut daily: BTreeMap<String, Daily> = BTreeMap::new();
    for row in &rows {
        by_date.entry(row.date()).or_default().push(row);
        if let (Some(event), "event") = (&row.event, row.record_type.as_str()) {
            let month = rows::month_of(rows::bucket_of(event.occurred_at));
            rows::add_event(by_month.entry(month).or_default(), event, row.charge.as_ref())?;
            rows::add_event_daily(&mut daily, zones, event, row.charge.as_ref())?;
        }
    }
    let mut report = FlushReport { records: rows.len() as u64, ..FlushReport::default() };
    let mut touched = Vec::new();
    for (date, rows) in &by_date {
        let path = files::partition_dir(root, Tree::Events, tenant, date).join(files::file_name(first, last, rows.len() as u64));
        write_parquet(&path, &[rows::rows_batch(rows)?])?;
        report.files += 1;
        touched.push((Tree::Events, date.clone()));
    }
    for (month, rollup) in &by_month {
        let path = files::partition_dir(root, Tree::Rollups, tenant, month).join(files::file_name(first, last, rollup.len() as u64));
        write_parquet(&path, &[rows::rollup_batch(rollup.iter())?])?;
        report.files += 1;
        touched.push((Tree::Rollups, month.clone()));
    }
    for (month, rollup) in &daily {
        let path = files::partition_dir(root, Tree::Daily, tenant, month).join(files::file_name(first, last, rollup.len() as u64));
        write_parquet(&path, &[rows::daily_batch(rollup.iter())?])?;
        report.files += 1;
        touched.push((Tree::Daily, month.clone()));
    }
    // Statements are kept whole beside the rows, for the spend export by billing period.
    let statements = rows
        .iter()
        .zip(entries)
        .filter(|(row, _)| row.record_type == "statement")
        .map(|(row, entry)| Ok(files::ProjectedStatement { seq: row.seq, statement: tally_log::Statement::decode(row.seq, entry)? }))
        .collect::<Result<Vec<_>>>()?;
    files::add_statements(root, tenant, first, statements)?;
    Ok((report, touched))
}

/// Whether a merge must leave its run as it is because a merged sum would leave the 64-bit range:
/// the files stay separate (readers add them with checks and say so), and the merge is not
/// retried as an error at every flush.
fn skip_overflow(folded: Result<()>, tenant: &str, partition: &str) -> Result<bool> {
    match folded {
        Ok(()) => Ok(false),
        Err(Error::SumOverflow(detail)) => {
            tracing::warn!(tenant_id = %tenant, partition, %detail, "roll-up files not merged: a merged sum would overflow");
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

fn merge_touched(root: &Path, tenant: &str, touched: &Touched) -> Result<usize> {
    let mut merged = 0;
    for (tree, value) in touched {
        merged += merge(root, *tree, tenant, value)?;
        files::sweep_replaced(&files::partition_dir(root, *tree, tenant, value), value, files::REPLACED_FILE_GRACE)?;
    }
    Ok(merged)
}

/// Projects records that are not in a log on this machine (a generator, an import): `entries`
/// must be the tenant's records from its current watermark on. Writes, advances the watermark
/// (with no checkpoint) and merges, as a flush does.
pub fn append_records(root: &Path, tenant: &str, entries: &[Vec<u8>], zones: &[(String, jiff::tz::TimeZone)]) -> Result<FlushReport> {
    if entries.is_empty() {
        return Ok(FlushReport::default());
    }
    let mark = files::read_watermark(root, tenant)?;
    files::recover_tenant(root, tenant, mark.next_seq)?;
    // Records written by tools and benchmarks carry no sealed personal values.
    let (mut report, touched) = write_flush(root, tenant, mark.next_seq, entries, &[], zones)?;
    let daily_zones = zone_coverage(&mark, mark.next_seq, zones);
    let statements = mark.statements || mark.next_seq == 0;
    files::write_watermark(root, tenant, &files::Watermark { next_seq: mark.next_seq + entries.len() as u64, checkpoint: None, daily_zones, statements })?;
    report.merged = merge_touched(root, tenant, &touched)?;
    Ok(report)
}

/// Which zones the daily roll-ups cover from which seq, after a flush from `first` with `zones`:
/// a zone keeps its start if it was already kept, starts at `first` if new, and is dropped if
/// no longer configured.
fn zone_coverage(mark: &files::Watermark, first: u64, zones: &[(String, jiff::tz::TimeZone)]) -> BTreeMap<String, u64> {
    zones.iter().map(|(name, _)| (name.clone(), mark.daily_zones.get(name).copied().unwrap_or(first))).collect()
}

/// Merges the directory's trailing run of small files, if long enough; returns files replaced.
fn merge(root: &Path, tree: Tree, tenant: &str, value: &str) -> Result<usize> {
    let mut replaced = 0;
    loop {
        let run = files::merge_candidates(root, tree, tenant, value, MERGE_MIN_FILES, MERGE_MAX_ROWS)?;
        let (Some(head), Some(tail)) = (run.first(), run.last()) else { return Ok(replaced) };
        let (batches, rows) = match tree {
            Tree::Events => {
                let mut batches = Vec::new();
                for f in &run {
                    for batch in read_parquet(&f.path)? {
                        rows::check_schema(&batch, &tally_schemas::projection_schema())?;
                        batches.push(batch);
                    }
                }
                let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
                (batches, rows)
            }
            Tree::Rollups => {
                let mut rollup = Rollup::new();
                for f in &run {
                    for batch in read_parquet(&f.path)? {
                        rows::check_schema(&batch, &tally_schemas::rollup_schema())?;
                        if skip_overflow(rows::fold_rollup_batch(&mut rollup, &batch), tenant, value)? {
                            return Ok(replaced);
                        }
                    }
                }
                (vec![rows::rollup_batch(rollup.iter())?], rollup.len() as u64)
            }
            Tree::Daily => {
                let mut daily = Daily::new();
                for f in &run {
                    for batch in read_parquet(&f.path)? {
                        rows::check_schema(&batch, &tally_schemas::daily_rollup_schema())?;
                        if skip_overflow(rows::fold_daily_batch(&mut daily, &batch), tenant, value)? {
                            return Ok(replaced);
                        }
                    }
                }
                (vec![rows::daily_batch(daily.iter())?], daily.len() as u64)
            }
        };
        let path = files::partition_dir(root, tree, tenant, value).join(files::file_name(head.first, tail.last, rows));
        write_parquet(&path, &batches)?;
        // The merged file now covers the inputs: readers skip them from here on, and they are
        // deleted once no query that listed them before can still be running.
        replaced += run.len();
    }
}

/// Rewrites a tenant's projection from its log: deletes it, then flushes to the end, calling
/// `progress(done, total)` after each flush. The caller must hold the partition's lock.
pub fn rebuild_tenant(root: &Path, tenant: &str, log: &Ledger, zones: Vec<(String, jiff::tz::TimeZone)>, mut progress: impl FnMut(u64, u64)) -> Result<u64> {
    files::remove_tenant(root, tenant)?;
    let mut projection = Projection::new(root, Duration::ZERO).with_zones(zones);
    let total = log.size(tenant);
    loop {
        projection.flush(tenant, log, true)?;
        let done = total - projection.behind(tenant, log)?;
        progress(done, total);
        if done >= total {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests;
