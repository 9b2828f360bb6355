//! A ledger directory: every tenant's [`TenantLog`] under `<dir>/t/<tenant>/`, committed and
//! checkpointed together.
//!
//! After each group commit every tenant with new entries gets a checkpoint signed for its new
//! size, stored as `<dir>/t/<tenant>/checkpoint`. Checkpoints are only ever signed for committed
//! sizes of an append-only tree, so any two of them are consistent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::keyfile::LedgerKey;
use crate::log::TenantLog;
use crate::receipt::Receipt;

pub struct Ledger {
    dir: PathBuf,
    key: LedgerKey,
    tenants: BTreeMap<String, TenantLog>,
}

impl Ledger {
    pub fn open(dir: &Path, key: LedgerKey) -> Result<Ledger> {
        std::fs::create_dir_all(dir.join("t")).map_err(|e| Error::io(dir, e))?;
        Ok(Ledger { dir: dir.to_path_buf(), key, tenants: BTreeMap::new() })
    }

    pub fn key(&self) -> &LedgerKey {
        &self.key
    }

    /// The tenant's log, opened (and repaired) on first use.
    pub fn tenant(&mut self, tenant_id: &str) -> Result<&mut TenantLog> {
        tally_schemas::validate_tenant_id(tenant_id).map_err(|r| Error::BadKey(r.detail))?;
        if !self.tenants.contains_key(tenant_id) {
            let log = TenantLog::open(&self.dir.join("t").join(tenant_id))?;
            // A crash between a commit and its checkpoint leaves the checkpoint behind the log:
            // sign the committed size now (same bytes as the lost one would have been).
            let stored = std::fs::read_to_string(log.dir().join("checkpoint")).ok();
            let current = stored.as_deref().and_then(|n| crate::note::split_note(n).ok()).and_then(|(t, _)| Checkpoint::parse_text(t).ok());
            if log.size() > 0 && current.map(|c| c.size) != Some(log.size()) {
                write_checkpoint(&self.key, tenant_id, &log)?;
            }
            self.tenants.insert(tenant_id.to_string(), log);
        }
        self.tenants.get_mut(tenant_id).ok_or_else(|| Error::BadKey(tenant_id.to_string()))
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
    pub fn commit(&mut self) -> Result<Vec<(String, Checkpoint)>> {
        let mut out = Vec::new();
        for (tenant, log) in &mut self.tenants {
            if log.pending() == 0 {
                continue;
            }
            log.commit()?;
            out.push((tenant.clone(), write_checkpoint(&self.key, tenant, log)?));
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
        let verifier = self.key.signer_for(tenant_id)?.verifier();
        let checkpoint = Checkpoint::open(&note, &[verifier], None)?;
        let log = self.tenant(tenant_id)?;
        let proof = log.inclusion_proof(seq, checkpoint.size)?;
        Ok((Receipt { index: seq, proof, checkpoint: note }, log.entry(seq)?))
    }
}

/// Signs the log's committed size and replaces the stored checkpoint atomically.
fn write_checkpoint(key: &LedgerKey, tenant: &str, log: &TenantLog) -> Result<Checkpoint> {
    let checkpoint = Checkpoint { origin: crate::checkpoint::tenant_origin(key.origin(), tenant), size: log.size(), root: log.root() };
    let note = checkpoint.sign(&[key.signer_for(tenant)?])?;
    let path = log.dir().join("checkpoint");
    let tmp = log.dir().join("checkpoint.tmp");
    std::fs::write(&tmp, note.as_bytes()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok(checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_signs_checkpoints_and_receipts_verify_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut ledger = Ledger::open(dir.path(), key.clone()).unwrap();
        for i in 0..50u64 {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            ledger.tenant(tenant).unwrap().append(format!("entry {i}").as_bytes()).unwrap();
        }
        let checkpoints = ledger.commit().unwrap();
        assert_eq!(checkpoints.len(), 2);
        assert!(ledger.commit().unwrap().is_empty(), "nothing new, no new checkpoint");
        drop(ledger);

        let mut ledger = Ledger::open(dir.path(), key.clone()).unwrap();
        assert_eq!(ledger.tenant_ids().unwrap(), ["acme", "globex"]);
        let (receipt, entry) = ledger.receipt("globex", 3).unwrap();
        assert_eq!(entry, b"entry 7");
        let vkey = key.signer_for("globex").unwrap().verifier();
        receipt.verify(&entry, &[vkey.clone()], Some("tally.example.com/t/globex")).unwrap();
        // A tenant's key does not vouch for another tenant's log.
        let acme = key.signer_for("acme").unwrap().verifier();
        assert!(receipt.verify(&entry, &[acme], None).is_err());
        assert!(ledger.tenant("../etc").is_err(), "tenant ids are validated before touching paths");
    }

    #[test]
    fn a_checkpoint_lost_after_its_commit_is_re_signed_identically_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let key = LedgerKey::generate("tally.example.com").unwrap();
        let mut ledger = Ledger::open(dir.path(), key.clone()).unwrap();
        ledger.tenant("acme").unwrap().append(b"one").unwrap();
        ledger.commit().unwrap();
        let signed = ledger.checkpoint_note("acme").unwrap();
        drop(ledger);
        std::fs::remove_file(dir.path().join("t/acme/checkpoint")).unwrap();
        let mut ledger = Ledger::open(dir.path(), key).unwrap();
        assert_eq!(ledger.checkpoint_note("acme").unwrap(), signed);
    }
}
