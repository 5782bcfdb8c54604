//! The health/admin router over HTTP, served on port 0 next to a real stage: liveness,
//! readiness, status, dead-letter replay, consumer deletion, metrics; and the producer-side
//! backlog measurement.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use redis::Value;
use reqwest::StatusCode;
use serde_json::{Value as Json, json};
use streams_core::{
    ConsumeMode, Redis, Stage, Stats,
    admin::{AdminState, STATUS_CACHE_TTL, router},
    backpressure::{Backlog, Overloaded},
    config::Secret,
    telemetry::install_metrics,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::support::*;

const TOKEN: &str = "it-admin-token";

/// One stream entry as XRANGE and XREADGROUP return it: its id and its fields in order.
type Entry = (String, Vec<(String, Vec<u8>)>);

/// The admin router served on 127.0.0.1:0, and a client for it.
struct Admin {
    base: String,
    client: reqwest::Client,
    server: JoinHandle<()>,
}

impl Admin {
    async fn serve(
        redis: Redis,
        stats: Stats,
        admin_token: Option<&str>,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(AdminState {
            redis,
            stats,
            admin_token: admin_token.map(|token| Secret::new(token.to_owned())),
            metrics,
            service: "it-service".into(),
        });
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            server,
        }
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.text().await.unwrap())
    }

    async fn get_json(&self, path: &str) -> (StatusCode, Json) {
        let (status, body) = self.get(path).await;
        let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        (status, json)
    }

    /// Sends `method path` with `Authorization: <authorization>` if given.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        authorization: Option<&str>,
    ) -> (StatusCode, Json) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(value) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        let json = serde_json::from_str(&body).unwrap_or(Json::String(body));
        (status, json)
    }

    async fn post(&self, path: &str, authorization: Option<&str>) -> (StatusCode, Json) {
        self.call(reqwest::Method::POST, path, authorization).await
    }

    async fn delete(&self, path: &str, authorization: Option<&str>) -> (StatusCode, Json) {
        self.call(reqwest::Method::DELETE, path, authorization)
            .await
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Every entry of `key` with its id, fields in entry order.
async fn entries_with_ids(redis: &TestRedis, key: &str) -> Vec<Entry> {
    let mut conn = redis.conn().await;
    let reply: Vec<Entry> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    reply
}

/// The consumers of `group` on the stream `key`, by name, with their pending counts.
async fn consumers(redis: &TestRedis, key: &str, group: &str) -> HashMap<String, u64> {
    let mut conn = redis.conn().await;
    let reply: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(key)
        .arg(group)
        .query_async(&mut conn)
        .await
        .unwrap();
    reply
        .into_iter()
        .map(|c| {
            let name: String = redis::from_redis_value(c["name"].clone()).unwrap();
            let pending: u64 = redis::from_redis_value(c["pending"].clone()).unwrap();
            (name, pending)
        })
        .collect()
}

/// The groups of the stream `key`, by name.
async fn groups(redis: &TestRedis, key: &str) -> Vec<String> {
    let mut conn = redis.conn().await;
    let reply: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    reply
        .into_iter()
        .map(|g| redis::from_redis_value(g["name"].clone()).unwrap())
        .collect()
}

/// Reads up to `count` new entries of `key` as `consumer` of `group`; returns their ids.
async fn read_group(
    redis: &TestRedis,
    key: &str,
    group: &str,
    consumer: &str,
    count: usize,
) -> Vec<String> {
    let mut conn = redis.conn().await;
    let reply: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(key)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let reply: Vec<(String, Vec<Entry>)> = redis::from_redis_value(reply).unwrap_or_default();
    reply
        .into_iter()
        .flat_map(|(_, entries)| entries.into_iter().map(|(id, _)| id))
        .collect()
}

async fn ack(redis: &TestRedis, key: &str, group: &str, ids: &[String]) {
    let mut conn = redis.conn().await;
    let acked: usize = redis::cmd("XACK")
        .arg(key)
        .arg(group)
        .arg(ids)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(acked, ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livez_and_readyz_follow_the_process_redis_and_the_groups() {
    let redis = TestRedis::start(2);
    let config = redis.config("c1");

    // A stage registered but not running yet: its groups do not exist.
    let waiting = Stats::default();
    let _not_started = Stage::new(
        spec(ConsumeMode::Shared),
        Forward::new(&config),
        redis.redis(),
        &config,
        &waiting,
        CancellationToken::new(),
    );
    let admin = Admin::serve(redis.redis(), waiting, Some(TOKEN), None).await;
    assert_eq!(admin.get("/livez").await, (StatusCode::OK, "ok\n".into()));
    let (status, body) = admin.get_json("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["ready"], false);
    assert!(
        body["reason"].as_str().unwrap().contains(GROUP),
        "the reason names the group: {body}"
    );
    drop(admin);

    // Redis unreachable: live, not ready, and the reason says so without Redis's own
    // error text (here "Connection refused (os error 111)"), which stays in the log.
    let nowhere = Redis::new("redis://127.0.0.1:1", 1).unwrap();
    let admin = Admin::serve(nowhere, Stats::default(), Some(TOKEN), None).await;
    assert_eq!(admin.get("/livez").await.0, StatusCode::OK);
    let (status, body) = admin.get_json("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        body,
        json!({ "ready": false, "reason": "redis unreachable" }),
        "{body}"
    );
    drop(admin);

    // The running stage creates its groups: ready.
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    let admin = Admin::serve(redis.redis(), stage.stats.clone(), Some(TOKEN), None).await;
    eventually(Duration::from_secs(10), "/readyz answers 200", || async {
        admin.get("/readyz").await.0 == StatusCode::OK
    })
    .await;
    assert_eq!(
        admin.get_json("/readyz").await,
        (StatusCode::OK, json!({ "ready": true }))
    );
    for p in 0..2 {
        assert_eq!(
            groups(&redis, &redis.key(INPUT, p)).await,
            vec![GROUP.to_owned()],
            "the group exists on partition {p}"
        );
    }
    stage.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_stage_its_counters_and_every_partition() {
    let redis = TestRedis::start(2);
    redis.produce(INPUT, 0, "a", 0..10).await;
    redis.produce(INPUT, 1, "b", 0..5).await;
    redis.produce(INPUT, 1, "poison", 0..1).await;
    // Another consumer took three entries of partition 0 and sits on them; the claim time
    // is long enough that the stage leaves them pending for the whole test.
    let p0 = redis.key(INPUT, 0);
    redis.create_group(&p0, GROUP).await;
    assert_eq!(read_group(&redis, &p0, GROUP, "ghost", 3).await.len(), 3);

    let mut config = redis.config("c1");
    config.stage.claim_idle = Duration::from_secs(600);
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    let admin = Admin::serve(redis.redis(), stage.stats.clone(), Some(TOKEN), None).await;
    eventually(
        Duration::from_secs(20),
        "12 entries processed, 1 dead-lettered",
        || async {
            let c = stage.counters();
            c.processed >= 12 && c.dead_lettered >= 1
        },
    )
    .await;

    let (status, body) = admin.get_json("/admin/status").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["service"], "it-service");
    let stages = body["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 1, "{body}");
    let s = &stages[0];
    assert_eq!(s["group"], GROUP);
    assert_eq!(s["mode"], "shared");
    assert_eq!(
        s["counters"],
        json!({
            "processed": 12,
            "failed": 0,
            "dead_lettered": 1,
            "duplicates_skipped": 0,
            "claimed": 0,
            "fenced": 0,
            "reconnects": 0,
            "trimmed": 0,
            "trimmed_unacknowledged": 0,
            "dead_letters_dropped": 0,
        }),
        "{body}"
    );
    assert_eq!(redis.all_payloads(OUTPUT).await.len(), 12);

    let partitions = s["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 2, "{body}");
    let expected = [
        // partition, stream length, pending, dead letters
        (0, 10, 3, 0),
        (1, 6, 0, 1),
    ];
    for (part, (p, length, pending, dead)) in partitions.iter().zip(expected) {
        let key = redis.key(INPUT, p);
        assert_eq!(part["partition"], p, "{part}");
        assert_eq!(part["stream"], key.as_str(), "{part}");
        assert_eq!(part["length"], length, "{part}");
        assert_eq!(part["lag"], 0, "everything was delivered: {part}");
        assert_eq!(part["pending"], pending, "{part}");
        assert_eq!(part["dead_letters"], dead, "{part}");
        assert_eq!(
            part["owner"],
            Json::Null,
            "shared mode has no owner: {part}"
        );
        let last_id = entries_with_ids(&redis, &key).await.pop().unwrap().0;
        assert_eq!(part["last_delivered_id"], last_id.as_str(), "{part}");

        let listed: HashMap<String, (u64, u64)> = part["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_owned(),
                    (
                        c["pending"].as_u64().unwrap(),
                        c["idle_ms"].as_u64().expect("idle_ms is a number"),
                    ),
                )
            })
            .collect();
        assert_eq!(listed["c1"].0, 0, "{part}");
        assert!(listed["c1"].1 < 60_000, "c1 reads all the time: {part}");
        if p == 0 {
            assert_eq!(listed.len(), 2, "{part}");
            assert_eq!(listed["ghost"].0, 3, "{part}");
        } else {
            assert_eq!(listed.len(), 1, "{part}");
        }
    }
    stage.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_replayed_into_their_stream_with_the_token_only() {
    let redis = TestRedis::start(1);
    let input = redis.key(INPUT, 0);
    let dlq = redis.dlq_key(INPUT, 0);
    redis.produce(INPUT, 0, "good", 0..3).await;
    redis.produce(INPUT, 0, "poison", 0..1).await;
    let original = entries_with_ids(&redis, &input).await.pop().unwrap();

    let config = redis.config("c1");
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    let stats = stage.stats.clone();
    let admin = Admin::serve(redis.redis(), stats, Some(TOKEN), None).await;
    eventually(
        Duration::from_secs(10),
        "the poison dead-lettered",
        || async { redis.xlen(&dlq).await == 1 },
    )
    .await;
    let dead = entries_with_ids(&redis, &dlq).await;
    let dead_fields: HashMap<_, _> = dead[0].1.iter().cloned().collect();
    assert_eq!(dead_fields["dlq.reason"], b"poison payload poison:0");
    assert_eq!(dead_fields["dlq.source_id"], original.0.as_bytes());
    // Stop the stage so that the replayed entry stays where the replay put it until it
    // has been looked at (a running stage would dead-letter it again at once).
    stage.stop().await;

    let replay = "/admin/dlq/replay?stage=fwd";
    let (status, body) = admin.post(replay, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body["error"].is_string(), "{body}");
    for wrong in [
        bearer("not-the-token"),
        bearer(&format!("{TOKEN}x")),
        bearer(""),
        format!("Basic {TOKEN}"),
        TOKEN.to_owned(),
    ] {
        let (status, body) = admin.post(replay, Some(&wrong)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong}: {body}");
    }
    assert_eq!(redis.xlen(&dlq).await, 1, "refused calls replay nothing");
    assert_eq!(redis.xlen(&input).await, 4);

    let (status, body) = admin
        .post("/admin/dlq/replay?stage=nope", Some(&bearer(TOKEN)))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = admin
        .post(
            "/admin/dlq/replay?stage=fwd&partition=7",
            Some(&bearer(TOKEN)),
        )
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "replayed": 0 })));

    let (status, body) = admin.post(replay, Some(&bearer(TOKEN))).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "replayed": 1 })));
    assert_eq!(redis.xlen(&dlq).await, 0, "the dead-letter stream is empty");
    let (status, body) = admin.post(replay, Some(&bearer(TOKEN))).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "replayed": 0 })));

    // The copy appended to the input: the original fields, in order, no dlq.* fields.
    let all = entries_with_ids(&redis, &input).await;
    assert_eq!(all.len(), 5);
    let copy = all.last().unwrap().clone();
    assert_ne!(copy.0, original.0, "a new entry, with a new id");
    assert!(
        copy.1.iter().all(|(name, _)| !name.starts_with("dlq.")),
        "{:?}",
        copy.1
    );
    assert_eq!(
        copy.1, original.1,
        "the original fields travel back unchanged"
    );

    // A stage running again finds it still poisonous: dead-lettered a second time.
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    eventually(Duration::from_secs(10), "dead-lettered again", || async {
        redis.xlen(&dlq).await == 1
    })
    .await;
    let again = entries_with_ids(&redis, &dlq).await;
    assert_ne!(again[0].0, dead[0].0);
    let again: HashMap<_, _> = again[0].1.iter().cloned().collect();
    assert_eq!(again["dlq.reason"], b"poison payload poison:0");
    assert_eq!(again["dlq.source_id"], copy.0.as_bytes());
    assert_eq!(again["dlq.deliveries"], b"1");
    let fields: HashMap<String, Vec<u8>> = again
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .filter(|(n, _)| !n.starts_with("dlq."))
        .collect();
    assert_eq!(payload_of(&fields), b"poison:0");
    assert_eq!(redis.pending(INPUT, 0, GROUP).await, 0);
    stage.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_while_the_stage_runs_goes_round_once() {
    let redis = TestRedis::start(1);
    let dlq = redis.dlq_key(INPUT, 0);
    redis.produce(INPUT, 0, "poison", 0..1).await;
    let config = redis.config("c1");
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    let admin = Admin::serve(redis.redis(), stage.stats.clone(), Some(TOKEN), None).await;
    eventually(Duration::from_secs(10), "dead-lettered", || async {
        stage.counters().dead_lettered == 1
    })
    .await;
    let first = entries_with_ids(&redis, &dlq).await[0].0.clone();
    let (status, body) = admin
        .post(
            "/admin/dlq/replay?stage=fwd&partition=0&count=10",
            Some(&bearer(TOKEN)),
        )
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "replayed": 1 })));
    eventually(Duration::from_secs(10), "dead-lettered again", || async {
        stage.counters().dead_lettered == 2
    })
    .await;
    let dead = entries_with_ids(&redis, &dlq).await;
    assert_eq!(dead.len(), 1, "the first dead letter left with the replay");
    assert_ne!(dead[0].0, first);
    assert_eq!(redis.xlen(&redis.key(INPUT, 0)).await, 2);
    stage.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_routes_are_forbidden_without_an_admin_token() {
    let redis = TestRedis::start(1);
    let dlq = redis.dlq_key(INPUT, 0);
    redis.produce(INPUT, 0, "poison", 0..1).await;
    let config = redis.config("c1");
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    eventually(Duration::from_secs(10), "dead-lettered", || async {
        redis.xlen(&dlq).await == 1
    })
    .await;
    let admin = Admin::serve(redis.redis(), stage.stats.clone(), None, None).await;
    for authorization in [None, Some(bearer(TOKEN)), Some(bearer(""))] {
        let (status, body) = admin
            .post("/admin/dlq/replay?stage=fwd", authorization.as_deref())
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        let (status, body) = admin
            .delete("/admin/consumers/fwd/c1", authorization.as_deref())
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    }
    assert_eq!(redis.xlen(&dlq).await, 1);
    assert!(
        consumers(&redis, &redis.key(INPUT, 0), GROUP)
            .await
            .contains_key("c1")
    );
    // Reading stays open.
    assert_eq!(admin.get("/admin/status").await.0, StatusCode::OK);
    stage.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_is_deleted_with_the_token_only() {
    let redis = TestRedis::start(2);
    // One entry per partition, so that the stage's consumer exists on both (Redis creates a
    // consumer when a read delivers to it).
    for p in 0..2 {
        redis.produce(INPUT, p, "a", 0..1).await;
    }
    let config = redis.config("c1");
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    let admin = Admin::serve(redis.redis(), stage.stats.clone(), Some(TOKEN), None).await;
    eventually(
        Duration::from_secs(10),
        "both entries forwarded",
        || async { stage.counters().processed == 2 },
    )
    .await;
    let mut conn = redis.conn().await;
    for p in 0..2 {
        let created: i64 = redis::cmd("XGROUP")
            .arg("CREATECONSUMER")
            .arg(redis.key(INPUT, p))
            .arg(GROUP)
            .arg("ghost")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(created, 1);
    }
    let path = "/admin/consumers/fwd/ghost";
    let (status, body) = admin.delete(path, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = admin.delete(path, Some(&bearer("wrong"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    for p in 0..2 {
        assert!(
            consumers(&redis, &redis.key(INPUT, p), GROUP)
                .await
                .contains_key("ghost")
        );
    }
    let (status, body) = admin
        .delete("/admin/consumers/nope/ghost", Some(&bearer(TOKEN)))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let (status, body) = admin.delete(path, Some(&bearer(TOKEN))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "deleted": "ghost", "pending_dropped": 0 }));
    for p in 0..2 {
        let left = consumers(&redis, &redis.key(INPUT, p), GROUP).await;
        assert!(!left.contains_key("ghost"), "partition {p}: {left:?}");
        assert!(left.contains_key("c1"), "partition {p}: {left:?}");
    }
    stage.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_consumer_reports_the_pending_entries_it_dropped() {
    let redis = TestRedis::start(1);
    let key = redis.key(INPUT, 0);
    redis.produce(INPUT, 0, "a", 0..5).await;
    redis.create_group(&key, GROUP).await;
    assert_eq!(read_group(&redis, &key, GROUP, "ghost", 3).await.len(), 3);
    // The stage is registered (so the router knows the group) but not running, so nothing
    // claims the ghost's entries.
    let config = redis.config("c1");
    let stats = Stats::default();
    let _not_started = Stage::new(
        spec(ConsumeMode::Shared),
        Forward::new(&config),
        redis.redis(),
        &config,
        &stats,
        CancellationToken::new(),
    );
    let admin = Admin::serve(redis.redis(), stats, Some(TOKEN), None).await;
    let (status, body) = admin
        .delete("/admin/consumers/fwd/ghost", Some(&bearer(TOKEN)))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "deleted": "ghost", "pending_dropped": 3 }));
    assert!(consumers(&redis, &key, GROUP).await.is_empty());
    assert_eq!(redis.pending(INPUT, 0, GROUP).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_as_prometheus_text() {
    let handle = install_metrics();
    let redis = TestRedis::start(1);
    redis.produce(INPUT, 0, "m", 0..5).await;
    let config = redis.config("c1");
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    eventually(Duration::from_secs(10), "5 processed", || async {
        stage.counters().processed == 5
    })
    .await;
    let admin = Admin::serve(redis.redis(), stage.stats.clone(), None, Some(handle)).await;
    let response = admin
        .client
        .get(format!("{}/metrics", admin.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = response.text().await.unwrap();
    let processed: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tickflow_events_processed_total{"))
        .collect();
    assert!(
        processed.iter().any(|l| l.contains("stage=\"fwd\"")),
        "{text}"
    );
    assert!(
        text.contains("# TYPE tickflow_events_processed_total counter"),
        "{text}"
    );
    assert!(text.contains("tickflow_batch_size"), "{text}");
    stage.stop().await;

    // Without a recorder the route says so.
    let bare = Admin::serve(redis.redis(), Stats::default(), None, None).await;
    assert_eq!(bare.get("/metrics").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_is_lag_plus_pending_over_every_partition() {
    let redis = TestRedis::start(2);
    let config = redis.config("producer");
    let backlog = Backlog::new(redis.redis(), &config.keys, INPUT, GROUP);
    assert_eq!(backlog.measure().await.unwrap(), 0, "no streams at all");
    assert_eq!(backlog.current(), 0);

    // No group yet: the whole length counts.
    redis.produce(INPUT, 0, "a", 0..10).await;
    assert_eq!(backlog.measure().await.unwrap(), 10, "one stream, no group");
    redis.produce(INPUT, 1, "b", 0..4).await;
    assert_eq!(backlog.measure().await.unwrap(), 14);
    // Another group's existence changes nothing for ours.
    redis.create_group(&redis.key(INPUT, 1), "other").await;
    assert_eq!(backlog.measure().await.unwrap(), 14);

    // Partition 0: 6 read, 2 of them acked → lag 4, pending 4. Partition 1: group
    // created, nothing read → lag 4, pending 0.
    let p0 = redis.key(INPUT, 0);
    redis.create_group(&p0, GROUP).await;
    redis.create_group(&redis.key(INPUT, 1), GROUP).await;
    let ids = read_group(&redis, &p0, GROUP, "x", 6).await;
    ack(&redis, &p0, GROUP, &ids[..2]).await;
    assert_eq!(backlog.measure().await.unwrap(), 8 + 4);
    assert_eq!(backlog.current(), 12);
    assert_eq!(backlog.check(12), Ok(()));
    assert_eq!(
        backlog.check(11),
        Err(Overloaded {
            backlog: 12,
            limit: 11
        })
    );
    let message = backlog.check(5).unwrap_err().to_string();
    assert!(
        message.contains("12") && message.contains("limit 5"),
        "{message}"
    );

    // Everything handled: no backlog.
    let rest = read_group(&redis, &p0, GROUP, "x", 100).await;
    ack(&redis, &p0, GROUP, &ids[2..]).await;
    ack(&redis, &p0, GROUP, &rest).await;
    let p1 = redis.key(INPUT, 1);
    let p1_ids = read_group(&redis, &p1, GROUP, "x", 100).await;
    ack(&redis, &p1, GROUP, &p1_ids).await;
    assert_eq!(backlog.measure().await.unwrap(), 0);
    assert_eq!(backlog.check(0), Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_monitor_follows_a_running_stage() {
    let redis = TestRedis::start(2);
    let config = redis.config("c1");
    let backlog = Backlog::new(redis.redis(), &config.keys, INPUT, GROUP);
    let shutdown = CancellationToken::new();
    redis.produce(INPUT, 0, "a", 0..20).await;
    redis.produce(INPUT, 1, "b", 0..20).await;
    let monitor = backlog.spawn_monitor(Duration::from_millis(50), shutdown.clone());
    eventually(Duration::from_secs(5), "backlog measured", || async {
        backlog.current() == 40
    })
    .await;
    assert!(backlog.check(39).is_err());
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    eventually(Duration::from_secs(10), "backlog drained", || async {
        backlog.current() == 0
    })
    .await;
    assert_eq!(backlog.check(0), Ok(()));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), monitor)
        .await
        .expect("the monitor stops on shutdown")
        .unwrap();
    stage.stop().await;
}

/// Calls per command since the server started, from `INFO commandstats` (names as Redis
/// gives them, e.g. `xinfo|consumers`).
async fn command_calls(redis: &TestRedis) -> HashMap<String, u64> {
    let mut conn = redis.conn().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.strip_prefix("calls=")?.split(',').next()?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_status_costs_redis_a_bounded_number_of_commands_while_the_stage_runs() {
    const PARTITIONS: u32 = 4;
    const POLLERS: usize = 16;
    const POLLS: usize = 400;
    let redis = TestRedis::start(PARTITIONS);
    let config = redis.config("c1");
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    let admin = Admin::serve(redis.redis(), stage.stats.clone(), None, None).await;
    eventually(Duration::from_secs(10), "/readyz answers 200", || async {
        admin.get("/readyz").await.0 == StatusCode::OK
    })
    .await;

    let before = command_calls(&redis).await;
    let started = Instant::now();
    // POLLERS clients poll /admin/status back to back, at least POLLS times in all, and
    // until the stage has forwarded what is produced meanwhile.
    let forwarded = AtomicBool::new(false);
    let polls = AtomicUsize::new(0);
    let poller = || async {
        while !forwarded.load(Ordering::Relaxed) || polls.load(Ordering::Relaxed) < POLLS {
            let (status, body) = admin.get_json("/admin/status").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(
                body["stages"][0]["partitions"].as_array().map(Vec::len),
                Some(PARTITIONS as usize),
                "{body}"
            );
            polls.fetch_add(1, Ordering::Relaxed);
        }
    };
    let work = async {
        for p in 0..PARTITIONS {
            redis.produce(INPUT, p, &format!("p{p}"), 0..25).await;
        }
        eventually(
            Duration::from_secs(30),
            "100 forwarded while polled",
            || async { redis.all_payloads(OUTPUT).await.len() == 100 },
        )
        .await;
        forwarded.store(true, Ordering::Relaxed);
    };
    tokio::join!(
        futures::future::join_all((0..POLLERS).map(|_| poller())),
        work
    );
    let elapsed = started.elapsed();
    let after = command_calls(&redis).await;
    let delta = |name: &str| after.get(name).unwrap_or(&0) - before.get(name).unwrap_or(&0);
    let polls = polls.into_inner();

    // Only a status computation sends XINFO CONSUMERS here (the idle-consumer cleanup runs
    // after a minute at the earliest), once per partition. Computations are at most one per
    // cache lifetime, plus the one in flight at the start: uncached, every poll would
    // compute, POLLS x PARTITIONS calls at least.
    let computations_allowed = elapsed.as_millis() / STATUS_CACHE_TTL.as_millis() + 2;
    let consumers_calls = delta("xinfo|consumers");
    assert!(consumers_calls > 0, "status was computed at all");
    assert!(
        u128::from(consumers_calls) <= computations_allowed * u128::from(PARTITIONS),
        "{consumers_calls} XINFO CONSUMERS calls for {polls} polls in {elapsed:?}"
    );
    let total: u64 = after.values().sum::<u64>() - before.values().sum::<u64>();
    eprintln!(
        "{polls} polls of /admin/status in {elapsed:?}: {consumers_calls} XINFO CONSUMERS, \
         {total} Redis commands in all (stage included)"
    );
    assert_exactly_once(
        &redis.all_payloads(OUTPUT).await,
        (0..PARTITIONS).flat_map(|p| tags(&format!("p{p}"), 0..25).collect::<Vec<_>>()),
    );
    stage.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_keeps_dead_letters_it_cannot_put_back_whole() {
    let redis = TestRedis::start(1);
    let input = redis.key(INPUT, 0);
    let dlq = redis.dlq_key(INPUT, 0);
    let config = redis.config("c1");
    // The stage only registers `fwd` with the admin router; it is stopped so that what the
    // replay appends stays where it put it.
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    let admin = Admin::serve(redis.redis(), stage.stats.clone(), Some(TOKEN), None).await;
    stage.stop().await;
    let input_before = entries_with_ids(&redis, &input).await;

    // Three dead letters: one that kept only the first fields of its entry (as a stage
    // writes one for an entry of more fields than an XADD may carry), one whose own fields
    // are more than an XADD may carry (2,048), and one that can go back as it is.
    let mut conn = redis.conn().await;
    let xadd = |fields: Vec<(String, String)>| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&dlq).arg("*");
        for (name, value) in fields {
            cmd.arg(name).arg(value);
        }
        cmd
    };
    let field = |i: usize| (format!("f{i}"), format!("v{i}"));
    let dlq_reason = || ("dlq.reason".to_owned(), "refused".to_owned());
    let mut truncated: Vec<_> = (0..10).map(field).collect();
    truncated.extend([
        dlq_reason(),
        ("dlq.fields_dropped".to_owned(), "5".to_owned()),
    ]);
    let mut too_wide: Vec<_> = (0..2_049).map(field).collect();
    too_wide.push(dlq_reason());
    let whole: Vec<_> = (0..3).map(field).collect();
    let mut replayable = whole.clone();
    replayable.push(dlq_reason());
    for fields in [truncated, too_wide, replayable] {
        let _: String = xadd(fields).query_async(&mut conn).await.unwrap();
    }
    let dead_before = entries_with_ids(&redis, &dlq).await;

    let (status, body) = admin
        .post("/admin/dlq/replay?stage=fwd", Some(&bearer(TOKEN)))
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "replayed": 1 })));
    assert_eq!(
        entries_with_ids(&redis, &dlq).await,
        dead_before[..2],
        "the two it cannot put back whole stay, untouched"
    );
    let input_after = entries_with_ids(&redis, &input).await;
    assert_eq!(input_after[..input_before.len()], input_before[..]);
    let appended: Vec<Vec<(String, String)>> = input_after[input_before.len()..]
        .iter()
        .map(|(_, fields)| {
            fields
                .iter()
                .map(|(n, v)| (n.clone(), String::from_utf8(v.clone()).unwrap()))
                .collect()
        })
        .collect();
    assert_eq!(appended, vec![whole], "only the whole one, as it was");
}
