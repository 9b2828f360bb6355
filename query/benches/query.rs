//! Query benchmark: generates a projection of N events over T tenants and D days (through the
//! ledger's own record encoding and projection writer, so files look like the ledger's), then
//! times the reports the service answers, in process:
//! * the big tenant's monthly cost report (by day, agent and model, from the roll-ups);
//! * the billing spend of every tenant for the month;
//! * an audit-trail page of 1,000 rows in the middle of the big tenant's log.
//!
//! `scripts/bench.sh query` runs it, then `bench/duckdb_compare.py` runs the same SQL through
//! DuckDB over the same files in the same run. Arguments (after `--`): `--events N`
//! (default 10,000,000), `--tenants T` (100), `--days D` (30), `--runs R` (20), `--dir PATH`
//! (default: a new temporary directory, kept), `--sizes uniform|zipf` (default `uniform`: the
//! first tenant holds 20% of the events and the others equal shares; `zipf`: tenant `i` holds a
//! share proportional to 1/(i+1)^0.9, so at 100,000 tenants the first holds about 5% and the
//! median tenant a few hundred events per 100M, as issue #17 asks). With `zipf`, the median
//! tenant's monthly report is timed as well (a small tenant).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_log::{event_record, EventInput, Source};
use tally_query::reports::{costs, events_page, spend, CostQuery, Dim, EventFilter, SpendCalendar};
use tally_query::{Engine, QueryConfig};

struct Args {
    events: u64,
    tenants: u64,
    days: i64,
    runs: usize,
    dir: Option<PathBuf>,
    zipf: bool,
}

/// The exponent of the Zipf sizes: at 100,000 tenants the largest holds about 5% of the events.
const ZIPF_EXPONENT: f64 = 0.9;

/// Events per tenant, largest first: every tenant has at least one (billing lists it).
fn tenant_sizes(a: &Args) -> Vec<u64> {
    if a.zipf {
        let weights: Vec<f64> = (0..a.tenants).map(|i| 1.0 / ((i + 1) as f64).powf(ZIPF_EXPONENT)).collect();
        let total: f64 = weights.iter().sum();
        return weights.iter().map(|w| ((a.events as f64 * w / total).round() as u64).max(1)).collect();
    }
    // The big tenant's share plus an equal share for each other one (N minus the rounding of
    // (N - big) / (T - 1)).
    let big = a.events / 5;
    let per_other = (a.events - big) / (a.tenants - 1).max(1);
    (0..a.tenants).map(|i| if i == 0 { big } else { per_other }).collect()
}

fn args() -> Args {
    let mut a = Args { events: 10_000_000, tenants: 100, days: 30, runs: 20, dir: None, zipf: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--events" => a.events = value().parse().expect("--events N"),
            "--tenants" => a.tenants = value().parse().expect("--tenants T"),
            "--days" => a.days = value().parse().expect("--days D"),
            "--runs" => a.runs = value().parse().expect("--runs R"),
            "--dir" => a.dir = Some(PathBuf::from(value())),
            "--sizes" => {
                a.zipf = match value().as_str() {
                    "zipf" => true,
                    "uniform" => false,
                    other => panic!("--sizes uniform|zipf, not {other}"),
                }
            }
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

const AGENTS: usize = 20;
const MODELS: [&str; 10] =
    ["gpt-5", "gpt-5-mini", "claude-opus", "claude-sonnet", "gemini-pro", "search", "crm.update", "s3.put_object", "email.send", "sql.query"];

/// Partitions the generated tenants are spread over, as the ledger spreads them.
const PARTITIONS: i32 = 16;
/// Records buffered per partition before they are written as one flush of its projection.
const FLUSH_RECORDS: usize = 100_000;

/// One partition's buffered records, by tenant.
type Buffered = std::collections::BTreeMap<String, Vec<Vec<u8>>>;

/// The partitions' projections being generated: each buffers records of many tenants and writes
/// them as one flush (files shared by the tenants), as the ledger's projector does.
struct Generator {
    data: PathBuf,
    zones: Vec<(String, jiff::tz::TimeZone)>,
    buffers: Vec<(Buffered, usize)>,
    /// Bytes the flushes wrote, and bytes their merges wrote again.
    written: (u64, u64),
}

impl Generator {
    /// Pins the partition count and creates the partition directories, so the query service
    /// finds each tenant's partition as it would under a ledger.
    fn new(data: &Path) -> Generator {
        let partitions = data.join("partitions");
        for p in 0..PARTITIONS {
            std::fs::create_dir_all(partitions.join(format!("tally.events-{p}")).join(tally_log::JOURNAL_DIR)).expect("partition directory");
        }
        std::fs::write(partitions.join("tally.events.partition-count"), format!("{PARTITIONS}\n")).expect("partition count");
        let zones = tally_projection::report_zones(&["UTC".to_string()]).expect("zones");
        Generator { data: data.to_path_buf(), zones, buffers: (0..PARTITIONS).map(|_| Default::default()).collect(), written: (0, 0) }
    }

    fn push(&mut self, tenant: &str, record: Vec<u8>) {
        let p = tally_schemas::tenant_partition(tenant, PARTITIONS);
        let (buffer, n) = &mut self.buffers[p as usize];
        buffer.entry(tenant.to_string()).or_default().push(record);
        *n += 1;
        if *n >= FLUSH_RECORDS {
            self.flush(p);
        }
    }

    fn flush(&mut self, p: i32) {
        let (buffer, n) = std::mem::take(&mut self.buffers[p as usize]);
        if n > 0 {
            let root = self.data.join("parquet");
            let report =
                tally_projection::append_records(&root, &format!("tally.events-{p}"), buffer.into_iter().collect(), &self.zones).expect("projection write");
            self.written.0 += report.bytes;
            self.written.1 += report.merge_bytes;
        }
    }

    /// Writes what is buffered; returns the bytes flushes wrote and the bytes merges wrote.
    fn finish(mut self) -> (u64, u64) {
        for p in 0..PARTITIONS {
            self.flush(p);
        }
        self.written
    }
}

/// The projection unit (partition directory) holding `tenant`, as the generator placed it.
fn unit_of(tenant: &str) -> String {
    format!("tally.events-{}", tally_schemas::tenant_partition(tenant, PARTITIONS))
}

/// Generates `count` events of `tenant`, spread evenly over `days` days from 2026-11-01.
fn generate_tenant(generator: &mut Generator, tenant: &str, count: u64, days: i64, rng: &mut StdRng) {
    let start = jiff::Timestamp::from_second(1_793_491_200).expect("2026-11-01T00:00:00Z");
    let span_us = days * 86_400 * 1_000_000;
    let mut task = 0u64;
    for i in 0..count {
        if rng.gen_ratio(1, 20) {
            task += 1;
        }
        let at = start + jiff::SignedDuration::from_micros((i as i128 * span_us as i128 / count.max(1) as i128) as i64);
        let kind = match rng.gen_range(0..100) {
            0..70 => "llm_call",
            70..95 => "tool_call",
            _ => "policy_decision",
        };
        let mut value = serde_json::json!({
            "event_id": format!("{:032x}", rng.gen::<u128>()),
            "tenant_id": tenant,
            "occurred_at": at.to_string(),
            "kind": kind,
            "decision": if rng.gen_ratio(1, 50) { "deny" } else { "allow" },
            "agent_id": format!("agent-{}", rng.gen_range(0..AGENTS)),
            "action": MODELS[rng.gen_range(0..MODELS.len())],
            "task_id": format!("task-{task}"),
        });
        if kind == "llm_call" {
            value["usage"] = serde_json::json!({"input_tokens": rng.gen_range(100..4000), "output_tokens": rng.gen_range(10..1000)});
            value["cost"] = serde_json::json!({"amount_micros": rng.gen_range(100..50_000), "currency": "USD"});
        }
        let event: tally_schemas::Event = serde_json::from_value(value).expect("generated event");
        let digest: [u8; 32] = rng.gen();
        let source = Source::Kafka { topic: "tally.events".into(), partition: 0, offset: i as i64, timestamp_ms: Some(at.as_millisecond()) };
        generator.push(tenant, event_record(i, EventInput { event: &event, ce_source: None, payload_sha256: &digest, source: &source }, None).expect("record"));
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| if e.path().is_dir() { dir_bytes(&e.path()) } else { e.metadata().map_or(0, |m| m.len()) }).sum()
}

fn file_count(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| if e.path().is_dir() { file_count(&e.path()) } else { u64::from(e.file_name().to_string_lossy().ends_with(".parquet")) }).sum()
}

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i].as_secs_f64() * 1000.0
}

fn main() {
    let a = args();
    let dir = a.dir.clone().unwrap_or_else(|| tempfile::Builder::new().prefix("tally-query-bench").tempdir().expect("temp dir").keep());
    let data = dir.join("data");
    let root = data.join("parquet");
    let sizes = tenant_sizes(&a);
    let big = sizes[0];
    let width = a.tenants.saturating_sub(1).to_string().len().max(3);
    let tenant = |i: u64| format!("t{i:0width$}");
    let small = a.zipf.then_some(a.tenants / 2);
    let total_events: u64 = sizes.iter().sum();
    if root.exists() {
        println!("reusing the projection under {}", root.display());
    } else {
        let started = Instant::now();
        let mut rng = StdRng::seed_from_u64(7);
        let mut generator = Generator::new(&data);
        for (i, count) in sizes.iter().enumerate() {
            generate_tenant(&mut generator, &tenant(i as u64), *count, a.days, &mut rng);
        }
        let (flushed, merged) = generator.finish();
        println!(
            "compaction: flushes wrote {:.1} MiB, merges {:.1} MiB: write amplification {:.2}",
            flushed as f64 / 1048576.0,
            merged as f64 / 1048576.0,
            (flushed + merged) as f64 / flushed.max(1) as f64
        );
        println!("generated {} events over {} tenants and {} days in {:.1} s", total_events, a.tenants, a.days, started.elapsed().as_secs_f64());
    }
    let events_bytes = dir_bytes(&root.join("events"));
    let rollup_bytes = dir_bytes(&root.join("rollups")) + dir_bytes(&root.join("daily"));

    let config: QueryConfig = toml::from_str(&format!("data_dir = {:?}\nquery_timeout_ms = 300000\nquery_memory_mb = 4096\n", data)).expect("config");
    let engine = Engine::new(&config);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let timeout = Duration::from_secs(600);
    let month_start: jiff::Timestamp = "2026-11-01T00:00:00Z".parse().expect("date");
    let month_end: jiff::Timestamp = "2026-12-01T00:00:00Z".parse().expect("date");
    let report =
        CostQuery { from: month_start, to: month_end, tz: jiff::tz::TimeZone::UTC, group_by: vec![Dim::Day, Dim::Agent, Dim::Action], billing_period: None };
    let page = EventFilter { after: Some(big / 2), limit: 1000, ..EventFilter::default() };
    let mut timings: Vec<(&str, Vec<Duration>)> =
        vec![("tenant_monthly_report", vec![]), ("billing_spend", vec![]), ("audit_page", vec![]), ("small_tenant_monthly_report", vec![])];
    let mut report_rows = 0;
    let mut report_source = "";
    for run in 0..=a.runs {
        let t = Instant::now();
        let answer = rt.block_on(costs(&engine, &tenant(0), &report, timeout)).expect("cost report");
        let d0 = t.elapsed();
        (report_rows, report_source) = (answer.rows.len(), answer.source);
        let t = Instant::now();
        let spent = rt.block_on(spend(&engine, "2026-11", SpendCalendar::Month, timeout)).expect("spend");
        let d1 = t.elapsed();
        assert_eq!(spent.len() as u64, a.tenants);
        let t = Instant::now();
        let (_, batches, _) = rt.block_on(events_page(&engine, &tenant(0), &page, timeout)).expect("audit page");
        let d2 = t.elapsed();
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1000);
        let d3 = small.map(|i| {
            let t = Instant::now();
            rt.block_on(costs(&engine, &tenant(i), &report, timeout)).expect("small tenant's cost report");
            t.elapsed()
        });
        if run > 0 {
            // Run 0 warms the page cache, as a long-running service's would be.
            timings[0].1.push(d0);
            timings[1].1.push(d1);
            timings[2].1.push(d2);
            timings[3].1.extend(d3);
        }
    }
    timings.retain(|(_, samples)| !samples.is_empty());
    println!("projection: {} under {}", total_events, root.display());
    println!(
        "  events tree: {:.1} MiB in {} files, {:.1} bytes/event",
        events_bytes as f64 / 1048576.0,
        file_count(&root.join("events")),
        events_bytes as f64 / total_events as f64
    );
    println!(
        "  roll-ups:    {:.1} MiB in {} files, 15-minute and daily ({:.2} bytes/event)",
        rollup_bytes as f64 / 1048576.0,
        file_count(&root.join("rollups")) + file_count(&root.join("daily")),
        rollup_bytes as f64 / total_events as f64
    );
    println!("  big tenant {}: {big} events; monthly report has {report_rows} rows (from the {report_source} roll-ups)", tenant(0));
    if let Some(i) = small {
        println!("  small tenant {}: {} events (the median size)", tenant(i), sizes[i as usize]);
    }
    let files = file_count(&root);
    println!("  files in the projection: {files}");
    let mut json = serde_json::json!({
        "root": root, "events": total_events, "tenants": a.tenants, "days": a.days, "big_tenant": tenant(0), "big_events": big,
        "page_after": big / 2, "events_bytes": events_bytes, "rollup_bytes": rollup_bytes, "runs": a.runs, "files": files,
        "small_tenant": small.map(tenant),
        "big_unit": unit_of(&tenant(0)), "small_unit": small.map(|i| unit_of(&tenant(i))),
    });
    println!("{:<24} {:>9} {:>9}   ({} runs, ms)", "tally (DataFusion)", "p50", "p90", a.runs);
    for (name, samples) in timings.iter_mut() {
        let (p50, p90) = (percentile(samples, 0.5), percentile(samples, 0.9));
        println!("{name:<24} {p50:>9.1} {p90:>9.1}");
        json[format!("{name}_p50_ms")] = p50.into();
    }
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(&json).expect("json")).expect("results.json");
    println!("results: {}", dir.join("results.json").display());
}
