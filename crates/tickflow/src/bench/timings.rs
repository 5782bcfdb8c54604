//! The stages' own timings over a local run: every histogram of seconds with a `stage`
//! label on the services' `/metrics` (`tickflow_ack_forward_duration_seconds`: a commit,
//! `tickflow_handler_duration_seconds`: handling a batch, `tickflow_stage_arrival_seconds`:
//! from an event's origin to the stage's read, whose growth from stage to stage is the
//! wait of each hop), read before and after the measured flow.

use std::collections::BTreeMap;

use super::report::Timing;

/// One histogram's cumulative series: `_count`, `_sum` and `_bucket`s (upper bound →
/// count), as the Prometheus text gives them.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Series {
    count: u64,
    sum: f64,
    buckets: Vec<(f64, u64)>,
}

/// Stage → metric (without `tickflow_` and `_seconds`) → its series.
pub(crate) type StageSeries = BTreeMap<String, BTreeMap<String, Series>>;

/// The stage histograms in one service's `/metrics` text, added to `into`.
pub(crate) fn parse(text: &str, into: &mut StageSeries) {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match name_labels.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (name_labels, ""),
        };
        let (family, part) = if let Some(f) = name.strip_suffix("_bucket") {
            (f, "bucket")
        } else if let Some(f) = name.strip_suffix("_sum") {
            (f, "sum")
        } else if let Some(f) = name.strip_suffix("_count") {
            (f, "count")
        } else {
            continue;
        };
        let Some(metric) = family
            .strip_suffix("_seconds")
            .map(|m| m.strip_prefix("tickflow_").unwrap_or(m))
        else {
            continue;
        };
        let label = |wanted: &str| {
            labels.split(',').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k.trim() == wanted).then(|| v.trim().trim_matches('"').to_owned())
            })
        };
        let Some(stage) = label("stage") else {
            continue;
        };
        let series = into
            .entry(stage)
            .or_default()
            .entry(metric.to_owned())
            .or_default();
        match part {
            "count" => series.count = value as u64,
            "sum" => series.sum = value,
            _ => {
                let bound = match label("le").as_deref() {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => le.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                series.buckets.push((bound, value as u64));
            }
        }
    }
}

/// What each series gained from `before` to `after`; series that gained nothing are left
/// out.
pub(crate) fn since(
    before: &StageSeries,
    after: &StageSeries,
) -> BTreeMap<String, BTreeMap<String, Timing>> {
    let mut timings: BTreeMap<String, BTreeMap<String, Timing>> = BTreeMap::new();
    for (stage, metrics) in after {
        for (metric, series) in metrics {
            let earlier = before
                .get(stage)
                .and_then(|m| m.get(metric))
                .cloned()
                .unwrap_or_default();
            let count = series.count.saturating_sub(earlier.count);
            if count == 0 {
                continue;
            }
            let mut buckets: Vec<(f64, u64)> = series
                .buckets
                .iter()
                .map(|(bound, cumulative)| {
                    let was = earlier
                        .buckets
                        .iter()
                        .find(|(b, _)| b == bound)
                        .map_or(0, |(_, c)| *c);
                    (*bound, cumulative.saturating_sub(was))
                })
                .collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let bound_of = |q: f64| {
                let rank = ((q * count as f64).ceil() as u64).max(1);
                buckets
                    .iter()
                    .find(|(_, cumulative)| *cumulative >= rank)
                    .map(|(bound, _)| *bound)
                    .filter(|b| b.is_finite())
                    .map(|b| b * 1e6)
            };
            timings.entry(stage.clone()).or_default().insert(
                metric.clone(),
                Timing {
                    count,
                    mean_us: (series.sum - earlier.sum) / count as f64 * 1e6,
                    p50_le_us: bound_of(0.5),
                    p99_le_us: bound_of(0.99),
                },
            );
        }
    }
    timings
}

/// Whether a stage timing measures a wait: the origin-to-read arrival, or a timing whose
/// name says so.
pub(crate) fn has_wait(timings: &BTreeMap<String, BTreeMap<String, Timing>>) -> bool {
    timings
        .values()
        .flat_map(|metrics| metrics.keys())
        .any(|metric| metric.contains("wait") || metric == "stage_arrival")
}

/// Every service's stage histograms now, from `/metrics` under each base URL.
pub(crate) async fn scrape(bases: &[String]) -> anyhow::Result<StageSeries> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let mut series = StageSeries::new();
    for base in bases {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        parse(&text, &mut series);
    }
    Ok(series)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(count: u64, sum: f64, buckets: [u64; 3]) -> String {
        format!(
            "# TYPE tickflow_ack_forward_duration_seconds histogram\n\
             tickflow_ack_forward_duration_seconds_bucket{{stage=\"engine\",le=\"0.0005\"}} {}\n\
             tickflow_ack_forward_duration_seconds_bucket{{stage=\"engine\",le=\"0.001\"}} {}\n\
             tickflow_ack_forward_duration_seconds_bucket{{stage=\"engine\",le=\"+Inf\"}} {}\n\
             tickflow_ack_forward_duration_seconds_sum{{stage=\"engine\"}} {sum}\n\
             tickflow_ack_forward_duration_seconds_count{{stage=\"engine\"}} {count}\n\
             tickflow_e2e_latency_seconds_count 99\n\
             tickflow_batch_size_count{{stage=\"engine\"}} 7\n",
            buckets[0], buckets[1], buckets[2]
        )
    }

    #[test]
    fn a_stage_timing_is_what_its_histogram_gained() {
        let mut before = StageSeries::new();
        parse(&metrics(10, 0.01, [5, 10, 10]), &mut before);
        let mut after = StageSeries::new();
        parse(&metrics(110, 0.11, [55, 108, 110]), &mut after);
        assert_eq!(after.len(), 1, "no stage label, no seconds: left out");
        let timings = since(&before, &after);
        let commit = timings["engine"]["ack_forward_duration"];
        assert_eq!(commit.count, 100);
        assert!((commit.mean_us - 1000.0).abs() < 1e-6, "{commit:?}");
        // 50 of 100 at or below 0.5 ms; the 99th above 1 ms.
        assert_eq!(commit.p50_le_us, Some(500.0));
        assert_eq!(commit.p99_le_us, None);
        assert!(!has_wait(&timings));
        let unchanged = since(&after, &after);
        assert!(unchanged.is_empty(), "{unchanged:?}");
    }

    #[test]
    fn a_wait_timing_is_recognised_by_its_name() {
        let text = "tickflow_read_wait_seconds_count{stage=\"transform\"} 3\n\
                    tickflow_read_wait_seconds_sum{stage=\"transform\"} 0.003\n";
        let mut after = StageSeries::new();
        parse(text, &mut after);
        let timings = since(&StageSeries::new(), &after);
        assert_eq!(timings["transform"]["read_wait"].count, 3);
        assert!(has_wait(&timings));

        let text = "tickflow_stage_arrival_seconds_count{stage=\"engine\"} 2\n\
                    tickflow_stage_arrival_seconds_sum{stage=\"engine\"} 0.002\n";
        let mut after = StageSeries::new();
        parse(text, &mut after);
        let timings = since(&StageSeries::new(), &after);
        assert_eq!(timings["engine"]["stage_arrival"].count, 2);
        assert!(has_wait(&timings));
    }
}
