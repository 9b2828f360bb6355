//! Tile paths as the tile routes receive them, and entry bundles as a tile client reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_log::{parse_entry_bundle, TilePath};

fuzz_target!(|data: &[u8]| {
    if let Ok(path) = std::str::from_utf8(data) {
        if let Ok(tile) = TilePath::parse(path) {
            // Only canonical spellings parse: printing one gives the same path back.
            assert_eq!(tile.to_path(), path);
        }
    }
    // A bundle's declared width comes from its path: any of 1..=256.
    if let Some((&width, bundle)) = data.split_first() {
        let _ = parse_entry_bundle(bundle, u64::from(width) + 1);
    }
});
