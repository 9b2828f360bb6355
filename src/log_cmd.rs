//! Offline ledger tools: `tally keygen`, `tally vkey`, `tally verify`, `tally log import|receipt`.
//! None of them needs Kafka; `verify` needs nothing but the files an auditor was given.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use tally_ledger::merkle::{verify_consistency, Hash};
use tally_ledger::{tenant_origin, Checkpoint, EventInput, Ledger, LedgerKey, NoteVerifier, Receipt, Source, TenantEntries};
use tally_schemas::{Event, IdempotencyKey, RejectCode, Rejection, MAX_MESSAGE_BYTES};

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
        anyhow::ensure!(
            key.origin() == args.origin.trim_end_matches('/'),
            "{} holds a key for origin {:?}, not {:?}",
            args.out.display(),
            key.origin(),
            args.origin
        );
        eprintln!("kept the existing private key {}", args.out.display());
        eprintln!("{}", which_vkey(&args.out, key.origin()));
        println!("{}", key.origin_verifier()?);
        return Ok(());
    }
    let key = LedgerKey::generate(&args.origin)?;
    key.write_new(&args.out).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote private key {} (mode 0600)", args.out.display());
    eprintln!("{}", which_vkey(&args.out, key.origin()));
    println!("{}", key.origin_verifier()?);
    Ok(())
}

/// What `keygen` says of the vkey it prints: which key verifies what.
fn which_vkey(key: &Path, origin: &str) -> String {
    format!(
        "the vkey below is the log origin's ({origin}): it verifies no tenant checkpoint. Tenant checkpoints, receipts and statements verify with the tenant's own vkey (name {origin}/t/<id>): `tally vkey --key {} --tenant <id>`, or GET /t/<id>/vkey on the ledger",
        key.display()
    )
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
        /// A verifier key; repeat it for every key that may have signed (a key rotation).
        #[arg(long = "vkey", required = true)]
        vkeys: Vec<String>,
        #[arg(long)]
        receipt: PathBuf,
        #[arg(long)]
        entry: PathBuf,
        /// The record's personal values, as `GET /v1/tenants/{tenant}/records/{seq}/personal`
        /// answers them: each value is checked against its commitment in the entry.
        #[arg(long)]
        personal: Option<PathBuf>,
    },
    /// Check that a newer checkpoint extends an older one (proof: base64 hashes, one per line).
    Consistency {
        /// A verifier key; repeat it for every key that may have signed (a key rotation).
        #[arg(long = "vkey", required = true)]
        vkeys: Vec<String>,
        #[arg(long)]
        old: PathBuf,
        #[arg(long)]
        new: PathBuf,
        #[arg(long)]
        proof: PathBuf,
    },
    /// Check an audit export (`GET /v1/tenants/{tenant}/audit-export`, saved as JSON): its
    /// checkpoint, its entries against the checkpoint's root with the range proof, the personal
    /// values against their commitments, and every row against its entry.
    Export {
        /// A verifier key; repeat it for every key that may have signed (a key rotation).
        #[arg(long = "vkey", required = true)]
        vkeys: Vec<String>,
        /// The export, as JSON.
        export: PathBuf,
    },
    /// Check a billing statement: recompute its totals from every entry of the tenant's log up
    /// to a signed checkpoint, in a tlog-tiles directory (`checkpoint` and `tile/entries/…`, as
    /// `tally log export-tiles` writes or the ledger serves them).
    Statement {
        /// A verifier key; repeat it for every key that may have signed (a key rotation).
        #[arg(long = "vkey", required = true)]
        vkeys: Vec<String>,
        /// The tiles directory.
        #[arg(long, required_unless_present = "export", conflicts_with = "export")]
        tiles: Option<PathBuf>,
        /// Or an audit export of the tenant's log from seq 0 through the statement at least
        /// (`GET /v1/tenants/{tenant}/audit-export?from_seq=0`, saved as JSON).
        #[arg(long)]
        export: Option<PathBuf>,
        /// The statement's seq (`GET /v1/tenants/{tenant}/statements` lists them).
        #[arg(long)]
        seq: u64,
    },
}

/// A proof hash as the tools print it: 32 bytes, standard base64.
fn base64_hash(text: &str) -> Option<Hash> {
    base64::engine::general_purpose::STANDARD.decode(text).ok().and_then(|h| Hash::try_from(h).ok())
}

/// Every `--vkey`, parsed; the error names the one that is not a vkey.
fn parse_vkeys(vkeys: &[String]) -> anyhow::Result<Vec<NoteVerifier>> {
    vkeys.iter().enumerate().map(|(i, v)| NoteVerifier::parse(v).with_context(|| format!("--vkey number {} is not a verifier key", i + 1))).collect()
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

pub fn verify(command: VerifyCommand) -> anyhow::Result<()> {
    match command {
        VerifyCommand::Receipt { vkeys, receipt, entry, personal } => {
            let verifiers = parse_vkeys(&vkeys)?;
            let receipt = Receipt::parse(&read_text(&receipt)?)?;
            let entry = std::fs::read(&entry).with_context(|| format!("reading {}", entry.display()))?;
            let checkpoint = receipt.verify(&entry, &verifiers, None).context("receipt is not valid")?;
            println!("valid: entry {} is in {} at tree size {}", receipt.index, checkpoint.origin, checkpoint.size);
            if let Some(path) = personal {
                println!("{}", personal_values(receipt.index, &entry, &path)?);
            }
        }
        VerifyCommand::Consistency { vkeys, old, new, proof } => {
            // Across a key rotation the old checkpoint is signed by the old key, the new one by
            // the new key: each must be signed by one of the keys given.
            let verifiers = parse_vkeys(&vkeys)?;
            let old = Checkpoint::open(&read_text(&old)?, &verifiers, None).context("old checkpoint")?;
            let new = Checkpoint::open(&read_text(&new)?, &verifiers, Some(&old.origin)).context("new checkpoint")?;
            let proof: Vec<Hash> = read_text(&proof)?
                .lines()
                .filter(|l| !l.is_empty())
                .enumerate()
                .map(|(i, l)| base64_hash(l).with_context(|| format!("proof line {} is not a base64 32-byte hash", i + 1)))
                .collect::<anyhow::Result<_>>()?;
            verify_consistency(old.size, new.size, &old.root, &new.root, &proof).context("consistency proof is not valid")?;
            println!("valid: {} at size {} extends size {}", new.origin, new.size, old.size);
        }
        VerifyCommand::Export { vkeys, export } => {
            let verifiers = parse_vkeys(&vkeys)?;
            let export = tally_query::parse_export(&read_text(&export)?).context("export is not valid")?;
            let v = tally_query::verify_export(&export, &verifiers).context("export is not valid")?;
            println!(
                "valid: seqs {}..={} of {} at tree size {}: {} entries in the checkpoint's tree, each row what its entry gives; personal values: {} records verified, {} erased{}",
                v.from_seq,
                v.to_seq,
                v.origin,
                v.tree_size,
                v.to_seq - v.from_seq + 1,
                v.personal_open,
                v.personal_erased,
                match v.personal_withheld {
                    0 => String::new(),
                    n => format!(", {n} not given (no erasure record in the export names them)"),
                }
            );
        }
        VerifyCommand::Statement { vkeys, tiles, export, seq } => {
            let verifiers = parse_vkeys(&vkeys)?;
            let verified = match (tiles, export) {
                (Some(tiles), _) => statement_in_tiles(&verifiers, &tiles, seq)?,
                (None, Some(export)) => statement_in_export(&verifiers, &export, seq)?,
                (None, None) => bail!("give --tiles or --export"),
            };
            println!("{}", describe_statement(&verified, seq));
        }
    }
    Ok(())
}

/// Checks the statement at `seq` against the tiles in `dir` (docs/billing.md, "Verifying a
/// statement"), reading the entry bundles as the check asks for them. Returns the summary line.
fn statement_in_tiles(verifiers: &[NoteVerifier], dir: &Path, seq: u64) -> anyhow::Result<tally_ledger::budget::VerifiedStatement> {
    use tally_ledger::TilePath;
    let note = read_text(&dir.join("checkpoint"))?;
    // A bundle holds at most 256 entries of at most 64 KiB, each with its 2-byte length: a
    // larger file is not a bundle, and is not read whole.
    const MAX_BUNDLE_BYTES: u64 = 256 * (2 + 65_535);
    let mut bundle = |index: u64, width: u64| -> Result<Vec<u8>, String> {
        use std::io::Read as _;
        let path = dir.join(TilePath::Entries { index, width: width as u16 }.to_path());
        let file = std::fs::File::open(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let mut bytes = Vec::new();
        file.take(MAX_BUNDLE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| format!("reading {}: {e}", path.display()))?;
        if bytes.len() as u64 > MAX_BUNDLE_BYTES {
            return Err(format!("{} is larger than any entry bundle", path.display()));
        }
        Ok(bytes)
    };
    tally_ledger::budget::verify_statement(verifiers, &note, &mut bundle, seq).context("statement is not valid")
}

/// Checks a record's personal values (the ledger's `…/records/{seq}/personal` answer, saved as
/// JSON) against the commitments in its verified entry; says which fields hold a verified value
/// and which were erased.
fn personal_values(seq: u64, entry: &[u8], path: &Path) -> anyhow::Result<String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Given {
        seq: u64,
        #[serde(default)]
        erased: bool,
        fields: BTreeMap<String, tally_log::Opening>,
    }
    let given: Given = serde_json::from_str(&read_text(path)?).with_context(|| format!("{} is not a record's personal values", path.display()))?;
    if given.seq != seq {
        bail!("the personal values are seq {}'s, the receipt is for seq {seq}", given.seq);
    }
    let tally_log::Record::Event(record) = tally_log::Record::<serde::de::IgnoredAny>::decode(seq, entry)? else {
        bail!("entry {seq} is not an event record: it has no personal fields");
    };
    record.check_openings(&given.fields).context("personal values are not valid")?;
    // A record's fields are sealed, and erased, together: all of them, or none and `erased`.
    // Anything else withholds values.
    let fields: Vec<&str> = record.personal.keys().map(String::as_str).collect();
    match (given.erased, given.fields.len()) {
        (true, 0) if !fields.is_empty() => Ok(format!("personal values: 0 verified, erased: {}", fields.join(", "))),
        (false, n) if n == fields.len() => Ok(format!("personal values: all {n} verified against their commitments")),
        (true, _) => bail!("personal values are not valid: marked erased, yet they hold values (or the record has no personal fields)"),
        (false, n) => bail!("personal values are not valid: {n} of the {} fields the record commits to are given, and it is not marked erased", fields.len()),
    }
}

/// Verifies the statement at `seq` from an audit export saved as JSON.
fn statement_in_export(verifiers: &[NoteVerifier], path: &Path, seq: u64) -> anyhow::Result<tally_ledger::budget::VerifiedStatement> {
    let export: tally_query::reports::AuditExport =
        serde_json::from_str(&read_text(path)?).with_context(|| format!("{} is not an audit export", path.display()))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let entries = export
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| b64.decode(e).with_context(|| format!("entries[{i}] is not base64")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let proof = export
        .range_proof
        .iter()
        .enumerate()
        .map(|(i, h)| base64_hash(h).with_context(|| format!("range_proof[{i}] is not a base64 32-byte hash")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    tally_ledger::budget::verify_statement_in_export(verifiers, &export.checkpoint, export.from_seq, &entries, &proof, seq).context("statement is not valid")
}

/// What `tally verify statement` prints for a valid statement.
fn describe_statement(v: &tally_ledger::budget::VerifiedStatement, seq: u64) -> String {
    let s = &v.statement;
    let totals: Vec<String> = s
        .totals
        .iter()
        .map(|t| {
            format!(
                "{} {} {}{}: {} events",
                tally_schemas::decimal_units(t.micros),
                t.currency,
                t.basis.as_str(),
                if t.correction { " (corrections)" } else { "" },
                t.events
            )
        })
        .collect();
    let mut line = format!(
        "valid: statement of period {} ({} to {}, {}) at seq {seq} in {} at tree size {}, seqs {}..={}: {}",
        s.period,
        s.period_start,
        s.period_end,
        s.time_zone,
        v.origin,
        v.tree_size,
        s.first_seq,
        s.last_seq,
        totals.join("; ")
    );
    if v.checked < v.tree_size {
        line.push_str(&format!(
            " (the evidence held entries 0..{} of {}: records from seq {} on were not seen; an export up to the tree size shows that none of them is charged in the closed period)",
            v.checked, v.tree_size, v.checked
        ));
    }
    line
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
    /// Append JSONL events to tenant logs in a data directory, without Kafka (backfills). Holds
    /// the directory's lock; skips events whose event_id the tenant's log already holds.
    Import {
        #[command(flatten)]
        ledger: LedgerArgs,
        input: PathBuf,
    },
    /// Print a tenant's checkpoint at its committed size, signed by every key.
    Checkpoint {
        #[command(flatten)]
        log: TenantLogArgs,
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
    /// Re-derive every stored node from the entries, and check every frame, seq and segment
    /// index of the journal (fsck).
    Audit {
        #[arg(long)]
        data: PathBuf,
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
        LogCommand::Import { ledger, input } => import(&ledger, &input),
        LogCommand::Receipt { log, seq, out } => {
            let (receipt, entry) = log.open()?.receipt(&log.tenant, seq)?;
            let proof_path = out.with_extension("tlog-proof");
            let entry_path = out.with_extension("entry");
            std::fs::write(&proof_path, receipt.to_text()).with_context(|| format!("writing {}", proof_path.display()))?;
            std::fs::write(&entry_path, entry).with_context(|| format!("writing {}", entry_path.display()))?;
            println!("{}\n{}", proof_path.display(), entry_path.display());
            Ok(())
        }
        LogCommand::Audit { data } => audit(&data),
        LogCommand::Checkpoint { log } => {
            print!("{}", log.open()?.checkpoint_note(&log.tenant)?);
            Ok(())
        }
        LogCommand::ExportTiles { log, out } => export_tiles(&log, &out),
        LogCommand::Consistency { log, old, new } => {
            let ledger = log.open()?;
            for hash in ledger.tenant(&log.tenant).consistency_proof(old, new)? {
                println!("{}", base64::engine::general_purpose::STANDARD.encode(hash));
            }
            Ok(())
        }
    }
}

/// Imports valid events into `args.data`, holding its lock (`<data>/lock`, as a ledger instance
/// and `tally parquet rebuild` do) from before the logs are opened until they are committed.
///
/// Each event is recorded at most once per tenant, by its idempotency key (`event_id`): one whose
/// key the tenant's log already holds (from an earlier import, or earlier in this file) is skipped,
/// as a duplicate when its content is the same and as a conflict otherwise. Lines are read as
/// bytes, at most [`MAX_MESSAGE_BYTES`] of each: a longer line (`too_large`), a line that is not
/// UTF-8 (`malformed_json`), an invalid event or a conflict is reported with its line number and
/// skipped, every other line is imported, and the exit status is then non-zero.
fn import(args: &LedgerArgs, input: &Path) -> anyhow::Result<()> {
    let data = &args.data;
    refuse_service_partition(data)?;
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let _lock = match tally_ledger::service::lock_data_dir(data) {
        Ok(lock) => lock,
        Err(tally_ledger::Error::PartitionBusy(_)) => bail!(
            "{} is locked by another process (a ledger instance, `tally parquet rebuild` or another import); nothing was imported, try again once it is done",
            data.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("locking {}", data.display())),
    };
    // A ledger instance may have made it a partition directory before the lock was ours.
    refuse_service_partition(data)?;
    let mut ledger = args.open()?;
    let file = std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let name = input.display().to_string();
    let (mut rejected, mut conflicts, mut duplicates) = (0u64, 0u64, 0u64);
    let mut added: BTreeMap<String, u64> = BTreeMap::new();
    // Per tenant: every recorded idempotency key, with the seq and content digest of its event.
    let mut recorded: HashMap<String, HashMap<IdempotencyKey, (u64, [u8; 16])>> = HashMap::new();
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        let line = read_line(&mut reader, &mut buf, MAX_MESSAGE_BYTES).with_context(|| format!("reading line {} of {name}", line_no + 1))?;
        line_no += 1;
        let reject = |rejection: Rejection| eprintln!("line {line_no}: rejected: {rejection}");
        match line {
            Line::End => break,
            Line::TooLong(len) => {
                reject(Rejection::new(RejectCode::TooLarge, format!("line is {len} bytes; at most {MAX_MESSAGE_BYTES} are accepted")));
                rejected += 1;
                continue;
            }
            Line::Read => {}
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Err(e) = std::str::from_utf8(&buf) {
            reject(Rejection::new(RejectCode::MalformedJson, format!("line is not UTF-8 (invalid byte at column {})", e.valid_up_to() + 1)));
            rejected += 1;
            continue;
        }
        let event = match Event::from_json(&buf) {
            Ok(e) => e,
            Err(rejection) => {
                reject(rejection);
                rejected += 1;
                continue;
            }
        };
        let tenant = event.tenant_id.clone();
        if !recorded.contains_key(&tenant) {
            let keys = recorded_events(&ledger, &tenant).with_context(|| format!("reading the events already in {tenant}'s log"))?;
            recorded.insert(tenant.clone(), keys);
        }
        let seen = recorded.entry(tenant.clone()).or_default();
        let key = IdempotencyKey { source: None, id: event.event_id.clone() };
        let content = ledger.content_digest(&event)?;
        if let Some(&(first_seq, first)) = seen.get(&key) {
            if first == content {
                duplicates += 1;
            } else {
                eprintln!(
                    "line {line_no}: conflict: event_id {:?} is already recorded for tenant {tenant} at seq {first_seq} with different content; skipped",
                    key.id
                );
                conflicts += 1;
            }
            continue;
        }
        let digest: [u8; 32] = sha2_digest(&buf);
        let source = Source::File { file: name.clone(), line: line_no };
        // An import has no budgets: an event's own cost is its charge, in its UTC month.
        let charge = tally_ledger::budget::rate(&event, None, &tally_ledger::budget::Calendar::utc_months(), None);
        // Personal fields are committed to and sealed, as the ledger service records them.
        let seq = match ledger.append_event(EventInput { event: &event, ce_source: None, payload_sha256: &digest, source: &source }, charge.as_ref(), None) {
            Ok(seq) => seq,
            Err(e @ tally_log::Error::EntryTooLarge(_)) => {
                reject(Rejection::new(RejectCode::TooLarge, e.to_string()));
                rejected += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        seen.insert(key, (seq, content));
        *added.entry(tenant).or_default() += 1;
    }
    for tenant in ledger.commit(None)? {
        let (cp, _) = ledger.checkpoint(&tenant)?;
        println!(
            "{}: +{} -> size {} root {}",
            tenant_origin(ledger.origin(), &tenant),
            added.get(&tenant).copied().unwrap_or(0),
            cp.size,
            base64::engine::general_purpose::STANDARD.encode(cp.root)
        );
    }
    let total: u64 = added.values().sum();
    println!("{total} imported, {duplicates} duplicate(s) skipped, {conflicts} conflict(s), {rejected} rejected");
    if rejected > 0 || conflicts > 0 {
        bail!("{rejected} line(s) rejected and {conflicts} in conflict with recorded events; everything else was imported");
    }
    Ok(())
}

/// A ledger service's partition directory has a dedup store (`state.redb`) next to its logs; events
/// imported behind its back would be unknown to it, and recorded a second time when they arrive.
fn refuse_service_partition(data: &Path) -> anyhow::Result<()> {
    if data.join("state.redb").exists() {
        bail!(
            "{} is a ledger service partition directory (it has state.redb): the service's dedup store would not know about imported events; import into a separate data directory",
            data.display()
        );
    }
    Ok(())
}

/// What [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// The end of the input: nothing was read.
    End,
    /// A line (without its `\n` or `\r\n`) is in the buffer.
    Read,
    /// A line of this many bytes, longer than allowed: skipped, and not kept in memory.
    TooLong(u64),
}

/// Reads the next line into `buf`, keeping at most `max` bytes of it: the rest of a longer line
/// is consumed up to its newline without being stored.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>, max: usize) -> std::io::Result<Line> {
    buf.clear();
    // One more than `max`, for a `\r` before the `\n`.
    let cap = max + 1;
    let (mut len, mut last, mut any) = (0u64, 0u8, false);
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            break;
        }
        any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        len += chunk.len() as u64;
        if let Some(&b) = chunk.last() {
            last = b;
        }
        let room = cap.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = chunk.len() + usize::from(newline.is_some());
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if !any {
        return Ok(Line::End);
    }
    let len = len - u64::from(last == b'\r' && len > 0);
    if len > max as u64 {
        buf.clear();
        return Ok(Line::TooLong(len));
    }
    buf.truncate(len as usize);
    Ok(Line::Read)
}

/// The idempotency keys of the events a tenant's log holds, each with its first seq and content
/// (as [`Ledger::content_digest`] gives it: personal fields are compared through their key).
fn recorded_events(ledger: &Ledger, tenant: &str) -> anyhow::Result<HashMap<IdempotencyKey, (u64, [u8; 16])>> {
    let log = ledger.tenant(tenant);
    let mut keys = HashMap::new();
    for seq in 0..log.size() {
        let entry = log.entry(seq)?;
        // Budget and conflict records are not events of their own.
        if let tally_log::Record::Event(r) = tally_log::Record::<serde::de::IgnoredAny>::decode(seq, &entry)? {
            if !r.is_conflict() {
                let content = ledger.recorded_content_digest(tenant, seq, &r)?;
                keys.entry(IdempotencyKey { source: r.ce_source, id: r.event.event_id }).or_insert((seq, content));
            }
        }
    }
    Ok(keys)
}

fn sha2_digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

fn audit(data: &Path) -> anyhow::Result<()> {
    let journal = data.join(tally_ledger::JOURNAL_DIR);
    let total: u64 = std::fs::read_dir(&journal)
        .with_context(|| format!("reading {}", journal.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    let report = tally_ledger::audit_ledger(data, &mut |n| bar.inc(n));
    bar.finish_and_clear();
    for (tenant, records) in &report.tenants {
        println!("{tenant}: {records} intact records");
    }
    if !report.problems.is_empty() {
        for p in &report.problems {
            println!("DAMAGED {p}");
        }
        bail!("the journal of {} is damaged ({} problem(s) listed above)", data.display(), report.problems.len());
    }
    println!("audited {} tenant logs: all sound", report.tenants.len());
    Ok(())
}

fn export_tiles(args: &TenantLogArgs, out: &Path) -> anyhow::Result<()> {
    use tally_ledger::{available_width, TilePath, TILE_WIDTH};
    let ledger = args.open()?;
    // Tiles are cut at the checkpoint's size: its partial widths are the ones clients will ask for.
    let (checkpoint, note) = ledger.checkpoint(&args.tenant)?;
    let size = checkpoint.size;
    let log = ledger.tenant(&args.tenant);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<(Line, Vec<u8>)> {
        // A tiny buffer, so lines span many reads.
        let mut reader = BufReader::with_capacity(3, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            let line = read_line(&mut reader, &mut buf, max).unwrap();
            if line == Line::End {
                return out;
            }
            out.push((line, buf.clone()));
        }
    }

    /// A statement checked against evidence that stops before the tree size says so.
    #[test]
    fn a_statement_checked_on_part_of_the_log_says_what_was_not_seen() {
        let statement: tally_ledger::budget::Statement = serde_json::from_value(serde_json::json!({
            "at": "2026-12-02T00:00:00Z", "period": "2026-11-01", "period_start": "2026-11-01T00:00:00Z",
            "period_end": "2026-12-01T00:00:00Z", "time_zone": "UTC", "first_seq": 1, "last_seq": 4, "tree_size": 6,
            "totals": [{"currency": "USD", "basis": "table", "events": 2, "micros": 252000}]
        }))
        .unwrap();
        let verified = |checked| tally_ledger::budget::VerifiedStatement { statement: statement.clone(), origin: "o/t/acme".into(), tree_size: 9, checked };
        let whole = describe_statement(&verified(9), 6);
        assert!(whole.starts_with("valid: statement of period 2026-11-01") && whole.ends_with("0.252000 USD table: 2 events"), "{whole}");
        let part = describe_statement(&verified(7), 6);
        assert!(part.contains("the evidence held entries 0..7 of 9: records from seq 7 on were not seen"), "{part}");
    }

    #[test]
    fn lines_are_bounded_and_the_rest_is_skipped() {
        let input = b"12345\n123456\r\n1234567\n\n12345\r\n1234\xff\n123456789012345";
        let got = lines(input, 6);
        let want: Vec<(Line, Vec<u8>)> = vec![
            (Line::Read, b"12345".to_vec()),
            (Line::Read, b"123456".to_vec()),
            (Line::TooLong(7), vec![]),
            (Line::Read, vec![]),
            (Line::Read, b"12345".to_vec()),
            (Line::Read, b"1234\xff".to_vec()),
            (Line::TooLong(15), vec![]),
        ];
        assert_eq!(got, want);
        assert!(lines(b"", 6).is_empty());
        assert_eq!(lines(b"\n", 6), vec![(Line::Read, vec![])]);
    }
}
