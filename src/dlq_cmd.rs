//! `tally dlq inspect|replay`: an operator's tools for the dead-letter queue (docs/events.md,
//! "The dead-letter queue"). `inspect` reads the DLQ to its current end (no consumer group, no
//! commit) and counts by reject code, with samples, optionally writing the dead letters out as
//! JSON lines; `replay` publishes dead letters again to the events topic through the
//! tenant-keyed publisher, as they are or fixed from such a file. The ledger records an event
//! once however often it arrives (its idempotency key), so a replay repeated by mistake adds
//! nothing.

use std::collections::BTreeMap;
use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use tally_ingest::{read_dead_letters, DeadLetter, EventPublisher};

use crate::config::CliConfig;

#[derive(clap::Subcommand)]
pub enum DlqCommand {
    /// Count the DLQ's messages by reject code, with samples; optionally write them out as JSON
    /// lines, to fix and replay.
    Inspect {
        #[arg(long, default_value = "tally.events.dlq")]
        dlq_topic: String,
        /// Only messages refused with this code.
        #[arg(long)]
        code: Option<String>,
        /// Only messages keyed by this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Samples printed per code.
        #[arg(long, default_value_t = 3)]
        samples: usize,
        /// Write every matching message to this file, one JSON object per line.
        #[arg(long)]
        export: Option<PathBuf>,
    },
    /// Publish dead letters again to the events topic: from the DLQ as they are (after fixing
    /// what refused them, e.g. a producer's partitioner for `wrong_partition`), or fixed, from a
    /// file `inspect --export` wrote. Bounded forms hold no original and are skipped.
    Replay {
        #[arg(long, default_value = "tally.events")]
        topic: String,
        /// Replay from this DLQ topic, as the messages are.
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        dlq_topic: Option<String>,
        /// Only messages refused with this code (with --dlq-topic).
        #[arg(long, requires = "dlq_topic")]
        code: Option<String>,
        /// Only messages keyed by this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Replay the JSON lines of this file (`inspect --export`, fixed).
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

pub async fn run(config: &CliConfig, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::Inspect { dlq_topic, code, tenant, samples, export } => inspect(config, &dlq_topic, code, tenant, samples, export).await,
        DlqCommand::Replay { topic, dlq_topic, code, tenant, file } => {
            // A reader thread hands letters over a bounded channel to the publisher, so memory
            // does not grow with the DLQ or the file.
            let (send, letters) = tokio::sync::mpsc::channel(REPLAY_QUEUE);
            let reader = match (dlq_topic, file) {
                (Some(dlq), _) => {
                    let kafka = config.kafka.clone();
                    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                        read_dead_letters(&kafka, &dlq, |letter| {
                            if matches(&letter, code.as_deref(), tenant.as_deref()) {
                                // A closed channel means the publisher stopped; its error is reported.
                                let _ = send.blocking_send(Ok(Exported::from(&letter)));
                            }
                        })
                        .with_context(|| format!("reading {dlq}"))?;
                        Ok(())
                    })
                }
                (None, Some(file)) => tokio::task::spawn_blocking(move || read_file(&file, tenant.as_deref(), &send)),
                (None, None) => bail!("give --dlq-topic or --file"),
            };
            let replayed = replay(config, &topic, letters).await;
            let read = reader.await?;
            let Replayed { sent, bounded, keyless } = replayed?;
            read?;
            println!("replayed {sent} to {topic}; skipped {bounded} in bounded form (no original kept) and {keyless} without a key");
            Ok(())
        }
    }
}

/// Letters in flight between the reader and the publisher during a replay.
const REPLAY_QUEUE: usize = 1024;

fn matches(letter: &DeadLetter, code: Option<&str>, tenant: Option<&str>) -> bool {
    code.is_none_or(|c| letter.code == c) && tenant.is_none_or(|t| letter.key.as_deref() == Some(t.as_bytes()))
}

async fn inspect(config: &CliConfig, dlq: &str, code: Option<String>, tenant: Option<String>, samples: usize, export: Option<PathBuf>) -> anyhow::Result<()> {
    let mut out = match &export {
        Some(path) => Some(std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?)),
        None => None,
    };
    let (kafka, topic) = (config.kafka.clone(), dlq.to_string());
    // Counts and a few samples per code: memory does not grow with the DLQ.
    let (counts, shown, written) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut shown: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut written = 0u64;
        let mut failed = None;
        read_dead_letters(&kafka, &topic, |letter| {
            if !matches(&letter, code.as_deref(), tenant.as_deref()) {
                return;
            }
            let count = counts.entry(letter.code.clone()).or_default();
            count.0 += 1;
            count.1 += u64::from(letter.bounded);
            let list = shown.entry(letter.code.clone()).or_default();
            if list.len() < samples {
                list.push(sample(&letter));
            }
            if let (Some(out), None) = (out.as_mut(), &failed) {
                let line = serde_json::to_string(&Exported::from(&letter)).map(|l| writeln!(out, "{l}"));
                match line {
                    Ok(Ok(())) => written += 1,
                    Ok(Err(e)) => failed = Some(e.to_string()),
                    Err(e) => failed = Some(e.to_string()),
                }
            }
        })
        .with_context(|| format!("reading {topic}"))?;
        if let Some(e) = failed {
            bail!("writing the export: {e}");
        }
        if let Some(mut out) = out {
            out.flush().context("writing the export")?;
        }
        Ok((counts, shown, written))
    })
    .await??;
    let total: u64 = counts.values().map(|(n, _)| n).sum();
    println!("{total} dead letters in {dlq}{}", if total == 0 { "" } else { ", by code:" });
    for (code, (n, bounded)) in &counts {
        let bounded = if *bounded > 0 { format!(" ({bounded} in bounded form)") } else { String::new() };
        println!("  {code:<24} {n:>8}{bounded}");
        for line in shown.get(code).into_iter().flatten() {
            println!("      {line}");
        }
    }
    if let Some(path) = export {
        println!("wrote {written} to {}", path.display());
    }
    Ok(())
}

/// One line about a dead letter: where it was, its key and detail, the start of its value.
fn sample(letter: &DeadLetter) -> String {
    let key = letter.key.as_deref().map_or("(no key)".to_string(), |k| String::from_utf8_lossy(&k[..k.len().min(64)]).into_owned());
    let value: String = String::from_utf8_lossy(&letter.value[..letter.value.len().min(80)]).chars().map(|c| if c.is_control() { '.' } else { c }).collect();
    let detail: String = letter.detail.chars().take(120).collect();
    format!("{}[{}]@{} key={key}: {detail} | {value}", letter.source.0, letter.source.1, letter.source.2)
}

/// A dead letter as `inspect --export` writes it and `replay --file` reads it. Bytes are kept
/// exactly: as text where they are UTF-8, as `{"base64": …}` otherwise, so a replay publishes
/// the key, value and headers it read, byte for byte, except what an operator changed.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Exported {
    #[serde(default)]
    code: String,
    #[serde(default)]
    detail: String,
    #[serde(default)]
    source: Option<(String, i32, i64)>,
    #[serde(default)]
    bounded: bool,
    key: Option<Bytes>,
    value: Bytes,
    #[serde(default)]
    headers: Vec<(String, Bytes)>,
}

/// Bytes in JSON: a string when they are UTF-8, `{"base64": "…"}` otherwise.
#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
#[serde(untagged)]
enum Bytes {
    Text(String),
    Binary { base64: String },
}

impl Bytes {
    fn of(bytes: &[u8]) -> Bytes {
        match std::str::from_utf8(bytes) {
            Ok(text) => Bytes::Text(text.to_string()),
            Err(_) => Bytes::Binary { base64: base64::engine::general_purpose::STANDARD.encode(bytes) },
        }
    }

    fn to_vec(&self) -> anyhow::Result<Vec<u8>> {
        match self {
            Bytes::Text(text) => Ok(text.as_bytes().to_vec()),
            Bytes::Binary { base64 } => base64::engine::general_purpose::STANDARD.decode(base64).context("not base64"),
        }
    }
}

impl From<&DeadLetter> for Exported {
    fn from(letter: &DeadLetter) -> Exported {
        Exported {
            code: letter.code.clone(),
            detail: letter.detail.clone(),
            source: Some(letter.source.clone()),
            bounded: letter.bounded,
            key: letter.key.as_deref().map(Bytes::of),
            value: Bytes::of(&letter.value),
            headers: letter.headers.iter().map(|(k, v)| (k.clone(), Bytes::of(v))).collect(),
        }
    }
}

/// Sends the lines of `path` (each an [`Exported`]), for `tenant` only when given; a line that
/// is not one is sent as an error, which stops the replay there.
fn read_file(path: &std::path::Path, tenant: Option<&str>, send: &tokio::sync::mpsc::Sender<anyhow::Result<Exported>>) -> anyhow::Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let letter = serde_json::from_str::<Exported>(&line)
            .with_context(|| format!("{} line {}: not a dead letter as `inspect --export` writes one", path.display(), i + 1));
        let wanted = letter.as_ref().map_or(true, |l| tenant.is_none_or(|t| l.key == Some(Bytes::Text(t.to_string()))));
        if wanted && send.blocking_send(letter).is_err() {
            break;
        }
    }
    Ok(())
}

/// What a replay did.
struct Replayed {
    sent: u64,
    /// Skipped: bounded forms hold no original.
    bounded: u64,
    /// Skipped: without a key there is no tenant to route by.
    keyless: u64,
}

/// Publishes what `letters` brings to `topic`, until it ends or brings an error.
async fn replay(config: &CliConfig, topic: &str, mut letters: tokio::sync::mpsc::Receiver<anyhow::Result<Exported>>) -> anyhow::Result<Replayed> {
    let publisher = EventPublisher::new(&config.kafka, topic).context("creating the publisher")?;
    let (mut sent, mut bounded, mut keyless) = (0u64, 0u64, 0u64);
    while let Some(letter) = letters.recv().await {
        let letter = letter?;
        if letter.bounded {
            bounded += 1;
            continue;
        }
        let key = match &letter.key {
            Some(key) => key.to_vec().context("the key")?,
            None => Vec::new(),
        };
        if key.is_empty() {
            keyless += 1;
            continue;
        }
        let value = letter.value.to_vec().context("the value")?;
        let headers =
            letter.headers.iter().map(|(k, v)| Ok((k.as_str(), v.to_vec().with_context(|| format!("header {k}"))?))).collect::<anyhow::Result<Vec<_>>>()?;
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        publisher.publish(Some(&key), &value, &headers).await.with_context(|| format!("publishing to {topic}"))?;
        sent += 1;
    }
    Ok(Replayed { sent, bounded, keyless })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_line_keeps_every_byte_of_key_value_and_headers() {
        let letter = DeadLetter {
            partition: 1,
            offset: 7,
            code: "not_json".into(),
            detail: "expected value at line 1".into(),
            source: ("tally.events".into(), 3, 1042),
            bounded: false,
            key: Some(b"acme".to_vec()),
            value: vec![0xff, 0xfe, b'{', 0x00],
            headers: vec![("trace".into(), b"t-9".to_vec()), ("raw".into(), vec![0xc3, 0x28])],
        };
        let line = serde_json::to_string(&Exported::from(&letter)).unwrap();
        assert!(line.contains(r#""key":"acme""#) && line.contains(r#""value":{"base64":"//57AA=="}"#), "{line}");
        let back: Exported = serde_json::from_str(&line).unwrap();
        assert_eq!(back.key.unwrap().to_vec().unwrap(), b"acme");
        assert_eq!(back.value.to_vec().unwrap(), letter.value);
        let headers: Vec<(String, Vec<u8>)> = back.headers.iter().map(|(k, v)| (k.clone(), v.to_vec().unwrap())).collect();
        assert_eq!(headers, letter.headers);
    }

    #[test]
    fn a_line_with_an_unknown_member_or_bad_base64_is_refused() {
        assert!(serde_json::from_str::<Exported>(r#"{"key":"a","value":"v","colour":"red"}"#).is_err());
        let bad: Exported = serde_json::from_str(r#"{"key":"a","value":{"base64":"!!"}}"#).unwrap();
        assert!(bad.value.to_vec().is_err());
    }
}
