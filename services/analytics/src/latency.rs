//! A log-linear latency histogram that merges by adding counts: bucket `b` holds latencies
//! in `[lower(b), lower(b + 1))` µs, four buckets per power of two (≤ 19 % relative error).

/// Bucket of a latency in µs.
pub fn bucket(latency_us: u64) -> u32 {
    if latency_us < 4 {
        return latency_us as u32;
    }
    let exponent = 63 - latency_us.leading_zeros(); // ≥ 2
    let fraction = (latency_us >> (exponent - 2)) & 0b11;
    exponent * 4 + fraction as u32 - 4
}

/// The smallest latency in bucket `b`, µs.
pub fn lower(b: u32) -> u64 {
    if b < 4 {
        return u64::from(b);
    }
    let exponent = (b + 4) / 4;
    let fraction = u64::from((b + 4) % 4);
    (4 + fraction) << (exponent - 2)
}

/// Percentiles (µs, each the upper edge of its bucket) of a merged histogram.
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
    /// Upper edge of the highest bucket.
    pub max_us: u64,
}

/// Percentiles of `(bucket, count)` pairs.
pub fn percentiles(counts: &[(u32, u64)]) -> Percentiles {
    let mut sorted: Vec<(u32, u64)> = counts.iter().copied().filter(|(_, c)| *c > 0).collect();
    sorted.sort();
    let total: u64 = sorted.iter().map(|(_, c)| c).sum();
    let at = |q: f64| -> u64 {
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, c) in &sorted {
            seen += c;
            if seen >= rank {
                return lower(b + 1).saturating_sub(1).max(lower(*b));
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
        max_us: sorted
            .last()
            .map(|(b, _)| lower(b + 1).saturating_sub(1).max(lower(*b)))
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        for b in 0..200 {
            assert!(lower(b) < lower(b + 1), "bucket {b}");
            assert_eq!(bucket(lower(b)), b);
            assert_eq!(bucket(lower(b + 1) - 1), b);
        }
        for v in [5u64, 100, 999, 1000, 123_456, 10_000_000] {
            let b = bucket(v);
            assert!(lower(b) <= v && v < lower(b + 1));
            assert!((lower(b + 1) - lower(b)) as f64 / lower(b) as f64 <= 0.25);
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut counts = std::collections::BTreeMap::new();
        for v in 1..=1000u64 {
            *counts.entry(bucket(v * 10)).or_insert(0u64) += 1;
        }
        let list: Vec<(u32, u64)> = counts.into_iter().collect();
        let p = percentiles(&list);
        assert_eq!(p.count, 1000);
        assert!((4_000..=6_200).contains(&p.p50_us), "{p:?}");
        assert!((9_000..=12_000).contains(&p.p99_us), "{p:?}");
        assert!(p.max_us >= 10_000);
    }
}
