//! `tally`: the one binary. Each subcommand is a thin layer over the library crates; argument
//! parsing, configuration loading and human-facing output live here, and nowhere else reads the
//! process environment.

mod config;
mod consume;
mod dlq_cmd;
mod log_cmd;
mod publish;
mod token_cmd;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tally_ingest::{ensure_topics, DeadLetterQueue, TopicSpec};

use crate::config::CliConfig;

#[derive(Parser)]
#[command(name = "tally", version, about = "Audit and metering backbone for multi-tenant AI-agent platforms")]
struct Cli {
    /// TOML configuration file (a `[kafka]` table; see README). Environment overrides apply on top.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers; overrides the config file and KAFKA_BOOTSTRAP.
    #[arg(long, global = true)]
    bootstrap: Option<String>,
    /// Log lines on stderr: `text` (colour only when stderr is a terminal) or `json` (one object
    /// per line, for log shippers). Levels come from RUST_LOG (default `warn,tally=info,tower_http=info`).
    #[arg(long, global = true, value_enum, env = "TALLY_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Sets up `tracing` on stderr. Request spans (method, route, path) from both services' HTTP
/// layers appear as fields of each line.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,tally=info,tower_http=info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Publish JSONL events (one per line) to Kafka, keyed by tenant_id.
    Publish(publish::Args),
    /// Consume events, dead-letter bad ones, and print a per-tenant summary.
    Consume(consume::Args),
    /// The dead-letter queue: count and show what was refused, and publish it again once fixed.
    #[command(subcommand)]
    Dlq(dlq_cmd::DlqCommand),
    /// Create a ledger signing key (private key file, mode 0600) and print the origin's vkey.
    Keygen(log_cmd::KeygenArgs),
    /// Print a tenant's verifier key (vkey).
    Vkey(log_cmd::VkeyArgs),
    /// Verify receipts and consistency proofs offline.
    #[command(subcommand)]
    Verify(log_cmd::VerifyCommand),
    /// Offline tools over a ledger data directory.
    #[command(subcommand)]
    Log(log_cmd::LogCommand),
    /// Run the ledger service: consume events into signed per-tenant logs and serve them over
    /// HTTP. Needs a config file with a `[ledger]` table (see README).
    Ledger,
    /// Run the query service (audit trails, cost reports, SQL, billing spend, audit exports)
    /// over the ledger's Parquet projection. Needs a config file with a `[query]` table.
    Query,
    /// The Parquet projection of the ledger's logs.
    #[command(subcommand)]
    Parquet(ParquetCommand),
    /// Convert a data directory from the pre-journal layout (a directory per tenant) to one
    /// journal per partition, recomputing every tenant's root before anything old is removed.
    /// Stop the ledger instances first: each partition is locked while it is converted.
    Migrate {
        /// The ledger's data directory (or a `tally log` directory).
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Erase personal data of a tenant's records in a stopped ledger's data directory: one
    /// subject's (its events' actor_id) or every subject's. A running ledger does the same on
    /// `POST /v1/tenants/{tenant}/erase` (docs/privacy.md). Irreversible.
    Erase {
        /// The ledger's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The ledger's private key file (repeat it during a rotation).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long)]
        tenant: String,
        /// The subject whose data to erase (`""`: the tenant's events without an actor_id).
        #[arg(long, required_unless_present = "all_subjects", conflicts_with = "all_subjects")]
        subject: Option<String>,
        /// Erase every subject's data (offboarding).
        #[arg(long)]
        all_subjects: bool,
        /// Only what occurred in months wholly before this date (YYYY-MM-DD): keys are per UTC
        /// month, so the month holding the date is kept.
        #[arg(long)]
        before: Option<jiff::civil::Date>,
        /// Who asks, named in the `erasure` records.
        #[arg(long, default_value = "tally-erase")]
        by: String,
        /// A zone to keep daily cost roll-ups for: the ledger's `report_time_zones` (repeat it).
        #[arg(long = "zone", default_value = "UTC")]
        zones: Vec<String>,
    },
    /// Bearer tokens for the HTTP services.
    #[command(subcommand)]
    Token(token_cmd::TokenCommand),
    /// Create Tally's topics (events, its DLQ, budget) where missing. Names default to the
    /// `[ledger]` table of `--config` when it has one, else to tally.events, <events>.dlq and
    /// tally.budget.
    Topics {
        #[arg(long)]
        events_topic: Option<String>,
        #[arg(long)]
        dlq_topic: Option<String>,
        #[arg(long)]
        budget_topic: Option<String>,
        #[arg(long, default_value_t = 8)]
        partitions: i32,
    },
}

#[derive(Subcommand)]
enum ParquetCommand {
    /// Regenerate the projection (`<data-dir>/parquet`) from the logs. Stop the ledger
    /// instances that own the partitions first: each partition is locked while it is rebuilt.
    Rebuild {
        /// The ledger's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The ledger's private key file, to sign the checkpoint each tenant's state keeps (repeat it
        /// during a rotation).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// Only the partition holding this tenant (its tenants share their files, so the whole
        /// partition is rebuilt).
        #[arg(long)]
        tenant: Option<String>,
        /// A zone to keep daily cost roll-ups for: the ledger's `report_time_zones` (repeat it).
        #[arg(long = "zone", default_value = "UTC")]
        zones: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // Offline commands run without Kafka settings or an async runtime.
    let online = |config: Option<PathBuf>, bootstrap: Option<String>| -> anyhow::Result<(CliConfig, tokio::runtime::Runtime)> {
        let mut config = CliConfig::load(config.as_deref(), std::env::vars())?;
        if let Some(b) = bootstrap {
            config.kafka.bootstrap = b;
        }
        config.kafka.validate()?;
        Ok((config, tokio::runtime::Runtime::new().context("starting the tokio runtime")?))
    };
    match cli.command {
        Command::Keygen(args) => log_cmd::keygen(args),
        Command::Vkey(args) => log_cmd::vkey(args),
        Command::Verify(command) => log_cmd::verify(command),
        Command::Log(command) => log_cmd::log(command),
        Command::Token(command) => token_cmd::run(command),
        Command::Publish(args) => {
            let (config, rt) = online(cli.config, cli.bootstrap)?;
            rt.block_on(publish::run(&config, args))
        }
        Command::Consume(args) => {
            let (config, rt) = online(cli.config, cli.bootstrap)?;
            rt.block_on(consume::run(&config, args))
        }
        Command::Dlq(command) => {
            let (config, rt) = online(cli.config, cli.bootstrap)?;
            rt.block_on(dlq_cmd::run(&config, command))
        }
        Command::Ledger => {
            let (mut config, rt) = online(cli.config, cli.bootstrap)?;
            let service = config.ledger.take().context("the configuration has no [ledger] table (pass --config)")?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(service.listen).await.with_context(|| format!("binding ledger.listen {}", service.listen))?;
                tracing::info!(listen = %listener.local_addr()?, topic = %service.topic, "ledger service starting");
                tally_ledger::service::run(service, config.kafka, listener, shutdown_signal()).await?;
                Ok(())
            })
        }
        Command::Query => {
            let config = CliConfig::load(cli.config.as_deref(), std::env::vars())?;
            let service = config.query.context("the configuration has no [query] table (pass --config)")?;
            service.validate()?;
            let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(service.listen).await.with_context(|| format!("binding query.listen {}", service.listen))?;
                tally_query::run(service, listener, shutdown_signal()).await?;
                Ok(())
            })
        }
        Command::Parquet(ParquetCommand::Rebuild { data_dir, keys, tenant, zones }) => parquet_rebuild(&data_dir, &keys, tenant.as_deref(), &zones),
        Command::Migrate { data_dir } => migrate(&data_dir),
        Command::Erase { data_dir, keys, tenant, subject, all_subjects: _, before, by, zones } => {
            let keys = keys
                .iter()
                .map(|k| tally_ledger::LedgerKey::read(k).with_context(|| format!("reading key {}", k.display())))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let before = before.map(|d| d.strftime("%Y-%m").to_string());
            let (erased, rows) = tally_ledger::service::erase_offline(&data_dir, keys, &tenant, subject.as_deref(), before.as_deref(), &by, &zones)
                .with_context(|| format!("erasing under {}", data_dir.display()))?;
            match erased.seq {
                None => println!("{tenant}: nothing to erase (no such subject)"),
                Some(seq) => println!(
                    "{tenant}: erased {} key(s) and the personal values of {} record(s); recorded in {} erasure record(s), the last at seq {seq}; projection rewritten ({rows} records)",
                    erased.keys, erased.records, erased.erasure_records
                ),
            }
            if erased.unerasable > 0 {
                println!(
                    "{tenant}: {} record(s) written before personal fields were committed to hold them in clear; no key erases those (docs/privacy.md)",
                    erased.unerasable
                );
            }
            Ok(())
        }
        Command::Topics { events_topic, dlq_topic, budget_topic, partitions } => {
            let (config, rt) = online(cli.config, cli.bootstrap)?;
            let ledger = config.ledger.as_ref();
            let events_topic = events_topic.or_else(|| ledger.map(|l| l.topic.clone())).unwrap_or_else(|| "tally.events".into());
            let dlq = dlq_topic.or_else(|| ledger.and_then(|l| l.dlq_topic.clone())).unwrap_or_else(|| DeadLetterQueue::topic_for(&events_topic));
            let budget = budget_topic.or_else(|| ledger.map(|l| l.budget_topic.clone())).unwrap_or_else(|| "tally.budget".into());
            let topics = [
                TopicSpec::new(events_topic.clone(), partitions),
                TopicSpec::new(dlq.clone(), partitions),
                TopicSpec { compacted: true, ..TopicSpec::new(budget.clone(), partitions) },
            ];
            rt.block_on(ensure_topics(&config.kafka, &topics)).context("creating topics")?;
            println!("topics ready: {events_topic} ({partitions} partitions), {dlq}, {budget} (compacted)");
            Ok(())
        }
    }
}

/// `tally parquet rebuild`: one progress bar per partition (its tenants share their files), then
/// a summary line.
fn parquet_rebuild(data_dir: &std::path::Path, keys: &[PathBuf], tenant: Option<&str>, zones: &[String]) -> anyhow::Result<()> {
    let keys =
        keys.iter().map(|k| tally_ledger::LedgerKey::read(k).with_context(|| format!("reading key {}", k.display()))).collect::<anyhow::Result<Vec<_>>>()?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template("{msg:>24} [{bar:40}] {pos}/{len} records").context("progress bar template")?.progress_chars("=> "));
    let mut current = String::new();
    let rebuilt = tally_ledger::service::rebuild_projection(data_dir, keys, tenant, zones, |t, done, total| {
        if t != current {
            current = t.to_string();
            bar.set_message(current.clone());
            bar.set_length(total);
        }
        bar.set_position(done);
    })
    .with_context(|| format!("rebuilding the projection under {}", data_dir.display()))?;
    bar.finish_and_clear();
    if let Some(t) = tenant.filter(|_| rebuilt.is_empty()) {
        anyhow::bail!("no log of tenant {t} under {}", data_dir.display());
    }
    let records: u64 = rebuilt.iter().map(|(_, n)| n).sum();
    println!("rebuilt the projection of {} partition(s), {records} records, under {}", rebuilt.len(), data_dir.join("parquet").display());
    Ok(())
}

/// `tally migrate`: converts every partition, printing each tenant as its root is checked.
fn migrate(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let migrated = tally_ledger::service::migrate_data_dir(data_dir, |dir, tenant, size| println!("{}: {tenant}: {size} records, root checked", dir.display()))
        .with_context(|| format!("migrating {}", data_dir.display()))?;
    let tenants: usize = migrated.iter().map(|(_, m)| m.tenants.len()).sum();
    let records: u64 = migrated.iter().flat_map(|(_, m)| m.tenants.iter().map(|(_, n)| n)).sum();
    println!("migrated {} partition(s), {tenants} tenant log(s), {records} records, under {}", migrated.len(), data_dir.display());
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM, so the service commits what it applied before exiting.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    // The service makes what it applied durable first, then leaves the group. With the broker
    // gone, librdkafka can wait on that leave indefinitely; give up after a while, which is no
    // worse than a crash (recovery resumes from the durable state).
    std::thread::spawn(|| {
        std::thread::sleep(SHUTDOWN_GRACE);
        tracing::error!(seconds = SHUTDOWN_GRACE.as_secs(), "shutdown is taking too long; exiting");
        std::process::exit(1);
    });
}

/// How long a shutdown may take once the signal arrived.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(20);
