//! Bad state at start (issue #19, item 3): the real `tally ledger` binary, started on a data
//! directory or key that cannot be used, exits non-zero with an error naming the path, and
//! leaves every file as it was. Each case starts from a copy of one good data directory, made by
//! the service from real events on the broker.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use tally_ingest::EventPublisher;

/// Every file under `dir` (relative path → bytes): what "nothing modified" compares.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_under(dir).into_iter().map(|path| (path.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&path).unwrap())).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// What a start of the binary did: its exit status and stderr. A start that is still running
/// after 60 s is a failure of the test: every case here must stop by itself.
fn start(config: &Path, wrap: &[&str]) -> (std::process::ExitStatus, String) {
    let mut command = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = std::process::Command::new(first);
            c.args(rest).arg(env!("CARGO_BIN_EXE_tally"));
            c
        }
        None => std::process::Command::new(env!("CARGO_BIN_EXE_tally")),
    };
    let mut child = command
        .args(["--config", config.to_str().unwrap(), "ledger"])
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .env_remove("KAFKA_BOOTSTRAP")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start tally ledger");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the ledger started on bad state instead of refusing it");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Case {
    root: tempfile::TempDir,
    data: PathBuf,
    key: PathBuf,
    config: PathBuf,
}

impl Case {
    /// A copy of `good` (data directory and key) with its own config file.
    fn of(good: &Path, key: &Path, topic: &str) -> Case {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        copy_dir(good, &data);
        let case_key = root.path().join("ledger.key");
        std::fs::copy(key, &case_key).unwrap();
        let config = root.path().join("ledger.toml");
        let case = Case { root, data, key: case_key, config };
        case.write_config(&case.data, &case.key, topic);
        case
    }

    fn write_config(&self, data: &Path, key: &Path, topic: &str) {
        let text = format!(
            "[kafka]\nbootstrap = \"{}\"\n[ledger]\ndata_dir = \"{}\"\nkeys = [\"{}\"]\ntopic = \"{topic}\"\ngroup = \"{topic}.g\"\nbudget_topic = \"{topic}.budget\"\nlisten = \"127.0.0.1:0\"\n",
            kafka().bootstrap,
            data.display(),
            key.display()
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// Starts the binary and asserts it refused: non-zero exit, `names` in its error, and every
    /// file of the data directory as it was.
    fn refuses(&self, wrap: &[&str], names: &str) -> String {
        let before = snapshot(&self.data);
        let (status, err) = start(&self.config, wrap);
        assert!(!status.success(), "the ledger exited successfully on bad state: {err}");
        assert!(err.contains(names), "the error does not name {names}: {err}");
        let after = snapshot(&self.data);
        let changed: Vec<_> =
            after.iter().filter(|(p, b)| before.get(*p) != Some(b)).map(|(p, _)| p).chain(before.keys().filter(|p| !after.contains_key(*p))).collect();
        assert!(changed.is_empty(), "a refused start modified {changed:?}: {err}");
        err
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_bad_state_names_the_path_exits_non_zero_and_modifies_nothing() {
    let kafka = kafka();
    // One partition: a case damages it, and no other partition is opened meanwhile.
    let LedgerFixture { topic, dir, key_path, .. } = ledger_fixture("badstate", 1).await;
    let good = dir.path().join("data");
    std::fs::create_dir(&good).unwrap();
    let publisher = EventPublisher::new(&kafka, &topic).unwrap();
    for i in 0..12 {
        publisher.publish(Some(b"acme"), &event_json("acme", &format!("e-{i}"), 10), &[]).await.unwrap();
    }
    let running = start_ledger(&good, &key_path, &topic, &format!("{topic}.g"), 50).await;
    running.wait_for(&BTreeMap::from([("acme".to_string(), 12)])).await;
    running.stop().await;
    let partition = good.join("partitions").join(format!("{topic}-0"));
    assert!(partition.join("journal").join("00000000000000000000.seg").is_file() && partition.join("state.redb").is_file());

    tokio::task::block_in_place(|| {
        // A data directory whose parent is missing (a typo, a volume not mounted): not created.
        let case = Case::of(&good, &key_path, &topic);
        let missing = case.root.path().join("not-mounted").join("data");
        case.write_config(&missing, &case.key, &topic);
        case.refuses(&[], "not-mounted");
        assert!(!case.root.path().join("not-mounted").exists());

        // A read-only data directory: a read-only bind mount in a mount namespace of the
        // ledger's own (root ignores permission bits; a read-only mount stops everyone).
        let case = Case::of(&good, &key_path, &topic);
        let data = case.data.to_str().unwrap().to_string();
        let script = format!("mount --bind {data} {data} && mount -o remount,bind,ro {data} && exec \"$@\"");
        let err = case.refuses(&["unshare", "--mount", "--map-root-user", "sh", "-c", &script, "sh"], &data);
        assert!(err.contains("Read-only file system"), "{err}");

        // A missing key, and one that is not a key.
        let case = Case::of(&good, &key_path, &topic);
        std::fs::remove_file(&case.key).unwrap();
        case.refuses(&[], case.key.to_str().unwrap());
        let case = Case::of(&good, &key_path, &topic);
        std::fs::write(&case.key, b"not a key\n").unwrap();
        case.refuses(&[], case.key.to_str().unwrap());

        // A bit flipped inside acknowledged records of the journal: refused, not cut.
        let case = Case::of(&good, &key_path, &topic);
        let segment = case.data.join("partitions").join(format!("{topic}-0")).join("journal").join("00000000000000000000.seg");
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[100] ^= 0x10;
        std::fs::write(&segment, &bytes).unwrap();
        let err = case.refuses(&[], segment.to_str().unwrap());
        assert!(err.contains("acknowledged durable"), "{err}");

        // The journal cut short at a commit boundary, and gone altogether.
        let case = Case::of(&good, &key_path, &topic);
        let segment = case.data.join("partitions").join(format!("{topic}-0")).join("journal").join("00000000000000000000.seg");
        std::fs::OpenOptions::new().write(true).open(&segment).unwrap().set_len(8).unwrap();
        case.refuses(&[], segment.to_str().unwrap());
        let case = Case::of(&good, &key_path, &topic);
        let journal = case.data.join("partitions").join(format!("{topic}-0")).join("journal");
        std::fs::remove_file(journal.join("00000000000000000000.seg")).unwrap();
        case.refuses(&[], journal.to_str().unwrap());

        // The partition's state store and the pinned partition count, overwritten.
        let case = Case::of(&good, &key_path, &topic);
        let state = case.data.join("partitions").join(format!("{topic}-0")).join("state.redb");
        std::fs::write(&state, vec![0x5a; 4096]).unwrap();
        case.refuses(&[], state.to_str().unwrap());
        let case = Case::of(&good, &key_path, &topic);
        let count = case.data.join("partitions").join(format!("{topic}.partition-count"));
        std::fs::write(&count, b"many\n").unwrap();
        case.refuses(&[], count.to_str().unwrap());
    });
}
