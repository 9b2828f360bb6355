//! Per-request DataFusion contexts, each seeing exactly one tenant's rows.
//!
//! Isolation by construction: a context is created for one request and holds only tables built
//! from explicit file lists of the tenant's partition (`events`, or `rollups`), each wrapped in a
//! [`TenantTable`] that filters to the tenant below SQL and hides the `tenant_id` column. There
//! is no catalog to browse (`information_schema` off), no URL tables, and the files never come
//! from the query text. Memory is bounded per context with spilling off (nothing is written, not even
//! temporary files), and every context's pool draws from one process-wide pool
//! ([`crate::workers::QueryPool`]); value-building functions reserve what they build in it
//! ([`crate::bounded`]). Time is bounded by the caller.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::datasource::MemTable;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{GreedyMemoryPool, MemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use tally_projection::{list_files, ProjectionFile, Tree};

use crate::config::QueryConfig;
use crate::error::{Error, Result};

/// The files of a tenant's partition in one tree, their URLs for DataFusion, and the tenant whose
/// rows a table over them shows.
pub struct Listed {
    pub tenant: String,
    pub files: Vec<ProjectionFile>,
    pub urls: Vec<ListingTableUrl>,
    /// Seq bounds (exclusive, inclusive) the scan may skip pages by (see
    /// [`crate::tenant_table::TenantTable::with_seq_range`]).
    pub seq_range: (Option<u64>, Option<u64>),
}

impl Listed {
    /// The same files, the scan skipping pages outside `seq > after AND seq <= upto`.
    pub fn with_seq_range(mut self, after: Option<u64>, upto: Option<u64>) -> Listed {
        self.seq_range = (after, upto);
        self
    }
}

/// Rows per batch of a tenant's own SQL: with values of at most 64 KiB (an event's largest, and
/// a built value's), one column of one batch holds at most 512 MiB. Smaller batches would bound
/// that copy better, but measured here they keep DataFusion 55's nested-loop join from yielding
/// for long stretches, so a timed-out cross join was not aborted for seconds (see
/// `isolation::queries_past_their_time_or_row_limits_are_stopped_with_a_clear_error`).
pub const TENANT_SQL_BATCH_ROWS: usize = 8192;

/// What every request needs to build its context.
#[derive(Debug, Clone)]
pub struct Engine {
    root: PathBuf,
    /// The ledger's data directory: where a tenant's partition is found.
    data_dir: PathBuf,
    memory_bytes: usize,
    /// Shared by every context this engine makes: the process-wide cap.
    global_pool: Arc<GreedyMemoryPool>,
    builders: crate::bounded::Builders,
    max_result_bytes: usize,
}

impl Engine {
    pub fn new(config: &QueryConfig) -> Engine {
        Engine {
            root: config.projection_root(),
            data_dir: config.data_dir.clone(),
            memory_bytes: config.query_memory_mb << 20,
            global_pool: Arc::new(GreedyMemoryPool::new(config.query_memory_total_mb << 20)),
            builders: crate::bounded::Builders::of_default_context(),
            max_result_bytes: config.max_response_mb << 20,
        }
    }

    /// The projection's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Most bytes of result batches one query may collect.
    pub fn max_result_bytes(&self) -> usize {
        self.max_result_bytes
    }

    /// Bytes all running queries hold in the process-wide pool now.
    pub fn memory_in_use(&self) -> usize {
        self.global_pool.reserved()
    }

    /// A fresh context with no tables, this service's memory limits and no catalog browsing.
    pub fn context(&self) -> Result<SessionContext> {
        self.context_with_batch(8192)
    }

    /// As [`Engine::context`], with `batch_size` rows per batch: a join or a wide select copies
    /// values into output batches outside the memory pool, so the batch size bounds what one
    /// such copy can hold.
    fn context_with_batch(&self, batch_size: usize) -> Result<SessionContext> {
        // No spilling: a tenant's query never writes, not even temporary files.
        let no_spill = DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled);
        let pool: Arc<dyn MemoryPool> = Arc::new(crate::workers::QueryPool::new(self.memory_bytes, Arc::clone(&self.global_pool)));
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::clone(&pool))
            .with_disk_manager_builder(no_spill)
            .build_arc()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let mut config = SessionConfig::new().with_information_schema(false).with_batch_size(batch_size);
        // A recursive CTE makes rows without end; no report needs one.
        config.options_mut().execution.enable_recursive_ctes = false;
        // Plain Utf8 columns, as the projection schema declares them.
        config.options_mut().execution.parquet.schema_force_view_types = false;
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        self.builders.register(&ctx, &pool);
        Ok(ctx)
    }

    /// The projection unit (partition) holding `tenant`'s rows; None for a tenant with no log.
    /// Reads the data directory: call it off the async runtime.
    pub fn unit_of(&self, tenant: &str) -> Option<String> {
        tally_projection::unit_of_tenant(&self.data_dir, tenant)
    }

    /// The visible files of `tree` of the tenant's partition whose partition value (date or
    /// month) passes `wanted`, with their URLs (parsing one stats the file: done here, off the
    /// async runtime). None for a tenant with no log.
    pub async fn files(&self, tree: Tree, tenant: &str, wanted: impl Fn(&str) -> bool + Send + 'static) -> Result<Listed> {
        let engine = self.clone();
        let tenant = tenant.to_string();
        tokio::task::spawn_blocking(move || -> Result<Listed> {
            let files = match engine.unit_of(&tenant) {
                Some(unit) => list_files(&engine.root, tree, &unit, wanted)?,
                None => Vec::new(),
            };
            let urls = files
                .iter()
                .map(|f| {
                    let path = f.path.to_str().ok_or_else(|| Error::Internal(format!("non-UTF-8 path {}", f.path.display())))?;
                    ListingTableUrl::parse(path).map_err(|e| Error::Internal(e.to_string()))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Listed { tenant, files, urls, seq_range: (None, None) })
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
    }

    /// Registers `name` in `ctx` as the listed tenant's rows (under `schema`) of exactly the
    /// `listed` files (stored with `tenant_id` first).
    pub fn register(&self, ctx: &SessionContext, name: &str, schema: SchemaRef, listed: &Listed) -> Result<()> {
        let table: Arc<dyn datafusion::catalog::TableProvider> = if listed.files.is_empty() {
            Arc::new(MemTable::try_new(Arc::clone(&schema), vec![vec![]]).map_err(|e| Error::Internal(e.to_string()))?)
        } else {
            let urls = listed.urls.clone();
            let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
            let stored = Arc::new(tally_schemas::stored_schema(&schema));
            let config = ListingTableConfig::new_with_multi_paths(urls).with_listing_options(options).with_schema(stored);
            let files = Arc::new(ListingTable::try_new(config).map_err(|e| Error::Internal(e.to_string()))?);
            let (after, upto) = listed.seq_range;
            Arc::new(crate::tenant_table::TenantTable::new(files, schema, &listed.tenant).with_seq_range(after, upto))
        };
        ctx.register_table(name, table).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(())
    }

    /// A context whose only table, `events`, is the tenant's rows in the dates `wanted` passes.
    pub async fn tenant_events(&self, tenant: &str, wanted: impl Fn(&str) -> bool + Send + 'static) -> Result<SessionContext> {
        let files = self.files(Tree::Events, tenant, wanted).await?;
        self.events_context(&files)
    }

    /// A context for a tenant's own SQL: its only table, `events`, is all the tenant's rows, in
    /// batches of [`TENANT_SQL_BATCH_ROWS`].
    pub async fn tenant_sql_context(&self, tenant: &str) -> Result<SessionContext> {
        let files = self.files(Tree::Events, tenant, |_| true).await?;
        let ctx = self.context_with_batch(TENANT_SQL_BATCH_ROWS)?;
        self.register(&ctx, tally_sql_gate::EVENTS_TABLE, Arc::new(tally_schemas::projection_schema()), &files)?;
        Ok(ctx)
    }

    /// A context whose only table, `events`, is exactly the `listed` files of the events tree.
    pub fn events_context(&self, listed: &Listed) -> Result<SessionContext> {
        let ctx = self.context()?;
        self.register(&ctx, tally_sql_gate::EVENTS_TABLE, Arc::new(tally_schemas::projection_schema()), listed)?;
        Ok(ctx)
    }

    /// A context whose only table, `rollups`, is the tenant's 15-minute roll-ups (or, for
    /// [`Tree::Daily`], daily roll-ups) in the months `wanted` passes.
    pub async fn tenant_rollups(&self, tree: Tree, tenant: &str, wanted: impl Fn(&str) -> bool + Send + 'static) -> Result<SessionContext> {
        let files = self.files(tree, tenant, wanted).await?;
        let ctx = self.context()?;
        self.register(&ctx, "rollups", rollup_schema_of(tree), &files)?;
        Ok(ctx)
    }
}

/// The schema of a roll-up tree's rows, as a tenant's queries see them.
pub fn rollup_schema_of(tree: Tree) -> SchemaRef {
    Arc::new(match tree {
        Tree::Daily => tally_schemas::daily_rollup_schema(),
        _ => tally_schemas::rollup_schema(),
    })
}
