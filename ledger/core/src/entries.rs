//! [`TenantEntries`]: read access to one tenant's committed log, whatever stores it (a
//! [`crate::TenantView`] of a partition journal, or a pre-journal [`crate::LogReader`] that the
//! migration reads). Everything served from a log (entries, roots, proofs, tiles, bundles) is
//! computed here from entries and stored nodes, so every store answers byte for byte alike.
//!
//! Invariant: nothing here reads past [`TenantEntries::size`], the committed size.

use crate::error::{Error, Result};
use crate::merkle::{self, Hash, NodeSource};
use crate::tiles::{available_width, TilePath};

/// One tenant's committed entries and stored Merkle nodes.
pub trait TenantEntries: NodeSource<Error = Error> {
    /// The committed size.
    fn size(&self) -> u64;
    /// Committed entry `seq` (its checksum verified).
    fn entry(&self, seq: u64) -> Result<Vec<u8>>;

    /// The root of the tree at `size` (at most the committed size).
    fn root_at(&self, size: u64) -> Result<Hash> {
        check_size(self, size)?;
        merkle::root(self, size)
    }

    /// The inclusion proof of entry `seq` in the tree at `size`.
    fn inclusion_proof(&self, seq: u64, size: u64) -> Result<Vec<Hash>> {
        check_size(self, size)?;
        if seq >= size {
            return Err(Error::NoSuchEntry { seq, size });
        }
        merkle::inclusion_proof(self, seq, size)
    }

    /// The proof that the tree at `new_size` extends the tree at `old_size`.
    fn consistency_proof(&self, old_size: u64, new_size: u64) -> Result<Vec<Hash>> {
        check_size(self, new_size)?;
        if old_size == 0 || old_size > new_size {
            return Err(Error::NoSuchEntry { seq: old_size, size: new_size });
        }
        merkle::consistency_proof(self, old_size, new_size)
    }

    /// A hash tile of the committed tree (`tile/<level>/<index>[.p/<width>]`).
    fn hash_tile(&self, level: u8, index: u64, width: u16) -> Result<Vec<u8>> {
        crate::tiles::hash_tile(self, level, index, width, self.size())
    }

    /// An entry bundle (`tile/entries/<index>[.p/<width>]`): each entry as `u16 BE length || bytes`.
    fn entry_bundle(&self, index: u64, width: u16) -> Result<Vec<u8>> {
        if u64::from(width) > available_width(0, index, self.size()) {
            return Err(Error::NoSuchTile(TilePath::Entries { index, width }.to_path()));
        }
        let mut out = Vec::new();
        for seq in index * 256..index * 256 + u64::from(width) {
            let entry = self.entry(seq)?;
            out.extend_from_slice(&(entry.len() as u16).to_be_bytes());
            out.extend_from_slice(&entry);
        }
        Ok(out)
    }
}

fn check_size<S: TenantEntries + ?Sized>(log: &S, size: u64) -> Result<()> {
    if size > log.size() {
        return Err(Error::NoSuchEntry { seq: size, size: log.size() });
    }
    Ok(())
}
