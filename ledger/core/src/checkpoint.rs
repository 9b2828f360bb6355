//! C2SP tlog-checkpoints: the signed tree head of one tenant's log.
//!
//! Text: origin, tree size in decimal (no leading zeros), base64 root hash, each LF-terminated,
//! signed as a note. A tenant's origin (and key name) is `<log-origin>/t/<tenant_id>`. The text is
//! a pure function of (origin, size, root) and Ed25519 signatures are deterministic, so a
//! checkpoint for a given tree size and key is always the same bytes.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::error::{Error, Result};
use crate::merkle::Hash;
use crate::note::{sign_note, verify_note, NoteSigner, NoteVerifier};

/// The origin (and key name) of a tenant's log.
pub fn tenant_origin(log_origin: &str, tenant_id: &str) -> String {
    format!("{}/t/{tenant_id}", log_origin.trim_end_matches('/'))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The note text (what gets signed).
    pub fn text(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root))
    }

    /// Signs the checkpoint with every signer (several during a key rotation).
    pub fn sign(&self, signers: &[NoteSigner]) -> Result<String> {
        sign_note(&self.text(), signers)
    }

    /// Parses checkpoint text (strictly: no leading zeros, a 32-byte root). Extension lines are
    /// allowed by the format and ignored.
    pub fn parse_text(text: &str) -> Result<Checkpoint> {
        let bad = |why: &str| Error::BadCheckpoint(why.to_string());
        let mut lines = text.split('\n');
        let origin = lines.next().filter(|o| !o.is_empty()).ok_or_else(|| bad("empty origin line"))?;
        let size_line = lines.next().ok_or_else(|| bad("missing tree size line"))?;
        if size_line.is_empty() || (size_line.len() > 1 && size_line.starts_with('0')) || !size_line.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(&format!("tree size {size_line:?} is not a decimal number without leading zeros")));
        }
        let size = size_line.parse::<u64>().map_err(|_| bad("tree size does not fit 64 bits"))?;
        let root_line = lines.next().ok_or_else(|| bad("missing root hash line"))?;
        let root = B64.decode(root_line).map_err(|_| bad("root hash is not base64"))?;
        let root: Hash = root.try_into().map_err(|_| bad("root hash is not 32 bytes"))?;
        if !text.ends_with('\n') {
            return Err(bad("checkpoint text must end in a newline"));
        }
        Ok(Checkpoint { origin: origin.to_string(), size, root })
    }

    /// The checkpoint a signed note states, without checking its signatures: for a note this
    /// service wrote and stored itself (a projection watermark), never for one from outside.
    pub fn parse_note(note: &str) -> Result<Checkpoint> {
        let (text, _) = crate::note::split_note(note)?;
        Checkpoint::parse_text(text)
    }

    /// Verifies a signed checkpoint note and parses it; with `expected_origin`, also checks it.
    pub fn open(note: &str, verifiers: &[NoteVerifier], expected_origin: Option<&str>) -> Result<Checkpoint> {
        let verified = verify_note(note, verifiers)?;
        let checkpoint = Checkpoint::parse_text(&verified.text)?;
        if let Some(expected) = expected_origin {
            if checkpoint.origin != expected {
                return Err(Error::OriginMismatch { expected: expected.to_string(), found: checkpoint.origin });
            }
        }
        // The log's key name must be its origin; a key for another log proves nothing here.
        if !verified.signed_by.contains(&checkpoint.origin) {
            return Err(Error::OriginMismatch { expected: checkpoint.origin.clone(), found: verified.signed_by.join(", ") });
        }
        Ok(checkpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::empty_root;

    #[test]
    fn empty_tree_checkpoint_text_matches_the_spec() {
        let cp = Checkpoint { origin: "example.com/log".into(), size: 0, root: empty_root() };
        assert_eq!(cp.text(), "example.com/log\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n");
        assert_eq!(Checkpoint::parse_text(&cp.text()).unwrap(), cp);
    }

    #[test]
    fn sign_open_and_origin_rules() {
        let origin = tenant_origin("tally.example.com", "acme");
        assert_eq!(origin, "tally.example.com/t/acme");
        let signer = NoteSigner::new(&origin, [3; 32]).unwrap();
        let cp = Checkpoint { origin: origin.clone(), size: 12, root: [5; 32] };
        let note = cp.sign(std::slice::from_ref(&signer)).unwrap();
        assert_eq!(Checkpoint::open(&note, &[signer.verifier()], Some(&origin)).unwrap(), cp);
        assert!(matches!(Checkpoint::open(&note, &[signer.verifier()], Some("tally.example.com/t/other")), Err(Error::OriginMismatch { .. })));
        // A key whose name is not the checkpoint's origin proves nothing about this log.
        let other = NoteSigner::new("tally.example.com/t/globex", [3; 32]).unwrap();
        let forged = cp.sign(std::slice::from_ref(&other)).unwrap();
        assert!(matches!(Checkpoint::open(&forged, &[other.verifier()], None), Err(Error::OriginMismatch { .. })));
        // Reading back a note we stored ourselves: the same checkpoint, signatures not needed.
        assert_eq!(Checkpoint::parse_note(&note).unwrap(), cp);
        assert!(Checkpoint::parse_note("tally.example.com/t/acme\n12\n").is_err(), "a note has a signature block");
    }

    #[test]
    fn strict_parsing() {
        for bad in
            ["o\n012\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n", "o\n1\nAAAA\n", "\n1\nx\n", "o\n-1\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"]
        {
            assert!(Checkpoint::parse_text(bad).is_err(), "{bad:?}");
        }
    }
}
