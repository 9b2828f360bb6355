//! What the log core's benchmarks share: the synthetic entry they append and how they read
//! their settings, so `ledger` and `storage` figures are comparable.

/// Every benchmark entry is this long: about a real event record.
pub const ENTRY_BYTES: usize = 300;

/// The integer setting `name` from the environment, or `default`.
pub fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Entry `i`: record-shaped JSON padded to [`ENTRY_BYTES`], written into `buf`.
pub fn entry(i: u64, buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(format!("{{\"seq\":{i},\"type\":\"event\",\"event\":{{").as_bytes());
    buf.resize(ENTRY_BYTES - 2, b'x');
    buf.extend_from_slice(b"}}");
}
