//! Which partition a tenant's events go to: Kafka's default (Java) partitioner, murmur2 of the
//! key, positive, modulo the partition count.
//!
//! The ledger keeps a tenant's budget where its events land, so it must compute the same
//! partition as every producer. Tally's publisher sets librdkafka's `murmur2_random` (which is
//! this function for keyed messages); Java and most other clients use it by default. librdkafka's
//! own default (`consistent_random`, CRC32) would place tenants elsewhere.

/// Kafka's murmur2 (seed 0x9747b28c), as in `org.apache.kafka.common.utils.Utils.murmur2`.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len() as u32;
    let mut h: u32 = 0x9747_b28c ^ len;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `tenant_id` among `partitions`.
pub fn tenant_partition(tenant_id: &str, partitions: i32) -> i32 {
    (murmur2(tenant_id.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_kafkas_murmur2_test_vectors() {
        // From Apache Kafka's UtilsTest.testMurmur2.
        for (input, expected) in [
            (&b"21"[..], -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ] {
            assert_eq!(murmur2(input), expected, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn partitions_are_in_range() {
        for t in ["acme", "globex", "t000", "x"] {
            assert!((0..8).contains(&tenant_partition(t, 8)));
        }
        assert_eq!(tenant_partition("acme", 1), 0);
    }
}
