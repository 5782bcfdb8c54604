//! Bad inputs are refused at the door (400, 413, INVALID_ARGUMENT), dead-lettered with a
//! reason, or rejected with an execution report; none reaches the engine, and good events
//! around them still trade.

use std::collections::BTreeSet;

use e2e::{Options, Pipeline, RedisKind, ValidatedEvent};
use serde_json::{Value, json};
use tickflow_proto::{topology, v1};

use crate::support::{
    WAIT, limit, limit_json, status_name, tick, trade, trade_view, wait_report, wait_trades,
};

/// The `field`s named in a 400 answer's details.
fn fields(body: &Value) -> BTreeSet<String> {
    body["details"]
        .as_array()
        .unwrap_or_else(|| panic!("no details in {body}"))
        .iter()
        .map(|d| d["field"].as_str().expect("field").to_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

on_both_backends!(bad_inputs_are_refused_or_dead_lettered_and_never_reach_the_engine);

async fn bad_inputs_are_refused_or_dead_lettered_and_never_reach_the_engine(backend: RedisKind) {
    let p = Pipeline::start_with(Options {
        backend,
        ingest_env: vec![("INGEST_MAX_BODY_BYTES".into(), "2048".into())],
        name: "bad".into(),
        ..Options::default()
    })
    .await;
    let mut grpc = p.grpc_client().await;

    // A good resting offer first.
    let (status, body) = p
        .post_json(
            "/v1/orders",
            &limit_json("AAPL", "sell", 172.50, 10, "good-s1"),
        )
        .await;
    assert_eq!(status, 202, "{body}");

    // --- HTTP: 400 with every bad field named, or 413 -----------------------------------
    let (status, body) = p.post_raw("/v1/orders", "{not json").await;
    assert_eq!(status, 400, "malformed JSON: {body}");
    assert_eq!(fields(&body), set(&["body"]), "{body}");
    assert!(
        body["details"][0]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{body}"
    );

    let (status, body) = p
        .post_json(
            "/v1/orders",
            &json!({ "symbol": 5, "side": "up", "price": "172.5", "qty": "ten", "client_order_id": "bad-types" }),
        )
        .await;
    assert_eq!(status, 400, "wrong types: {body}");
    assert_eq!(
        fields(&body),
        set(&["symbol", "side", "price", "qty"]),
        "{body}"
    );

    for qty in [json!(-5), json!(0)] {
        let mut order = limit_json("AAPL", "buy", 172.50, 1, "bad-qty");
        order["qty"] = qty.clone();
        let (status, body) = p.post_json("/v1/orders", &order).await;
        assert_eq!(status, 400, "qty {qty}: {body}");
        assert_eq!(fields(&body), set(&["qty"]), "qty {qty}: {body}");
    }
    let (status, body) = p
        .post_json(
            "/v1/ticks",
            &json!({ "symbol": "AAPL", "price": 172.5, "qty": 0 }),
        )
        .await;
    assert_eq!(status, 400, "tick qty 0: {body}");
    assert_eq!(fields(&body), set(&["qty"]), "{body}");

    // One bad event in an array refuses the whole request.
    let (status, body) = p
        .post_json(
            "/v1/orders",
            &json!([
                limit_json("AAPL", "buy", 172.50, 1, "bad-batch-good-part"),
                limit_json("AAPL", "buy", -1.0, 1, "bad-batch-bad-part"),
            ]),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["details"][0]["index"], 1, "{body}");
    assert_eq!(fields(&body), set(&["price"]), "{body}");

    // Over INGEST_MAX_BODY_BYTES (2048).
    let big: Vec<Value> = (0..40)
        .map(|i| limit_json("AAPL", "buy", 172.50, 1, &format!("too-big-{i}")))
        .collect();
    let big = serde_json::to_vec(&big).unwrap();
    assert!(big.len() > 2048);
    let (status, body) = p.post_raw("/v1/orders", big).await;
    assert_eq!(status, 413, "{body}");

    // --- gRPC: INVALID_ARGUMENT, all or none --------------------------------------------
    let nan_price = grpc
        .publish(v1::PublishRequest {
            events: vec![limit("AAPL", v1::Side::Buy, f64::NAN, 1.0, "bad-nan-price")],
        })
        .await
        .expect_err("NaN price");
    assert_eq!(
        nan_price.code(),
        tonic::Code::InvalidArgument,
        "{nan_price:?}"
    );
    assert!(nan_price.message().contains("price"), "{nan_price:?}");
    let nan_batch = grpc
        .publish(v1::PublishRequest {
            events: vec![
                limit(
                    "AAPL",
                    v1::Side::Buy,
                    172.50,
                    1.0,
                    "bad-grpc-batch-good-part",
                ),
                tick("AAPL", 172.5, f64::NAN),
            ],
        })
        .await
        .expect_err("NaN qty");
    assert_eq!(
        nan_batch.code(),
        tonic::Code::InvalidArgument,
        "{nan_batch:?}"
    );
    assert!(nan_batch.message().contains("event 1"), "{nan_batch:?}");
    assert!(nan_batch.message().contains("qty"), "{nan_batch:?}");
    let streamed = grpc
        .publish_stream(futures::stream::iter(vec![limit(
            "AAPL",
            v1::Side::Sell,
            172.50,
            -3.0,
            "bad-stream-qty",
        )]))
        .await
        .expect_err("negative qty on PublishStream");
    assert_eq!(
        streamed.code(),
        tonic::Code::InvalidArgument,
        "{streamed:?}"
    );

    // --- The external stream: a bad entry is dead-lettered with the reason --------------
    p.xadd_external(&[("symbol", "AAPL"), ("price", "abc"), ("qty", "1")])
        .await;
    let dlq = p.external_dead_letter_stream();
    let dead = p
        .wait_for(WAIT, async || {
            let dead = p.dead_letters(&dlq).await;
            if dead.is_empty() {
                Err(format!("a dead letter in {dlq}"))
            } else {
                Ok(dead)
            }
        })
        .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = &dead[0]["dlq.reason"];
    assert!(
        reason.contains("price") && reason.contains("not a number"),
        "{dead:?}"
    );
    assert_eq!(
        dead[0]["price"], "abc",
        "the original fields are kept: {dead:?}"
    );
    assert_eq!(dead[0]["dlq.group"], topology::INGEST_GROUP, "{dead:?}");

    // --- Business rejections: a report with the reason ----------------------------------
    let (status, body) = p
        .post_json(
            "/v1/orders",
            &limit_json("ZZZZ", "buy", 10.0, 1, "bad-unknown"),
        )
        .await;
    assert_eq!(status, 202, "syntactically fine: {body}");
    let rejected = wait_report(&p, "bad-unknown", "REJECTED").await;
    assert_eq!(rejected.symbol, "ZZZZ");
    assert_eq!(rejected.reason, "unknown symbol ZZZZ");

    let (status, body) = p
        .post_json(
            "/v1/orders",
            &limit_json("AAPL", "buy", 172.503, 10, "bad-off-tick"),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let rejected = wait_report(&p, "bad-off-tick", "REJECTED").await;
    assert!(
        rejected.reason.contains("off the tick size"),
        "{rejected:?}"
    );

    // A tick of an unknown symbol has nobody to answer: dead-lettered by transform.
    let (status, body) = p
        .post_json(
            "/v1/ticks",
            &json!({ "symbol": "ZZZZ", "price": 1.5, "qty": 1 }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let dead = p
        .wait_for(WAIT, async || {
            let dead = p.partition_dead_letters(topology::INBOUND).await;
            if dead.is_empty() {
                Err("a dead letter of transform".to_owned())
            } else {
                Ok(dead)
            }
        })
        .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["dlq.reason"], "unknown symbol ZZZZ", "{dead:?}");
    assert_eq!(dead[0]["dlq.group"], topology::TRANSFORM_GROUP, "{dead:?}");

    // --- Good events around the bad ones still trade ------------------------------------
    grpc.publish(v1::PublishRequest {
        events: vec![limit("AAPL", v1::Side::Buy, 172.50, 10.0, "good-b1")],
    })
    .await
    .expect("good gRPC order");
    wait_trades(&p, "AAPL", 1).await;
    let (status, body) = p
        .post_json(
            "/v1/orders",
            &limit_json("AAPL", "sell", 172.50, 5, "good-s2"),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    p.xadd_external(&[
        ("symbol", "AAPL"),
        ("side", "buy"),
        ("price", "172.50"),
        ("qty", "5"),
        ("client_order_id", "good-b2"),
    ])
    .await;
    wait_trades(&p, "AAPL", 2).await;
    p.wait_settled(WAIT).await;

    let trades: Vec<_> = p.trades().await.iter().map(trade_view).collect();
    assert_eq!(
        trades,
        vec![
            trade("AAPL", 172_500_000, 10, "good-b1", "good-s1", 3),
            trade("AAPL", 172_500_000, 5, "good-b2", "good-s2", 8),
        ]
    );

    // Nothing bad reached the engine: its input holds exactly the good orders.
    let validated: Vec<String> = p
        .validated_entries()
        .await
        .into_iter()
        .map(|(kind, event)| match event {
            ValidatedEvent::Order(o) => o.client_order_id,
            other => panic!("unexpected {kind} on the validated stream: {other:?}"),
        })
        .collect();
    assert_eq!(
        validated,
        vec!["good-s1", "good-b1", "good-s2", "good-b2"],
        "the engine's input"
    );
    // Nor did anything refused at the door enter the pipeline at all: the inbound stream
    // holds the 4 good orders, the 2 orders transform rejected and the unknown tick.
    let inbound: Vec<(String, String)> = p
        .stream_entries(topology::INBOUND)
        .await
        .into_iter()
        .map(|e| (e.envelope.event_type, e.envelope.partition_key))
        .collect();
    assert_eq!(inbound.len(), 7, "{inbound:?}");
    assert_eq!(
        inbound.iter().filter(|(kind, _)| kind == "tick").count(),
        1,
        "{inbound:?}"
    );
    // Every report is about a good order, or is one of the two rejections.
    for r in p.execution_reports().await {
        let bad = r.client_order_id.starts_with("bad-");
        assert!(
            !bad || (status_name(r.status) == "REJECTED"
                && ["bad-unknown", "bad-off-tick"].contains(&r.client_order_id.as_str())),
            "{r:?}"
        );
    }

    drop(grpc);
    p.shutdown().await;
}
