//! The C2SP tlog-tiles layout of a tenant's log: paths, hash tiles and entry bundles.
//!
//! Tile height is 8. Tile `N` at level `L` holds up to 256 hashes of tree level `8L`, nodes
//! `N*256 .. N*256+W`; a full tile has 256 (path `tile/<L>/<N>`), a partial one `W < 256`
//! (`tile/<L>/<N>.p/<W>`). `<N>` is written in 3-digit groups, all but the last prefixed with `x`
//! (`1234067` → `x001/x234/067`). Entry bundles (`tile/entries/<N>[.p/<W>]`) hold entries
//! `N*256 .. N*256+W`, each prefixed with its length as a big-endian uint16.
//!
//! Only perfect nodes appear in tiles, so every tile is a plain read of stored nodes; a partial
//! tile of any width up to what the tree holds is served, because clients fetch the widths of
//! older checkpoints.

use crate::error::{Error, Result};
use crate::merkle::{Hash, NodeSource};

pub const TILE_WIDTH: u64 = 256;

#[cfg(test)]
mod bundle_tests {
    use super::*;

    #[test]
    fn bundles_parse_back_and_refuse_cut_or_padded_bytes() {
        let bundle = [&[0u8, 2][..], b"ab", &[0, 0], &[0, 1], b"c"].concat();
        assert_eq!(parse_entry_bundle(&bundle, 3).unwrap(), vec![b"ab".to_vec(), vec![], b"c".to_vec()]);
        assert!(parse_entry_bundle(&bundle, 2).unwrap_err().to_string().contains("not 2"));
        assert!(parse_entry_bundle(&bundle[..bundle.len() - 1], 3).unwrap_err().to_string().contains("remain"));
        assert!(parse_entry_bundle(&[0], 1).unwrap_err().to_string().contains("cut short"));
    }
}

/// A parsed tlog-tiles path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TilePath {
    Hashes { level: u8, index: u64, width: u16 },
    Entries { index: u64, width: u16 },
}

fn encode_index(mut n: u64) -> String {
    let mut s = format!("{:03}", n % 1000);
    n /= 1000;
    while n > 0 {
        s = format!("x{:03}/{s}", n % 1000);
        n /= 1000;
    }
    s
}

fn suffix(width: u16) -> String {
    if u64::from(width) == TILE_WIDTH {
        String::new()
    } else {
        format!(".p/{width}")
    }
}

impl TilePath {
    /// The path below a log's prefix, e.g. `tile/0/x001/000.p/7`.
    pub fn to_path(self) -> String {
        match self {
            TilePath::Hashes { level, index, width } => format!("tile/{level}/{}{}", encode_index(index), suffix(width)),
            TilePath::Entries { index, width } => format!("tile/entries/{}{}", encode_index(index), suffix(width)),
        }
    }

    /// Parses a path below the log's prefix; rejects every non-canonical spelling.
    pub fn parse(path: &str) -> Result<TilePath> {
        let bad = || Error::BadTilePath(path.to_string());
        let rest = path.strip_prefix("tile/").ok_or_else(bad)?;
        let (kind, rest) = rest.split_once('/').ok_or_else(bad)?;
        let (index_part, width) = match rest.split_once(".p/") {
            None => (rest, TILE_WIDTH as u16),
            Some((index_part, w)) => {
                let width: u16 = parse_decimal(w).filter(|w| (1..TILE_WIDTH).contains(w)).ok_or_else(bad)? as u16;
                (index_part, width)
            }
        };
        let groups: Vec<&str> = index_part.split('/').collect();
        let mut index: u64 = 0;
        for (i, group) in groups.iter().enumerate() {
            let digits = if i + 1 < groups.len() { group.strip_prefix('x').ok_or_else(bad)? } else { group };
            if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let value: u64 = digits.parse().map_err(|_| bad())?;
            index = index.checked_mul(1000).and_then(|x| x.checked_add(value)).ok_or_else(bad)?;
        }
        // Leading zero groups are not canonical (`x000/001` is `001`).
        if groups.len() > 1 && groups[0] == "x000" {
            return Err(bad());
        }
        if kind == "entries" {
            return Ok(TilePath::Entries { index, width });
        }
        let level = parse_decimal(kind).filter(|l| *l < 64).ok_or_else(bad)? as u8;
        Ok(TilePath::Hashes { level, index, width })
    }
}

fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// How many nodes of tile (`level`, `index`) exist in a tree of `size` leaves (0..=256).
pub fn available_width(level: u8, index: u64, size: u64) -> u64 {
    let nodes_at_level = size.checked_shr(8 * u32::from(level)).unwrap_or(0);
    nodes_at_level.saturating_sub(index.saturating_mul(TILE_WIDTH)).min(TILE_WIDTH)
}

/// The entries of an entry bundle (each `u16 BE length || bytes`, as
/// [`crate::TenantEntries::entry_bundle`] writes them), which must hold exactly `width`.
pub fn parse_entry_bundle(bytes: &[u8], width: u64) -> Result<Vec<Vec<u8>>> {
    let bad = |why: String| Error::BadRecord(format!("entry bundle: {why}"));
    let mut entries = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let [hi, lo, tail @ ..] = rest else { return Err(bad("a length is cut short".into())) };
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        if tail.len() < len {
            return Err(bad(format!("entry {} says {len} bytes but {} remain", entries.len(), tail.len())));
        }
        entries.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    if entries.len() as u64 != width {
        return Err(bad(format!("holds {} entries, not {width}", entries.len())));
    }
    Ok(entries)
}

/// The bytes of a hash tile (`width` × 32), if the tree of `size` leaves holds it.
pub fn hash_tile<S: NodeSource<Error = Error> + ?Sized>(src: &S, level: u8, index: u64, width: u16, size: u64) -> Result<Vec<u8>> {
    if u64::from(width) > available_width(level, index, size) {
        return Err(Error::NoSuchTile(TilePath::Hashes { level, index, width }.to_path()));
    }
    let mut out = Vec::with_capacity(usize::from(width) * 32);
    for i in 0..u64::from(width) {
        let node: Hash = src.node(8 * u32::from(level), index * TILE_WIDTH + i)?;
        out.extend_from_slice(&node);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_encoding() {
        for (n, s) in [(0, "000"), (999, "999"), (1000, "x001/000"), (1234067, "x001/x234/067"), (123456789, "x123/x456/789")] {
            assert_eq!(encode_index(n), s);
            let path = TilePath::Hashes { level: 0, index: n, width: 256 }.to_path();
            assert_eq!(TilePath::parse(&path).unwrap(), TilePath::Hashes { level: 0, index: n, width: 256 });
        }
    }

    #[test]
    fn non_canonical_paths_are_rejected() {
        for bad in [
            "tile/0/1",
            "tile/00/000",
            "tile/0/000.p/256",
            "tile/0/000.p/0",
            "tile/0/000.p/07",
            "tile/0/x000/001",
            "tile/0/001/002",
            "tile/64/000",
            "tile/0/x1/000",
            "tiles/0/000",
            "tile/entries/00",
        ] {
            assert!(TilePath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn widths_follow_the_spec_examples() {
        // C2SP: a 70000-leaf tree has tile/0/273.p/112, tile/1/001.p/17 and tile/2/000.p/1.
        assert_eq!(available_width(0, 273, 70000), 112);
        assert_eq!(available_width(0, 272, 70000), 256);
        assert_eq!(available_width(1, 1, 70000), 17);
        assert_eq!(available_width(2, 0, 70000), 1);
        assert_eq!(available_width(3, 0, 70000), 0);
    }
}
