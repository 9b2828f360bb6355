//! RFC 6962 / RFC 9162 Merkle trees: hashing, the compact right frontier used for appends, proof
//! generation over stored nodes, and proof verification.
//!
//! Storage model: every *perfect* subtree root (a node whose leaves are all present) is stored once,
//! in post-order, so node positions are pure arithmetic ([`node_position`]) and a tree of `n` leaves
//! holds `2n - popcount(n)` hashes. Perfect nodes never change, so proofs for any past tree size read
//! the same stored nodes; the hash of an imperfect right-edge subtree is derived from at most
//! log2(n) perfect ones. Proof generation therefore reads O(log n) hashes and never rehashes leaves.
//!
//! Verification follows RFC 9162 §2.1.3.2 and §2.1.4.2 literally and reports *why* a proof fails.

use sha2::{Digest, Sha256};

/// A SHA-256 tree hash.
pub type Hash = [u8; 32];

/// `SHA-256(0x00 || entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree: `SHA-256("")`.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Post-order position of the perfect node at `level` (0 = leaves) with `index` at that level.
pub fn node_position(level: u32, index: u64) -> u64 {
    let first_leaf = index << level;
    stored_nodes(first_leaf) + (1u64 << (level + 1)) - 2
}

/// How many perfect nodes a tree of `leaves` leaves stores.
pub fn stored_nodes(leaves: u64) -> u64 {
    2 * leaves - u64::from(leaves.count_ones())
}

/// Largest power of two strictly less than `n` (n ≥ 2).
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// Read access to stored perfect nodes.
pub trait NodeSource {
    type Error;
    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error>;
}

/// Hash of the subtree over leaves `[lo, hi)`; `lo` must be aligned as RFC 9162 splits align it.
pub fn subtree_hash<S: NodeSource + ?Sized>(src: &S, lo: u64, hi: u64) -> Result<Hash, S::Error> {
    let n = hi - lo;
    if n.is_power_of_two() {
        let level = n.trailing_zeros();
        return src.node(level, lo >> level);
    }
    let k = split_point(n);
    let left = subtree_hash(src, lo, lo + k)?;
    let right = subtree_hash(src, lo + k, hi)?;
    Ok(node_hash(&left, &right))
}

/// Root of the tree of the first `size` leaves.
pub fn root<S: NodeSource + ?Sized>(src: &S, size: u64) -> Result<Hash, S::Error> {
    if size == 0 {
        Ok(empty_root())
    } else {
        subtree_hash(src, 0, size)
    }
}

/// RFC 9162 inclusion proof for leaf `index` in the tree of `size` leaves (`index < size`).
pub fn inclusion_proof<S: NodeSource + ?Sized>(src: &S, index: u64, size: u64) -> Result<Vec<Hash>, S::Error> {
    assert!(index < size, "inclusion_proof: index {index} out of range for size {size}");
    let mut out = Vec::with_capacity(64);
    let (mut lo, mut hi) = (0, size);
    // Collect siblings top-down, then reverse: the proof lists them leaf-side first.
    while hi - lo > 1 {
        let k = split_point(hi - lo);
        if index < lo + k {
            out.push(subtree_hash(src, lo + k, hi)?);
            hi = lo + k;
        } else {
            out.push(subtree_hash(src, lo, lo + k)?);
            lo += k;
        }
    }
    out.reverse();
    Ok(out)
}

/// RFC 9162 consistency proof from size `m` to size `n` (`0 < m ≤ n`; empty when `m == n`).
pub fn consistency_proof<S: NodeSource + ?Sized>(src: &S, m: u64, n: u64) -> Result<Vec<Hash>, S::Error> {
    assert!(0 < m && m <= n, "consistency_proof: need 0 < m <= n, got {m}, {n}");
    let mut out = Vec::with_capacity(64);
    if m == n {
        return Ok(out);
    }
    // Iterative SUBPROOF(m, D[lo:hi], b): each step records one sibling, deepest last.
    let (mut lo, mut hi, mut rel_m, mut complete) = (0u64, n, m, true);
    loop {
        let size = hi - lo;
        if rel_m == size {
            if !complete {
                out.push(subtree_hash(src, lo, hi)?);
            }
            break;
        }
        let k = split_point(size);
        if rel_m <= k {
            out.push(subtree_hash(src, lo + k, hi)?);
            hi = lo + k;
        } else {
            out.push(subtree_hash(src, lo, lo + k)?);
            lo += k;
            rel_m -= k;
            complete = false;
        }
    }
    out.reverse();
    Ok(out)
}

/// Why a proof does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("index {index} is out of range for tree size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("old size {old} is larger than new size {new}")]
    SizesOutOfOrder { old: u64, new: u64 },
    #[error("wrong proof length: {got} hashes")]
    WrongProofLength { got: usize },
    #[error("root mismatch: the proof leads to {computed}, the checkpoint says {expected}")]
    RootMismatch { computed: String, expected: String },
}

fn mismatch(computed: &Hash, expected: &Hash) -> ProofError {
    use base64::Engine as _;
    let b64 = |h: &Hash| base64::engine::general_purpose::STANDARD.encode(h);
    ProofError::RootMismatch { computed: b64(computed), expected: b64(expected) }
}

/// Root implied by an inclusion proof (RFC 9162 §2.1.3.2 steps 1-6).
pub fn root_from_inclusion_proof(leaf: &Hash, index: u64, size: u64, proof: &[Hash]) -> Result<Hash, ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let (mut fnode, mut snode, mut r) = (index, size - 1, *leaf);
    for p in proof {
        if snode == 0 {
            return Err(ProofError::WrongProofLength { got: proof.len() });
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::WrongProofLength { got: proof.len() });
    }
    Ok(r)
}

/// Checks that `leaf` is at `index` in the tree of `size` leaves with root `root`.
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> Result<(), ProofError> {
    let computed = root_from_inclusion_proof(leaf, index, size, proof)?;
    if &computed == root {
        Ok(())
    } else {
        Err(mismatch(&computed, root))
    }
}

/// Checks that the tree (`new_size`, `new_root`) extends (`old_size`, `old_root`) (RFC 9162 §2.1.4.2).
pub fn verify_consistency(old_size: u64, new_size: u64, old_root: &Hash, new_root: &Hash, proof: &[Hash]) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizesOutOfOrder { old: old_size, new: new_size });
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::WrongProofLength { got: proof.len() });
        }
        return if old_root == new_root { Ok(()) } else { Err(mismatch(new_root, old_root)) };
    }
    if old_size == 0 {
        // Every tree extends the empty tree; the proof is empty.
        return if proof.is_empty() { Ok(()) } else { Err(ProofError::WrongProofLength { got: proof.len() }) };
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let (first, rest) = path.split_first().ok_or(ProofError::WrongProofLength { got: 0 })?;
    let (mut fnode, mut snode) = (old_size - 1, new_size - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if snode == 0 {
            return Err(ProofError::WrongProofLength { got: proof.len() });
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::WrongProofLength { got: proof.len() });
    }
    if &fr != old_root {
        return Err(mismatch(&fr, old_root));
    }
    if &sr != new_root {
        return Err(mismatch(&sr, new_root));
    }
    Ok(())
}

/// The compact right edge of a growing tree: one perfect subtree root per set bit of the size.
/// Appending a leaf returns the perfect nodes it completes, in post-order, for storage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// (level, hash), largest subtree first.
    stack: Vec<(u32, Hash)>,
}

impl Frontier {
    /// Rebuilds the frontier of a stored tree of `size` leaves (reads popcount(size) nodes).
    pub fn load<S: NodeSource + ?Sized>(src: &S, size: u64) -> Result<Frontier, S::Error> {
        let mut stack = Vec::new();
        let mut lo = 0u64;
        for level in (0..64u32).rev() {
            if size & (1u64 << level) != 0 {
                stack.push((level, src.node(level, lo >> level)?));
                lo += 1u64 << level;
            }
        }
        Ok(Frontier { size, stack })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash; `out` receives the newly perfect nodes in post-order (leaf first).
    pub fn push(&mut self, leaf: Hash, out: &mut Vec<Hash>) {
        out.push(leaf);
        let mut cur = (0u32, leaf);
        while let Some(&(level, left)) = self.stack.last() {
            if level != cur.0 {
                break;
            }
            self.stack.pop();
            cur = (level + 1, node_hash(&left, &cur.1));
            out.push(cur.1);
        }
        self.stack.push(cur);
        self.size += 1;
    }

    /// The root of the current tree.
    pub fn root(&self) -> Hash {
        let mut iter = self.stack.iter().rev();
        match iter.next() {
            None => empty_root(),
            Some(&(_, last)) => iter.fold(last, |acc, (_, left)| node_hash(left, &acc)),
        }
    }
}

/// Perfect nodes in memory, in post-order: the reference store for tests and small tools.
#[derive(Debug, Clone, Default)]
pub struct MemoryTree {
    nodes: Vec<Hash>,
    frontier: Frontier,
}

impl MemoryTree {
    pub fn new() -> Self {
        MemoryTree::default()
    }

    pub fn push_entry(&mut self, entry: &[u8]) {
        self.push_leaf_hash(leaf_hash(entry));
    }

    pub fn push_leaf_hash(&mut self, leaf: Hash) {
        self.frontier.push(leaf, &mut self.nodes);
    }

    pub fn size(&self) -> u64 {
        self.frontier.size()
    }

    pub fn root(&self) -> Hash {
        self.frontier.root()
    }
}

impl NodeSource for MemoryTree {
    type Error = std::convert::Infallible;
    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error> {
        Ok(self.nodes[node_position(level, index) as usize])
    }
}

/// Leaf hashes held in memory, as a [`NodeSource`] (a node is recomputed from its leaves). For
/// proofs over a range someone holds the leaf hashes of, such as a Parquet projection.
pub struct LeafHashes<'a>(pub &'a [Hash]);

impl NodeSource for LeafHashes<'_> {
    type Error = std::convert::Infallible;
    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error> {
        if level == 0 {
            return Ok(self.0[index as usize]);
        }
        let left = self.node(level - 1, 2 * index)?;
        let right = self.node(level - 1, 2 * index + 1)?;
        Ok(node_hash(&left, &right))
    }
}

/// Range proof (Tally's, in the spirit of RFC 9162 proofs): that leaves `[lo, hi)` are exactly
/// the leaves at those positions of the tree of `size` leaves. It is the hashes of the maximal
/// subtrees of the RFC 9162 split lying wholly outside the range, left to right; with the range's
/// leaves they recompute the root ([`root_from_range`]). A gap or a changed leaf changes the root.
pub fn range_proof<S: NodeSource + ?Sized>(src: &S, lo: u64, hi: u64, size: u64) -> Result<Vec<Hash>, S::Error> {
    assert!(lo < hi && hi <= size, "range_proof: need lo < hi <= size, got {lo}, {hi}, {size}");
    fn walk<S: NodeSource + ?Sized>(src: &S, a: u64, b: u64, lo: u64, hi: u64, out: &mut Vec<Hash>) -> Result<(), S::Error> {
        if b <= lo || a >= hi {
            out.push(subtree_hash(src, a, b)?);
        } else if b - a > 1 {
            let k = split_point(b - a);
            walk(src, a, a + k, lo, hi, out)?;
            walk(src, a + k, b, lo, hi, out)?;
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(src, 0, size, lo, hi, &mut out)?;
    Ok(out)
}

/// The root that `leaves` (the leaf hashes of `[lo, lo + leaves.len())`) and a [`range_proof`]
/// give for a tree of `size` leaves; None if the shapes do not fit.
pub fn root_from_range(leaves: &[Hash], lo: u64, size: u64, proof: &[Hash]) -> Option<Hash> {
    let hi = lo.checked_add(leaves.len() as u64)?;
    if leaves.is_empty() || hi > size {
        return None;
    }
    struct Cursor<'a> {
        leaves: std::slice::Iter<'a, Hash>,
        proof: std::slice::Iter<'a, Hash>,
    }
    fn walk(c: &mut Cursor<'_>, a: u64, b: u64, lo: u64, hi: u64) -> Option<Hash> {
        if b <= lo || a >= hi {
            c.proof.next().copied()
        } else if b - a == 1 {
            c.leaves.next().copied()
        } else {
            let k = split_point(b - a);
            let left = walk(c, a, a + k, lo, hi)?;
            let right = walk(c, a + k, b, lo, hi)?;
            Some(node_hash(&left, &right))
        }
    }
    let mut c = Cursor { leaves: leaves.iter(), proof: proof.iter() };
    let root = walk(&mut c, 0, size, lo, hi)?;
    (c.leaves.next().is_none() && c.proof.next().is_none()).then_some(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RFC 6962 definition, recursively over leaves: the oracle for everything above.
    fn reference_root(leaves: &[Vec<u8>]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaf_hash(&leaves[0]),
            n => {
                let k = split_point(n as u64) as usize;
                node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
            }
        }
    }

    fn tree(n: usize) -> (MemoryTree, Vec<Vec<u8>>) {
        let leaves: Vec<Vec<u8>> = (0..n).map(|i| format!("leaf {i}").into_bytes()).collect();
        let mut t = MemoryTree::new();
        for l in &leaves {
            t.push_entry(l);
        }
        (t, leaves)
    }

    #[test]
    fn post_order_positions_match_what_push_stores() {
        let (t, _) = tree(300);
        assert_eq!(t.nodes.len() as u64, stored_nodes(300));
        for level in 0..9u32 {
            for index in 0..(300u64 >> level) {
                let lo = (index << level) as usize;
                let hi = lo + (1usize << level);
                let (sub, _) = {
                    let mut s = MemoryTree::new();
                    for i in lo..hi {
                        s.push_entry(format!("leaf {i}").as_bytes());
                    }
                    (s.root(), ())
                };
                assert_eq!(t.node(level, index).unwrap(), sub, "level {level} index {index}");
            }
        }
    }

    #[test]
    fn roots_match_the_recursive_definition_for_every_size() {
        let (t, leaves) = tree(130);
        let mut incremental = MemoryTree::new();
        for n in 0..=130usize {
            let expected = reference_root(&leaves[..n]);
            assert_eq!(root(&t, n as u64).unwrap(), expected, "stored root at {n}");
            assert_eq!(incremental.root(), expected, "frontier root at {n}");
            assert_eq!(Frontier::load(&t, n as u64).unwrap().root(), expected, "loaded frontier at {n}");
            if n < 130 {
                incremental.push_entry(&leaves[n]);
            }
        }
    }

    #[test]
    fn every_inclusion_proof_verifies_and_mutations_fail() {
        let (t, leaves) = tree(40);
        for size in 1..=40u64 {
            let r = root(&t, size).unwrap();
            for index in 0..size {
                let leaf = leaf_hash(&leaves[index as usize]);
                let proof = inclusion_proof(&t, index, size).unwrap();
                verify_inclusion(&leaf, index, size, &proof, &r).unwrap();
                if let Some(first) = proof.first() {
                    let mut bad = proof.clone();
                    bad[0] = node_hash(first, first);
                    assert!(verify_inclusion(&leaf, index, size, &bad, &r).is_err());
                    assert!(verify_inclusion(&leaf, index, size, &proof[1..], &r).is_err());
                }
                let mut longer = proof.clone();
                longer.push(r);
                assert_eq!(verify_inclusion(&leaf, index, size, &longer, &r), Err(ProofError::WrongProofLength { got: longer.len() }));
            }
            assert_eq!(verify_inclusion(&leaf_hash(b"x"), size, size, &[], &r), Err(ProofError::IndexOutOfRange { index: size, size }));
        }
    }

    #[test]
    fn every_consistency_proof_verifies_and_mutations_fail() {
        let (t, _) = tree(41);
        for n in 1..=40u64 {
            let rn = root(&t, n).unwrap();
            for m in 1..=n {
                let rm = root(&t, m).unwrap();
                let proof = consistency_proof(&t, m, n).unwrap();
                verify_consistency(m, n, &rm, &rn, &proof).unwrap();
                if m < n {
                    assert!(verify_consistency(m, n, &rn, &rn, &proof).is_err() || rm == rn);
                    let mut bad = proof.clone();
                    bad[0][0] ^= 1;
                    assert!(verify_consistency(m, n, &rm, &rn, &bad).is_err());
                    // A proof claimed for another new size must not reach that size's real root.
                    let rn1 = root(&t, n + 1).unwrap();
                    assert!(verify_consistency(m, n + 1, &rm, &rn1, &proof).is_err(), "m={m} n={n}");
                }
            }
            verify_consistency(0, n, &empty_root(), &rn, &[]).unwrap();
        }
    }

    #[test]
    fn range_proofs_recompute_the_root_and_catch_gaps_and_changes() {
        for size in 1u64..=21 {
            let leaves: Vec<Hash> = (0..size).map(|i| leaf_hash(&i.to_le_bytes())).collect();
            let src = LeafHashes(&leaves);
            let want = root(&src, size).unwrap();
            for lo in 0..size {
                for hi in lo + 1..=size {
                    let proof = range_proof(&src, lo, hi, size).unwrap();
                    let range = &leaves[lo as usize..hi as usize];
                    assert_eq!(root_from_range(range, lo, size, &proof), Some(want), "size {size} [{lo},{hi})");
                    if range.len() > 2 {
                        let gap: Vec<Hash> = range.iter().enumerate().filter(|(i, _)| *i != 1).map(|(_, h)| *h).collect();
                        assert_ne!(root_from_range(&gap, lo, size, &proof), Some(want));
                    }
                    let mut changed = range.to_vec();
                    changed[0][0] ^= 1;
                    assert_ne!(root_from_range(&changed, lo, size, &proof), Some(want));
                }
            }
        }
    }
}
