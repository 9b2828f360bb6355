//! Storage candidates for the partition as the unit of durability (issue #13; run with
//! `scripts/bench.sh storage`). The question: what makes the records of thousands of tenants,
//! and the Merkle nodes they complete, durable with one `fdatasync` per group commit, without a
//! file per tenant?
//!
//! Every candidate gets the same work: `TALLY_BENCH_APPENDS` 300-byte entries spread round-robin
//! over `T` tenants, one group commit per 1,000 appends. The leaf hash and each tenant's
//! in-memory Merkle frontier are computed outside the candidate (every design needs them); the
//! candidate stores the entry and the nodes it completes, keyed by (tenant, index), and makes
//! them durable at each commit. Reported per candidate and tenant count: appends/s, its ratio to
//! the SHA-256 floor measured in the same run, bytes on disk per entry, open descriptors.
//!
//! * `tenant-files`: today's layout, a `TenantLog` (entries, hashes, index, head) per tenant,
//!   each touched log committed at every group commit (its own fsyncs).
//! * `journal`: `tally_log::Journal`, append-only segments per partition, checksummed frames
//!   (tenant id, seq, entry, nodes), one `fdatasync` per commit. Reads by (tenant, seq) need an
//!   index beside it, not included here.
//! * `partition-log`: `tally_log::PartitionLog`, the journal with its segment indexes and tenant
//!   heads (hashing and frontiers inside it, as `tenant-files`): what the ledger will write.
//! * `redb`: one redb database per partition (the B-tree store the ledger already uses for
//!   dedup keys), tables (tenant, seq) → entry and (tenant, node position) → hash, one write
//!   transaction (`Durability::Immediate`) per commit.
//! * `fjall`: one fjall database (an LSM tree with a write-ahead journal), keyspaces as redb's,
//!   one write batch plus `persist(SyncData)` per commit.
//!
//! To count the sync calls of one candidate: `TALLY_BENCH_ONLY=journal strace -f -c -e
//! trace=fsync,fdatasync <bench binary>`. Settings: `TALLY_BENCH_APPENDS` (200000),
//! `TALLY_BENCH_TENANTS` (comma-separated, default `1,10000,100000`), `TALLY_BENCH_ONLY`.

mod support;

use std::path::Path;
use std::time::Instant;

use redb::{ReadableDatabase, TableDefinition};
use support::{entry, env, ENTRY_BYTES};

/// Appends per group commit.
const COMMIT_EVERY: u64 = 1_000;
use tally_log::merkle::{leaf_hash, Frontier, Hash};

/// Today's layout holds three descriptors per tenant for the life of the process.
const TENANT_FILES_MAX_TENANTS: u64 = 5_000;

const ENTRIES: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("entries");
const NODES: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("nodes");

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn disk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let meta = match e.metadata() {
            Ok(m) => m,
            Err(_) => continue,
        };
        total += if meta.is_dir() { disk_bytes(&e.path()) } else { meta.len() };
    }
    total
}

/// What a candidate does with each record, and at each group commit.
trait Candidate {
    /// Stores entry `seq` of tenant `tenant` and the nodes it completes (`nodes[0]` is its
    /// leaf hash; node positions follow the post-order layout, starting at `first_node`).
    fn append(&mut self, tenant: u32, seq: u64, entry: &[u8], first_node: u64, nodes: &[Hash]);
    /// Makes everything appended so far durable.
    fn commit(&mut self);
}

/// `tally_log::Journal` itself: the candidate chosen, measured as built.
struct JournalCandidate {
    journal: tally_log::Journal,
}

impl Candidate for JournalCandidate {
    fn append(&mut self, tenant: u32, seq: u64, entry: &[u8], _first_node: u64, nodes: &[Hash]) {
        let record = tally_log::RecordFrame { tenant: format!("t{tenant}"), seq, entry: entry.to_vec(), nodes: nodes.to_vec(), sealed: None };
        self.journal.append(&record).unwrap();
    }

    fn commit(&mut self) {
        self.journal.commit(None).unwrap();
    }
}

/// `tally_log::PartitionLog`: the journal plus segment indexes and tenant heads (it hashes and
/// keeps frontiers itself, like `tenant-files`).
struct PartitionLogCandidate {
    log: tally_log::PartitionLog,
    names: Vec<String>,
}

impl Candidate for PartitionLogCandidate {
    fn append(&mut self, tenant: u32, _seq: u64, entry: &[u8], _first_node: u64, _nodes: &[Hash]) {
        self.log.append(&self.names[tenant as usize], entry).unwrap();
    }

    fn commit(&mut self) {
        self.log.commit(None).unwrap();
    }
}

/// One record waiting for the next write transaction.
struct Pending {
    tenant: u32,
    seq: u64,
    entry: Vec<u8>,
    first_node: u64,
    nodes: Vec<Hash>,
}

struct Redb {
    db: redb::Database,
    pending: Vec<Pending>,
}

impl Candidate for Redb {
    fn append(&mut self, tenant: u32, seq: u64, entry: &[u8], first_node: u64, nodes: &[Hash]) {
        self.pending.push(Pending { tenant, seq, entry: entry.to_vec(), first_node, nodes: nodes.to_vec() });
    }

    fn commit(&mut self) {
        let tx = self.db.begin_write().unwrap();
        {
            let mut entries = tx.open_table(ENTRIES).unwrap();
            let mut nodes = tx.open_table(NODES).unwrap();
            for p in self.pending.drain(..) {
                entries.insert((p.tenant, p.seq), p.entry.as_slice()).unwrap();
                for (i, h) in p.nodes.iter().enumerate() {
                    nodes.insert((p.tenant, p.first_node + i as u64), h.as_slice()).unwrap();
                }
            }
        }
        tx.commit().unwrap();
    }
}

struct Fjall {
    db: fjall::Database,
    entries: fjall::Keyspace,
    nodes: fjall::Keyspace,
    batch: Option<fjall::OwnedWriteBatch>,
}

fn fjall_key(tenant: u32, n: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&tenant.to_be_bytes());
    k[4..].copy_from_slice(&n.to_be_bytes());
    k
}

impl Candidate for Fjall {
    fn append(&mut self, tenant: u32, seq: u64, entry: &[u8], first_node: u64, nodes: &[Hash]) {
        let batch = self.batch.get_or_insert_with(|| self.db.batch());
        batch.insert(&self.entries, fjall_key(tenant, seq), entry);
        for (i, h) in nodes.iter().enumerate() {
            batch.insert(&self.nodes, fjall_key(tenant, first_node + i as u64), h.as_slice());
        }
    }

    fn commit(&mut self) {
        if let Some(batch) = self.batch.take() {
            batch.commit().unwrap();
        }
        self.db.persist(fjall::PersistMode::SyncData).unwrap();
    }
}

/// Today's layout: a `TenantLog` per tenant; a commit commits each touched log.
struct TenantFiles {
    logs: Vec<tally_log::TenantLog>,
    touched: Vec<u32>,
}

impl Candidate for TenantFiles {
    fn append(&mut self, tenant: u32, _seq: u64, entry: &[u8], _first_node: u64, _nodes: &[Hash]) {
        // TenantLog hashes and stores its own nodes.
        self.logs[tenant as usize].append(entry).unwrap();
        self.touched.push(tenant);
    }

    fn commit(&mut self) {
        self.touched.sort_unstable();
        self.touched.dedup();
        for t in self.touched.drain(..) {
            self.logs[t as usize].commit().unwrap();
        }
    }
}

/// Runs `appends` appends over `tenants` tenants into `c`: appends/s.
fn run(c: &mut dyn Candidate, tenants: u64, appends: u64) -> f64 {
    let mut frontiers = vec![Frontier::default(); tenants as usize];
    let mut buf = Vec::with_capacity(ENTRY_BYTES);
    let mut nodes = Vec::with_capacity(64);
    let start = Instant::now();
    for i in 0..appends {
        let t = (i % tenants) as usize;
        let seq = frontiers[t].size();
        entry(i, &mut buf);
        nodes.clear();
        let first_node = tally_log::merkle::stored_nodes(seq);
        frontiers[t].push(leaf_hash(&buf), &mut nodes);
        c.append(t as u32, seq, &buf, first_node, &nodes);
        if (i + 1) % COMMIT_EVERY == 0 {
            c.commit();
        }
    }
    c.commit();
    appends as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let appends = env("TALLY_BENCH_APPENDS", 200_000);
    let tenant_counts: Vec<u64> =
        std::env::var("TALLY_BENCH_TENANTS").unwrap_or_else(|_| "1,10000,100000".into()).split(',').filter_map(|t| t.trim().parse().ok()).collect();
    let only = std::env::var("TALLY_BENCH_ONLY").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);

    // Baselines from this run: hashing the same bytes, and signing a checkpoint.
    let mut buf = Vec::with_capacity(ENTRY_BYTES);
    let start = Instant::now();
    let mut acc = 0u8;
    for i in 0..appends {
        entry(i, &mut buf);
        acc ^= leaf_hash(&buf)[0];
    }
    let floor = appends as f64 / start.elapsed().as_secs_f64();
    println!("SHA-256 leaf hashing of {ENTRY_BYTES}-byte entries (the floor): {floor:.0}/s [{acc}]");
    let key = tally_log::LedgerKey::generate("bench.tally.example").unwrap();
    let signer = key.signer_for("t0").unwrap();
    let start = Instant::now();
    let signatures = 20_000;
    for i in 0..signatures {
        let cp = tally_log::Checkpoint { origin: "bench.tally.example/t/t0".into(), size: i, root: [7; 32] };
        cp.sign(std::slice::from_ref(&signer)).unwrap();
    }
    println!("Ed25519 checkpoint signatures: {:.0}/s", signatures as f64 / start.elapsed().as_secs_f64());
    println!("appends: {appends}, 300-byte entries, a group commit every {COMMIT_EVERY} appends\n");
    println!("| candidate | tenants | appends/s | of the floor | bytes on disk per entry | descriptors open |");
    println!("| --- | --- | --- | --- | --- | --- |");

    for &tenants in &tenant_counts {
        let report = |name: &str, rate: f64, dir: &Path, fds: usize| {
            println!("| {name} | {tenants} | {rate:.0} | {:.3} | {:.0} | {fds} |", rate / floor, disk_bytes(dir) as f64 / appends as f64);
        };
        if wanted("tenant-files") {
            if tenants > TENANT_FILES_MAX_TENANTS {
                println!("| tenant-files | {tenants} | not run: 3 descriptors per tenant would pass the open-file limit | | | |");
            } else {
                let dir = tempfile::tempdir().unwrap();
                let logs = (0..tenants).map(|t| tally_log::TenantLog::open(&dir.path().join(format!("t{t}"))).unwrap()).collect();
                let mut c = TenantFiles { logs, touched: Vec::new() };
                // Fewer appends: every commit syncs up to 1,000 tenants' files.
                let n = (appends / 10).max(COMMIT_EVERY);
                let rate = run(&mut c, tenants, n);
                let fds = open_descriptors();
                println!("| tenant-files | {tenants} | {rate:.0} | {:.3} | {:.0} | {fds} |", rate / floor, disk_bytes(dir.path()) as f64 / n as f64);
            }
        }
        if wanted("journal") {
            let dir = tempfile::tempdir().unwrap();
            let (journal, _) = tally_log::Journal::open(dir.path(), tally_log::DEFAULT_SEGMENT_BYTES).unwrap();
            let mut c = JournalCandidate { journal };
            let rate = run(&mut c, tenants, appends);
            report("journal", rate, dir.path(), open_descriptors());
        }
        if wanted("partition-log") {
            let dir = tempfile::tempdir().unwrap();
            let log = tally_log::PartitionLog::open(dir.path(), tally_log::DEFAULT_SEGMENT_BYTES).unwrap();
            let mut c = PartitionLogCandidate { log, names: (0..tenants).map(|t| format!("t{t}")).collect() };
            let rate = run(&mut c, tenants, appends);
            let fds = open_descriptors();
            assert_eq!(c.log.entry("t0", 0).unwrap().len(), ENTRY_BYTES);
            report("partition-log", rate, dir.path(), fds);
        }
        if wanted("redb") {
            let dir = tempfile::tempdir().unwrap();
            let db = redb::Database::create(dir.path().join("partition.redb")).unwrap();
            let mut c = Redb { db, pending: Vec::new() };
            let rate = run(&mut c, tenants, appends);
            let fds = open_descriptors();
            // A read, so the store is not write-only in the comparison's eyes.
            let read = c.db.begin_read().unwrap();
            assert!(read.open_table(ENTRIES).unwrap().get((0, 0)).unwrap().is_some());
            drop(read);
            drop(c);
            report("redb", rate, dir.path(), fds);
        }
        if wanted("fjall") {
            let dir = tempfile::tempdir().unwrap();
            let db = fjall::Database::builder(dir.path().join("fjall")).open().unwrap();
            let entries = db.keyspace("entries", fjall::KeyspaceCreateOptions::default).unwrap();
            let nodes = db.keyspace("nodes", fjall::KeyspaceCreateOptions::default).unwrap();
            let mut c = Fjall { db, entries, nodes, batch: None };
            let rate = run(&mut c, tenants, appends);
            let fds = open_descriptors();
            assert!(c.entries.get(fjall_key(0, 0)).unwrap().is_some());
            drop(c);
            report("fjall", rate, dir.path(), fds);
        }
    }
}
