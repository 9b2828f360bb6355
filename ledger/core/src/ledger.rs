//! A ledger directory: every tenant's [`TenantLog`] under `<dir>/t/<tenant>/`, committed and
//! checkpointed together.
//!
//! After each group commit every tenant with new entries gets a checkpoint signed for its new
//! size, stored as `<dir>/t/<tenant>/checkpoint`. Checkpoints are only ever signed for committed
//! sizes of an append-only tree, so any two of them are consistent.
//!
//! Key rotation: the ledger signs with every key it is given (all for the same origin), so during
//! a rotation each checkpoint carries both signatures and verifiers holding either vkey accept it.
//! A stored checkpoint that is stale or was signed by another key set is re-signed when its tenant
//! is opened; signing is deterministic, so an unchanged key set rewrites identical bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::keyfile::LedgerKey;
use crate::log::TenantLog;
use crate::receipt::Receipt;

pub struct Ledger {
    dir: PathBuf,
    keys: Vec<LedgerKey>,
    tenants: BTreeMap<String, TenantLog>,
}

impl Ledger {
    /// Opens the ledger in `dir`, signing with every key in `keys` (one, or several during a
    /// rotation; all must share one origin).
    pub fn open(dir: &Path, keys: Vec<LedgerKey>) -> Result<Ledger> {
        let origin = keys.first().map(|k| k.origin().to_string()).ok_or_else(|| Error::BadKey("a ledger needs at least one signing key".into()))?;
        if let Some(other) = keys.iter().find(|k| k.origin() != origin) {
            return Err(Error::BadKey(format!("all signing keys must share one origin: {origin:?} and {:?}", other.origin())));
        }
        std::fs::create_dir_all(dir.join("t")).map_err(|e| Error::io(dir, e))?;
        Ok(Ledger { dir: dir.to_path_buf(), keys, tenants: BTreeMap::new() })
    }

    /// The log origin (tenant logs are `<origin>/t/<tenant>`).
    pub fn origin(&self) -> &str {
        self.keys[0].origin()
    }

    /// The tenant's verifier keys, one per signing key.
    pub fn verifiers_for(&self, tenant_id: &str) -> Result<Vec<crate::note::NoteVerifier>> {
        self.keys.iter().map(|k| k.signer_for(tenant_id).map(|s| s.verifier())).collect()
    }

    /// The tenant's log, opened (and repaired) on first use.
    pub fn tenant(&mut self, tenant_id: &str) -> Result<&mut TenantLog> {
        tally_schemas::validate_tenant_id(tenant_id).map_err(|r| Error::BadKey(r.detail))?;
        if !self.tenants.contains_key(tenant_id) {
            let log = TenantLog::open(&self.dir.join("t").join(tenant_id))?;
            // A crash between a commit and its checkpoint leaves the checkpoint behind the log:
            // sign the committed size now (same bytes as the lost one would have been).
            if log.size() > 0 {
                let stored = std::fs::read_to_string(log.dir().join("checkpoint")).ok();
                let (checkpoint, note) = sign_checkpoint(&self.keys, tenant_id, &log)?;
                if stored.as_deref() != Some(note.as_str()) {
                    tracing::info!(tenant_id, size = checkpoint.size, "re-signing a stale checkpoint");
                    store_checkpoint(&log, &note)?;
                }
            }
            self.tenants.insert(tenant_id.to_string(), log);
        }
        self.tenants.get_mut(tenant_id).ok_or_else(|| Error::BadKey(tenant_id.to_string()))
    }

    /// Whether the tenant has a log in this directory (the id must be valid).
    pub fn has_tenant(&self, tenant_id: &str) -> bool {
        tally_schemas::validate_tenant_id(tenant_id).is_ok() && self.dir.join("t").join(tenant_id).join("head").exists()
    }

    /// Tenants that have a log in this directory.
    pub fn tenant_ids(&self) -> Result<Vec<String>> {
        let dir = self.dir.join("t");
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
            .filter(|id| tally_schemas::validate_tenant_id(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Commits every tenant with pending entries and signs a checkpoint for each.
    /// Returns the tenants checkpointed with their new checkpoints.
    ///
    /// Tenants are committed on up to [`COMMIT_THREADS`] threads at once: each commit is a few
    /// fsyncs that mostly wait on the device, and a disk serves many at a time. Each tenant's own
    /// order (data, then head) is unchanged, and all are durable before this returns.
    pub fn commit(&mut self) -> Result<Vec<(String, Checkpoint)>> {
        let mut dirty: Vec<(&String, &mut TenantLog)> = self.tenants.iter_mut().filter(|(_, log)| log.pending() > 0).collect();
        let keys = &self.keys;
        let commit_one = |tenant: &String, log: &mut TenantLog| -> Result<(String, Checkpoint)> {
            log.commit()?;
            let (checkpoint, note) = sign_checkpoint(keys, tenant, log)?;
            store_checkpoint(log, &note)?;
            Ok((tenant.clone(), checkpoint))
        };
        if dirty.len() <= 1 {
            return dirty.into_iter().map(|(t, log)| commit_one(t, log)).collect();
        }
        let per_thread = dirty.len().div_ceil(COMMIT_THREADS);
        let results: Vec<Result<Vec<(String, Checkpoint)>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = dirty
                .chunks_mut(per_thread)
                .map(|chunk| scope.spawn(move || chunk.iter_mut().map(|(t, log)| commit_one(t, log)).collect::<Result<Vec<_>>>()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::Commit("a commit thread panicked".into())))).collect()
        });
        let mut out = Vec::new();
        for r in results {
            out.extend(r?);
        }
        Ok(out)
    }

    /// The tenant's latest signed checkpoint note.
    pub fn checkpoint_note(&mut self, tenant_id: &str) -> Result<String> {
        let path = self.tenant(tenant_id)?.dir().join("checkpoint");
        std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))
    }

    /// A receipt for entry `seq` against the tenant's latest checkpoint, and the entry bytes.
    pub fn receipt(&mut self, tenant_id: &str, seq: u64) -> Result<(Receipt, Vec<u8>)> {
        let note = self.checkpoint_note(tenant_id)?;
        let checkpoint = Checkpoint::open(&note, &self.verifiers_for(tenant_id)?, None)?;
        let log = self.tenant(tenant_id)?;
        let proof = log.inclusion_proof(seq, checkpoint.size)?;
        Ok((Receipt { index: seq, proof, checkpoint: note }, log.entry(seq)?))
    }
}

/// How many tenants' commits run at once.
pub const COMMIT_THREADS: usize = 16;

/// The checkpoint of the log's committed size, signed by every key.
fn sign_checkpoint(keys: &[LedgerKey], tenant: &str, log: &TenantLog) -> Result<(Checkpoint, String)> {
    let checkpoint = Checkpoint { origin: crate::checkpoint::tenant_origin(keys[0].origin(), tenant), size: log.size(), root: log.root() };
    let signers = keys.iter().map(|k| k.signer_for(tenant)).collect::<Result<Vec<_>>>()?;
    let note = checkpoint.sign(&signers)?;
    Ok((checkpoint, note))
}

/// Replaces the stored checkpoint durably: after a crash it is the old note or the new one.
fn store_checkpoint(log: &TenantLog, note: &str) -> Result<()> {
    crate::durable::replace_file(&log.dir().join("checkpoint"), note.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_signs_checkpoints_and_receipts_verify_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut ledger = Ledger::open(dir.path(), vec![key.clone()]).unwrap();
        for i in 0..50u64 {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            ledger.tenant(tenant).unwrap().append(format!("entry {i}").as_bytes()).unwrap();
        }
        let checkpoints = ledger.commit().unwrap();
        assert_eq!(checkpoints.len(), 2);
        assert!(ledger.commit().unwrap().is_empty(), "nothing new, no new checkpoint");
        drop(ledger);

        let mut ledger = Ledger::open(dir.path(), vec![key.clone()]).unwrap();
        assert_eq!(ledger.tenant_ids().unwrap(), ["acme", "globex"]);
        let (receipt, entry) = ledger.receipt("globex", 3).unwrap();
        assert_eq!(entry, b"entry 7");
        let vkey = key.signer_for("globex").unwrap().verifier();
        receipt.verify(&entry, std::slice::from_ref(&vkey), Some("tally.example.com/t/globex")).unwrap();
        // A tenant's key does not vouch for another tenant's log.
        let acme = key.signer_for("acme").unwrap().verifier();
        assert!(receipt.verify(&entry, &[acme], None).is_err());
        assert!(ledger.tenant("../etc").is_err(), "tenant ids are validated before touching paths");
    }

    #[test]
    fn a_checkpoint_lost_after_its_commit_is_re_signed_identically_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut ledger = Ledger::open(dir.path(), vec![key.clone()]).unwrap();
        ledger.tenant("acme").unwrap().append(b"one").unwrap();
        ledger.commit().unwrap();
        let signed = ledger.checkpoint_note("acme").unwrap();
        drop(ledger);
        std::fs::remove_file(dir.path().join("t/acme/checkpoint")).unwrap();
        let mut ledger = Ledger::open(dir.path(), vec![key]).unwrap();
        assert_eq!(ledger.checkpoint_note("acme").unwrap(), signed);
    }

    #[test]
    fn rotation_signs_with_both_keys_then_only_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let old = LedgerKey::generate("tally.example.com").unwrap();
        let new = LedgerKey::generate("tally.example.com").unwrap();
        let mut ledger = Ledger::open(dir.path(), vec![old.clone()]).unwrap();
        ledger.tenant("acme").unwrap().append(b"one").unwrap();
        ledger.commit().unwrap();
        drop(ledger);
        let old_v = old.signer_for("acme").unwrap().verifier();
        let new_v = new.signer_for("acme").unwrap().verifier();

        // During the rotation both keys sign; holders of either vkey accept.
        let mut ledger = Ledger::open(dir.path(), vec![old.clone(), new.clone()]).unwrap();
        let note = ledger.checkpoint_note("acme").unwrap();
        assert_eq!(note.matches('\u{2014}').count(), 2, "{note}");
        let a = Checkpoint::open(&note, std::slice::from_ref(&old_v), None).unwrap();
        let b = Checkpoint::open(&note, std::slice::from_ref(&new_v), None).unwrap();
        assert_eq!(a, b);
        drop(ledger);

        // After it, only the new key signs; same tree, so old and new checkpoints are consistent.
        let mut ledger = Ledger::open(dir.path(), vec![new]).unwrap();
        let note = ledger.checkpoint_note("acme").unwrap();
        assert!(Checkpoint::open(&note, &[old_v], None).is_err());
        assert_eq!(Checkpoint::open(&note, &[new_v], None).unwrap(), a);
        let other = LedgerKey::generate("other.example.com").unwrap();
        assert!(Ledger::open(dir.path(), vec![ledger_key_clone(&ledger), other]).is_err(), "one origin only");
    }

    fn ledger_key_clone(ledger: &Ledger) -> LedgerKey {
        ledger.keys[0].clone()
    }
}
