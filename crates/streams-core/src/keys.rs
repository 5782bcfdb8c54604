//! The key layout: every Redis key tickflow touches is named here, and only here.
//!
//! A logical stream (say `orders`) is `partitions` Redis streams. Partition `p` of every
//! logical stream, its dead-letter stream, its leases and its per-partition state share the
//! hash tag `{p}` behind the namespace, so that one partition's whole path through the
//! pipeline maps to one Redis Cluster slot and one script call can touch all of it:
//!
//! ```text
//! tickflow:{3}:s:orders            partition 3 of the `orders` stream
//! tickflow:{3}:dlq:orders          its dead-letter stream
//! tickflow:{3}:lease:engine        the lease on partition 3 for the `engine` group
//! tickflow:members:engine          live consumers of the `engine` group (sorted set)
//! tickflow:{g}:instruments         global data: reference tables, with the tag `{g}`
//! ```
//!
//! Keys used together in one script or transaction share a tag, so that no call crosses
//! slots on a Redis Cluster: a partition's keys share `{p}`; global data (a table and its
//! version counter, written in one transaction) shares `{g}`; a key used alone (a group's
//! membership set) needs none.

use std::fmt;

/// Names the keys of one namespace with a fixed partition count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpace {
    namespace: String,
    partitions: u32,
}

/// A partition number in `0..partitions`.
pub type Partition = u32;

impl KeySpace {
    /// A key space with the given prefix and partition count (at least 1).
    pub fn new(namespace: impl Into<String>, partitions: u32) -> Self {
        Self {
            namespace: namespace.into(),
            partitions: partitions.max(1),
        }
    }

    /// The key prefix, `TICKFLOW_NAMESPACE`.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// How many partitions every logical stream has, `TICKFLOW_PARTITIONS`.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Every partition number, in order.
    pub fn all_partitions(&self) -> impl Iterator<Item = Partition> + use<> {
        0..self.partitions
    }

    /// The partition a partition key (a symbol, usually) belongs to: FNV-1a (64 bit) of its
    /// bytes modulo the partition count. Stable across processes, versions and languages.
    pub fn partition_for(&self, partition_key: &[u8]) -> Partition {
        (fnv1a64(partition_key) % u64::from(self.partitions)) as Partition
    }

    /// Partition `partition` of the logical stream `stream`.
    pub fn stream(&self, stream: &str, partition: Partition) -> String {
        format!("{}:{{{partition}}}:s:{stream}", self.namespace)
    }

    /// The dead-letter stream of partition `partition` of `stream`.
    pub fn dead_letter(&self, stream: &str, partition: Partition) -> String {
        format!("{}:{{{partition}}}:dlq:{stream}", self.namespace)
    }

    /// The lease a consumer of `group` holds to own partition `partition`.
    pub fn lease(&self, group: &str, partition: Partition) -> String {
        format!("{}:{{{partition}}}:lease:{group}", self.namespace)
    }

    /// A per-partition state key of a stage (for example the engine's book snapshot).
    pub fn partition_state(&self, group: &str, name: &str, partition: Partition) -> String {
        format!("{}:{{{partition}}}:state:{group}:{name}", self.namespace)
    }

    /// The sorted set of live consumers of `group` (score: expiry, ms since the epoch).
    pub fn members(&self, group: &str) -> String {
        format!("{}:members:{group}", self.namespace)
    }

    /// The key that remembers a client's idempotency key `key` for `scope` (e.g. ingest's
    /// requests). It has no hash tag (braces in `key` are escaped): an append adds the tag
    /// of the slot it writes (see [`crate::append`]).
    pub fn idempotency(&self, scope: &str, key: &str) -> String {
        let escaped = key
            .replace('%', "%25")
            .replace('{', "%7B")
            .replace('}', "%7D");
        format!("{}:idem:{scope}:{escaped}", self.namespace)
    }

    /// A key outside any partition, for stage data such as reference tables.
    pub fn global(&self, name: &str) -> String {
        format!("{}:{{g}}:{name}", self.namespace)
    }
}

/// The part of `key` Redis Cluster hashes to pick its slot: the first `{…}` with something
/// inside, or else the whole key. Keys with the same tag share a slot.
pub fn slot_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// The sorted set, in the slot of `tag`, of the ids of `source`'s entries whose effects
/// on that slot were applied (the commit's dedupe gate on Redis Cluster).
pub fn dedupe_set(tag: &str, group: &str, source: &str) -> String {
    format!("{{{tag}}}:dedupe:{group}:{source}")
}

impl fmt::Display for KeySpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} partitions)", self.namespace, self.partitions)
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_keys_share_one_hash_tag() {
        let keys = KeySpace::new("tf", 16);
        for key in [
            keys.stream("orders", 3),
            keys.dead_letter("orders", 3),
            keys.lease("engine", 3),
            keys.partition_state("engine", "book", 3),
        ] {
            assert!(key.starts_with("tf:{3}:"), "{key}");
        }
    }

    #[test]
    fn the_slot_tag_is_what_redis_cluster_hashes() {
        assert_eq!(slot_tag("tf:{3}:s:inbound"), "3");
        assert_eq!(slot_tag("ingest_stream"), "ingest_stream");
        assert_eq!(
            slot_tag("a{}b{c}"),
            "a{}b{c}",
            "an empty first tag: the whole key"
        );
        assert_eq!(slot_tag("x{y"), "x{y");
        let dedupe = dedupe_set(slot_tag("ingest_stream:dlq"), "ingest", "ingest_stream");
        assert_eq!(slot_tag(&dedupe), "ingest_stream:dlq");
    }

    #[test]
    fn idempotency_keys_carry_no_hash_tag_whatever_the_client_sends() {
        let keys = KeySpace::new("tf", 16);
        let key = keys.idempotency("ingest", "a{b}c%");
        assert_eq!(key, "tf:idem:ingest:a%7Bb%7Dc%25");
        assert_eq!(slot_tag(&key), key);
    }

    #[test]
    fn global_keys_used_together_share_one_hash_tag() {
        let keys = KeySpace::new("tf", 16);
        assert_eq!(keys.global("instruments"), "tf:{g}:instruments");
        assert_eq!(
            keys.global("instruments:version"),
            "tf:{g}:instruments:version"
        );
    }

    #[test]
    fn partitioning_is_stable_and_in_range() {
        let keys = KeySpace::new("tf", 16);
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let seen: std::collections::BTreeSet<_> = (0..1000)
            .map(|i| keys.partition_for(format!("SYM{i}").as_bytes()))
            .collect();
        assert_eq!(seen.len(), 16, "1000 symbols spread over every partition");
        assert!(seen.iter().all(|p| *p < 16));
    }
}
