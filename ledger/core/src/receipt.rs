//! Receipts for regulators: C2SP `tlog-proof@v1` text plus the entry bytes, verifiable offline.
//!
//! ```text
//! c2sp.org/tlog-proof@v1
//! index <i>
//! <base64 inclusion-proof hash, leaf side first>...
//!
//! <the signed checkpoint note>
//! ```
//!
//! The entry travels beside the proof (a separate file): the format's `extra` line is
//! unauthenticated and common parsers cap a line at 64 KiB, while entries reach 65,535 bytes.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::merkle::{leaf_hash, verify_inclusion, Hash};
use crate::note::NoteVerifier;

const HEADER: &str = "c2sp.org/tlog-proof@v1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub index: u64,
    pub proof: Vec<Hash>,
    /// The signed checkpoint note, verbatim.
    pub checkpoint: String,
}

impl Receipt {
    pub fn to_text(&self) -> String {
        let mut out = format!("{HEADER}\nindex {}\n", self.index);
        for h in &self.proof {
            out.push_str(&B64.encode(h));
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&self.checkpoint);
        out
    }

    pub fn parse(text: &str) -> Result<Receipt> {
        let bad = |why: String| Error::BadReceipt(why);
        let rest = text.strip_prefix(HEADER).and_then(|r| r.strip_prefix('\n')).ok_or_else(|| bad(format!("first line must be {HEADER}")))?;
        let (mut line, mut rest) = rest.split_once('\n').ok_or_else(|| bad("missing index line".into()))?;
        if line.starts_with("extra ") {
            // Unauthenticated by design; accepted and ignored.
            (line, rest) = rest.split_once('\n').ok_or_else(|| bad("missing index line".into()))?;
        }
        let index_text = line.strip_prefix("index ").ok_or_else(|| bad(format!("expected 'index <n>', found {line:?}")))?;
        if index_text.is_empty() || (index_text.len() > 1 && index_text.starts_with('0')) || !index_text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(format!("index {index_text:?} is not a decimal number without leading zeros")));
        }
        let index = index_text.parse().map_err(|_| bad("index does not fit 64 bits".into()))?;
        let mut proof = Vec::new();
        loop {
            let (line, after) = rest.split_once('\n').ok_or_else(|| bad("missing blank line before the checkpoint".into()))?;
            rest = after;
            if line.is_empty() {
                break;
            }
            let hash = B64.decode(line).map_err(|_| bad(format!("proof line {} is not base64", proof.len() + 1)))?;
            proof.push(hash.try_into().map_err(|_| bad(format!("proof line {} is not a 32-byte hash", proof.len() + 1)))?);
        }
        if rest.is_empty() {
            return Err(bad("no checkpoint after the proof".into()));
        }
        Ok(Receipt { index, proof, checkpoint: rest.to_string() })
    }

    /// Verifies the checkpoint's signature with `verifiers` and that `entry` is at `index` in it.
    /// With `expected_origin`, also that the checkpoint is that log's.
    pub fn verify(&self, entry: &[u8], verifiers: &[NoteVerifier], expected_origin: Option<&str>) -> Result<Checkpoint> {
        let checkpoint = Checkpoint::open(&self.checkpoint, verifiers, expected_origin)?;
        verify_inclusion(&leaf_hash(entry), self.index, checkpoint.size, &self.proof, &checkpoint.root)?;
        Ok(checkpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{inclusion_proof, root, MemoryTree, ProofError};
    use crate::note::NoteSigner;

    fn setup() -> (Receipt, Vec<u8>, NoteVerifier) {
        let mut tree = MemoryTree::new();
        for i in 0..13 {
            tree.push_entry(format!("entry {i}").as_bytes());
        }
        let signer = NoteSigner::new("tally.example.com/t/acme", [4; 32]).unwrap();
        let cp = Checkpoint { origin: signer.name().into(), size: 13, root: root(&tree, 13).unwrap() };
        let receipt = Receipt { index: 6, proof: inclusion_proof(&tree, 6, 13).unwrap(), checkpoint: cp.sign(std::slice::from_ref(&signer)).unwrap() };
        (receipt, b"entry 6".to_vec(), signer.verifier())
    }

    #[test]
    fn round_trip_and_verify() {
        let (receipt, entry, v) = setup();
        let text = receipt.to_text();
        assert!(text.starts_with("c2sp.org/tlog-proof@v1\nindex 6\n"));
        let parsed = Receipt::parse(&text).unwrap();
        assert_eq!(parsed, receipt);
        assert_eq!(parsed.verify(&entry, std::slice::from_ref(&v), Some("tally.example.com/t/acme")).unwrap().size, 13);
    }

    #[test]
    fn precise_reasons() {
        let (receipt, entry, v) = setup();
        let wrong_entry = receipt.verify(b"entry 7", std::slice::from_ref(&v), None).unwrap_err();
        assert!(matches!(wrong_entry, Error::Proof(ProofError::RootMismatch { .. })), "{wrong_entry}");
        let mut short = receipt.clone();
        short.proof.pop();
        assert!(matches!(short.verify(&entry, std::slice::from_ref(&v), None), Err(Error::Proof(ProofError::WrongProofLength { .. }))));
        let mut far = receipt.clone();
        far.index = 13;
        assert!(matches!(far.verify(&entry, std::slice::from_ref(&v), None), Err(Error::Proof(ProofError::IndexOutOfRange { .. }))));
        let stranger = NoteSigner::new("tally.example.com/t/acme", [5; 32]).unwrap().verifier();
        assert!(matches!(receipt.verify(&entry, &[stranger], None), Err(Error::UnknownKey(_))));
        let mut tampered = receipt.clone();
        tampered.checkpoint = tampered.checkpoint.replacen("13", "14", 1);
        assert!(matches!(tampered.verify(&entry, &[v], None), Err(Error::BadSignature(_))));
    }

    #[test]
    fn every_single_bit_flip_of_the_receipt_or_entry_is_rejected() {
        let (receipt, entry, v) = setup();
        let text = receipt.to_text();
        for i in 0..text.len() {
            for bit in 0..8 {
                let mut bytes = text.as_bytes().to_vec();
                bytes[i] ^= 1 << bit;
                let Ok(s) = String::from_utf8(bytes) else { continue };
                if let Ok(r) = Receipt::parse(&s) {
                    // Base64 has slack bits in its last character: a flip there can decode to
                    // the same bytes, i.e. the same receipt. Anything else must fail.
                    if r != receipt {
                        assert!(r.verify(&entry, std::slice::from_ref(&v), None).is_err(), "flip at byte {i} bit {bit} accepted");
                    }
                }
            }
        }
        for i in 0..entry.len() * 8 {
            let mut e = entry.clone();
            e[i / 8] ^= 1 << (i % 8);
            assert!(receipt.verify(&e, std::slice::from_ref(&v), None).is_err());
        }
    }
}
