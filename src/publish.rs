//! `tally publish`: JSONL in, one Kafka message per line, keyed by the event's tenant.
//!
//! A line that is a CloudEvent in structured form (it has `specversion`) is sent with
//! `content-type: application/cloudevents+json` and keyed by `data.tenant_id`. A line with no
//! tenant to key by cannot be partitioned correctly, so it is not sent and counts as failed, with
//! its line number. The exit status is non-zero when anything failed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tally_ingest::EventPublisher;

use crate::config::CliConfig;

/// Files at least this large get a progress bar.
const PROGRESS_MIN_BYTES: u64 = 1 << 20;
/// Deliveries awaited concurrently before enqueueing pauses.
const MAX_IN_FLIGHT: usize = 20_000;

#[derive(clap::Args)]
pub struct Args {
    /// Topic to publish to.
    #[arg(long, default_value = "tally.events")]
    topic: String,
    /// JSONL file, or `-` for standard input.
    input: PathBuf,
}

#[derive(Default)]
struct Summary {
    sent: u64,
    failed: u64,
    per_tenant: BTreeMap<String, u64>,
}

/// The Kafka key for a line and whether it is a structured CloudEvent.
fn key_of(line: &str) -> Result<(String, bool), String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let is_cloudevent = value.get("specversion").is_some();
    let tenant = if is_cloudevent { value.pointer("/data/tenant_id") } else { value.get("tenant_id") };
    match tenant.and_then(Value::as_str) {
        Some(t) if !t.is_empty() => Ok((t.to_string(), is_cloudevent)),
        _ => Err("no string tenant_id to key the message by".to_string()),
    }
}

pub async fn run(config: &CliConfig, args: Args) -> anyhow::Result<()> {
    let publisher = EventPublisher::new(&config.kafka, &args.topic).context("creating the producer")?;
    let (reader, size): (Box<dyn Read + Send>, Option<u64>) = if args.input.as_os_str() == "-" {
        (Box::new(std::io::stdin()), None)
    } else {
        let file = std::fs::File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
        let size = file.metadata().ok().map(|m| m.len());
        (Box::new(file), size)
    };
    let progress = match size {
        Some(bytes) if bytes >= PROGRESS_MIN_BYTES => {
            let bar = ProgressBar::new(bytes);
            bar.set_style(ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({eta})").unwrap_or_else(|_| ProgressStyle::default_bar()));
            bar
        }
        _ => ProgressBar::hidden(),
    };

    let mut summary = Summary::default();
    let mut in_flight = FuturesUnordered::new();
    let mut lines = BufReader::new(reader);
    let mut line = String::new();
    let mut line_no = 0u64;
    loop {
        line.clear();
        let read = lines.read_line(&mut line).with_context(|| format!("reading line {}", line_no + 1))?;
        if read == 0 {
            break;
        }
        line_no += 1;
        progress.inc(read as u64);
        let text = line.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        let (tenant, is_cloudevent) = match key_of(text) {
            Ok(k) => k,
            Err(why) => {
                progress.suspend(|| eprintln!("line {line_no}: not sent: {why}"));
                summary.failed += 1;
                continue;
            }
        };
        let headers: &[(&str, &[u8])] = if is_cloudevent { &[("content-type", b"application/cloudevents+json")] } else { &[] };
        let delivery = publisher.enqueue(Some(tenant.as_bytes()), text.as_bytes(), headers).await?;
        in_flight.push(async move { (line_no, tenant, delivery.await) });
        while in_flight.len() >= MAX_IN_FLIGHT {
            if let Some(done) = in_flight.next().await {
                record(&mut summary, &progress, done);
            }
        }
        progress.set_message(format!("{} sent", summary.sent));
    }
    while let Some(done) = in_flight.next().await {
        record(&mut summary, &progress, done);
    }
    publisher.flush(Duration::from_secs(30)).await?;
    progress.finish_and_clear();

    println!("published to {}: {} sent, {} failed", args.topic, summary.sent, summary.failed);
    for (tenant, count) in &summary.per_tenant {
        println!("  {tenant}: {count}");
    }
    if summary.failed > 0 {
        anyhow::bail!("{} line(s) were not published", summary.failed);
    }
    Ok(())
}

fn record(summary: &mut Summary, progress: &ProgressBar, (line_no, tenant, result): (u64, String, tally_ingest::Result<tally_ingest::Published>)) {
    match result {
        Ok(_) => {
            summary.sent += 1;
            *summary.per_tenant.entry(tenant).or_default() += 1;
        }
        Err(e) => {
            progress.suspend(|| eprintln!("line {line_no}: delivery failed: {e}"));
            summary.failed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::key_of;

    #[test]
    fn keys_plain_and_cloudevent_lines() {
        assert_eq!(key_of(r#"{"tenant_id":"acme"}"#).unwrap(), ("acme".to_string(), false));
        assert_eq!(key_of(r#"{"specversion":"1.0","data":{"tenant_id":"globex"}}"#).unwrap(), ("globex".to_string(), true));
        assert!(key_of(r#"{"tenant_id":7}"#).unwrap_err().contains("tenant_id"));
        assert!(key_of("{oops").unwrap_err().contains("not JSON"));
    }
}
