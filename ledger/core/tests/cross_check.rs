//! Cross-check against independent implementations (dev-dependencies, ports of Go's
//! golang.org/x/mod/sumdb by Cloudflare): `tlog_tiles` verifies our inclusion and consistency
//! proofs and parses our checkpoints, `signed_note` verifies our signatures with our vkeys. Our own
//! verifier must reject every single-bit mutation of proof, root, size, index, signature and entry.

use rand::{Rng, SeedableRng};
use tally_log::merkle::{self, leaf_hash, verify_consistency, verify_inclusion, Hash, MemoryTree};
use tally_log::{Checkpoint, NoteSigner, Receipt, TenantLog};

fn entry(i: u64) -> Vec<u8> {
    format!("{{\"seq\":{i},\"type\":\"event\",\"n\":{}}}", i.wrapping_mul(0x9e37_79b9)).into_bytes()
}

fn their_verifiers(vkey: &str) -> signed_note::VerifierList {
    signed_note::VerifierList::new(vec![Box::new(signed_note::StandardVerifier::new(vkey).expect("their parser accepts our vkey"))])
}

/// Checks random proofs of a tree with their verifier.
fn cross_check_tree<S: merkle::NodeSource>(tree: &S, size: u64, rng: &mut impl Rng)
where
    S::Error: std::fmt::Debug,
{
    let th = |n: u64| tlog_tiles::Hash(merkle::root(tree, n).unwrap());
    for _ in 0..100 {
        let n = rng.gen_range(1..=size);
        let i = rng.gen_range(0..n);
        let proof: Vec<tlog_tiles::Hash> = merkle::inclusion_proof(tree, i, n).unwrap().into_iter().map(tlog_tiles::Hash).collect();
        let leaf = tlog_tiles::record_hash(&entry(i));
        tlog_tiles::check_record(&proof, n, th(n), i, leaf).unwrap_or_else(|e| panic!("inclusion {i} in {n}: {e}"));
        let m = rng.gen_range(1..=n);
        let proof: Vec<tlog_tiles::Hash> = merkle::consistency_proof(tree, m, n).unwrap().into_iter().map(tlog_tiles::Hash).collect();
        tlog_tiles::check_tree(&proof, n, th(n), m, th(m)).unwrap_or_else(|e| panic!("consistency {m} -> {n}: {e}"));
    }
}

#[test]
fn their_verifier_accepts_our_proofs_for_random_trees_up_to_100k_leaves() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9162);
    let mut sizes = vec![1u64, 2, 3, 7, 8, 255, 256, 257, 1000, 65_536];
    sizes.extend((0..3).map(|_| rng.gen_range(1..100_000u64)));
    sizes.push(100_000);
    let mut tree = MemoryTree::new();
    for &size in &sizes {
        while tree.size() < size {
            tree.push_entry(&entry(tree.size()));
        }
        cross_check_tree(&tree, size, &mut rng);
    }
}

#[test]
fn their_verifier_accepts_proofs_served_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = TenantLog::open(dir.path()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(6962);
    for i in 0..20_000 {
        log.append(&entry(i)).unwrap();
        if rng.gen_ratio(1, 500) {
            log.commit().unwrap();
        }
    }
    log.commit().unwrap();
    cross_check_tree(&log, 20_000, &mut rng);
}

#[test]
fn their_note_verifier_and_checkpoint_parser_accept_our_checkpoints_and_receipts() {
    let signer = NoteSigner::new("tally.example.com/t/acme", [42; 32]).unwrap();
    let vkey = signer.verifier().vkey();
    let mut tree = MemoryTree::new();
    for i in 0..1234 {
        tree.push_entry(&entry(i));
    }
    let cp = Checkpoint { origin: signer.name().into(), size: 1234, root: tree.root() };
    let note_text = cp.sign(std::slice::from_ref(&signer)).unwrap();
    let note = signed_note::Note::from_bytes(note_text.as_bytes()).expect("their parser accepts our note");
    let (verified, _) = note.verify(&their_verifiers(&vkey)).expect("their verifier accepts our signature");
    assert_eq!(verified.len(), 1);
    let theirs = tlog_tiles::Checkpoint::from_bytes(note.text()).expect("their checkpoint parser accepts ours");
    assert_eq!((theirs.origin(), theirs.size(), theirs.hash().0), (cp.origin.as_str(), 1234, cp.root));

    // The receipt, parsed naively here (not by our parser) and checked with their verifier.
    let receipt = Receipt { index: 777, proof: merkle::inclusion_proof(&tree, 777, 1234).unwrap(), checkpoint: note_text };
    let text = receipt.to_text();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("c2sp.org/tlog-proof@v1"));
    let index: u64 = lines.next().unwrap().strip_prefix("index ").unwrap().parse().unwrap();
    use base64::Engine as _;
    let proof: Vec<tlog_tiles::Hash> = lines
        .by_ref()
        .take_while(|l| !l.is_empty())
        .map(|l| tlog_tiles::Hash(base64::engine::general_purpose::STANDARD.decode(l).unwrap().try_into().unwrap()))
        .collect();
    let rest: Vec<&str> = lines.collect();
    let checkpoint_note = format!("{}\n", rest.join("\n"));
    let note = signed_note::Note::from_bytes(checkpoint_note.as_bytes()).unwrap();
    note.verify(&their_verifiers(&vkey)).unwrap();
    let theirs = tlog_tiles::Checkpoint::from_bytes(note.text()).unwrap();
    tlog_tiles::check_record(&proof, theirs.size(), *theirs.hash(), index, tlog_tiles::record_hash(&entry(777))).unwrap();
}

#[test]
fn our_verifier_rejects_every_single_bit_mutation() {
    let mut tree = MemoryTree::new();
    for i in 0..1000 {
        tree.push_entry(&entry(i));
    }
    let (i, n, m) = (345u64, 1000u64, 300u64);
    let root = tree.root();
    let leaf = leaf_hash(&entry(i));
    let proof = merkle::inclusion_proof(&tree, i, n).unwrap();
    verify_inclusion(&leaf, i, n, &proof, &root).unwrap();
    for k in 0..proof.len() * 256 {
        let mut p = proof.clone();
        p[k / 256][(k % 256) / 8] ^= 1 << (k % 8);
        assert!(verify_inclusion(&leaf, i, n, &p, &root).is_err(), "proof bit {k}");
    }
    for b in 0..256 {
        let mut r: Hash = root;
        r[b / 8] ^= 1 << (b % 8);
        assert!(verify_inclusion(&leaf, i, n, &proof, &r).is_err(), "root bit {b}");
    }
    for b in 0..64 {
        assert!(verify_inclusion(&leaf, i ^ (1 << b), n, &proof, &root).is_err(), "index bit {b}");
    }
    // A bare RFC 9162 path does not bind the tree size (leaf 345's path is the same shape in trees
    // of 1000 and 1001 leaves); the size is bound by the signed checkpoint. So size and root
    // mutations are checked on the receipt, where they live in the signed text.
    let signer = NoteSigner::new("tally.example.com/t/acme", [42; 32]).unwrap();
    let receipt = Receipt {
        index: i,
        proof: proof.clone(),
        checkpoint: Checkpoint { origin: signer.name().into(), size: n, root }.sign(std::slice::from_ref(&signer)).unwrap(),
    };
    receipt.verify(&entry(i), &[signer.verifier()], None).unwrap();
    for b in 0..64 {
        let mut r = receipt.clone();
        r.checkpoint = r.checkpoint.replacen(&format!("\n{n}\n"), &format!("\n{}\n", n ^ (1 << b)), 1);
        assert!(r.verify(&entry(i), &[signer.verifier()], None).is_err(), "signed size bit {b}");
    }
    use base64::Engine as _;
    let b64 = |h: &Hash| base64::engine::general_purpose::STANDARD.encode(h);
    for b in 0..256 {
        let mut flipped = root;
        flipped[b / 8] ^= 1 << (b % 8);
        let mut r = receipt.clone();
        r.checkpoint = r.checkpoint.replacen(&b64(&root), &b64(&flipped), 1);
        assert!(r.verify(&entry(i), &[signer.verifier()], None).is_err(), "signed root bit {b}");
    }
    let e = entry(i);
    for b in 0..e.len() * 8 {
        let mut x = e.clone();
        x[b / 8] ^= 1 << (b % 8);
        assert!(verify_inclusion(&leaf_hash(&x), i, n, &proof, &root).is_err(), "entry bit {b}");
    }
    let old_root = merkle::root(&tree, m).unwrap();
    let cproof = merkle::consistency_proof(&tree, m, n).unwrap();
    verify_consistency(m, n, &old_root, &root, &cproof).unwrap();
    for k in 0..cproof.len() * 256 {
        let mut p = cproof.clone();
        p[k / 256][(k % 256) / 8] ^= 1 << (k % 8);
        assert!(verify_consistency(m, n, &old_root, &root, &p).is_err(), "consistency proof bit {k}");
    }
    // As for inclusion, the two sizes are bound by the signed checkpoints, not by the path; the CLI
    // test checks `tally verify consistency` rejects swapped checkpoints.
    for b in 0..256 {
        let mut r = old_root;
        r[b / 8] ^= 1 << (b % 8);
        assert!(verify_consistency(m, n, &r, &root, &cproof).is_err(), "old root bit {b}");
        let mut r = root;
        r[b / 8] ^= 1 << (b % 8);
        assert!(verify_consistency(m, n, &old_root, &r, &cproof).is_err(), "new root bit {b}");
    }
    // Signature: every bit of the signature line's base64-decoded blob.
    let cp = Checkpoint { origin: signer.name().into(), size: n, root };
    let note = cp.sign(std::slice::from_ref(&signer)).unwrap();
    let (text, sig_line) = note.split_at(note.rfind("\n\n").unwrap() + 2);
    let b64 = sig_line.trim_end().rsplit(' ').next().unwrap();
    let blob = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    for b in 0..blob.len() * 8 {
        let mut x = blob.clone();
        x[b / 8] ^= 1 << (b % 8);
        let forged = format!("{text}\u{2014} {} {}\n", signer.name(), base64::engine::general_purpose::STANDARD.encode(&x));
        assert!(Checkpoint::open(&forged, &[signer.verifier()], None).is_err(), "signature bit {b}");
    }
}
