//! A log-linear latency histogram that merges by adding counts. A bucket is named by its
//! lowest latency in µs (its floor), so `HGETALL` of the hash in redis-cli reads as
//! "µs → count". Latencies below 64 µs have a bucket each; above, each power of two is split
//! into 32 buckets, so a bucket is at most 1/32 (3.1 %) of its floor wide.

/// Buckets per power of two, as a power of two.
const SUB_BITS: u32 = 5;

/// The floor (µs) of the bucket holding a latency of `latency_us`.
pub fn floor(latency_us: u64) -> u64 {
    let shift = shift(latency_us);
    (latency_us >> shift) << shift
}

/// The highest latency (µs) in the bucket whose floor is `floor`.
pub fn ceiling(floor: u64) -> u64 {
    floor + ((1u64 << shift(floor)) - 1)
}

/// log2 of the width of the bucket holding `v`.
fn shift(v: u64) -> u32 {
    let exponent = 63u32.saturating_sub(v.leading_zeros()); // floor(log2 v), 0 for v = 0
    exponent.saturating_sub(SUB_BITS)
}

/// Percentiles (µs, each the highest latency of its bucket) of a merged histogram.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Percentiles {
    /// Events measured.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th.
    pub p90_us: u64,
    /// 99th.
    pub p99_us: u64,
    /// 99.9th.
    pub p999_us: u64,
    /// Highest latency of the highest bucket.
    pub max_us: u64,
}

/// Percentiles of `(bucket floor, count)` pairs.
pub fn percentiles(counts: &[(u64, u64)]) -> Percentiles {
    let mut sorted: Vec<(u64, u64)> = counts.iter().copied().filter(|(_, c)| *c > 0).collect();
    sorted.sort();
    let total: u64 = sorted.iter().map(|(_, c)| c).sum();
    let at = |q: f64| -> u64 {
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (floor, c) in &sorted {
            seen += c;
            if seen >= rank {
                return ceiling(*floor);
            }
        }
        0
    };
    Percentiles {
        count: total,
        p50_us: at(0.5),
        p90_us: at(0.9),
        p99_us: at(0.99),
        p999_us: at(0.999),
        max_us: sorted.last().map(|(floor, _)| ceiling(*floor)).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut floor_of_previous = floor(0);
        assert_eq!(floor_of_previous, 0);
        for v in 1..200_000u64 {
            let f = floor(v);
            assert!(f <= v && v <= ceiling(f), "{v}: [{f}, {}]", ceiling(f));
            if f != floor_of_previous {
                // A new bucket starts right after the previous one ends.
                assert_eq!(f, v);
                assert_eq!(ceiling(floor_of_previous) + 1, f, "{v}");
                floor_of_previous = f;
            }
            assert_eq!(floor(f), f);
            assert!(
                (ceiling(f) - f + 1) as f64 <= f.max(32) as f64 / 32.0,
                "{v}"
            );
        }
        assert_eq!(floor(63), 63);
        assert_eq!(floor(1000), 992);
        assert_eq!(ceiling(992), 1007);
        assert_eq!(floor(u64::MAX), u64::MAX - (1 << 58) + 1);
        assert_eq!(ceiling(floor(u64::MAX)), u64::MAX);
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut counts = std::collections::BTreeMap::new();
        for v in 1..=1000u64 {
            *counts.entry(floor(v * 10)).or_insert(0u64) += 1;
        }
        let list: Vec<(u64, u64)> = counts.into_iter().collect();
        let p = percentiles(&list);
        assert_eq!(p.count, 1000);
        // The true figures are 5,000, 9,000, 9,900, 9,990 and 10,000 µs; each is reported as
        // the top of its bucket, at most 1/32 above.
        for (reported, truth) in [
            (p.p50_us, 5_000),
            (p.p90_us, 9_000),
            (p.p99_us, 9_900),
            (p.p999_us, 9_990),
            (p.max_us, 10_000),
        ] {
            assert!(
                truth <= reported && reported as f64 <= truth as f64 * (1.0 + 1.0 / 32.0),
                "{truth} reported as {reported}: {p:?}"
            );
        }
        assert_eq!(percentiles(&[]).p50_us, 0);
    }
}
