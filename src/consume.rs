//! `tally consume`: read the events topic as a consumer-group member, dead-letter what is bad,
//! and print what arrived per tenant. An operator's view of the stream before (or beside) the
//! ledger: it resumes from the group's committed offsets and commits after each batch, so running
//! it twice does not count a message twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tally_ingest::{DeadLetterQueue, EventConsumer, PartitionSink, Resume};

use crate::config::CliConfig;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value = "tally.events")]
    topic: String,
    /// Dead-letter topic; defaults to `<topic>.dlq`.
    #[arg(long)]
    dlq_topic: Option<String>,
    #[arg(long, default_value = "tally-consume")]
    group: String,
    /// Ignore committed offsets and read every partition from its start.
    #[arg(long)]
    from_beginning: bool,
    /// Stop after this many seconds without a message (0: run until interrupted).
    #[arg(long, default_value_t = 0)]
    idle_exit: u64,
}

/// Resumes where the group left off; this command holds nothing that needs flushing on revoke.
struct GroupOffsets {
    from_beginning: bool,
}

impl PartitionSink for GroupOffsets {
    fn resume(&self, _topic: &str, _partition: i32) -> Resume {
        if self.from_beginning {
            Resume::Beginning
        } else {
            Resume::Committed
        }
    }

    fn partitions_revoked(&self, _topic: &str, _partitions: &[i32]) {}
}

pub async fn run(config: &CliConfig, args: Args) -> anyhow::Result<()> {
    let dlq_topic = args.dlq_topic.clone().unwrap_or_else(|| DeadLetterQueue::topic_for(&args.topic));
    let dlq = DeadLetterQueue::new(&config.kafka, &dlq_topic).context("creating the DLQ producer")?;
    let sink = Arc::new(GroupOffsets { from_beginning: args.from_beginning });
    let consumer =
        EventConsumer::new(&config.kafka, &args.group, &args.topic, sink, 5_000, Duration::from_millis(500)).context("joining the consumer group")?;

    let mut per_tenant: BTreeMap<String, u64> = BTreeMap::new();
    let mut dead: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut last_message = Instant::now();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let batch = tokio::select! {
            batch = consumer.next_batch() => batch?,
            _ = &mut ctrl_c => break,
        };
        if batch.is_empty() {
            if args.idle_exit > 0 && last_message.elapsed() >= Duration::from_secs(args.idle_exit) {
                break;
            }
            continue;
        }
        last_message = Instant::now();
        let mut next_offsets: BTreeMap<i32, i64> = BTreeMap::new();
        for delivery in &batch {
            match &delivery.outcome {
                Ok(decoded) => *per_tenant.entry(decoded.event.tenant_id.clone()).or_default() += 1,
                Err(rejection) => {
                    dlq.send(&args.topic, delivery, rejection).await;
                    tracing::warn!(
                        partition = delivery.partition,
                        offset = delivery.offset,
                        code = rejection.code.as_str(),
                        detail = %rejection.detail,
                        "message dead-lettered"
                    );
                    *dead.entry(rejection.code.as_str()).or_default() += 1;
                }
            }
            next_offsets.insert(delivery.partition, delivery.offset + 1);
        }
        consumer.commit(&next_offsets.into_iter().collect::<Vec<_>>())?;
    }
    consumer.close().await?;

    let accepted: u64 = per_tenant.values().sum();
    let dead_total: u64 = dead.values().sum();
    println!("consumed from {}: {accepted} accepted for {} tenants, {dead_total} dead-lettered to {dlq_topic}", args.topic, per_tenant.len());
    for (tenant, count) in &per_tenant {
        println!("  {tenant}: {count}");
    }
    for (code, count) in &dead {
        println!("  dlq {code}: {count}");
    }
    Ok(())
}
