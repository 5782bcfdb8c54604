//! Trimming: never below what every group has acknowledged, except by the hard cap, which
//! says how many unacknowledged entries it deleted; the stage's periodic trim; and the cap
//! on dead-letter streams.

use std::time::Duration;

use redis::Value;
use streams_core::{ConsumeMode, StageSpec, TrimOutcome, telemetry::install_metrics, trim_stream};

use crate::support::*;

/// One stream entry as XRANGE and XREADGROUP return it: its id and its fields in order.
type Entry = (String, Vec<(String, String)>);
/// An XAUTOCLAIM reply: the next cursor, the claimed entries, the ids deleted meanwhile.
type AutoClaimed = (String, Vec<Option<Entry>>, Vec<String>);

/// Appends `n` raw entries `n=<i>` to `key`; returns their ids in order.
async fn append(redis: &TestRedis, key: &str, n: usize) -> Vec<String> {
    let mut conn = redis.conn().await;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id: String = redis::cmd("XADD")
            .arg(key)
            .arg("*")
            .arg("n")
            .arg(i)
            .query_async(&mut conn)
            .await
            .unwrap();
        ids.push(id);
    }
    ids
}

async fn ids_in(redis: &TestRedis, key: &str) -> Vec<String> {
    let mut conn = redis.conn().await;
    let entries: Vec<Entry> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    entries.into_iter().map(|(id, _)| id).collect()
}

/// Reads up to `count` new entries as `consumer` of `group`; returns their ids and `n`
/// field values.
async fn read_group(
    redis: &TestRedis,
    key: &str,
    group: &str,
    consumer: &str,
    count: usize,
) -> Vec<(String, String)> {
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
    if reply == Value::Nil {
        return Vec::new();
    }
    let reply: Vec<(String, Vec<Entry>)> = redis::from_redis_value(reply).unwrap();
    reply
        .into_iter()
        .flat_map(|(_, entries)| entries)
        .map(|(id, fields)| (id, fields[0].1.clone()))
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
    assert_eq!(acked, ids.len(), "every id was pending");
}

/// Claims every pending entry of `group` for `consumer` (XAUTOCLAIM, min idle 0); returns
/// the claimed ids and the ids that were pending but deleted from the stream.
async fn claim_all(
    redis: &TestRedis,
    key: &str,
    group: &str,
    consumer: &str,
) -> (Vec<String>, Vec<String>) {
    let mut conn = redis.conn().await;
    let (cursor, entries, deleted): AutoClaimed = redis::cmd("XAUTOCLAIM")
        .arg(key)
        .arg(group)
        .arg(consumer)
        .arg(0)
        .arg("0-0")
        .arg("COUNT")
        .arg(1000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(cursor, "0-0", "one call claims everything");
    let claimed = entries
        .into_iter()
        .map(|e| e.expect("claimed entries still exist").0)
        .collect();
    (claimed, deleted)
}

fn outcome(trimmed: u64, trimmed_unacknowledged: u64) -> TrimOutcome {
    TrimOutcome {
        trimmed,
        trimmed_unacknowledged,
    }
}

#[tokio::test]
async fn trimming_keeps_everything_the_slowest_group_has_not_acknowledged() {
    let redis = TestRedis::start(1);
    let key = redis.key(INPUT, 0);
    let ids = append(&redis, &key, 20).await;
    redis.create_group(&key, "fast").await;
    redis.create_group(&key, "slow").await;

    // The fast group read and acknowledged everything.
    let fast: Vec<String> = read_group(&redis, &key, "fast", "f", 100)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(fast, ids);
    ack(&redis, &key, "fast", &fast).await;
    // The slow group read the first 10 and acknowledged 0..4 and 6: 4, 5, 7, 8, 9 are
    // pending, 10..20 were never delivered.
    let slow: Vec<String> = read_group(&redis, &key, "slow", "s", 10)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(slow, ids[..10]);
    ack(&redis, &key, "slow", &ids[..4]).await;
    ack(&redis, &key, "slow", &ids[6..7]).await;

    let trimmed = trim_stream(&redis.redis(), &key, 0).await.unwrap();
    assert_eq!(trimmed, outcome(4, 0), "only what both groups acknowledged");
    assert_eq!(
        ids_in(&redis, &key).await,
        ids[4..],
        "from the oldest pending on"
    );
    assert_eq!(
        trim_stream(&redis.redis(), &key, 0).await.unwrap(),
        outcome(0, 0),
        "nothing more until the slow group moves"
    );

    // The slow group recovers every pending entry and reads every undelivered one.
    let (claimed, deleted) = claim_all(&redis, &key, "slow", "s2").await;
    let pending: Vec<String> = [4, 5, 7, 8, 9].iter().map(|&i| ids[i].clone()).collect();
    assert_eq!(claimed, pending);
    assert!(
        deleted.is_empty(),
        "no pending entry was trimmed: {deleted:?}"
    );
    let rest = read_group(&redis, &key, "slow", "s2", 100).await;
    assert_eq!(
        rest.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
        ids[10..]
    );
    assert_eq!(
        rest.iter().map(|(_, n)| n.clone()).collect::<Vec<_>>(),
        (10..20).map(|i| i.to_string()).collect::<Vec<_>>(),
        "with their fields"
    );

    // Acknowledged all but one in the middle: that one holds the floor.
    ack(&redis, &key, "slow", &claimed[..2]).await;
    ack(&redis, &key, "slow", &claimed[3..]).await;
    let rest_ids: Vec<String> = rest.into_iter().map(|(id, _)| id).collect();
    ack(&redis, &key, "slow", &rest_ids).await;
    // ids[7] (still pending) is the floor now: ids[4], ids[5] and ids[6] go.
    assert_eq!(
        trim_stream(&redis.redis(), &key, 0).await.unwrap(),
        outcome(3, 0)
    );
    assert_eq!(ids_in(&redis, &key).await, ids[7..]);

    // Both groups acknowledged everything: down to the last delivered entry.
    ack(&redis, &key, "slow", &claimed[2..3]).await;
    assert_eq!(
        trim_stream(&redis.redis(), &key, 0).await.unwrap(),
        outcome(12, 0)
    );
    assert_eq!(ids_in(&redis, &key).await, ids[19..]);
}

#[tokio::test]
async fn a_group_that_has_read_nothing_holds_the_whole_stream() {
    let redis = TestRedis::start(1);
    let key = redis.key(INPUT, 0);
    let ids = append(&redis, &key, 10).await;
    redis.create_group(&key, "fast").await;
    let fast: Vec<String> = read_group(&redis, &key, "fast", "f", 100)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    ack(&redis, &key, "fast", &fast).await;
    redis.create_group(&key, "idle").await;
    assert_eq!(
        trim_stream(&redis.redis(), &key, 0).await.unwrap(),
        outcome(0, 0)
    );
    assert_eq!(ids_in(&redis, &key).await, ids);

    // A group that read part and acknowledged all it read: it holds from its last
    // delivered entry on.
    let idle = read_group(&redis, &key, "idle", "i", 6).await;
    let idle: Vec<String> = idle.into_iter().map(|(id, _)| id).collect();
    ack(&redis, &key, "idle", &idle).await;
    assert_eq!(
        trim_stream(&redis.redis(), &key, 0).await.unwrap(),
        outcome(5, 0)
    );
    assert_eq!(ids_in(&redis, &key).await, ids[5..]);
}

#[tokio::test]
async fn a_stream_without_groups_is_not_trimmed() {
    let redis = TestRedis::start(1);
    let key = redis.key(INPUT, 0);
    let ids = append(&redis, &key, 25).await;
    assert_eq!(
        trim_stream(&redis.redis(), &key, 0).await.unwrap(),
        outcome(0, 0)
    );
    assert_eq!(ids_in(&redis, &key).await, ids);
    assert_eq!(
        trim_stream(&redis.redis(), &redis.key("absent", 0), 0)
            .await
            .unwrap(),
        outcome(0, 0),
        "a stream that does not exist"
    );
    assert_eq!(redis.xlen(&redis.key("absent", 0)).await, 0);
}

#[tokio::test]
async fn the_hard_cap_deletes_unacknowledged_entries_and_counts_them() {
    let redis = TestRedis::start(1);

    // No groups: every entry is unacknowledged by definition of nothing; the cap applies.
    let bare = redis.key("bare", 0);
    let ids = append(&redis, &bare, 10).await;
    assert_eq!(
        trim_stream(&redis.redis(), &bare, 4).await.unwrap(),
        outcome(0, 6)
    );
    assert_eq!(ids_in(&redis, &bare).await, ids[6..]);
    assert_eq!(
        trim_stream(&redis.redis(), &bare, 4).await.unwrap(),
        outcome(0, 0),
        "at the cap: nothing to do"
    );

    // A group that read nothing: the cap deletes the 6 oldest, none acknowledged.
    let unread = redis.key("unread", 0);
    let ids = append(&redis, &unread, 10).await;
    redis.create_group(&unread, "g").await;
    assert_eq!(
        trim_stream(&redis.redis(), &unread, 4).await.unwrap(),
        outcome(0, 6)
    );
    assert_eq!(ids_in(&redis, &unread).await, ids[6..]);

    // A group that read 6 and acknowledged 3: 3 go safely; of the 7 left (3 pending, 4 never
    // delivered) the cap of 4 deletes the 3 pending ones.
    let key = redis.key(INPUT, 0);
    let ids = append(&redis, &key, 10).await;
    redis.create_group(&key, "g").await;
    let read: Vec<String> = read_group(&redis, &key, "g", "c", 6)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    ack(&redis, &key, "g", &read[..3]).await;
    assert_eq!(
        trim_stream(&redis.redis(), &key, 4).await.unwrap(),
        outcome(3, 3)
    );
    assert_eq!(ids_in(&redis, &key).await, ids[6..]);
    // What the cap deleted is gone from the stream but still in the pending list.
    let (claimed, deleted) = claim_all(&redis, &key, "g", "c2").await;
    assert!(claimed.is_empty(), "{claimed:?}");
    assert_eq!(deleted, ids[3..6]);
}

#[tokio::test]
async fn the_hard_cap_does_not_count_an_acknowledged_entry_as_unacknowledged() {
    let redis = TestRedis::start(1);
    let key = redis.key(INPUT, 0);
    let ids = append(&redis, &key, 10).await;
    redis.create_group(&key, "g").await;
    // The group read and acknowledged 6 entries; 4 were never delivered.
    let read: Vec<String> = read_group(&redis, &key, "g", "c", 6)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    ack(&redis, &key, "g", &read).await;
    // The cap of 4 keeps exactly the 4 undelivered entries: the 6 deleted were all
    // acknowledged, so none may be reported as unacknowledged.
    let trimmed = trim_stream(&redis.redis(), &key, 4).await.unwrap();
    assert_eq!(ids_in(&redis, &key).await, ids[6..]);
    assert_eq!(
        trimmed.trimmed + trimmed.trimmed_unacknowledged,
        6,
        "{trimmed:?}"
    );
    assert_eq!(
        trimmed.trimmed_unacknowledged, 0,
        "every deleted entry had been acknowledged: {trimmed:?}"
    );
}

/// The length of the stage's input, over every partition.
async fn input_len(redis: &TestRedis) -> u64 {
    let mut len = 0;
    for p in 0..redis.partitions {
        len += redis.xlen(&redis.key(INPUT, p)).await;
    }
    len
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_stage_trims_its_input_behind_itself() {
    let redis = TestRedis::start(2);
    for p in 0..2 {
        redis.produce(INPUT, p, &format!("p{p}"), 0..50).await;
    }
    let mut config = redis.config("c1");
    config.stage.trim_interval = Duration::from_millis(200);
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    eventually(Duration::from_secs(20), "100 forwarded", || async {
        redis.all_payloads(OUTPUT).await.len() == 100
    })
    .await;
    // At most the last delivered entry of each partition is left, and the counter has
    // every deleted entry (it is bumped just after each XTRIM, so the sum is exact once
    // the trims are done).
    eventually(
        Duration::from_secs(10),
        "the input trimmed to its last delivered entry, and counted",
        || async {
            let len = input_len(&redis).await;
            len <= 2 && stage.counters().trimmed + len == 100
        },
    )
    .await;
    for p in 0..2 {
        let left = redis.payloads(INPUT, p).await;
        assert!(
            left.is_empty() || left == [format!("p{p}:49")],
            "partition {p}: {left:?}"
        );
        assert_eq!(redis.pending(INPUT, p, GROUP).await, 0);
    }
    assert!(stage.counters().trimmed >= 98);
    // The output has no group yet: untouched.
    assert_eq!(redis.all_payloads(OUTPUT).await.len(), 100);

    // More input: forwarded and trimmed in turn.
    for p in 0..2 {
        redis.produce(INPUT, p, &format!("q{p}"), 0..10).await;
    }
    eventually(
        Duration::from_secs(10),
        "20 more forwarded, trimmed and counted",
        || async {
            let len = input_len(&redis).await;
            stage.counters().processed == 120 && len <= 2 && stage.counters().trimmed + len == 120
        },
    )
    .await;
    for p in 0..2 {
        let left = redis.payloads(INPUT, p).await;
        assert!(
            left.is_empty() || left == [format!("q{p}:9")],
            "partition {p}: {left:?}"
        );
    }
    assert_eq!(redis.all_payloads(OUTPUT).await.len(), 120);
    assert_eq!(stage.counters().trimmed_unacknowledged, 0);
    stage.stop().await;
}

/// The value of the Prometheus sample `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<u64> {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_stage_caps_its_dead_letter_streams_and_counts_what_it_dropped() {
    const CAP: u64 = 10;
    let metrics = install_metrics();
    let redis = TestRedis::start(2);
    // Partition 0 gets 30 poison entries, three times the cap; partition 1 gets 4, within it.
    redis.produce(INPUT, 0, "poison", 0..30).await;
    redis.produce(INPUT, 1, "poison", 0..4).await;
    let mut config = redis.config("c1");
    config.stage.trim_interval = Duration::from_millis(200);
    config.stage.dead_letter_max_len = CAP;
    // A group of its own, so that the process-wide metric has this test's samples only.
    let spec = StageSpec {
        group: "dlq-cap".into(),
        ..spec(ConsumeMode::Shared)
    };
    let stage = spawn_stage(&config, spec, Forward::new(&config));
    let (dlq0, dlq1) = (redis.dlq_key(INPUT, 0), redis.dlq_key(INPUT, 1));
    eventually(
        Duration::from_secs(20),
        "34 dead-lettered, partition 0's dead letters capped and the drop counted",
        || async {
            stage.counters().dead_lettered == 34
                && redis.xlen(&dlq0).await == CAP
                && stage.counters().dead_letters_dropped == 20
        },
    )
    .await;
    assert_eq!(redis.xlen(&dlq1).await, 4, "within the cap: untouched");
    // The newest dead letters are the ones kept.
    let kept: Vec<String> = redis
        .entries(&dlq0)
        .await
        .iter()
        .map(|fields| String::from_utf8(payload_of(&fields_without_dlq(fields))).unwrap())
        .collect();
    assert_eq!(kept, tags("poison", 20..30).collect::<Vec<_>>());
    assert_eq!(
        stage.counters().trimmed_unacknowledged,
        0,
        "the input is not capped"
    );

    let text = metrics.render();
    let labels = ["stage=\"dlq-cap\"", "partition=\"0\""];
    assert_eq!(
        sample(&text, "tickflow_dead_letters_dropped_total", &labels),
        Some(20),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "tickflow_dead_letters_dropped_total",
            &["stage=\"dlq-cap\"", "partition=\"1\""]
        ),
        None,
        "nothing dropped on partition 1"
    );

    // More dead letters: the cap holds, and the count goes on.
    redis.produce(INPUT, 0, "poison-more", 0..5).await;
    eventually(
        Duration::from_secs(20),
        "5 more dead-lettered, capped and counted",
        || async {
            stage.counters().dead_lettered == 39
                && redis.xlen(&dlq0).await == CAP
                && stage.counters().dead_letters_dropped == 25
        },
    )
    .await;
    stage.stop().await;
}

/// A dead letter's fields without the `dlq.*` ones the stage added: the original envelope.
fn fields_without_dlq(
    fields: &std::collections::HashMap<String, Vec<u8>>,
) -> std::collections::HashMap<String, Vec<u8>> {
    fields
        .iter()
        .filter(|(name, _)| !name.starts_with("dlq."))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}
