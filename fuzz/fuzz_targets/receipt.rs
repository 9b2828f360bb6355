//! Receipts as `tally verify receipt` reads them: the text format, then the inclusion proof
//! against the signed checkpoint it carries, for the entry the seeds were made for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_log::Receipt;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(receipt) = Receipt::parse(text) else { return };
    // Round trip: what parses prints back to something that parses the same.
    let again = Receipt::parse(&receipt.to_text()).expect("a printed receipt parses");
    assert_eq!((again.index, &again.proof), (receipt.index, &receipt.proof));
    let verifier = tally_fuzz::verifier();
    let _ = receipt.verify(b"entry 0", std::slice::from_ref(&verifier), Some(tally_fuzz::ORIGIN));
});
