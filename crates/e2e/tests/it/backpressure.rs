//! Ingest refuses work the pipeline cannot absorb: 429 with `Retry-After` over HTTP,
//! RESOURCE_EXHAUSTED over gRPC, while transform's backlog (lag + pending) is over
//! `INGEST_MAX_BACKLOG`; and accepts again once transform has caught up.

use std::time::{Duration, Instant};

use e2e::{Options, Pipeline, RedisKind, Role};
use serde_json::json;
use tickflow_proto::v1;

fn order(id: &str) -> serde_json::Value {
    json!({"symbol": "AAPL", "side": "buy", "price": 100.0, "qty": 1, "client_order_id": id})
}

on_both_backends!(ingest_refuses_while_transform_is_behind_and_accepts_once_it_caught_up);

async fn ingest_refuses_while_transform_is_behind_and_accepts_once_it_caught_up(
    backend: RedisKind,
) {
    let mut p = Pipeline::start_with(Options {
        backend,
        ingest_env: vec![("INGEST_MAX_BACKLOG".into(), "5".into())],
        name: "backpressure".into(),
        ..Options::default()
    })
    .await;
    p.stop_replica(Role::Transform, 0)
        .await
        .expect("transform stops cleanly");

    let batch: Vec<_> = (0..10).map(|i| order(&format!("a{i}"))).collect();
    let (status, body) = p.post_json("/v1/orders", &json!(batch)).await;
    assert_eq!(status, 202, "{body}");

    // The backlog is measured every 100 ms; within a few seconds ingest must refuse.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let response = client
            .post(p.ingest_url("/v1/orders"))
            .json(&order("late"))
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            break response;
        }
        assert_eq!(response.status(), 202);
        assert!(
            Instant::now() < deadline,
            "ingest never refused with transform stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(body["backlog"].as_u64().unwrap() > 5, "{body}");
    assert_eq!(body["limit"], 5);

    let mut grpc = p.grpc_client().await;
    let status = grpc
        .publish(v1::PublishRequest {
            events: vec![v1::Event {
                kind: Some(v1::event::Kind::Tick(v1::MarketTick {
                    symbol: "AAPL".into(),
                    price: 100.0,
                    qty: 1.0,
                })),
            }],
        })
        .await
        .expect_err("gRPC refuses too");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    // Transform back: the backlog drains and ingest accepts again.
    p.add_replica(Role::Transform).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = p.post_json("/v1/orders", &order("after")).await;
        if status == 202 {
            break;
        }
        assert_eq!(status, 429, "{body}");
        assert!(
            Instant::now() < deadline,
            "ingest still refusing after transform came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.shutdown().await;
}
