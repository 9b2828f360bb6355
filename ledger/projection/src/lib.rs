//! The Parquet projection of every tenant's log (docs/parquet.md), and the cost roll-ups beside it.
//!
//! The log is the truth; the projection is derived from committed records only and can always be
//! rebuilt from it ([`rebuild_unit`]). The tenants of one unit (a Kafka partition's ledger
//! directory) share their files: [`Projection::write`] projects a round of tenants' records past
//! their watermarks as one numbered flush of the unit, one Parquet file per date the rows fall on
//! and one roll-up file per month, rows grouped by tenant and in seq order, then the tenants'
//! states (watermark, checkpoint) and the unit's watermark. So files grow with partitions and
//! time, never with tenants. `statement` records are also kept whole ([`read_statements`]), and
//! daily roll-ups per report zone (UTC by default) sit beside the 15-minute ones. Small files are
//! merged in size tiers after each flush. See [`files`] for the on-disk invariants that make a
//! crash at any instant leave only complete files visible, and re-running the flush exact.

mod error;
mod files;
mod rows;
mod shared;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

pub use files::{
    list_files, partition_dir, partitions, projected_units, read_unit_mark, unit_dir, valid_unit, ProjectedStatement, ProjectionFile, Tree, UnitMark,
    Watermark, REPLACED_FILE_GRACE,
};
pub use rows::{
    add_event, add_event_billing, add_event_daily, bucket_of, epoch_days, from_epoch_days, Billing, BillingKey, Daily, DailyKey, Rollup, RollupKey, RollupSums,
};
pub use shared::{read_statements, read_unit_statements, read_watermark, read_watermarks};

pub use error::{Error, Result};
use rows::Row;
use tally_log::{Ledger, Revealed, TenantEntries};

/// Records projected per flush at most, to bound memory (a catch-up takes several flushes).
const MAX_FLUSH_RECORDS: u64 = 250_000;
/// A directory's run of same-tier files is merged once it is this long.
const MERGE_MIN_FILES: usize = 8;
/// Merges never make a file larger than this many rows.
const MERGE_MAX_ROWS: u64 = 1 << 20;

/// Rows per data page at most: the granularity at which a tenant's query skips other tenants'
/// rows (page statistics on `tenant_id`, which rows are sorted by).
const PAGE_ROWS: usize = 4096;

/// The Parquet settings of every projection file: zstd, row groups of up to 128 Ki rows, pages
/// of at most [`PAGE_ROWS`] rows with page statistics, and a bloom filter on `tenant_id`, so a
/// reader skips the row groups and pages of other tenants.
fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
        .set_max_row_group_row_count(Some(128 * 1024))
        .set_data_page_row_count_limit(PAGE_ROWS)
        .set_statistics_enabled(parquet::file::properties::EnabledStatistics::Page)
        .set_column_bloom_filter_enabled(tally_schemas::TENANT_COLUMN.into(), true)
        .build()
}

/// Writes `batches` as the Parquet file `path` (atomically); returns the bytes written.
fn write_parquet(path: &Path, batches: &[arrow_array::RecordBatch]) -> Result<u64> {
    let schema = batches.first().map(|b| b.schema()).ok_or_else(|| Error::Projection("nothing to write".into()))?;
    let mut written = 0;
    files::write_atomically(path, |file| {
        let mut writer = ArrowWriter::try_new(&mut *file, schema, Some(writer_properties())).map_err(std::io::Error::other)?;
        for batch in batches {
            writer.write(batch).map_err(std::io::Error::other)?;
        }
        writer.close().map_err(std::io::Error::other)?;
        written = file.metadata()?.len();
        Ok(())
    })?;
    Ok(written)
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

/// Spend sums per tenant, then per currency, charge basis and correction.
pub type TenantSpend = BTreeMap<String, BTreeMap<SpendKey, RollupSums>>;

/// The sums per tenant, currency, charge basis (`None`: a cost that was not charged, which only
/// records from before rating can hold) and correction (whether the charges correct a closed
/// period) of one roll-up file (15-minute or daily; for daily files, of `zone`'s rows only; with
/// `billing_period`, of rows charged in the period starting that day only), for the tenants
/// `only` passes. Rows without a currency (events with no charge and no cost) are left out.
/// Reads only the columns it sums.
pub fn currency_sums(path: &Path, zone: Option<&str>, billing_period: Option<jiff::civil::Date>, only: impl Fn(&str) -> bool) -> Result<TenantSpend> {
    use arrow_array::{Array, Date32Array, StringArray};
    let bad = |e: &dyn std::fmt::Display| Error::Projection(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| bad(&e))?;
    let wanted = [
        tally_schemas::TENANT_COLUMN,
        "zone",
        "currency",
        "billing_period",
        "charge_basis",
        "corrects_period",
        "events",
        "cost_micros",
        "charge_micros",
        "input_tokens",
        "output_tokens",
    ];
    let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), wanted.iter().copied());
    let want_period = billing_period.map(epoch_days);
    let mut out = TenantSpend::new();
    for batch in builder.with_projection(mask).build().map_err(|e| bad(&e))? {
        let batch = batch.map_err(|e| bad(&e))?;
        let text = |name: &str| batch.column_by_name(name).and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
        let tenants = text(tally_schemas::TENANT_COLUMN).ok_or_else(|| bad(&"no column tenant_id"))?;
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
            if currency.is_null(i) || zone.is_some_and(|z| zones.as_ref().is_none_or(|zs| zs.value(i) != z)) || !only(tenants.value(i)) {
                continue;
            }
            if want_period.is_some_and(|p| period.is_null(i) || period.value(i) != p) {
                continue;
            }
            let basis = (!basis.is_null(i)).then(|| basis.value(i).to_string());
            let key = SpendKey { currency: currency.value(i).to_string(), basis, correction: !corrects.is_null(i) };
            out.entry(tenants.value(i).to_string()).or_default().entry(key).or_default().add(sums.row(i))?;
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
    /// Bytes of the files the flush wrote.
    pub bytes: u64,
    /// Files its merges replaced.
    pub merged: usize,
    /// Bytes of the files its merges wrote: the write amplification of compaction is
    /// `(bytes + merge_bytes) / bytes`.
    pub merge_bytes: u64,
}

/// What a unit's projection knows once loaded: its watermark and every tenant's state.
struct Loaded {
    next_flush: u64,
    tenants: HashMap<String, Watermark>,
    last_flush: Option<Instant>,
}

/// The projection of the tenants of one unit (a partition's ledger directory), under `root`.
pub struct Projection {
    root: PathBuf,
    unit: String,
    flush_every: Duration,
    /// Report zones daily roll-ups are kept for.
    zones: Vec<(String, jiff::tz::TimeZone)>,
    loaded: Option<Loaded>,
}

/// Parses report zone names (IANA); the error names the bad one.
pub fn report_zones(names: &[String]) -> Result<Vec<(String, jiff::tz::TimeZone)>> {
    names
        .iter()
        .map(|n| jiff::tz::TimeZone::get(n).map(|tz| (n.clone(), tz)).map_err(|_| Error::Projection(format!("{n:?} is not a known IANA time zone"))))
        .collect()
}

/// The unit holding `tenant`'s projection under a ledger's `data_dir`: the name of its ledger
/// directory (`<topic>-<n>`, found as the service placed it). None for a tenant with no log.
pub fn unit_of_tenant(data_dir: &Path, tenant: &str) -> Option<String> {
    let dir = tally_log::find_tenant_ledger(data_dir, tenant)?;
    dir.file_name()?.to_str().filter(|u| valid_unit(u)).map(str::to_string)
}

/// The unit a ledger directory's tenants are projected under: the directory's name.
pub fn unit_of_ledger_dir(dir: &Path) -> Result<String> {
    dir.file_name()
        .and_then(|n| n.to_str())
        .filter(|u| valid_unit(u))
        .map(str::to_string)
        .ok_or_else(|| Error::Projection(format!("{} cannot name a projection unit", dir.display())))
}

impl Projection {
    /// The projection of `unit` under `root` (`<data_dir>/parquet`); the unit is flushed at most
    /// once per `flush_every` unless forced. Daily roll-ups are kept for UTC only; see
    /// [`Projection::with_zones`].
    pub fn new(root: &Path, unit: &str, flush_every: Duration) -> Projection {
        Projection { root: root.to_path_buf(), unit: unit.to_string(), flush_every, zones: vec![("UTC".into(), jiff::tz::TimeZone::UTC)], loaded: None }
    }

    /// Keeps daily roll-ups for these zones (from [`report_zones`]).
    pub fn with_zones(mut self, zones: Vec<(String, jiff::tz::TimeZone)>) -> Projection {
        self.zones = zones;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn unit(&self) -> &str {
        &self.unit
    }

    /// The unit's state, recovered from disk on first use in this process: files of a flush
    /// that did not finish are deleted, and every tenant's state is read once.
    fn loaded(&mut self) -> Result<&mut Loaded> {
        if self.loaded.is_none() {
            if !valid_unit(&self.unit) {
                return Err(Error::Projection(format!("{:?} cannot name a projection unit", self.unit)));
            }
            let next_flush = files::read_unit_mark(&self.root, &self.unit)?.next_flush;
            let removed = files::recover_unit(&self.root, &self.unit, next_flush)?;
            if removed > 0 {
                tracing::info!(unit = %self.unit, removed, next_flush, "projection recovered from an interrupted flush or merge");
            }
            let tenants = shared::read_tenant_states(&self.root, &self.unit, next_flush, |_| true)?.into_iter().map(|(t, (_, mark))| (t, mark)).collect();
            self.loaded = Some(Loaded { next_flush, tenants, last_flush: None });
        }
        self.loaded.as_mut().ok_or_else(|| Error::Projection(self.unit.clone()))
    }

    /// Where the tenant's next flush starts: every record below it is projected.
    pub fn next_seq(&mut self, tenant: &str) -> Result<u64> {
        Ok(self.loaded()?.tenants.get(tenant).map_or(0, |m| m.next_seq))
    }

    /// Records of the tenant's committed log not yet projected.
    pub fn behind(&mut self, tenant: &str, ledger: &Ledger) -> Result<u64> {
        Ok(ledger.size(tenant).saturating_sub(self.next_seq(tenant)?))
    }

    /// Whether a flush of the unit is due: always with `force`, otherwise once the last one is
    /// `flush_every` old.
    pub fn due(&mut self, force: bool) -> Result<bool> {
        let flush_every = self.flush_every;
        let loaded = self.loaded()?;
        Ok(force || loaded.last_flush.is_none_or(|t| t.elapsed() >= flush_every))
    }

    /// Projects every tenant of `ledger` to the end of its committed log, in flushes of at most
    /// [`CATCH_UP_BYTES`] of entries. Returns the records projected.
    pub fn catch_up(&mut self, ledger: &Ledger) -> Result<u64> {
        self.catch_up_with(ledger, |_| {})
    }

    fn catch_up_with(&mut self, ledger: &Ledger, mut progress: impl FnMut(u64)) -> Result<u64> {
        let mut done = 0;
        loop {
            let mut inputs = Vec::new();
            let mut bytes = 0usize;
            for tenant in ledger.tenant_ids() {
                if bytes >= CATCH_UP_BYTES {
                    break;
                }
                let first = self.next_seq(&tenant)?;
                if let Some(input) = read_flush(ledger, &tenant, first, CATCH_UP_BYTES - bytes)? {
                    bytes += input.bytes();
                    inputs.push(input);
                }
            }
            if inputs.is_empty() {
                return Ok(done);
            }
            done += self.write(inputs)?.records;
            progress(done);
        }
    }

    /// Writes one flush of the unit from inputs read by [`read_flush`]: the rows and roll-ups of
    /// every input, the tenants' new states, then the unit's watermark. Needs no access to the
    /// log. An input that no longer starts at its tenant's watermark (another flush wrote it
    /// meanwhile) is skipped.
    ///
    /// A failure forgets the unit's state, so its next use recovers it from disk first: files the
    /// failed flush left are deleted before the flush is written again (a second flush with the
    /// same number and other rows must never meet them).
    pub fn write(&mut self, inputs: Vec<FlushInput>) -> Result<FlushReport> {
        let written = self.write_flush_of(inputs);
        if written.is_err() {
            self.loaded = None;
        }
        written
    }

    fn write_flush_of(&mut self, inputs: Vec<FlushInput>) -> Result<FlushReport> {
        let (root, unit, zones) = (self.root.clone(), self.unit.clone(), self.zones.clone());
        let loaded = self.loaded()?;
        let mut by_tenant: BTreeMap<String, FlushInput> = BTreeMap::new();
        for input in inputs {
            let at = loaded.tenants.get(&input.tenant).map_or(0, |m| m.next_seq);
            if input.first == at && !input.entries.is_empty() && !by_tenant.contains_key(&input.tenant) {
                by_tenant.insert(input.tenant.clone(), input);
            }
        }
        if by_tenant.is_empty() {
            return Ok(FlushReport::default());
        }
        let flush = loaded.next_flush;
        let (mut report, touched) = write_flush(&root, &unit, flush, &by_tenant, &zones)?;
        let mut states = BTreeMap::new();
        for (tenant, input) in &by_tenant {
            let old = loaded.tenants.get(tenant).cloned().unwrap_or_default();
            let mark = Watermark {
                next_seq: input.first + input.entries.len() as u64,
                checkpoint: input.checkpoint.clone(),
                daily_zones: zone_coverage(&old, input.first, &zones),
                statements: old.statements || input.first == 0,
            };
            states.insert(tenant.clone(), (flush, mark));
        }
        let path = files::partition_dir(&root, Tree::Tenants, &unit, "").join(files::file_name(flush, flush, states.len() as u64));
        report.bytes += write_parquet(&path, &[shared::tenant_state_batch(&states)?])?;
        report.files += 1;
        files::write_unit_mark(&root, &unit, &files::UnitMark { next_flush: flush + 1 })?;
        loaded.next_flush = flush + 1;
        loaded.last_flush = Some(Instant::now());
        for (tenant, (_, mark)) in states {
            loaded.tenants.insert(tenant, mark);
        }
        let mut touched = touched;
        touched.push((Tree::Tenants, String::new()));
        let (merged, merged_bytes) = merge_touched(&root, &unit, &touched)?;
        (report.merged, report.merge_bytes) = (merged, merged_bytes);
        Ok(report)
    }

    /// Rewrites every row of `tenant` in the unit's `events` files from its log, as after an
    /// erasure: the rows then show what the log reveals now (`"erased"`). Each file holding the
    /// tenant is replaced whole under its own name, so readers see it before or after, never
    /// half. Files a merge replaced are rewritten too: they stay on disk for the grace period.
    /// Returns the rows rewritten.
    pub fn rewrite_tenant(&mut self, tenant: &str, ledger: &Ledger) -> Result<u64> {
        let (root, unit) = (self.root.clone(), self.unit.clone());
        let next_flush = self.loaded()?.next_flush;
        let mut rewritten = 0;
        for value in files::partitions(&root, Tree::Events, &unit)? {
            for file in files::all_files(&root, Tree::Events, &unit, &value)?.into_iter().filter(|f| f.first < next_flush) {
                rewritten += rewrite_file(&file.path, tenant, ledger)?;
            }
        }
        Ok(rewritten)
    }
}

/// Entry bytes one flush of [`Projection::catch_up`] reads at most (past each tenant's first
/// record).
pub const CATCH_UP_BYTES: usize = 64 << 20;

/// Replaces `tenant`'s rows in one events file with rows derived from the log again; returns
/// how many (0, and the file untouched, if it holds none).
fn rewrite_file(path: &Path, tenant: &str, ledger: &Ledger) -> Result<u64> {
    let batches = read_parquet(path)?;
    let Some(schema) = batches.first().map(|b| b.schema()) else { return Ok(0) };
    let batch = shared::concat(Arc::clone(&schema), &batches)?;
    let runs = shared::tenant_runs(&batch)?;
    let Some((_, offset, len)) = runs.into_iter().find(|(t, _, _)| t == tenant) else { return Ok(0) };
    let seqs = batch
        .column_by_name("seq")
        .and_then(|c| c.as_any().downcast_ref::<arrow_array::UInt64Array>())
        .ok_or_else(|| Error::Projection(format!("{}: no seq column", path.display())))?;
    let mut rows = Vec::with_capacity(len);
    for i in offset..offset + len {
        let seq = seqs.value(i);
        let (entry, revealed) = ledger.entry_revealed(tenant, seq)?;
        rows.push(Row::parse(seq, &entry, revealed.as_ref())?);
    }
    let fresh = shared::with_tenant(&rows::rows_batch(&rows.iter().collect::<Vec<_>>())?, tenant)?;
    let parts = [batch.slice(0, offset), fresh, batch.slice(offset + len, batch.num_rows() - offset - len)];
    write_parquet(path, &[shared::concat(schema, &parts)?])?;
    Ok(len as u64)
}

/// One tenant's records to project, read from its log: what [`Projection::write`] needs.
pub struct FlushInput {
    tenant: String,
    first: u64,
    entries: Vec<Vec<u8>>,
    /// Each entry's personal values ([`Ledger::entry_revealed`]): rows show them, or `"erased"`.
    revealed: Vec<Option<Revealed>>,
    /// The signed checkpoint of exactly the projected size: with it the projection alone can
    /// prove any of its ranges complete. None for records that are not in a log on this machine.
    checkpoint: Option<String>,
}

impl FlushInput {
    /// Bytes of entries it holds.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(Vec::len).sum()
    }

    /// The tenant whose records it holds.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Whether it holds an `erasure` record: rows already written may show values it erased,
    /// so the tenant's rows are rewritten before it is appended (docs/privacy.md).
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
    Ok(Some(FlushInput { tenant: tenant.to_string(), first, entries, revealed, checkpoint: Some(checkpoint) }))
}

/// The directories a flush wrote to: (tree, date or month).
type Touched = Vec<(Tree, String)>;

/// The rows of `entries` (from seq `first` on), each with its personal values from `revealed`
/// (parallel to `entries`; shorter, or empty, for entries without any).
fn parse_rows(first: u64, entries: &[Vec<u8>], revealed: &[Option<Revealed>]) -> Result<Vec<Row>> {
    entries.iter().zip(first..).enumerate().map(|(i, (entry, seq))| Row::parse(seq, entry, revealed.get(i).and_then(Option::as_ref))).collect()
}

/// Writes the rows, roll-ups and statements of `inputs` (by tenant) as flush number `flush` of
/// the unit: one file per date and per month, each holding every tenant's rows, grouped by
/// tenant.
fn write_flush(
    root: &Path,
    unit: &str,
    flush: u64,
    inputs: &BTreeMap<String, FlushInput>,
    zones: &[(String, jiff::tz::TimeZone)],
) -> Result<(FlushReport, Touched)> {
    let mut by_date: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
    let mut by_month: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
    let mut daily_by_month: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
    let mut billing_by_month: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
    let mut statements = Vec::new();
    let mut report = FlushReport::default();
    // Tenants in ascending order, so every file is grouped by tenant.
    for (tenant, input) in inputs {
        let rows = parse_rows(input.first, &input.entries, &input.revealed)?;
        report.records += rows.len() as u64;
        let mut dates: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
        let mut months: BTreeMap<String, Rollup> = BTreeMap::new();
        let mut daily: BTreeMap<String, Daily> = BTreeMap::new();
        let mut billing: BTreeMap<String, Billing> = BTreeMap::new();
        for row in &rows {
            dates.entry(row.date()).or_default().push(row);
            if let (Some(event), "event") = (&row.event, row.record_type.as_str()) {
                let month = rows::month_of(rows::bucket_of(event.occurred_at));
                rows::add_event(months.entry(month).or_default(), event, row.charge.as_ref())?;
                rows::add_event_daily(&mut daily, zones, event, row.charge.as_ref())?;
                rows::add_event_billing(&mut billing, event, row.charge.as_ref())?;
            }
        }
        for (date, rows) in dates {
            by_date.entry(date).or_default().push(shared::with_tenant(&rows::rows_batch(&rows)?, tenant)?);
        }
        for (month, rollup) in months {
            by_month.entry(month).or_default().push(shared::with_tenant(&rows::rollup_batch(rollup.iter())?, tenant)?);
        }
        for (month, rollup) in daily {
            daily_by_month.entry(month).or_default().push(shared::with_tenant(&rows::daily_batch(rollup.iter())?, tenant)?);
        }
        for (month, lines) in billing {
            billing_by_month.entry(month).or_default().push(shared::with_tenant(&rows::billing_batch(lines.iter())?, tenant)?);
        }
        // Statements are kept whole beside the rows, for the spend export by billing period.
        for (row, entry) in rows.iter().zip(&input.entries).filter(|(row, _)| row.record_type == "statement") {
            statements.push((tenant.clone(), files::ProjectedStatement { seq: row.seq, statement: tally_log::Statement::decode(row.seq, entry)? }));
        }
    }
    let mut touched = Vec::new();
    for (tree, groups) in [(Tree::Events, by_date), (Tree::Rollups, by_month), (Tree::Daily, daily_by_month), (Tree::Billing, billing_by_month)] {
        for (value, batches) in groups {
            let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            let path = files::partition_dir(root, tree, unit, &value).join(files::file_name(flush, flush, rows as u64));
            report.bytes += write_parquet(&path, &batches)?;
            report.files += 1;
            touched.push((tree, value));
        }
    }
    if !statements.is_empty() {
        let path = files::partition_dir(root, Tree::Statements, unit, "").join(files::file_name(flush, flush, statements.len() as u64));
        report.bytes += write_parquet(&path, &[shared::statement_batch(&statements)?])?;
        report.files += 1;
        touched.push((Tree::Statements, String::new()));
    }
    Ok((report, touched))
}

/// Whether a merge must leave its run as it is because a merged sum would leave the 64-bit range:
/// the files stay separate (readers add them with checks and say so), and the merge is not
/// retried as an error at every flush.
fn skip_overflow(folded: Result<()>, unit: &str, partition: &str) -> Result<bool> {
    match folded {
        Ok(()) => Ok(false),
        Err(Error::SumOverflow(detail)) => {
            tracing::warn!(unit, partition, %detail, "roll-up files not merged: a merged sum would overflow");
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// Merges every directory a flush wrote to; returns the files replaced and the bytes written.
fn merge_touched(root: &Path, unit: &str, touched: &Touched) -> Result<(usize, u64)> {
    let (mut merged, mut bytes) = (0, 0);
    for (tree, value) in touched {
        let (files, written) = merge(root, *tree, unit, value)?;
        merged += files;
        bytes += written;
        files::sweep_replaced(&files::partition_dir(root, *tree, unit, value), value, files::REPLACED_FILE_GRACE)?;
    }
    Ok((merged, bytes))
}

/// Projects records that are not in a log on this machine (a generator, an import): each
/// tenant's `entries` must be its records from its current watermark on. Writes one flush of the
/// unit (tenant states with no checkpoint) and merges, as the ledger's flushes do.
pub fn append_records(root: &Path, unit: &str, records: Vec<(String, Vec<Vec<u8>>)>, zones: &[(String, jiff::tz::TimeZone)]) -> Result<FlushReport> {
    let mut projection = Projection::new(root, unit, Duration::ZERO).with_zones(zones.to_vec());
    let mut inputs = Vec::with_capacity(records.len());
    for (tenant, entries) in records {
        let first = projection.next_seq(&tenant)?;
        // Records written by tools and benchmarks carry no sealed personal values.
        inputs.push(FlushInput { tenant, first, entries, revealed: Vec::new(), checkpoint: None });
    }
    projection.write(inputs)
}

/// Which zones the daily roll-ups cover from which seq, after a flush from `first` with `zones`:
/// a zone keeps its start if it was already kept, starts at `first` if new, and is dropped if
/// no longer configured.
fn zone_coverage(mark: &files::Watermark, first: u64, zones: &[(String, jiff::tz::TimeZone)]) -> BTreeMap<String, u64> {
    zones.iter().map(|(name, _)| (name.clone(), mark.daily_zones.get(name).copied().unwrap_or(first))).collect()
}

/// The schema files of `tree` are stored with.
fn stored_schema_of(tree: Tree) -> arrow_schema::Schema {
    match tree {
        Tree::Events => tally_schemas::stored_schema(&tally_schemas::projection_schema()),
        Tree::Rollups => tally_schemas::stored_schema(&tally_schemas::rollup_schema()),
        Tree::Daily => tally_schemas::stored_schema(&tally_schemas::daily_rollup_schema()),
        Tree::Billing => tally_schemas::stored_schema(&tally_schemas::billing_rollup_schema()),
        Tree::Tenants => shared::tenant_state_schema(),
        Tree::Statements => shared::statement_schema(),
    }
}

/// The roll-up rows of `batches` (stored, with `tenant_id`) summed again per tenant and key,
/// folded by `fold` and written by `batch`; None when a merged sum would overflow (see
/// [`skip_overflow`]).
fn resum<K: Ord>(
    schema: &arrow_schema::SchemaRef,
    batches: &[RecordBatch],
    unit: &str,
    value: &str,
    fold: impl Fn(&mut BTreeMap<K, RollupSums>, &RecordBatch) -> Result<()>,
    batch: impl Fn(&BTreeMap<K, RollupSums>) -> Result<RecordBatch>,
) -> Result<Option<RecordBatch>> {
    let mut sums: BTreeMap<String, BTreeMap<K, RollupSums>> = BTreeMap::new();
    for stored in batches {
        for (tenant, offset, len) in shared::tenant_runs(stored)? {
            if skip_overflow(fold(sums.entry(tenant).or_default(), &stored.slice(offset, len)), unit, value)? {
                return Ok(None);
            }
        }
    }
    let parts = sums.iter().map(|(t, rows)| shared::with_tenant(&batch(rows)?, t)).collect::<Result<Vec<_>>>()?;
    shared::concat(Arc::clone(schema), &parts).map(Some)
}

/// Merges the directory's trailing run of small files, if long enough; returns the files
/// replaced and the bytes written.
fn merge(root: &Path, tree: Tree, unit: &str, value: &str) -> Result<(usize, u64)> {
    let (mut replaced, mut bytes) = (0, 0);
    let schema = Arc::new(stored_schema_of(tree));
    loop {
        let run = files::merge_candidates(root, tree, unit, value, MERGE_MIN_FILES, MERGE_MAX_ROWS)?;
        let (Some(head), Some(tail)) = (run.first(), run.last()) else { return Ok((replaced, bytes)) };
        let mut batches = Vec::new();
        for f in &run {
            for batch in read_parquet(&f.path)? {
                rows::check_schema(&batch, &schema)?;
                batches.push(batch);
            }
        }
        let merged = match tree {
            // Rows and statements are concatenated, per tenant in flush order.
            Tree::Events | Tree::Statements => shared::regroup(Arc::clone(&schema), &batches)?,
            // Roll-up rows are summed again per tenant and key; a sum that would overflow leaves
            // the run unmerged.
            Tree::Rollups => match resum(&schema, &batches, unit, value, rows::fold_rollup_batch, |r: &Rollup| rows::rollup_batch(r.iter()))? {
                Some(merged) => merged,
                None => return Ok((replaced, bytes)),
            },
            Tree::Daily => match resum(&schema, &batches, unit, value, rows::fold_daily_batch, |r: &Daily| rows::daily_batch(r.iter()))? {
                Some(merged) => merged,
                None => return Ok((replaced, bytes)),
            },
            Tree::Billing => match resum(&schema, &batches, unit, value, rows::fold_billing_batch, |r: &Billing| rows::billing_batch(r.iter()))? {
                Some(merged) => merged,
                None => return Ok((replaced, bytes)),
            },
            // A tenant's latest state replaces its earlier ones.
            Tree::Tenants => {
                let mut states = BTreeMap::new();
                for batch in &batches {
                    shared::fold_tenant_states(&mut states, batch, &head.path, |_| true)?;
                }
                shared::tenant_state_batch(&states)?
            }
        };
        let path = files::partition_dir(root, tree, unit, value).join(files::file_name(head.first, tail.last, merged.num_rows() as u64));
        bytes += write_parquet(&path, &[merged])?;
        // The merged file now covers the inputs: readers skip them from here on, and they are
        // deleted once no query that listed them before can still be running.
        replaced += run.len();
    }
}

/// Rewrites a unit's projection from its ledger: deletes it, then projects every tenant's whole
/// log, calling `progress(done, total)` after each flush. The caller must hold the partition's
/// lock.
pub fn rebuild_unit(root: &Path, unit: &str, log: &Ledger, zones: Vec<(String, jiff::tz::TimeZone)>, mut progress: impl FnMut(u64, u64)) -> Result<u64> {
    if !valid_unit(unit) {
        return Err(Error::Projection(format!("{unit:?} cannot name a projection unit")));
    }
    files::remove_unit(root, unit)?;
    let mut projection = Projection::new(root, unit, Duration::ZERO).with_zones(zones);
    let total: u64 = log.tenant_ids().iter().map(|t| log.size(t)).sum();
    progress(0, total);
    projection.catch_up_with(log, |done| progress(done, total))
}

#[cfg(test)]
mod tests;
