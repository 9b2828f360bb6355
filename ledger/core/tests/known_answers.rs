//! Known answers from outside this project (see tests/data/known_answers.json for sources):
//! the RFC 6962 reference tree, C2SP tile paths, and a Go `sumdb/note` signature.

use serde_json::Value;
use tally_log::merkle::{self, consistency_proof, inclusion_proof, leaf_hash, verify_consistency, verify_inclusion, Hash, MemoryTree};
use tally_log::{verify_note, NoteSigner, NoteVerifier, TenantEntries, TenantLog, TilePath};

fn data() -> Value {
    serde_json::from_str(include_str!("data/known_answers.json")).unwrap()
}

fn h(v: &Value) -> Hash {
    hex::decode(v.as_str().unwrap()).unwrap().try_into().unwrap()
}

fn path(v: &Value) -> Vec<Hash> {
    v.as_array().unwrap().iter().map(h).collect()
}

fn reference_tree() -> MemoryTree {
    let mut t = MemoryTree::new();
    for leaf in data()["leaves_hex"].as_array().unwrap() {
        t.push_entry(&hex::decode(leaf.as_str().unwrap()).unwrap());
    }
    t
}

#[test]
fn roots_for_every_prefix_size() {
    let d = data();
    let t = reference_tree();
    assert_eq!(merkle::empty_root(), h(&d["empty_root_hex"]));
    for (size, root) in d["roots_hex"].as_object().unwrap() {
        assert_eq!(merkle::root(&t, size.parse().unwrap()).unwrap(), h(root), "root at size {size}");
    }
}

#[test]
fn inclusion_proofs_match_and_verify() {
    let d = data();
    let t = reference_tree();
    for case in d["inclusion"].as_array().unwrap() {
        let (index, size) = (case["index"].as_u64().unwrap(), case["size"].as_u64().unwrap());
        let expected = path(&case["path"]);
        assert_eq!(inclusion_proof(&t, index, size).unwrap(), expected, "index {index} size {size}");
        verify_inclusion(&h(&case["leaf_hash"]), index, size, &expected, &h(&case["root"])).unwrap();
    }
}

#[test]
fn consistency_proofs_match_and_verify() {
    let d = data();
    let t = reference_tree();
    for case in d["consistency"].as_array().unwrap() {
        let (m, n) = (case["size1"].as_u64().unwrap(), case["size2"].as_u64().unwrap());
        let expected = path(&case["path"]);
        assert_eq!(consistency_proof(&t, m, n).unwrap(), expected, "{m} -> {n}");
        verify_consistency(m, n, &h(&case["root1"]), &h(&case["root2"]), &expected).unwrap();
    }
}

#[test]
fn tile_paths_match_the_c2sp_layout() {
    let d = data();
    for case in d["tile_paths"].as_array().unwrap() {
        let tile = TilePath::Hashes {
            level: case["level"].as_u64().unwrap() as u8,
            index: case["n"].as_u64().unwrap(),
            width: case["width"].as_u64().unwrap() as u16,
        };
        assert_eq!(tile.to_path(), case["path"].as_str().unwrap());
        assert_eq!(TilePath::parse(case["path"].as_str().unwrap()).unwrap(), tile);
    }
    for case in d["entry_bundle_paths"].as_array().unwrap() {
        let bundle = TilePath::Entries { index: case["n"].as_u64().unwrap(), width: case["width"].as_u64().unwrap() as u16 };
        assert_eq!(bundle.to_path(), case["path"].as_str().unwrap());
    }
}

#[test]
fn go_sumdb_note_signature_is_reproduced_and_verified() {
    let d = data();
    let g = &d["go_note"];
    // PRIVATE+KEY+<name>+<id>+base64(0x01 || seed)
    let key = g["signer_key"].as_str().unwrap();
    let parts: Vec<&str> = key.splitn(5, '+').collect();
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD.decode(parts[4]).unwrap();
    let signer = NoteSigner::new(parts[2], raw[1..].try_into().unwrap()).unwrap();
    assert_eq!(signer.verifier().vkey(), g["vkey"].as_str().unwrap());
    let text = g["text"].as_str().unwrap();
    let note = tally_log::sign_note(text, &[signer]).unwrap();
    assert_eq!(note, format!("{text}\n{}\n", g["signature_line"].as_str().unwrap()), "byte-identical to Go");
    verify_note(&note, &[NoteVerifier::parse(g["vkey"].as_str().unwrap()).unwrap()]).unwrap();
}

#[test]
fn tiles_and_bundles_of_a_real_log_agree_with_its_tree() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = TenantLog::open(dir.path()).unwrap();
    let entries: Vec<Vec<u8>> = (0..70_000u32).map(|i| format!("entry {i}").into_bytes()).collect();
    for e in &entries {
        log.append(e).unwrap();
    }
    log.commit().unwrap();
    // Level-0 partial tile of the spec's 70000-leaf example: 112 leaf hashes.
    let tile = log.hash_tile(0, 273, 112).unwrap();
    assert_eq!(tile.len(), 112 * 32);
    assert_eq!(&tile[..32], &leaf_hash(&entries[273 * 256]));
    assert!(log.hash_tile(0, 273, 113).is_err(), "wider than the tree holds");
    assert!(log.hash_tile(0, 273, 100).is_ok(), "older, narrower partial tiles stay served");
    // Level-1 hashes are the roots of full level-0 tiles.
    let level1 = log.hash_tile(1, 1, 17).unwrap();
    let mut sub = MemoryTree::new();
    for e in &entries[256 * 256 + 256 * 16..256 * 256 + 256 * 17] {
        sub.push_entry(e);
    }
    assert_eq!(&level1[16 * 32..], &sub.root());
    // Entry bundle: u16 length prefixes, entries hash to the level-0 tile.
    let bundle = log.entry_bundle(273, 112).unwrap();
    let mut at = 0;
    for i in 0..112 {
        let len = u16::from_be_bytes([bundle[at], bundle[at + 1]]) as usize;
        assert_eq!(&leaf_hash(&bundle[at + 2..at + 2 + len]), &tile[i * 32..i * 32 + 32]);
        at += 2 + len;
    }
    assert_eq!(at, bundle.len());
}
