//! Signed notes and checkpoints as a verifier reads them: parsing, signature checks with a
//! known key, and the checkpoint body; a vkey string as `--vkey` takes it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_log::{verify_note, Checkpoint, NoteVerifier};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let verifier = tally_fuzz::verifier();
    if let Ok(note) = verify_note(text, std::slice::from_ref(&verifier)) {
        // A note that verifies was signed by the seed key: its text is what was signed.
        let _ = Checkpoint::parse_text(&note.text);
    }
    let _ = Checkpoint::parse_note(text);
    if let Ok(checkpoint) = Checkpoint::open(text, std::slice::from_ref(&verifier), Some(tally_fuzz::ORIGIN)) {
        assert_eq!(checkpoint.origin, tally_fuzz::ORIGIN);
    }
    let _ = NoteVerifier::parse(text);
});
