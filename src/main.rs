//! `tally`: the one binary. Each subcommand is a thin layer over the library crates; argument
//! parsing, configuration loading and human-facing output live here, and nowhere else reads the
//! process environment.

mod config;
mod consume;
mod publish;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish JSONL events (one per line) to Kafka, keyed by tenant_id.
    Publish(publish::Args),
    /// Consume events, dead-letter bad ones, and print a per-tenant summary.
    Consume(consume::Args),
    /// Create Tally's topics (events, its DLQ, budget) where missing.
    Topics {
        #[arg(long, default_value = "tally.events")]
        events_topic: String,
        #[arg(long, default_value_t = 8)]
        partitions: i32,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,tally=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut config = CliConfig::load(cli.config.as_deref(), std::env::vars())?;
    if let Some(b) = cli.bootstrap {
        config.kafka.bootstrap = b;
    }
    config.kafka.validate()?;
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Publish(args) => publish::run(&config, args).await,
            Command::Consume(args) => consume::run(&config, args).await,
            Command::Topics { events_topic, partitions } => {
                let dlq = DeadLetterQueue::topic_for(&events_topic);
                let topics = [
                    TopicSpec::new(events_topic.clone(), partitions),
                    TopicSpec::new(dlq.clone(), partitions),
                    TopicSpec { compacted: true, ..TopicSpec::new("tally.budget", partitions) },
                ];
                ensure_topics(&config.kafka, &topics).await.context("creating topics")?;
                println!("topics ready: {events_topic} ({partitions} partitions), {dlq}, tally.budget (compacted)");
                Ok(())
            }
        }
    })
}
