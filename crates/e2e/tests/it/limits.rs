//! Every input path of ingest has a limit, tried past it against the real servers:
//!
//! - a trace context is checked before it is stored: an oversize `tracestate` (HTTP header,
//!   gRPC metadata, an `ingest_stream` entry's field) is dropped, not copied into every
//!   event, and Redis grows by about what the events themselves cost;
//! - ingest's HTTP server closes connections that send half a request header, and keeps
//!   answering others;
//! - a POST that is not JSON is refused (415); a gRPC message over
//!   `INGEST_GRPC_MAX_MESSAGE_BYTES` is refused; a `PublishStream` past
//!   `INGEST_MAX_STREAM_EVENTS`, or silent for `INGEST_GRPC_REQUEST_TIMEOUT_MS`, ends with a
//!   status that says how much of it was appended; its answer is a count and the last id.
//!
//! Entries are read raw (the `h` field as stored): the envelope decoder drops an oversize
//! `tracestate` on read, which would hide one that was stored.

use e2e::{Options, Pipeline, RedisKind};
use serde_json::{Value, json};
use tickflow_proto::{topology, v1};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::{WAIT, limit_json, tick};

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// A syntactically valid `tracestate` of about `bytes` bytes, in many 64-character members:
/// only its size (and member count) is wrong.
fn tracestate_of(bytes: usize) -> String {
    let mut state = String::with_capacity(bytes + 80);
    let mut member = 0;
    while state.len() < bytes {
        if member > 0 {
            state.push(',');
        }
        state.push_str(&format!("m{member}={}", "v".repeat(64)));
        member += 1;
    }
    state
}

fn ticks_json(count: usize) -> Value {
    Value::Array(
        (0..count)
            .map(|i| json!({ "symbol": "AAPL", "price": 172.5, "qty": i + 1 }))
            .collect(),
    )
}

/// What Redis uses for the pipeline: its whole memory on a redis-server of its own, the
/// size of its keys on the shared cluster (every key of a pipeline names its namespace).
async fn used_memory(p: &Pipeline) -> u64 {
    p.backend()
        .memory_used(&format!("*{}*", p.namespace()))
        .await
}

/// A stream entry's fields as `XRANGE` gives them: names as text, values as bytes.
type RawFields = Vec<(String, Vec<u8>)>;

/// The `h` field of every entry of every partition of the logical `stream`, as stored.
async fn raw_headers(p: &Pipeline, stream: &str) -> Vec<String> {
    let mut headers = Vec::new();
    for partition in p.keys().all_partitions() {
        let entries: Vec<(String, RawFields)> = redis::cmd("XRANGE")
            .arg(p.keys().stream(stream, partition))
            .arg("-")
            .arg("+")
            .query_async(&mut p.conn())
            .await
            .expect("XRANGE");
        for (_, fields) in entries {
            let (_, header) = fields
                .into_iter()
                .find(|(name, _)| name == "h")
                .expect("an envelope header");
            headers.push(String::from_utf8_lossy(&header).into_owned());
        }
    }
    headers
}

async fn stream_len(p: &Pipeline, stream: &str) -> u64 {
    let mut total = 0;
    for partition in p.keys().all_partitions() {
        let len: u64 = redis::cmd("XLEN")
            .arg(p.keys().stream(stream, partition))
            .query_async(&mut p.conn())
            .await
            .expect("XLEN");
        total += len;
    }
    total
}

/// Checks that every stored event of the pipeline's three streams carries `TRACEPARENT`
/// and, of a trace state, at most `kept` (the small valid one a test sent).
async fn assert_no_oversize_tracestate(p: &Pipeline, kept: &str, expected_events: usize) {
    for stream in [topology::INBOUND, topology::VALIDATED, topology::MARKET] {
        let headers = raw_headers(p, stream).await;
        assert!(
            headers.len() >= expected_events,
            "{stream}: {}",
            headers.len()
        );
        for header in headers {
            let parts: Vec<&str> = header.splitn(6, ' ').collect();
            assert_eq!(parts.get(4), Some(&TRACEPARENT), "{stream}: {header:.200}");
            if let Some(state) = parts.get(5) {
                assert!(
                    *state == kept,
                    "{stream}: a trace state of {} bytes was stored: {header:.200}",
                    state.len()
                );
            }
        }
    }
}

on_both_backends!(an_oversize_tracestate_is_stored_nowhere_whatever_the_path);

async fn an_oversize_tracestate_is_stored_nowhere_whatever_the_path(backend: RedisKind) {
    let p = Pipeline::start_with(Options {
        backend,
        name: "tracestate".into(),
        ..Options::default()
    })
    .await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let post = async |body: &Value, tracestate: &str| {
        let response = http
            .post(p.ingest_url("/v1/ticks"))
            .header("traceparent", TRACEPARENT)
            .header("tracestate", tracestate)
            .json(body)
            .send()
            .await
            .expect("POST /v1/ticks");
        assert_eq!(response.status().as_u16(), 202);
    };
    p.wait_settled(WAIT).await;
    let before = used_memory(&p).await;
    let mut sent = 0;
    let mut request_bytes = 0;

    // HTTP: a 200 kB header on 100 events, and a 20 kB one on 5,000 (each would have been
    // copied into every event: 20 MB and 100 MB per stream, three streams).
    for (header_bytes, events) in [(200_000, 100), (20_000, 5_000)] {
        let body = ticks_json(events);
        let state = tracestate_of(header_bytes);
        post(&body, &state).await;
        sent += events;
        request_bytes += body.to_string().len() + state.len();
    }
    // gRPC metadata: 12 kB (HTTP/2's default header list limit is 16 kB) on 5,000 events.
    let mut grpc = p.grpc_client().await;
    let mut request = tonic::Request::new(v1::PublishRequest {
        events: (0..5_000)
            .map(|i| tick("MSFT", 410.0, f64::from(i + 1)))
            .collect(),
    });
    let state = tracestate_of(12_000);
    request_bytes += state.len() + 5_000 * 30;
    let metadata = request.metadata_mut();
    metadata.insert("traceparent", TRACEPARENT.parse().unwrap());
    metadata.insert("tracestate", state.parse().unwrap());
    let reply = grpc.publish(request).await.expect("Publish").into_inner();
    assert_eq!(reply.accepted, 5_000);
    sent += 5_000;
    // The external stream: a 200 kB field, and a short one that is not a W3C list.
    for state in [tracestate_of(200_000), "Not A=List".to_owned()] {
        p.xadd_external(&[
            ("symbol", "AAPL"),
            ("price", "172.5"),
            ("qty", "1"),
            ("traceparent", TRACEPARENT),
            ("tracestate", &state),
        ])
        .await;
        sent += 1;
        // The producer's own entry stays in its stream (never trimmed here): its size is
        // the producer's, not a copy.
        request_bytes += state.len();
    }
    // A small valid one is kept.
    post(&ticks_json(1), "congo=t61rcWkgMzE").await;
    sent += 1;

    p.wait_until(WAIT, "every event to reach the market stream", async || {
        stream_len(&p, topology::MARKET).await >= sent as u64
    })
    .await;
    p.wait_settled(WAIT).await;
    assert_no_oversize_tracestate(&p, "congo=t61rcWkgMzE", sent).await;

    // What the events themselves cost (about 100 bytes per entry, three streams, the
    // analytics aggregates), plus the producer's own external entries: well under 8 MB.
    // Copied, the trace states alone would be over 600 MB.
    let grown = used_memory(&p).await.saturating_sub(before);
    let allowed = request_bytes as u64 + 8 * 1024 * 1024;
    assert!(
        grown < allowed,
        "Redis grew by {grown} bytes for {sent} events ({request_bytes} bytes of requests)"
    );
    p.shutdown().await;
}

/// Waits until the server closes `socket`; panics if it is still open after [`WAIT`].
async fn wait_closed(mut socket: TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let closed = tokio::time::timeout(WAIT, async {
        let mut buffer = [0u8; 1024];
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "ingest kept a half-sent request open for {WAIT:?}"
    );
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_sent_requests_to_ingest_are_closed_while_orders_are_still_taken() {
    let p = Pipeline::start_with(Options {
        name: "half-sent".into(),
        ingest_env: vec![
            ("TICKFLOW_HTTP_HEADER_READ_TIMEOUT_MS".into(), "1000".into()),
            ("TICKFLOW_HTTP_IDLE_TIMEOUT_MS".into(), "3600000".into()),
            ("TICKFLOW_HTTP_MAX_CONNECTIONS".into(), "2000".into()),
        ],
        ..Options::default()
    })
    .await;
    let addr = p.service(e2e::Role::Ingest, 0).http_addr();
    let mut half_sent = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut socket = TcpStream::connect(addr).await.expect("connect to ingest");
        socket
            .write_all(b"POST /v1/orders HTTP/1.1\r\nhost: ingest\r\ncontent-type: applic")
            .await
            .unwrap();
        half_sent.push(socket);
    }
    let (status, body) = p
        .post_json(
            "/v1/orders",
            &limit_json("AAPL", "sell", 172.5, 1, "while-held"),
        )
        .await;
    assert_eq!(
        status, 202,
        "an order is taken while 1,000 requests hang: {body}"
    );

    let closings: Vec<_> = half_sent
        .into_iter()
        .map(|socket| tokio::spawn(wait_closed(socket)))
        .collect();
    for closing in closings {
        let received = closing.await.unwrap();
        let text = String::from_utf8_lossy(&received);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }
    // On a new connection: the client's pooled one has been idle longer than the header
    // read timeout too, which closes it (README), maybe just as this request is sent.
    let fresh = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = fresh
        .post(p.ingest_url("/v1/orders"))
        .json(&limit_json("AAPL", "sell", 172.5, 1, "after"))
        .send()
        .await
        .expect("POST after the half-sent requests were closed");
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, 202, "{body}");
    p.shutdown().await;
}

on_both_backends!(ingest_refuses_forms_oversize_messages_and_overlong_streams);

async fn ingest_refuses_forms_oversize_messages_and_overlong_streams(backend: RedisKind) {
    let p = Pipeline::start_with(Options {
        backend,
        name: "ingest-limits".into(),
        ingest_env: vec![
            ("INGEST_GRPC_MAX_MESSAGE_BYTES".into(), "65536".into()),
            ("INGEST_MAX_STREAM_EVENTS".into(), "1000".into()),
            ("INGEST_GRPC_REQUEST_TIMEOUT_MS".into(), "2000".into()),
        ],
        ..Options::default()
    })
    .await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    // A browser form (and a text/plain "form") cannot place or cancel orders.
    for (path, content_type, body) in [
        (
            "/v1/orders",
            "application/x-www-form-urlencoded",
            "symbol=AAPL&side=buy&price=172.5&qty=1",
        ),
        (
            "/v1/orders",
            "text/plain",
            r#"{"symbol":"AAPL","side":"buy","price":172.5,"qty":1}"#,
        ),
        (
            "/v1/cancels",
            "multipart/form-data; boundary=x",
            "--x\r\ncontent-disposition: form-data; name=symbol\r\n\r\nAAPL\r\n--x--\r\n",
        ),
    ] {
        let response = http
            .post(p.ingest_url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 415, "{path} as {content_type}");
        let answer: Value = response.json().await.unwrap();
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("application/json")),
            "{answer}"
        );
    }
    assert_eq!(stream_len(&p, topology::INBOUND).await, 0);

    // A gRPC message over INGEST_GRPC_MAX_MESSAGE_BYTES is refused whole; one under it is
    // taken.
    let mut grpc = p.grpc_client().await;
    let events = |count: u32| -> Vec<v1::Event> {
        (0..count)
            .map(|i| tick("AAPL", 172.5, f64::from(i + 1)))
            .collect()
    };
    let too_large = grpc
        .publish(v1::PublishRequest {
            events: events(5_000),
        })
        .await
        .expect_err("a 100 kB message over a 64 kB limit");
    assert_eq!(
        too_large.code(),
        tonic::Code::ResourceExhausted,
        "{too_large:?}"
    );
    assert_eq!(stream_len(&p, topology::INBOUND).await, 0);
    let taken = grpc
        .publish(v1::PublishRequest {
            events: events(100),
        })
        .await
        .expect("a small message")
        .into_inner();
    assert_eq!(taken.accepted, 100);

    // PublishStream: at its cap it answers a count and the last id...
    let reply = grpc
        .publish_stream(futures::stream::iter(events(1_000)))
        .await
        .expect("a stream of exactly INGEST_MAX_STREAM_EVENTS")
        .into_inner();
    assert_eq!(reply.accepted, 1_000);
    let last = last_inbound_event(&p, &reply.last_id).await;
    assert_eq!(
        last,
        tick("AAPL", 172.5, 1_000.0),
        "the last id is the last event's"
    );

    // ...past it, the first 1,000 are appended and the status says so.
    let before = stream_len(&p, topology::INBOUND).await;
    let refused = grpc
        .publish_stream(futures::stream::iter(events(1_500)))
        .await
        .expect_err("a stream past INGEST_MAX_STREAM_EVENTS");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("INGEST_MAX_STREAM_EVENTS")
            && refused
                .message()
                .contains("1000 events of this stream were accepted"),
        "{refused:?}"
    );
    assert_eq!(
        refused
            .metadata()
            .get("tickflow-accepted")
            .and_then(|v| v.to_str().ok()),
        Some("1000")
    );
    assert_eq!(stream_len(&p, topology::INBOUND).await, before + 1_000);
    let last_id = refused
        .metadata()
        .get("tickflow-last-id")
        .and_then(|v| v.to_str().ok())
        .expect("the last id in the trailers")
        .to_owned();
    assert_eq!(
        last_inbound_event(&p, &last_id).await,
        tick("AAPL", 172.5, 1_000.0)
    );

    // A stream that goes silent is ended, with what it sent before appended.
    let (mut sender, receiver) = futures::channel::mpsc::channel::<v1::Event>(8);
    for event in events(3) {
        futures::SinkExt::send(&mut sender, event).await.unwrap();
    }
    let before = stream_len(&p, topology::INBOUND).await;
    let silent = tokio::time::timeout(WAIT, grpc.publish_stream(receiver))
        .await
        .expect("the server ends a silent stream")
        .expect_err("a stream silent past INGEST_GRPC_REQUEST_TIMEOUT_MS");
    assert_eq!(silent.code(), tonic::Code::DeadlineExceeded, "{silent:?}");
    assert!(
        silent
            .message()
            .contains("3 events of this stream were accepted"),
        "{silent:?}"
    );
    assert_eq!(stream_len(&p, topology::INBOUND).await, before + 3);
    drop(sender);
    p.shutdown().await;
}

/// The event stored at `id` in some partition of the inbound stream, as a gRPC tick.
async fn last_inbound_event(p: &Pipeline, id: &str) -> v1::Event {
    assert!(!id.is_empty(), "an id");
    let entries = p.stream_entries(topology::INBOUND).await;
    let entry = entries
        .iter()
        .find(|entry| entry.id == id)
        .unwrap_or_else(|| panic!("no inbound entry {id}"));
    let tick: v1::MarketTick =
        prost::Message::decode(entry.envelope.payload.as_ref()).expect("a tick");
    v1::Event {
        kind: Some(v1::event::Kind::Tick(tick)),
    }
}
