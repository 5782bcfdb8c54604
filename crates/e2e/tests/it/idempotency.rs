//! A client that retries with the same `Idempotency-Key` (HTTP header or gRPC metadata)
//! gets the ids of its first request back, and nothing is appended twice.

use e2e::{Options, Pipeline, RedisKind};
use serde_json::{Value, json};
use tickflow_proto::{topology, v1};

use crate::support::{limit, limit_json};

async fn post(p: &Pipeline, key: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(p.ingest_url("/v1/orders"))
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .expect("POST /v1/orders");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

on_both_backends!(a_retry_with_the_same_idempotency_key_is_not_appended_twice);

async fn a_retry_with_the_same_idempotency_key_is_not_appended_twice(backend: RedisKind) {
    let p = Pipeline::start_with(Options {
        backend,
        ..Options::default()
    })
    .await;
    let inbound = |p: &Pipeline| {
        let keys = p.keys().clone();
        let mut conn = p.conn();
        async move {
            let mut total = 0u64;
            for partition in keys.all_partitions() {
                let len: u64 = redis::cmd("XLEN")
                    .arg(keys.stream(topology::INBOUND, partition))
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                total += len;
            }
            total
        }
    };

    // HTTP: the same request twice under one key.
    let body = json!([
        limit_json("AAPL", "sell", 172.50, 10, "i1"),
        limit_json("MSFT", "buy", 410.00, 5, "i2"),
    ]);
    let (status, first) = post(&p, "order-batch-1", &body).await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(first["replayed"], false, "{first}");
    let (status, again) = post(&p, "order-batch-1", &body).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["replayed"], true, "{again}");
    assert_eq!(
        again["ids"], first["ids"],
        "the retry answers the first append's ids"
    );
    assert_eq!(inbound(&p).await, 2);

    // A new key is a new request.
    let (status, other) = post(&p, "order-batch-2", &body).await;
    assert_eq!(status, 202, "{other}");
    assert_eq!(other["replayed"], false, "{other}");
    assert_eq!(inbound(&p).await, 4);

    // The same key for another request: 422, nothing appended.
    let (status, answer) = post(
        &p,
        "order-batch-1",
        &json!([limit_json("AAPL", "sell", 172.50, 11, "i1")]),
    )
    .await;
    assert_eq!(status, 422, "{answer}");
    assert!(answer.to_string().contains("idempotency-key"), "{answer}");
    assert_eq!(inbound(&p).await, 4);

    // A key that cannot be one: 400 naming the header, nothing appended.
    let too_long = "k".repeat(201);
    for bad in [too_long.as_str(), "has space"] {
        let (status, answer) = post(&p, bad, &body).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer.to_string().contains("idempotency-key"), "{answer}");
    }
    assert_eq!(inbound(&p).await, 4);

    // gRPC Publish: the same key in the metadata.
    let mut grpc = p.grpc_client().await;
    let request = || {
        let mut request = tonic::Request::new(v1::PublishRequest {
            events: vec![limit("AAPL", v1::Side::Buy, 172.40, 3.0, "g1")],
        });
        request
            .metadata_mut()
            .insert("idempotency-key", "grpc-1".parse().unwrap());
        request
    };
    let first = grpc.publish(request()).await.expect("Publish").into_inner();
    let again = grpc
        .publish(request())
        .await
        .expect("Publish again")
        .into_inner();
    assert_eq!(first.ids, again.ids);
    assert_eq!(inbound(&p).await, 5);
    let mut bad = tonic::Request::new(v1::PublishRequest {
        events: vec![limit("AAPL", v1::Side::Buy, 172.40, 3.0, "g2")],
    });
    bad.metadata_mut()
        .insert("idempotency-key", "a b".parse().unwrap());
    let status = grpc.publish(bad).await.expect_err("a bad key is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("idempotency-key"), "{status:?}");
    let mut reused = tonic::Request::new(v1::PublishRequest {
        events: vec![limit("AAPL", v1::Side::Buy, 172.40, 4.0, "g1")],
    });
    reused
        .metadata_mut()
        .insert("idempotency-key", "grpc-1".parse().unwrap());
    let status = grpc
        .publish(reused)
        .await
        .expect_err("a reused key is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("idempotency-key"), "{status:?}");
    assert_eq!(inbound(&p).await, 5);

    p.wait_settled(crate::support::WAIT).await;
    p.shutdown().await;
}
