//! One tenant's rows of files its partition's tenants share: the table every tenant-facing query
//! reads, with the tenant restriction applied below SQL.
//!
//! Invariant: whatever plan a query makes, every row that leaves [`TenantTable::scan`] passed
//! [`TenantRestrictExec`], a node directly on the file scan that keeps the rows of `tenant_id =
//! <tenant>` and drops the column, so a query can neither see another tenant's row nor name the
//! column. The node is opaque to the optimizer on purpose: it accepts no filter, projection,
//! sort or limit from above, and claims no input order, so no expression of the query is ever
//! evaluated on another tenant's row (a cast that fails would quote that row's value in its
//! error; a plain `FilterExec` lets the optimizer merge the query's predicates into it, which
//! the isolation suite caught). The Parquet scan below it is given a pruning predicate built by
//! the server only, never from the query: the tenant equality, and seq bounds a route sets
//! ([`TenantTable::with_seq_range`]). It only skips row groups and pages by their statistics and
//! the bloom filter (row filtering inside the scan stays off), never decides what is returned.
//! The node reports no statistics, so no aggregate is answered from the files' row counts.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, DataFusionError, Result as DfResult};
use datafusion::datasource::physical_plan::{FileScanConfig, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::TableType;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{col, lit, Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties, SendableRecordBatchStream};
use futures::StreamExt;
use tally_schemas::TENANT_COLUMN;

/// `inner` (files stored with `tenant_id` first) seen as `tenant`'s rows under `schema` (the
/// stored schema without `tenant_id`).
#[derive(Debug)]
pub struct TenantTable {
    inner: Arc<dyn TableProvider>,
    schema: SchemaRef,
    tenant: String,
    /// Seq bounds (exclusive low, inclusive high) that only prune: set by a route, never by a
    /// query.
    seq_range: (Option<u64>, Option<u64>),
}

impl TenantTable {
    pub fn new(inner: Arc<dyn TableProvider>, schema: SchemaRef, tenant: &str) -> TenantTable {
        TenantTable { inner, schema, tenant: tenant.to_string(), seq_range: (None, None) }
    }

    /// Lets the scan skip pages of the tenant's rows outside `seq > after AND seq <= upto` (the
    /// rows are still filtered by the query itself: this only saves reading).
    pub fn with_seq_range(mut self, after: Option<u64>, upto: Option<u64>) -> TenantTable {
        self.seq_range = (after, upto);
        self
    }

    /// What the scan may skip data by: the tenant, and the route's seq bounds.
    fn pruning(&self) -> Expr {
        let mut all = col(TENANT_COLUMN).eq(lit(self.tenant.clone()));
        if let Some(after) = self.seq_range.0 {
            all = all.and(col("seq").gt(lit(after)));
        }
        if let Some(upto) = self.seq_range.1 {
            all = all.and(col("seq").lt_eq(lit(upto)));
        }
        all
    }
}

/// `scan` with `predicate` as its Parquet pruning predicate, when it is a Parquet file scan.
/// The predicate only prunes: with `pushdown_filters` off (the default, which no query can
/// change) the source evaluates it on statistics, never on rows.
fn with_pruning(scan: Arc<dyn ExecutionPlan>, predicate: Arc<dyn PhysicalExpr>, config: &ConfigOptions) -> DfResult<Arc<dyn ExecutionPlan>> {
    let Some(files) = scan.downcast_ref::<DataSourceExec>().and_then(|exec| exec.data_source().downcast_ref::<FileScanConfig>()) else {
        return Ok(scan);
    };
    if config.execution.parquet.pushdown_filters {
        return Err(DataFusionError::Internal("row filters inside the scan must stay off for a tenant's table".into()));
    }
    let Some(source) = files.file_source.try_pushdown_filters(vec![predicate], config)?.updated_node else {
        return Ok(scan);
    };
    let config = FileScanConfigBuilder::from(files.clone()).with_source(source).build();
    Ok(DataSourceExec::from_data_source(config))
}

#[async_trait]
impl TableProvider for TenantTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// None: the query's filters run above the restriction, on the caller's rows only.
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Unsupported; filters.len()])
    }

    async fn scan(&self, state: &dyn Session, projection: Option<&Vec<usize>>, _filters: &[Expr], _limit: Option<usize>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let stored = self.inner.schema();
        let tenant_index = stored.index_of(TENANT_COLUMN)?;
        // The requested columns, by name, in the stored schema; the tenant column is read too,
        // first, for the filter.
        let wanted: Vec<usize> = match projection {
            Some(p) => p.iter().map(|&i| stored.index_of(self.schema.field(i).name())).collect::<Result<_, _>>()?,
            None => self.schema.fields().iter().map(|f| stored.index_of(f.name())).collect::<Result<_, _>>()?,
        };
        let mut read = vec![tenant_index];
        read.extend(wanted.iter().copied());
        // Neither the query's filters nor its limit go below the restriction: a limit there
        // would count other tenants' rows, a filter would be evaluated on them.
        let scan = self.inner.scan(state, Some(&read), &[], None).await?;
        let predicate = state.create_physical_expr(self.pruning(), &DFSchema::try_from(Arc::clone(&stored))?)?;
        let scan = with_pruning(scan, predicate, state.config_options())?;
        Ok(Arc::new(TenantRestrictExec::new(scan, &self.tenant)?))
    }
}

/// Keeps the rows of one tenant of its input (whose first column is `tenant_id`) and drops that
/// column. See the module documentation for why it is a node of its own.
#[derive(Debug)]
pub struct TenantRestrictExec {
    input: Arc<dyn ExecutionPlan>,
    tenant: String,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl TenantRestrictExec {
    fn new(input: Arc<dyn ExecutionPlan>, tenant: &str) -> DfResult<TenantRestrictExec> {
        let scanned = input.schema();
        if scanned.fields().first().map(|f| f.name().as_str()) != Some(TENANT_COLUMN) {
            return Err(DataFusionError::Internal(format!("a tenant's table must read {TENANT_COLUMN} first")));
        }
        let schema = Arc::new(scanned.project(&(1..scanned.fields().len()).collect::<Vec<_>>())?);
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            input.output_partitioning().clone(),
            input.pipeline_behavior(),
            input.boundedness(),
        ));
        Ok(TenantRestrictExec { input, tenant: tenant.to_string(), schema, properties })
    }
}

/// `batch` (tenant column first) reduced to `tenant`'s rows, without the tenant column.
fn restrict(batch: &RecordBatch, tenant: &str, schema: &SchemaRef) -> DfResult<RecordBatch> {
    let tenants =
        batch.column(0).as_any().downcast_ref::<StringArray>().ok_or_else(|| DataFusionError::Internal(format!("{TENANT_COLUMN} is not a string column")))?;
    let keep: BooleanArray = (0..tenants.len()).map(|i| Some(!tenants.is_null(i) && tenants.value(i) == tenant)).collect();
    let kept = filter_record_batch(batch, &keep)?;
    // A query that reads no column (count(*)) still has a row count.
    let options = datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(kept.num_rows()));
    Ok(RecordBatch::try_new_with_options(Arc::clone(schema), kept.columns()[1..].to_vec(), &options)?)
}

impl DisplayAs for TenantRestrictExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        // The tenant is not shown: plans are never returned to callers, but logs may show them.
        write!(f, "TenantRestrictExec")
    }
}

#[allow(deprecated)]
impl ExecutionPlan for TenantRestrictExec {
    fn name(&self) -> &'static str {
        "TenantRestrictExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    /// No: an order claimed here would let the optimizer move a sort below this node, where
    /// its key would be evaluated on every tenant's rows (and on shifted columns).
    fn maintains_input_order(&self) -> Vec<bool> {
        vec![false]
    }

    fn apply_expressions(&self, _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, mut children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal("TenantRestrictExec has one child".into()));
        }
        Ok(Arc::new(TenantRestrictExec::new(children.swap_remove(0), &self.tenant)?))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let (tenant, schema) = (self.tenant.clone(), Arc::clone(&self.schema));
        let out = Arc::clone(&schema);
        let rows = self.input.execute(partition, context)?.map(move |batch| batch.and_then(|b| restrict(&b, &tenant, &schema)));
        Ok(Box::pin(RecordBatchStreamAdapter::new(out, rows)))
    }
}
