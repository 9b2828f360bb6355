//! Files shared by the tenants of a unit: the `tenant_id` column every stored batch starts with,
//! the tenant-grouped concatenation merges and rewrites rely on, and the two small trees that hold
//! per-tenant state (`tenants`: each tenant's watermark and checkpoint; `statements`: its
//! `statement` records whole).
//!
//! Invariant: every stored file's rows are grouped by tenant, tenants in ascending order, and a
//! tenant's rows keep their order (seq, or roll-up key). A tenant's seqs grow with the flush
//! number, so concatenating files in flush order per tenant keeps each tenant's rows in seq order
//! without sorting ([`regroup`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{BooleanBuilder, StringBuilder, UInt64Builder};
use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use tally_schemas::TENANT_COLUMN;

use crate::error::{Error, Result};
use crate::files::{self, ProjectedStatement, Tree, Watermark};

/// `batch` (one tenant's rows) with a `tenant_id` column first, all `tenant`.
pub(crate) fn with_tenant(batch: &RecordBatch, tenant: &str) -> Result<RecordBatch> {
    let schema = Arc::new(tally_schemas::stored_schema(&batch.schema()));
    let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from(vec![tenant; batch.num_rows()]))];
    columns.extend(batch.columns().iter().cloned());
    RecordBatch::try_new(schema, columns).map_err(|e| Error::Projection(format!("stored batch: {e}")))
}

/// The tenant column of a stored batch.
pub(crate) fn tenants_of(batch: &RecordBatch) -> Result<&StringArray> {
    batch
        .column_by_name(TENANT_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| Error::Projection("a projection file lacks its tenant_id column; rebuild the projection (tally parquet rebuild)".into()))
}

/// A stored batch without its tenant column: one tenant's rows as its queries see them.
#[cfg(test)]
pub(crate) fn without_tenant(batch: &RecordBatch) -> Result<RecordBatch> {
    let keep: Vec<usize> = (0..batch.num_columns()).filter(|&i| batch.schema().field(i).name() != TENANT_COLUMN).collect();
    batch.project(&keep).map_err(|e| Error::Projection(e.to_string()))
}

/// The runs of one tenant in a stored batch: (tenant, offset, length), in row order.
pub(crate) fn tenant_runs(batch: &RecordBatch) -> Result<Vec<(String, usize, usize)>> {
    let tenants = tenants_of(batch)?;
    let mut runs: Vec<(String, usize, usize)> = Vec::new();
    for i in 0..tenants.len() {
        let t = tenants.value(i);
        match runs.last_mut() {
            Some((last, _, len)) if last == t => *len += 1,
            _ => runs.push((t.to_string(), i, 1)),
        }
    }
    Ok(runs)
}

/// Concatenates stored batches (given in flush order) into one, grouped by tenant in ascending
/// order, each tenant's rows in the order they came.
pub(crate) fn regroup(schema: SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch> {
    let mut slices: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
    for batch in batches {
        for (tenant, offset, len) in tenant_runs(batch)? {
            slices.entry(tenant).or_default().push(batch.slice(offset, len));
        }
    }
    let ordered: Vec<RecordBatch> = slices.into_values().flatten().collect();
    arrow_select::concat::concat_batches(&schema, &ordered).map_err(|e| Error::Projection(format!("merging files: {e}")))
}

/// Concatenates batches of one schema.
pub(crate) fn concat(schema: SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch> {
    arrow_select::concat::concat_batches(&schema, batches).map_err(|e| Error::Projection(format!("concatenating rows: {e}")))
}

/// The `tenants` tree's rows: one per tenant a flush projected, with the flush's number.
pub(crate) fn tenant_state_schema() -> Schema {
    Schema::new(vec![
        Field::new(TENANT_COLUMN, DataType::Utf8, false),
        Field::new("flush", DataType::UInt64, false),
        Field::new("next_seq", DataType::UInt64, false),
        Field::new("checkpoint", DataType::Utf8, true),
        // JSON object: zone → first seq its daily roll-ups cover.
        Field::new("daily_zones", DataType::Utf8, false),
        Field::new("statements", DataType::Boolean, false),
    ])
}

/// The batch of tenant states (ascending tenants), each stamped with the flush it comes from.
pub(crate) fn tenant_state_batch(states: &BTreeMap<String, (u64, Watermark)>) -> Result<RecordBatch> {
    let (mut tenant, mut flush, mut next_seq) = (StringBuilder::new(), UInt64Builder::new(), UInt64Builder::new());
    let (mut checkpoint, mut zones, mut statements) = (StringBuilder::new(), StringBuilder::new(), BooleanBuilder::new());
    for (t, (f, mark)) in states {
        tenant.append_value(t);
        flush.append_value(*f);
        next_seq.append_value(mark.next_seq);
        checkpoint.append_option(mark.checkpoint.as_deref());
        zones.append_value(serde_json::to_string(&mark.daily_zones).map_err(|e| Error::Projection(e.to_string()))?);
        statements.append_value(mark.statements);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(tenant.finish()),
        Arc::new(flush.finish()),
        Arc::new(next_seq.finish()),
        Arc::new(checkpoint.finish()),
        Arc::new(zones.finish()),
        Arc::new(statements.finish()),
    ];
    RecordBatch::try_new(Arc::new(tenant_state_schema()), columns).map_err(|e| Error::Projection(format!("tenant states: {e}")))
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| Error::Corrupt { path: path.display().to_string(), detail: format!("no column {name} of the expected type") })
}

/// Keeps, per tenant, the state of the latest flush found in `batch` (of the file `path`), for
/// the tenants `only` passes.
pub(crate) fn fold_tenant_states(out: &mut BTreeMap<String, (u64, Watermark)>, batch: &RecordBatch, path: &Path, only: impl Fn(&str) -> bool) -> Result<()> {
    let tenant = column::<StringArray>(batch, TENANT_COLUMN, path)?;
    let flush = column::<UInt64Array>(batch, "flush", path)?;
    let next_seq = column::<UInt64Array>(batch, "next_seq", path)?;
    let checkpoint = column::<StringArray>(batch, "checkpoint", path)?;
    let zones = column::<StringArray>(batch, "daily_zones", path)?;
    let statements = column::<BooleanArray>(batch, "statements", path)?;
    for i in 0..batch.num_rows() {
        let t = tenant.value(i);
        if !only(t) || out.get(t).is_some_and(|(f, _)| *f >= flush.value(i)) {
            continue;
        }
        let daily_zones = serde_json::from_str(zones.value(i))
            .map_err(|e| Error::Corrupt { path: path.display().to_string(), detail: format!("daily_zones of {t}: {e}") })?;
        let mark = Watermark {
            next_seq: next_seq.value(i),
            checkpoint: (!checkpoint.is_null(i)).then(|| checkpoint.value(i).to_string()),
            daily_zones,
            statements: statements.value(i),
        };
        out.insert(t.to_string(), (flush.value(i), mark));
    }
    Ok(())
}

/// The states of the unit's tenants that `only` passes, from its `tenants` files below flush
/// `next_flush`, each with the flush it was written by.
pub(crate) fn read_tenant_states(root: &Path, unit: &str, next_flush: u64, only: impl Fn(&str) -> bool) -> Result<BTreeMap<String, (u64, Watermark)>> {
    let mut out = BTreeMap::new();
    for file in files::list_files_below(root, Tree::Tenants, unit, next_flush, |_| true)? {
        for batch in read_rows_of(&file.path, &only)? {
            fold_tenant_states(&mut out, &batch, &file.path, &only)?;
        }
    }
    Ok(out)
}

/// The rows of a stored file whose tenant `only` passes (and maybe a few others): the tenant
/// column is read first, then every column of the selected rows only. One tenant's state is
/// then a read of the small tenant column plus its own row, not of every tenant's checkpoint.
fn read_rows_of(path: &Path, only: impl Fn(&str) -> bool) -> Result<Vec<RecordBatch>> {
    use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
    use parquet::arrow::ProjectionMask;
    let bad = |e: &dyn std::fmt::Display| Error::Projection(format!("{}: {e}", path.display()));
    let open = || {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| bad(&e))
    };
    let builder = open()?;
    let mask = ProjectionMask::columns(builder.parquet_schema(), [TENANT_COLUMN]);
    let mut selectors: Vec<RowSelector> = Vec::new();
    let mut any = false;
    for batch in builder.with_projection(mask).build().map_err(|e| bad(&e))? {
        let batch = batch.map_err(|e| bad(&e))?;
        let tenants = column::<StringArray>(&batch, TENANT_COLUMN, path)?;
        for i in 0..tenants.len() {
            let keep = only(tenants.value(i));
            any |= keep;
            match selectors.last_mut() {
                Some(last) if last.skip != keep => last.row_count += 1,
                _ => selectors.push(if keep { RowSelector::select(1) } else { RowSelector::skip(1) }),
            }
        }
    }
    if !any {
        return Ok(Vec::new());
    }
    let reader = open()?.with_row_selection(RowSelection::from(selectors)).build().map_err(|e| bad(&e))?;
    reader.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| bad(&e))
}

/// The tenant's watermark in the unit's projection (zero when it was never projected).
pub fn read_watermark(root: &Path, unit: &str, tenant: &str) -> Result<Watermark> {
    let next_flush = files::read_unit_mark(root, unit)?.next_flush;
    Ok(read_tenant_states(root, unit, next_flush, |t| t == tenant)?.remove(tenant).map(|(_, mark)| mark).unwrap_or_default())
}

/// Every projected tenant of the unit with its watermark.
pub fn read_watermarks(root: &Path, unit: &str) -> Result<BTreeMap<String, Watermark>> {
    let next_flush = files::read_unit_mark(root, unit)?.next_flush;
    Ok(read_tenant_states(root, unit, next_flush, |_| true)?.into_iter().map(|(t, (_, mark))| (t, mark)).collect())
}

/// The `statements` tree's rows: a statement record's seq and its body as JSON.
pub(crate) fn statement_schema() -> Schema {
    Schema::new(vec![
        Field::new(TENANT_COLUMN, DataType::Utf8, false),
        Field::new("seq", DataType::UInt64, false),
        Field::new("statement", DataType::Utf8, false),
    ])
}

/// The batch of statements, given grouped by ascending tenant and in seq order within one.
pub(crate) fn statement_batch(statements: &[(String, ProjectedStatement)]) -> Result<RecordBatch> {
    let (mut tenant, mut seq, mut body) = (StringBuilder::new(), UInt64Builder::new(), StringBuilder::new());
    for (t, s) in statements {
        tenant.append_value(t);
        seq.append_value(s.seq);
        body.append_value(serde_json::to_string(&s.statement).map_err(|e| Error::Projection(e.to_string()))?);
    }
    let columns: Vec<ArrayRef> = vec![Arc::new(tenant.finish()), Arc::new(seq.finish()), Arc::new(body.finish())];
    RecordBatch::try_new(Arc::new(statement_schema()), columns).map_err(|e| Error::Projection(format!("statements: {e}")))
}

/// The tenant's statements below seq `below` (its watermark's `next_seq`), in seq order.
pub fn read_statements(root: &Path, unit: &str, tenant: &str, below: u64) -> Result<Vec<ProjectedStatement>> {
    Ok(read_unit_statements(root, unit, |t, seq| t == tenant && seq < below)?.into_iter().map(|(_, s)| s).collect())
}

/// The unit's statements that `keep(tenant, seq)` passes, by tenant then seq.
pub fn read_unit_statements(root: &Path, unit: &str, keep: impl Fn(&str, u64) -> bool) -> Result<Vec<(String, ProjectedStatement)>> {
    let mut out = Vec::new();
    for file in files::list_files(root, Tree::Statements, unit, |_| true)? {
        for batch in crate::read_parquet(&file.path)? {
            let tenants = column::<StringArray>(&batch, TENANT_COLUMN, &file.path)?;
            let seqs = column::<UInt64Array>(&batch, "seq", &file.path)?;
            let bodies = column::<StringArray>(&batch, "statement", &file.path)?;
            for i in (0..batch.num_rows()).filter(|&i| keep(tenants.value(i), seqs.value(i))) {
                let statement = serde_json::from_str(bodies.value(i))
                    .map_err(|e| Error::Corrupt { path: file.path.display().to_string(), detail: format!("statement {}: {e}", seqs.value(i)) })?;
                out.push((tenants.value(i).to_string(), ProjectedStatement { seq: seqs.value(i), statement }));
            }
        }
    }
    out.sort_by(|a, b| (&a.0, a.1.seq).cmp(&(&b.0, b.1.seq)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(tenants: &[&str], seqs: &[u64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new(TENANT_COLUMN, DataType::Utf8, false), Field::new("seq", DataType::UInt64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(tenants.to_vec())), Arc::new(UInt64Array::from(seqs.to_vec()))]).unwrap()
    }

    #[test]
    fn regrouping_keeps_each_tenants_rows_in_flush_order() {
        let a = stored(&["acme", "acme", "globex"], &[0, 1, 0]);
        let b = stored(&["acme", "beta", "globex"], &[2, 0, 1]);
        let merged = regroup(a.schema(), &[a, b]).unwrap();
        let tenants = tenants_of(&merged).unwrap();
        let seqs = merged.column(1).as_any().downcast_ref::<UInt64Array>().unwrap();
        let got: Vec<(String, u64)> = (0..merged.num_rows()).map(|i| (tenants.value(i).to_string(), seqs.value(i))).collect();
        let want = [("acme", 0), ("acme", 1), ("acme", 2), ("beta", 0), ("globex", 0), ("globex", 1)];
        assert_eq!(got, want.map(|(t, s)| (t.to_string(), s)));
        assert_eq!(tenant_runs(&merged).unwrap(), vec![("acme".into(), 0, 3), ("beta".into(), 3, 1), ("globex".into(), 4, 2)]);
        assert_eq!(without_tenant(&merged).unwrap().num_columns(), 1);
    }

    #[test]
    fn the_latest_flush_of_a_tenant_wins() {
        let mark = |n| Watermark { next_seq: n, checkpoint: Some(format!("cp{n}")), daily_zones: [("UTC".to_string(), 0)].into(), statements: true };
        let old: BTreeMap<String, (u64, Watermark)> = [("acme".to_string(), (3, mark(10))), ("beta".to_string(), (3, mark(1)))].into();
        let new: BTreeMap<String, (u64, Watermark)> = [("acme".to_string(), (5, mark(12)))].into();
        let mut out = BTreeMap::new();
        // Newest first, then older: the order files are read in must not matter.
        for states in [&new, &old] {
            fold_tenant_states(&mut out, &tenant_state_batch(states).unwrap(), Path::new("x"), |_| true).unwrap();
        }
        assert_eq!(out.get("acme"), Some(&(5, mark(12))));
        assert_eq!(out.get("beta"), Some(&(3, mark(1))));
        let mut only = BTreeMap::new();
        fold_tenant_states(&mut only, &tenant_state_batch(&old).unwrap(), Path::new("x"), |t| t == "beta").unwrap();
        assert_eq!(only.keys().collect::<Vec<_>>(), vec!["beta"]);
    }
}
