//! The ledger's private signing key on disk and the per-tenant signers derived from it.
//!
//! One Ed25519 key signs every tenant's checkpoints; what differs per tenant is the key *name*
//! (`<log-origin>/t/<tenant>`), and with it the key ID and the vkey. File format (one line, the
//! same shape as Go's note private keys): `PRIVATE+KEY+<log-origin>+<hex key id>+<base64(0x01 || seed)>`.
//! Files are created with mode 0600 and never overwritten; like ssh, [`LedgerKey::read`] refuses
//! a key file that its group or others may read or write.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore as _;

use crate::checkpoint::tenant_origin;
use crate::error::{Error, Result};
use crate::note::{NoteSigner, NoteVerifier};

#[derive(Clone)]
pub struct LedgerKey {
    origin: String,
    seed: [u8; 32],
    /// The Ed25519 key of `seed`, derived once: deriving it (a scalar multiplication) costs
    /// about as much as a signature, and every checkpoint needs a tenant's signer.
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for LedgerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerKey").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl LedgerKey {
    /// A fresh random key for the log origin (e.g. `tally.example.com`).
    pub fn generate(origin: &str) -> Result<Self> {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        NoteSigner::new(origin, seed)?;
        Ok(LedgerKey { origin: origin.trim_end_matches('/').to_string(), seed, key: ed25519_dalek::SigningKey::from_bytes(&seed) })
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The signer for one tenant's log.
    pub fn signer_for(&self, tenant_id: &str) -> Result<NoteSigner> {
        NoteSigner::with_key(&tenant_origin(&self.origin, tenant_id), self.key.clone())
    }

    /// The vkey of the log origin itself.
    pub fn origin_verifier(&self) -> Result<NoteVerifier> {
        Ok(NoteSigner::new(&self.origin, self.seed)?.verifier())
    }

    pub fn to_text(&self) -> Result<String> {
        let signer = NoteSigner::new(&self.origin, self.seed)?;
        let mut key = vec![0x01];
        key.extend_from_slice(&self.seed);
        Ok(format!("PRIVATE+KEY+{}+{:08x}+{}\n", self.origin, signer.id(), B64.encode(key)))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: &str| Error::BadKey(format!("private key file: {why}"));
        let rest = text.trim().strip_prefix("PRIVATE+KEY+").ok_or_else(|| bad("must start with PRIVATE+KEY+"))?;
        let mut parts = rest.splitn(3, '+');
        let (origin, id, key) = match (parts.next(), parts.next(), parts.next()) {
            (Some(o), Some(i), Some(k)) => (o, i, k),
            _ => return Err(bad("expected PRIVATE+KEY+<origin>+<key id>+<key>")),
        };
        let key = B64.decode(key).map_err(|_| bad("key is not base64"))?;
        let seed: [u8; 32] = match key.split_first() {
            Some((&0x01, seed)) => seed.try_into().map_err(|_| bad("an Ed25519 seed is 32 bytes"))?,
            _ => return Err(bad("unknown algorithm (only Ed25519, 0x01)")),
        };
        let signer = NoteSigner::new(origin, seed)?;
        if format!("{:08x}", signer.id()) != id {
            return Err(bad("key id does not match the origin and key"));
        }
        Ok(LedgerKey { origin: origin.to_string(), seed, key: ed25519_dalek::SigningKey::from_bytes(&seed) })
    }

    /// Writes a new key file with mode 0600; refuses to overwrite an existing file.
    pub fn write_new(&self, path: &Path) -> Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| Error::io(path, e))?;
        f.write_all(self.to_text()?.as_bytes()).map_err(|e| Error::io(path, e))?;
        f.sync_all().map_err(|e| Error::io(path, e))
    }

    /// Reads a key file, refusing one that anyone but its owner may read or write (mode bits
    /// `0o077`, as ssh does): a signing key others could read is a key others could sign with.
    pub fn read(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // The mode of the file actually opened, not of whatever the path names a moment later.
        let mode = file.metadata().map_err(|e| Error::io(path, e))?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(Error::BadKey(format!(
                "private key file {} has mode {mode:04o}: it must not be readable or writable by group or others; run `chmod 600 {}`",
                path.display(),
                path.display()
            )));
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(|e| Error::io(path, e))?;
        // A file that is not a key is named, so an operator with several keys knows which one.
        LedgerKey::parse(&text).map_err(|e| match e {
            Error::BadKey(why) => Error::BadKey(format!("{}: {why}", path.display())),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.key");
        let key = LedgerKey::generate("tally.example.com").unwrap();
        key.write_new(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let back = LedgerKey::read(&path).unwrap();
        assert_eq!(back.signer_for("acme").unwrap().verifier(), key.signer_for("acme").unwrap().verifier());
        assert_eq!(back.signer_for("acme").unwrap().name(), "tally.example.com/t/acme");
        assert!(LedgerKey::generate("tally.example.com").unwrap().write_new(&path).is_err());
        let tampered = key.to_text().unwrap().replacen("+", "+x", 3);
        assert!(LedgerKey::parse(&tampered).is_err());
    }

    #[test]
    fn a_key_file_others_may_read_or_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.key");
        LedgerKey::generate("tally.example.com").unwrap().write_new(&path).unwrap();
        let chmod = |mode: u32| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        for mode in [0o640, 0o604, 0o620, 0o602, 0o644, 0o660, 0o666, 0o700 | 0o010] {
            chmod(mode);
            let err = LedgerKey::read(&path).unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains(&format!("mode {mode:04o}")), "{err}");
            assert!(err.contains(&format!("chmod 600 {}", path.display())), "{err}");
        }
        for mode in [0o600, 0o400, 0o700] {
            chmod(mode);
            LedgerKey::read(&path).unwrap_or_else(|e| panic!("{mode:o}: {e}"));
        }
    }
}
