//! Disk full (issue #19, item 2): the real `tally ledger` binary with its data directory on a
//! 16 MiB tmpfs of its own, mounted in a mount namespace made with `unshare` (as
//! tests/ledger_bad_state.rs does). The test fills that filesystem from outside, through
//! `/proc/<pid>/root`, while events arrive:
//! * the partition halts: `/readyz` names the error, `tally_ledger_partitions_halted` is 1, and
//!   its tenants are answered 503 `storage_unavailable`;
//! * the query service over the same files goes on answering from what was projected.
//!
//! Once the space is freed, the ledger opens the partition again by itself, and every event is in
//! its tenant's log and in the projection exactly once, with no temporary file left behind.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use tally_ingest::EventPublisher;

const TENANTS: [&str; 2] = ["acme", "globex"];
/// Events per tenant before the disk fills, and again while it is full.
const EACH: u64 = 25;

/// The binary inside its namespace, SIGKILLed when dropped so a failing test leaves nothing.
struct Namespaced(std::process::Child);

impl Drop for Namespaced {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

async fn text(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, body) = http_get(addr, path).await.expect("the ledger answers");
    (status, String::from_utf8(body).unwrap())
}

/// The served checkpoint size of `tenant`, when it is served.
async fn size(addr: SocketAddr, tenant: &str) -> Option<u64> {
    let (status, body) = text(addr, &format!("/t/{tenant}/checkpoint")).await;
    (status == 200).then(|| body.lines().nth(1).unwrap().parse().unwrap())
}

/// Waits (up to 90 s) for every tenant's log to hold `n` records, failing as soon as one holds more.
async fn wait_for_sizes(addr: SocketAddr, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut done = true;
        for tenant in TENANTS {
            let got = size(addr, tenant).await;
            assert!(got.is_none_or(|g| g <= n), "{tenant} has {got:?} records, more than the {n} sent");
            done &= got == Some(n);
        }
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "the logs did not reach {n} records each");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The event ids the query service serves for `tenant`, if it answers.
async fn served_ids(addr: SocketAddr, tenant: &str) -> Option<Vec<String>> {
    let (200, body) = http_get(addr, &format!("/v1/tenants/{tenant}/events?record_type=event&limit=10000")).await? else { return None };
    let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
    Some(page["rows"].as_array().unwrap().iter().map(|r| r["event_id"].as_str().unwrap().to_string()).collect())
}

async fn publish(publisher: &EventPublisher, from: u64, to: u64) {
    for i in from..to {
        for tenant in TENANTS {
            publisher.publish(Some(tenant.as_bytes()), &event_json(tenant, &format!("{tenant}-{i}"), 10), &[]).await.unwrap();
        }
    }
}

/// Fills the filesystem holding `dir` with `dir/filler` until a write fails; returns that error.
fn fill(dir: &Path) -> std::io::Error {
    let mut filler = std::fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0u8; 64 << 10];
    loop {
        if let Err(e) = filler.write_all(&chunk) {
            return e;
        }
    }
}

/// Temporary files (a write not yet renamed into place) under `dir`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    files_under(dir).into_iter().filter(|path| path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".tmp"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_halts_the_partition_and_it_resumes_by_itself_when_space_returns() {
    let kafka = kafka();
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture_on(&kafka, "diskfull", 1).await;
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = dir.path().join("ledger.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbootstrap = \"{}\"\n[ledger]\ndata_dir = \"{}\"\nkeys = [\"{}\"]\ntopic = \"{topic}\"\nbudget_topic = \"{topic}.budget\"\n\
             commit_interval_ms = 50\nprojection_interval_ms = 200\nlisten = \"{addr}\"\nstatements = false\n",
            kafka.bootstrap,
            data.display(),
            key_path.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("ledger.log");
    // `unshare` without --fork execs the shell in place, and the shell execs the ledger: the
    // child's pid is the ledger's, and `/proc/<pid>/root` shows its mounts.
    let child = std::process::Command::new("unshare")
        .args(["--mount", "--map-root-user", "sh", "-c", r#"mount -t tmpfs -o size=16m tmpfs "$0" && exec "$@""#])
        .arg(&data)
        .arg(env!("CARGO_BIN_EXE_tally"))
        .args(["--config", config.to_str().unwrap(), "ledger"])
        .env("RUST_LOG", "warn,tally_ledger=info")
        .env_remove("KAFKA_BOOTSTRAP")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("unshare");
    let mut ledger = Namespaced(child);
    let inside = PathBuf::from(format!("/proc/{}/root{}", ledger.0.id(), data.display()));
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(addr, "/readyz").await.is_none_or(|(status, _)| status != 200) {
        assert!(ledger.0.try_wait().unwrap().is_none(), "the ledger stopped:\n{}", logged());
        assert!(Instant::now() < deadline, "the ledger never became ready:\n{}", logged());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    publish(&publisher, 0, EACH).await;
    wait_for_sizes(addr, EACH).await;
    // The query service reads the projection on the ledger's tmpfs.
    let (query, _stop_query) = start_query(&inside).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while served_ids(query, "acme").await.is_none_or(|ids| ids.len() < EACH as usize) {
        assert!(Instant::now() < deadline, "the projection never caught up before the disk filled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The disk fills up, then events arrive.
    let full = fill(&inside);
    assert_eq!(full.raw_os_error(), Some(28), "ENOSPC: {full}");
    publish(&publisher, EACH, 2 * EACH).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let (status, ready) = text(addr, "/readyz").await;
        if ready.contains("degraded: partition 0 halted") {
            assert_eq!(status, 503, "its only partition is halted: {ready}");
            break ready;
        }
        assert!(ledger.0.try_wait().unwrap().is_none(), "the ledger stopped instead of halting the partition:\n{}", logged());
        assert!(Instant::now() < deadline, "the partition never halted: {ready}\n{}", logged());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(ready.contains("No space left on device"), "{ready}");
    let (_, metrics) = text(addr, "/metrics").await;
    assert!(metric_sum(&metrics, "tally_ledger_partition_halts_total") >= 1.0, "{metrics}");
    // While the disk is full, an admission is answered 503 storage_unavailable while the
    // partition is halted (or rebalancing, for a request that held it as it stopped), never 500.
    // A reopen may succeed in between (cutting the torn tail frees room in the last page), and
    // a commit that still fits there is durable: then, and only then, a decision (200).
    let mut refused = 0;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, answer) =
            http_post(addr, "/v1/tenants/acme/budget/authorize", &serde_json::json!({"estimate_micros": 1})).await.expect("the ledger answers");
        if status == 200 {
            assert!(answer["decision"].is_string(), "{answer}");
            continue;
        }
        assert_eq!(status, 503, "{answer}");
        let code = answer["error"]["code"].as_str().unwrap_or_default().to_string();
        assert!(code == "storage_unavailable" || code == "rebalancing", "{answer}");
        refused += usize::from(code == "storage_unavailable");
    }
    assert!(refused > 0, "no admission was answered storage_unavailable");
    assert!(ledger.0.try_wait().unwrap().is_none(), "the ledger stopped:\n{}", logged());
    // The query service writes nothing: it answers from what was projected before.
    let served = served_ids(query, "acme").await.expect("the query service answers on a full disk");
    assert!((EACH as usize..=2 * EACH as usize).contains(&served.len()), "{} rows", served.len());

    // Space returns: the partition opens again by itself, and every event lands once.
    std::fs::remove_file(inside.join("filler")).unwrap();
    wait_for_sizes(addr, 2 * EACH).await;
    let (status, ready) = text(addr, "/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert!(!ready.contains("halted"), "{ready}");
    let (_, metrics) = text(addr, "/metrics").await;
    assert_eq!(metric_sum(&metrics, "tally_ledger_partitions_halted"), 0.0, "{metrics}");
    assert!(logged().contains("halted partition opened again"), "{}", logged());
    let deadline = Instant::now() + Duration::from_secs(60);
    for tenant in TENANTS {
        let expected: Vec<String> = (0..2 * EACH).map(|i| format!("{tenant}-{i}")).collect();
        loop {
            let served = served_ids(query, tenant).await.unwrap_or_default();
            let distinct: BTreeMap<&String, usize> = served.iter().fold(BTreeMap::new(), |mut m, id| {
                *m.entry(id).or_default() += 1;
                m
            });
            assert!(distinct.values().all(|n| *n == 1), "a row is projected twice: {distinct:?}");
            if served == expected {
                break;
            }
            assert!(Instant::now() < deadline, "the projection of {tenant} did not catch up: {served:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(temporaries(&inside), Vec::<PathBuf>::new(), "no half-written file is left behind");
    let (status, answer) = http_post(addr, "/v1/tenants/acme/budget/authorize", &serde_json::json!({"estimate_micros": 1})).await.expect("the ledger answers");
    assert_eq!((status, answer["decision"].as_str()), (200, Some("allow")), "{answer}");

    let stopped = std::process::Command::new("kill").args(["-TERM", &ledger.0.id().to_string()]).status().unwrap();
    assert!(stopped.success());
    let status = ledger.0.wait().unwrap();
    assert!(status.success(), "the ledger ran without error: {status}\n{}", logged());
}
