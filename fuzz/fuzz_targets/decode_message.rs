//! A message as the ledger's consumer receives it (key, value, headers): every input either
//! decodes or is refused with a code, never a panic; a decoded event names a valid tenant.
//!
//! Input framing (so seeds are easy to write): `[key len u8, 255 = no key][key][header count
//! u8] { [name len u8][name][value len u8][value] } [message value: the rest]`. A header name
//! that is not UTF-8 is skipped: Kafka header names are strings.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn take<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (&len, rest) = data.split_first()?;
    let len = usize::from(len).min(rest.len());
    let (taken, rest) = rest.split_at(len);
    *data = rest;
    Some(taken)
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let key = match data.first() {
        Some(255) => {
            data = &data[1..];
            None
        }
        Some(_) => take(&mut data),
        None => return,
    };
    let Some((&count, rest)) = data.split_first() else { return };
    data = rest;
    let mut headers = Vec::new();
    for _ in 0..count {
        let (Some(name), Some(value)) = (take(&mut data), take(&mut data)) else { break };
        if let Ok(name) = std::str::from_utf8(name) {
            headers.push((name, value));
        }
    }
    match tally_schemas::decode_message(key, data, &headers) {
        Ok(decoded) => assert!(tally_schemas::validate_tenant_id(&decoded.event.tenant_id).is_ok()),
        Err(rejection) => assert!(!rejection.code.as_str().is_empty()),
    }
});
