//! What the fuzz targets share: the one signing key their notes are checked against, so a
//! seed corpus of validly signed checkpoints and receipts (`seeds`) lets the fuzzer reach the
//! code past the signature check.

use tally_log::{NoteSigner, NoteVerifier};

/// The log origin of the seeds (a tenant log, as the ledger names them).
pub const ORIGIN: &str = "fuzz.tally.example/t/acme";

/// The fixed key the seeds are signed with: fuzzing needs reproducible inputs, not secrecy.
pub fn signer() -> NoteSigner {
    NoteSigner::new(ORIGIN, [7; 32]).expect("a valid key name")
}

pub fn verifier() -> NoteVerifier {
    signer().verifier()
}
