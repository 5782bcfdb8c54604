//! Every service's `/metrics` counts exactly what went through it. Each service is its own
//! process, so each has its own Prometheus recorder (in one process, every test's services
//! would add to the same counters).

use std::fmt::Write as _;

use e2e::{
    RedisKind, Role,
    processes::{ProcessOptions, ProcessPipeline, metric_sum},
    service_binaries,
};
use serde_json::json;
use tickflow_proto::{topology, v1};

use crate::support::{WAIT, limit, limit_json};

const PROCESSED: &str = "tickflow_events_processed_total";
const DEAD_LETTERED: &str = "tickflow_events_dead_lettered_total";
const DUPLICATES: &str = "tickflow_duplicates_skipped_total";
const FAILED: &str = "tickflow_events_failed_total";
const INGESTED: &str = "tickflow_ingest_events_total";
const REJECTED: &str = "tickflow_transform_rejections_total";
/// Entries whose origin-to-read time a stage recorded (envelopes, first deliveries).
const ARRIVALS: &str = "tickflow_stage_arrival_seconds_count";

/// The consumer group (`stage` label) of each service.
fn group(role: Role) -> &'static str {
    match role {
        Role::Ingest => topology::INGEST_GROUP,
        Role::Transform => topology::TRANSFORM_GROUP,
        Role::Engine => topology::ENGINE_GROUP,
        Role::Analytics => topology::ANALYTICS_GROUP,
    }
}

/// `(service, metric, stage label or "", value)` for every counter the test checks.
type Reading = Vec<(Role, &'static str, &'static str, u64)>;

async fn read(p: &ProcessPipeline, wanted: &[(Role, &'static str, &'static str)]) -> Reading {
    let mut texts = Vec::new();
    for role in Role::ALL {
        texts.push((role, p.metrics(role).await));
    }
    wanted
        .iter()
        .map(|&(role, metric, stage)| {
            let text = &texts.iter().find(|(r, _)| *r == role).expect("scraped").1;
            let labels: &[(&str, &str)] = if stage.is_empty() {
                &[]
            } else {
                &[("stage", stage)]
            };
            (role, metric, stage, metric_sum(text, metric, labels) as u64)
        })
        .collect()
}

on_both_backends!(every_services_metrics_count_what_went_through_it);

async fn every_services_metrics_count_what_went_through_it(backend: RedisKind) {
    let mut p = ProcessPipeline::start(
        service_binaries!(),
        ProcessOptions {
            backend,
            name: "metrics".into(),
            ..ProcessOptions::default()
        },
    )
    .await;

    // HTTP: 5 orders (a trade, a resting bid, an unknown symbol and an off-tick price that
    // transform rejects), 3 ticks (one of an unknown symbol, which transform dead-letters),
    // a cancel; and a request refused at the door, which counts nowhere.
    let (status, body) = p
        .post_json(
            "/v1/orders",
            &json!([
                limit_json("AAPL", "sell", 172.50, 100, "s1"),
                limit_json("AAPL", "buy", 172.60, 60, "b1"),
                limit_json("MSFT", "buy", 400.00, 10, "m1"),
                limit_json("ZZZZ", "buy", 10.0, 1, "z1"),
                limit_json("AAPL", "buy", 172.503, 10, "t1"),
            ]),
            &[],
        )
        .await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(5)),
        "{body}"
    );
    let (status, body) = p
        .post_json(
            "/v1/ticks",
            &json!([
                { "symbol": "AAPL", "price": 172.55, "qty": 10 },
                { "symbol": "MSFT", "price": 401.0, "qty": 5 },
                { "symbol": "ZZZZ", "price": 1.5, "qty": 1 },
            ]),
            &[],
        )
        .await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(3)),
        "{body}"
    );
    let (status, body) = p
        .post_json("/v1/orders", &limit_json("AAPL", "buy", 172.5, 0, "x"), &[])
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = p.delete("/v1/orders/MSFT/m1").await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(1)),
        "{body}"
    );
    // gRPC: 2 orders that trade.
    let mut grpc = p.grpc_client().await;
    grpc.publish(v1::PublishRequest {
        events: vec![
            limit("NVDA", v1::Side::Sell, 900.0, 5.0, "n1"),
            limit("NVDA", v1::Side::Buy, 900.0, 5.0, "n2"),
        ],
    })
    .await
    .expect("gRPC publish");
    drop(grpc);
    // The external stream: a good tick, and an entry ingest dead-letters.
    p.xadd_external(&[("symbol", "AAPL"), ("price", "172.56"), ("qty", "3")])
        .await;
    p.xadd_external(&[("symbol", "AAPL"), ("price", "abc"), ("qty", "1")])
        .await;

    let accepted = 5 + 3 + 1 + 2; // by HTTP and gRPC
    let external = 1;
    let inbound = accepted + external;
    let transform_dead = 1; // the ZZZZ tick
    let validated = 5 + 3 + 1; // s1 b1 m1 n1 n2, 3 good ticks, the cancel

    p.wait_settled(WAIT).await;
    // What Redis holds agrees with what was sent…
    assert_eq!(p.stream_len(topology::INBOUND).await, inbound);
    assert_eq!(p.dead_letter_len(topology::INBOUND).await, transform_dead);
    assert_eq!(p.stream_len(topology::VALIDATED).await, validated);
    assert_eq!(
        p.xlen(&format!("{}:dlq", p.external_stream())).await,
        1,
        "ingest's dead letter"
    );
    let market = p.stream_len(topology::MARKET).await;
    assert!(market > 2, "reports, trades and ticks: {market}");

    // …and so do the counters, each in its own process (a commit is counted just after
    // Redis acknowledged it: poll).
    let mut expected: Reading = vec![
        (Role::Ingest, INGESTED, "", accepted),
        (Role::Ingest, PROCESSED, topology::INGEST_GROUP, external),
        (Role::Ingest, DEAD_LETTERED, topology::INGEST_GROUP, 1),
        (
            Role::Transform,
            PROCESSED,
            topology::TRANSFORM_GROUP,
            inbound - transform_dead,
        ),
        (
            Role::Transform,
            DEAD_LETTERED,
            topology::TRANSFORM_GROUP,
            transform_dead,
        ),
        (Role::Transform, REJECTED, "", 2),
        (Role::Engine, PROCESSED, topology::ENGINE_GROUP, validated),
        (Role::Engine, DEAD_LETTERED, topology::ENGINE_GROUP, 0),
        (
            Role::Analytics,
            PROCESSED,
            topology::ANALYTICS_GROUP,
            market,
        ),
        (Role::Analytics, DEAD_LETTERED, topology::ANALYTICS_GROUP, 0),
        // Every envelope a stage read, dead-lettered or not; ingest reads flat fields.
        (Role::Ingest, ARRIVALS, topology::INGEST_GROUP, 0),
        (
            Role::Transform,
            ARRIVALS,
            topology::TRANSFORM_GROUP,
            inbound,
        ),
        (Role::Engine, ARRIVALS, topology::ENGINE_GROUP, validated),
        (Role::Analytics, ARRIVALS, topology::ANALYTICS_GROUP, market),
    ];
    for role in Role::ALL {
        expected.push((role, DUPLICATES, "", 0));
        expected.push((role, FAILED, "", 0));
        // A process counts only its own stage.
        for other in Role::ALL.into_iter().filter(|r| *r != role) {
            expected.push((role, PROCESSED, group(other), 0));
        }
    }
    let wanted: Vec<_> = expected.iter().map(|&(r, m, s, _)| (r, m, s)).collect();
    p.wait_for(WAIT, async || {
        let seen = read(&p, &wanted).await;
        if seen == expected {
            return Ok(());
        }
        let mut diff = String::from(
            "every counter to match; differences (service metric{stage}: seen, expected):",
        );
        for (seen, expected) in seen.iter().zip(&expected) {
            if seen != expected {
                let _ = write!(
                    diff,
                    "\n  {} {}{{stage={:?}}}: {}, {}",
                    seen.0, seen.1, seen.2, seen.3, expected.3
                );
            }
        }
        Err(diff)
    })
    .await;

    p.stop().await;
}
