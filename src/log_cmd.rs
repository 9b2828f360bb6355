//! Offline ledger tools: `tally keygen`, `tally vkey`, `tally verify`, `tally log import|receipt`.
//! None of them needs Kafka; `verify` needs nothing but the files an auditor was given.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use tally_ledger::merkle::{verify_consistency, Hash};
use tally_ledger::{event_record, tenant_origin, EventInput, Checkpoint, Ledger, LedgerKey, NoteVerifier, Receipt, Source};
use tally_schemas::Event;

#[derive(clap::Args)]
pub struct KeygenArgs {
    /// Log origin; tenant logs are `<origin>/t/<tenant>` (e.g. tally.example.com).
    #[arg(long)]
    origin: String,
    /// Private key file to create (mode 0600; never overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Keep an existing key file (same origin) instead of failing: for deployments that run
    /// keygen at every start.
    #[arg(long)]
    if_missing: bool,
}

pub fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    if args.if_missing && args.out.exists() {
        let key = LedgerKey::read(&args.out).with_context(|| format!("reading {}", args.out.display()))?;
        anyhow::ensure!(key.origin() == args.origin.trim_end_matches('/'), "{} holds a key for origin {:?}, not {:?}", args.out.display(), key.origin(), args.origin);
        eprintln!("kept the existing private key {}", args.out.display());
        println!("{}", key.origin_verifier()?);
        return Ok(());
    }
    let key = LedgerKey::generate(&args.origin)?;
    key.write_new(&args.out).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote private key {} (mode 0600); tenant vkeys: tally vkey --key {} --tenant <id>", args.out.display(), args.out.display());
    println!("{}", key.origin_verifier()?);
    Ok(())
}

#[derive(clap::Args)]
pub struct VkeyArgs {
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    tenant: String,
}

pub fn vkey(args: VkeyArgs) -> anyhow::Result<()> {
    tally_schemas::validate_tenant_id(&args.tenant)?;
    let key = LedgerKey::read(&args.key)?;
    println!("{}", key.signer_for(&args.tenant)?.verifier());
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum VerifyCommand {
    /// Check a tlog-proof receipt and its entry against a vkey.
    Receipt {
        #[arg(long)]
        vkey: String,
        #[arg(long)]
        receipt: PathBuf,
        #[arg(long)]
        entry: PathBuf,
    },
    /// Check that a newer checkpoint extends an older one (proof: base64 hashes, one per line).
    Consistency {
        #[arg(long)]
        vkey: String,
        #[arg(long)]
        old: PathBuf,
        #[arg(long)]
        new: PathBuf,
        #[arg(long)]
        proof: PathBuf,
    },
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

pub fn verify(command: VerifyCommand) -> anyhow::Result<()> {
    match command {
        VerifyCommand::Receipt { vkey, receipt, entry } => {
            let verifier = NoteVerifier::parse(&vkey)?;
            let receipt = Receipt::parse(&read_text(&receipt)?)?;
            let entry = std::fs::read(&entry).with_context(|| format!("reading {}", entry.display()))?;
            let checkpoint = receipt.verify(&entry, &[verifier], None).context("receipt is not valid")?;
            println!("valid: entry {} is in {} at tree size {}", receipt.index, checkpoint.origin, checkpoint.size);
        }
        VerifyCommand::Consistency { vkey, old, new, proof } => {
            let verifier = NoteVerifier::parse(&vkey)?;
            let old = Checkpoint::open(&read_text(&old)?, std::slice::from_ref(&verifier), None).context("old checkpoint")?;
            let new = Checkpoint::open(&read_text(&new)?, &[verifier], Some(&old.origin)).context("new checkpoint")?;
            let proof: Vec<Hash> = read_text(&proof)?
                .lines()
                .filter(|l| !l.is_empty())
                .enumerate()
                .map(|(i, l)| {
                    base64::engine::general_purpose::STANDARD
                        .decode(l)
                        .ok()
                        .and_then(|h| Hash::try_from(h).ok())
                        .with_context(|| format!("proof line {} is not a base64 32-byte hash", i + 1))
                })
                .collect::<anyhow::Result<_>>()?;
            verify_consistency(old.size, new.size, &old.root, &new.root, &proof).context("consistency proof is not valid")?;
            println!("valid: {} at size {} extends size {}", new.origin, new.size, old.size);
        }
    }
    Ok(())
}

/// A ledger data directory and its signing keys (`--key` twice during a rotation).
#[derive(clap::Args)]
pub struct LedgerArgs {
    #[arg(long)]
    data: PathBuf,
    /// Private key file; repeat it to sign with several keys during a rotation.
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
}

impl LedgerArgs {
    fn open(&self) -> anyhow::Result<Ledger> {
        let keys = self.keys.iter().map(|k| LedgerKey::read(k).with_context(|| format!("reading key {}", k.display()))).collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Ledger::open(&self.data, keys)?)
    }
}

/// One tenant's log in a ledger data directory.
#[derive(clap::Args)]
pub struct TenantLogArgs {
    #[command(flatten)]
    ledger: LedgerArgs,
    #[arg(long)]
    tenant: String,
}

impl TenantLogArgs {
    fn open(&self) -> anyhow::Result<Ledger> {
        self.ledger.open()
    }
}

#[derive(clap::Subcommand)]
pub enum LogCommand {
    /// Append JSONL events to tenant logs in a data directory, without Kafka (backfills).
    Import {
        #[command(flatten)]
        ledger: LedgerArgs,
        input: PathBuf,
    },
    /// Export a receipt (tlog-proof) and the entry bytes for one record.
    Receipt {
        #[command(flatten)]
        log: TenantLogArgs,
        #[arg(long)]
        seq: u64,
        /// Writes `<out>.tlog-proof` and `<out>.entry`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Re-derive every root from the entries and check stored nodes, heads and checkpoints (fsck).
    Audit {
        #[arg(long)]
        data: PathBuf,
        /// With keys, checkpoint signatures are verified too (every key must have signed).
        #[arg(long = "key")]
        keys: Vec<PathBuf>,
    },
    /// Write a tenant's log as a static C2SP tlog-tiles tree (checkpoint, tile/…, tile/entries/…).
    ExportTiles {
        #[command(flatten)]
        log: TenantLogArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a consistency proof between two sizes of a tenant's log.
    Consistency {
        #[command(flatten)]
        log: TenantLogArgs,
        #[arg(long)]
        old: u64,
        #[arg(long)]
        new: u64,
    },
}

pub fn log(command: LogCommand) -> anyhow::Result<()> {
    match command {
        LogCommand::Import { ledger, input } => import(ledger.open()?, &input),
        LogCommand::Receipt { log, seq, out } => {
            let (receipt, entry) = log.open()?.receipt(&log.tenant, seq)?;
            let proof_path = out.with_extension("tlog-proof");
            let entry_path = out.with_extension("entry");
            std::fs::write(&proof_path, receipt.to_text()).with_context(|| format!("writing {}", proof_path.display()))?;
            std::fs::write(&entry_path, entry).with_context(|| format!("writing {}", entry_path.display()))?;
            println!("{}\n{}", proof_path.display(), entry_path.display());
            Ok(())
        }
        LogCommand::Audit { data, keys } => audit(&data, &keys),
        LogCommand::ExportTiles { log, out } => export_tiles(&log, &out),
        LogCommand::Consistency { log, old, new } => {
            for hash in log.open()?.tenant(&log.tenant)?.consistency_proof(old, new)? {
                println!("{}", base64::engine::general_purpose::STANDARD.encode(hash));
            }
            Ok(())
        }
    }
}

/// Imports valid events; invalid lines are reported with their line number and code, and skipped.
fn import(mut ledger: Ledger, input: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let name = input.display().to_string();
    let mut rejected = 0u64;
    let mut added: BTreeMap<String, u64> = BTreeMap::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line_no = i as u64 + 1;
        let line = line.with_context(|| format!("reading line {line_no}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let event = match Event::from_json(line.as_bytes()) {
            Ok(e) => e,
            Err(rejection) => {
                eprintln!("line {line_no}: rejected: {rejection}");
                rejected += 1;
                continue;
            }
        };
        let digest: [u8; 32] = sha2_digest(line.as_bytes());
        let log = ledger.tenant(&event.tenant_id)?;
        let seq = log.size() + log.pending();
        let source = Source::File { file: name.clone(), line: line_no };
        let record = event_record(seq, EventInput { event: &event, ce_source: None, payload_sha256: &digest, source: &source })?;
        log.append(&record)?;
        *added.entry(event.tenant_id.clone()).or_default() += 1;
    }
    let checkpoints = ledger.commit()?;
    for (tenant, cp) in &checkpoints {
        println!(
            "{}: +{} -> size {} root {}",
            tenant_origin(ledger.origin(), tenant),
            added.get(tenant).copied().unwrap_or(0),
            cp.size,
            base64::engine::general_purpose::STANDARD.encode(cp.root)
        );
    }
    if rejected > 0 {
        bail!("{rejected} line(s) rejected; everything else was imported");
    }
    Ok(())
}

fn sha2_digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

fn audit(data: &Path, key_files: &[PathBuf]) -> anyhow::Result<()> {
    let keys = key_files.iter().map(|k| LedgerKey::read(k)).collect::<Result<Vec<_>, _>>()?;
    let tenants_dir = data.join("t");
    let mut tenants: Vec<String> = std::fs::read_dir(&tenants_dir)
        .with_context(|| format!("reading {}", tenants_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|t| tally_schemas::validate_tenant_id(t).is_ok())
        .collect();
    tenants.sort();
    let total: u64 = tenants
        .iter()
        .map(|t| std::fs::metadata(tenants_dir.join(t).join("entries")).map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut damaged = 0;
    for tenant in &tenants {
        bar.set_message(tenant.clone());
        let verifiers = keys.iter().map(|k| k.signer_for(tenant).map(|s| s.verifier())).collect::<Result<Vec<_>, _>>()?;
        let report = tally_ledger::audit_tenant(&tenants_dir.join(tenant), &verifiers, &mut |n| bar.inc(n));
        bar.suspend(|| {
            if report.problems.is_empty() {
                println!("ok {tenant}: {} entries", report.entries);
            } else {
                damaged += 1;
                println!("DAMAGED {tenant}: {} intact entries", report.entries);
                for p in &report.problems {
                    println!("  {p}");
                }
            }
        });
    }
    bar.finish_and_clear();
    if damaged > 0 {
        bail!("{damaged} of {} tenant logs are damaged", tenants.len());
    }
    println!("audited {} tenant logs: all sound", tenants.len());
    Ok(())
}

fn export_tiles(args: &TenantLogArgs, out: &Path) -> anyhow::Result<()> {
    use tally_ledger::{available_width, TilePath, TILE_WIDTH};
    let mut ledger = args.open()?;
    let note = ledger.checkpoint_note(&args.tenant)?;
    // Tiles are cut at the checkpoint's size: its partial widths are the ones clients will ask for.
    let size = Checkpoint::open(&note, &ledger.verifiers_for(&args.tenant)?, None)?.size;
    let log = ledger.tenant(&args.tenant)?;
    let write = |path: String, bytes: &[u8]| -> anyhow::Result<()> {
        let file = out.join(&path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&file, bytes).with_context(|| format!("writing {}", file.display()))
    };
    let mut files = 0u64;
    for level in 0..8u8 {
        let mut index = 0u64;
        loop {
            let width = available_width(level, index, size);
            if width == 0 {
                break;
            }
            let tile = TilePath::Hashes { level, index, width: width as u16 };
            write(tile.to_path(), &log.hash_tile(level, index, width as u16)?)?;
            if level == 0 {
                let bundle = TilePath::Entries { index, width: width as u16 };
                write(bundle.to_path(), &log.entry_bundle(index, width as u16)?)?;
                files += 1;
            }
            files += 1;
            if width < TILE_WIDTH {
                break;
            }
            index += 1;
        }
    }
    write("checkpoint".into(), note.as_bytes())?;
    println!("wrote {} files for {} entries of {} to {}", files + 1, size, args.tenant, out.display());
    Ok(())
}
