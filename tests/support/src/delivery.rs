//! What the tests assert about delivered records: nothing lost, nothing
//! phantom, per-key order, and Java-compatible partitions.

use std::collections::BTreeMap;

use crate::reader::Rec;
use crate::writer::Committed;

/// Kafka's Java client `Utils.murmur2`, written from its specification, for
/// checking partitions independently of librdkafka.
pub fn murmur2(data: &[u8]) -> i32 {
    let m: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(m);
        k ^= k >> 24;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(m);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(m);
    h ^= h >> 15;
    h as i32
}

/// The Java client's default partition for a keyed record.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// Checks per-key order: for each key, the first copies of its messages
/// appear in the order given by `seq` (a field of the JSON value).
pub fn assert_per_key_order(recs: &[Rec], expected: &BTreeMap<String, Vec<i64>>) {
    let mut sorted: Vec<&Rec> = recs.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut seen = std::collections::HashSet::new();
    let mut got: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in sorted {
        if seen.insert(r.message_id().to_owned()) {
            let seq = r.json()["seq"].as_i64().expect("seq");
            got.entry(r.key.clone().expect("key"))
                .or_default()
                .push(seq);
        }
    }
    for (key, want) in expected {
        let have = got.get(key).cloned().unwrap_or_default();
        assert_eq!(
            &have, want,
            "key {key}: first copies out of order or missing"
        );
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "records for keys nobody committed"
    );
}

/// Every committed ID present, no rolled-back or unknown ID, copies identical,
/// per-key order kept.
pub fn assert_delivered_exactly(recs: &[Rec], committed: &Committed) {
    let mut copies: BTreeMap<&str, &Rec> = BTreeMap::new();
    let mut duplicates = 0;
    for r in recs {
        let id = r.message_id();
        assert!(
            !committed.rolled_back.contains(id),
            "phantom: rolled-back message {id} was published"
        );
        assert!(
            committed.ids.contains(id),
            "phantom: unknown message {id} was published: {r:?}"
        );
        if let Some(first) = copies.insert(id, r) {
            duplicates += 1;
            assert_eq!(
                (&first.key, &first.value),
                (&r.key, &r.value),
                "duplicate of {id} differs"
            );
        }
    }
    let missing: Vec<&String> = committed
        .ids
        .iter()
        .filter(|id| !copies.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "lost {} committed messages, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_per_key_order(recs, &committed.order);
    eprintln!(
        "checked {} committed messages: {} records read, {duplicates} duplicates (same message-id)",
        committed.ids.len(),
        recs.len()
    );
}
