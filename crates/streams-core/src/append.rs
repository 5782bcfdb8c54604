//! Appending envelopes from outside the pipeline (an API request), all or nothing, and at
//! most once per idempotency key.
//!
//! A client that sends a request and loses the answer (a timeout, a dropped connection, a
//! Redis restart between the write and the reply) cannot know whether its events went in.
//! Retrying without a key may append them twice; retrying with the same key returns the
//! ids of the first append and appends nothing. The key is stored (with a time to live)
//! in the same atomic step as the entries, so no crash can separate them. It is stored
//! with a fingerprint of what was appended (each entry's stream, type, key and payload),
//! so a key reused for a different request is refused ([`AppendError::KeyReused`])
//! instead of answered with another request's ids.

use redis::Value;

use crate::{
    Envelope, Redis, StreamsError,
    keys::slot_tag,
    scripts::{KEY_REUSED, scripts},
};

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The idempotency key was used before for a different request (the client's mistake:
    /// nothing was appended).
    #[error("idempotency key {0:?} was used for a different request")]
    KeyReused(String),
    /// Redis could not take the entries; nothing was appended.
    #[error(transparent)]
    Redis(#[from] StreamsError),
    /// The entries were appended on their master, but fewer replicas than
    /// `TICKFLOW_WAIT_REPLICAS` acknowledged them in time: a failover could still lose
    /// them. Retrying with the same idempotency key appends them once, whether they
    /// survived or not.
    #[error(
        "not confirmed by {wanted} replicas ({confirmed} acknowledged in time); retry with the same idempotency key"
    )]
    NotConfirmed {
        /// Replicas asked for.
        wanted: u32,
        /// Replicas that acknowledged within the timeout.
        confirmed: u32,
    },
}

impl From<redis::RedisError> for AppendError {
    fn from(e: redis::RedisError) -> Self {
        AppendError::Redis(e.into())
    }
}

/// What [`append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The stream ids of the entries, in the order given.
    pub ids: Vec<String>,
    /// `true` when the idempotency key had been seen: these are the ids of that first
    /// append, and nothing was appended now.
    pub replayed: bool,
}

/// An idempotency key and how long it is remembered.
#[derive(Debug, Clone, Copy)]
pub struct Once<'a> {
    /// The Redis key that remembers the append (already namespaced by the caller, from
    /// [`crate::KeySpace::idempotency`]: without a hash tag, since on a cluster each slot's
    /// part of the request is remembered under this key with that slot's tag).
    pub key: &'a str,
    /// How long it is remembered, in milliseconds.
    pub ttl_ms: u64,
}

/// Appends each `(stream, envelope)` atomically (all or none, checked before the first
/// write). With `once`, an append already done under the same key is not repeated: its ids
/// are returned instead.
pub async fn append(
    redis: &Redis,
    entries: &[(String, Envelope)],
    once: Option<Once<'_>>,
) -> Result<Appended, AppendError> {
    if entries.is_empty() {
        return Ok(Appended {
            ids: Vec::new(),
            replayed: false,
        });
    }
    if !redis.is_cluster() {
        return append_in_one_slot(redis, entries, once).await;
    }
    // On a cluster one script cannot touch two slots: the request is appended slot by
    // slot, each part all or nothing and at most once under its own key (the request's
    // key with the slot's tag), in the slot of its streams. A retry with the key after a
    // partial failure appends only the parts that did not go in; the ids come back in the
    // request's order.
    let mut parts: Vec<(String, Vec<usize>)> = Vec::new();
    for (index, (stream, _)) in entries.iter().enumerate() {
        let tag = slot_tag(stream);
        match parts.iter_mut().find(|(t, _)| t == tag) {
            Some((_, indexes)) => indexes.push(index),
            None => parts.push((tag.to_owned(), vec![index])),
        }
    }
    let mut ids = vec![String::new(); entries.len()];
    let mut replayed = true;
    for (tag, indexes) in parts {
        let part: Vec<(String, Envelope)> = indexes.iter().map(|&i| entries[i].clone()).collect();
        let key = once.map(|once| format!("{}:{{{tag}}}", once.key));
        let part_once = once.zip(key.as_deref()).map(|(once, key)| Once {
            key,
            ttl_ms: once.ttl_ms,
        });
        let appended = append_in_one_slot(redis, &part, part_once)
            .await
            .map_err(|e| match e {
                AppendError::KeyReused(_) => {
                    AppendError::KeyReused(once.map_or_else(String::new, |o| o.key.to_owned()))
                }
                other => other,
            })?;
        replayed &= appended.replayed;
        for (&index, id) in indexes.iter().zip(appended.ids) {
            ids[index] = id;
        }
    }
    Ok(Appended { ids, replayed })
}

/// One APPEND_ONCE call: every stream of `entries` (and the key) in one slot.
async fn append_in_one_slot(
    redis: &Redis,
    entries: &[(String, Envelope)],
    once: Option<Once<'_>>,
) -> Result<Appended, AppendError> {
    let mut conn = redis.pooled().await?;
    // Without a key the script appends all or none too (a MULTI/EXEC would go on past a
    // failing XADD); KEYS[1] is then the first stream, never read, so the call stays in
    // one slot.
    let (key, ttl_ms) = match once {
        Some(once) => (once.key, once.ttl_ms.max(1)),
        None => (entries[0].0.as_str(), 0),
    };
    let fingerprint = format!("{:016x}", fingerprint(entries));
    let wait = redis.replica_wait();
    let reply = scripts()
        .append_once
        .run_confirmed(
            &mut *conn,
            1 + entries.len(),
            |cmd| {
                cmd.arg(key);
                for (stream, _) in entries {
                    cmd.arg(stream);
                }
                cmd.arg(ttl_ms);
                cmd.arg(&fingerprint);
                for (_, envelope) in entries {
                    cmd.arg(envelope.field_count() * 2);
                    envelope.for_each_field(|name, value| {
                        cmd.arg(name).arg(value);
                    });
                }
            },
            true,
            wait,
        )
        .await;
    match reply {
        Ok(reply) => Ok(parse_once(reply)?),
        Err(StreamsError::Redis(e))
            if e.code() == Some(KEY_REUSED) || e.to_string().contains(KEY_REUSED) =>
        {
            Err(AppendError::KeyReused(key.to_owned()))
        }
        Err(StreamsError::NotConfirmed { wanted, confirmed }) => {
            metrics::counter!("tickflow_replica_wait_unconfirmed_total", "operation" => "append")
                .increment(1);
            Err(AppendError::NotConfirmed { wanted, confirmed })
        }
        Err(e) => Err(e.into()),
    }
}

/// FNV-1a (64 bit) over each entry's stream, type, key and payload, each preceded by its
/// length: what a request is, whatever time or trace context a retry carries.
fn fingerprint(entries: &[(String, Envelope)]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for part in [&(bytes.len() as u64).to_le_bytes()[..], bytes] {
            for byte in part {
                hash ^= u64::from(*byte);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    };
    for (stream, envelope) in entries {
        eat(stream.as_bytes());
        eat(envelope.event_type.as_bytes());
        eat(envelope.partition_key.as_bytes());
        eat(&envelope.payload);
    }
    hash
}

/// `{replayed (0|1), "id id …"}`.
fn parse_once(reply: Value) -> Result<Appended, StreamsError> {
    if let Value::Array(items) = &reply
        && let [Value::Int(flag), Value::BulkString(ids)] = items.as_slice()
        && let Ok(ids) = std::str::from_utf8(ids)
    {
        return Ok(Appended {
            ids: ids
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            replayed: *flag == 1,
        });
    }
    Err(crate::scripts::protocol("APPEND_ONCE reply", &reply))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{connection::ReplicaWait, testing::RedisServer};

    fn entries(n: usize) -> Vec<(String, Envelope)> {
        (0..n)
            .map(|i| {
                let stream = format!("t:{{{}}}:in", i % 2);
                let mut envelope = Envelope::new("order.new", format!("S{i}"), vec![i as u8; 3]);
                envelope.traceparent = (i == 0)
                    .then(|| "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned());
                (stream, envelope)
            })
            .collect()
    }

    async fn len(redis: &Redis, stream: &str) -> u64 {
        let mut conn = redis.pooled().await.unwrap();
        redis::cmd("XLEN")
            .arg(stream)
            .query_async(&mut *conn)
            .await
            .unwrap()
    }

    async fn read_back(redis: &Redis, stream: &str) -> Vec<Envelope> {
        let mut conn = redis.pooled().await.unwrap();
        type Entries = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;
        let reply: Entries = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(&mut *conn)
            .await
            .unwrap();
        reply
            .iter()
            .map(|(_, fields)| {
                Envelope::from_fields(fields.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
                    .unwrap()
            })
            .collect()
    }

    #[tokio::test]
    async fn a_retry_with_the_same_key_appends_nothing_and_returns_the_first_ids() {
        let server = RedisServer::start();
        let redis = Redis::new(&server.url(), 2).unwrap();
        let batch = entries(5);
        let once = Once {
            key: "t:idem:a",
            ttl_ms: 60_000,
        };
        let first = append(&redis, &batch, Some(once)).await.unwrap();
        assert!(!first.replayed);
        assert_eq!(first.ids.len(), 5);
        let again = append(&redis, &entries(5), Some(once)).await.unwrap();
        assert!(again.replayed);
        assert_eq!(again.ids, first.ids);
        assert_eq!(len(&redis, "t:{0}:in").await, 3);
        assert_eq!(len(&redis, "t:{1}:in").await, 2);
        // What was written is exactly the envelopes given, in order, per stream.
        let written = read_back(&redis, "t:{0}:in").await;
        let expected: Vec<Envelope> = batch
            .iter()
            .filter(|(s, _)| s == "t:{0}:in")
            .map(|(_, e)| e.clone())
            .collect();
        assert_eq!(written, expected);

        // Another key appends again.
        let other = Once {
            key: "t:idem:b",
            ttl_ms: 60_000,
        };
        let second = append(&redis, &batch, Some(other)).await.unwrap();
        assert!(!second.replayed);
        assert_ne!(second.ids, first.ids);
        assert_eq!(len(&redis, "t:{0}:in").await, 6);
    }

    #[tokio::test]
    async fn a_key_reused_for_another_request_is_refused_and_appends_nothing() {
        let server = RedisServer::start();
        let redis = Redis::new(&server.url(), 2).unwrap();
        let once = Once {
            key: "t:idem:reused",
            ttl_ms: 60_000,
        };
        let first = append(&redis, &entries(2), Some(once)).await.unwrap();
        // Another payload, another stream, one entry more: each is another request.
        let mut other_payload = entries(2);
        other_payload[1].1.payload = vec![9u8; 3].into();
        let mut other_stream = entries(2);
        other_stream[0].0 = "t:{9}:in".into();
        for other in [other_payload, other_stream, entries(3)] {
            match append(&redis, &other, Some(once)).await {
                Err(AppendError::KeyReused(key)) => assert_eq!(key, once.key),
                other => panic!("expected KeyReused, got {other:?}"),
            }
        }
        assert_eq!(len(&redis, "t:{0}:in").await, 1);
        assert_eq!(len(&redis, "t:{1}:in").await, 1);
        assert_eq!(len(&redis, "t:{9}:in").await, 0);
        // The same request again (new timestamps and trace context) is still a replay.
        let mut again = entries(2);
        again[0].1.traceparent = None;
        let replay = append(&redis, &again, Some(once)).await.unwrap();
        assert!(replay.replayed);
        assert_eq!(replay.ids, first.ids);
    }

    #[tokio::test]
    async fn a_key_is_forgotten_after_its_ttl_and_without_a_key_every_call_appends() {
        let server = RedisServer::start();
        let redis = Redis::new(&server.url(), 2).unwrap();
        let once = Once {
            key: "t:idem:short",
            ttl_ms: 50,
        };
        assert!(
            !append(&redis, &entries(1), Some(once))
                .await
                .unwrap()
                .replayed
        );
        tokio::time::sleep(std::time::Duration::from_millis(120)).await;
        assert!(
            !append(&redis, &entries(1), Some(once))
                .await
                .unwrap()
                .replayed
        );
        assert_eq!(len(&redis, "t:{0}:in").await, 2);

        let plain = append(&redis, &entries(3), None).await.unwrap();
        let plain_again = append(&redis, &entries(3), None).await.unwrap();
        assert!(!plain.replayed && !plain_again.replayed);
        assert_eq!(len(&redis, "t:{0}:in").await, 6);
        assert_eq!(len(&redis, "t:{1}:in").await, 2);
    }

    #[tokio::test]
    async fn a_failed_append_leaves_nothing_and_remembers_no_key() {
        let server = RedisServer::start();
        let redis = Redis::new(&server.url(), 2).unwrap();
        // The second stream key holds a string: its XADD fails inside the atomic step.
        let mut conn = redis.pooled().await.unwrap();
        let () = redis::cmd("SET")
            .arg("t:{1}:in")
            .arg("not a stream")
            .query_async(&mut *conn)
            .await
            .unwrap();
        drop(conn);
        let once = Once {
            key: "t:idem:fails",
            ttl_ms: 60_000,
        };
        assert!(append(&redis, &entries(2), Some(once)).await.is_err());
        assert_eq!(len(&redis, "t:{0}:in").await, 0);
        let mut conn = redis.pooled().await.unwrap();
        let exists: bool = redis::cmd("EXISTS")
            .arg("t:idem:fails")
            .query_async(&mut *conn)
            .await
            .unwrap();
        assert!(!exists, "a failed append must not remember its key");
    }

    /// Without an idempotency key too: a stream of another type anywhere in the request
    /// refuses it whole (a MULTI/EXEC would have appended the entries before it).
    #[tokio::test]
    async fn an_append_without_a_key_is_all_or_nothing_too() {
        let server = RedisServer::start();
        let redis = Redis::new(&server.url(), 2).unwrap();
        let mut conn = redis.pooled().await.unwrap();
        let () = redis::cmd("SET")
            .arg("t:{1}:in")
            .arg("not a stream")
            .query_async(&mut *conn)
            .await
            .unwrap();
        drop(conn);
        let err = append(&redis, &entries(4), None).await.unwrap_err();
        assert!(err.to_string().contains("WRONGTYPE"), "{err}");
        assert_eq!(len(&redis, "t:{0}:in").await, 0);
        let appended = append(&redis, &entries(1), None).await.unwrap();
        assert_eq!(appended.ids.len(), 1);
        assert!(append(&redis, &[], None).await.unwrap().ids.is_empty());
    }

    /// `TICKFLOW_WAIT_REPLICAS`: an append no replica confirmed (a lone server has none) is
    /// refused with a reason that tells the client to retry under its key; the entries
    /// went in on the master, and each retry under the key appends nothing more.
    #[tokio::test]
    async fn an_append_not_confirmed_by_replicas_is_refused_and_its_retries_append_nothing_more() {
        let server = RedisServer::start();
        let waiting = Redis::new(&server.url(), 2)
            .unwrap()
            .with_replica_wait(ReplicaWait {
                replicas: 1,
                timeout: Duration::from_millis(20),
            });
        let once = Once {
            key: "t:idem:unconfirmed",
            ttl_ms: 60_000,
        };
        for _ in 0..2 {
            match append(&waiting, &entries(3), Some(once)).await {
                Err(
                    error @ AppendError::NotConfirmed {
                        wanted: 1,
                        confirmed: 0,
                    },
                ) => assert!(
                    error
                        .to_string()
                        .contains("retry with the same idempotency key"),
                    "{error}"
                ),
                other => panic!("expected NotConfirmed, got {other:?}"),
            }
        }
        assert_eq!(len(&waiting, "t:{0}:in").await, 2);
        assert_eq!(len(&waiting, "t:{1}:in").await, 1);
        let not_waiting = Redis::new(&server.url(), 2).unwrap();
        let replay = append(&not_waiting, &entries(3), Some(once)).await.unwrap();
        assert!(replay.replayed);
        assert_eq!(len(&waiting, "t:{0}:in").await, 2);
    }

    /// On a cluster, the `WAIT` goes to the master of each part's slot (it rides in the
    /// part's pipeline): an append is confirmed while every slot's master has its replica,
    /// refused while one has none (its replica promoted after the master died), and
    /// confirmed again, once, when the old master is back as the new one's replica.
    #[tokio::test]
    async fn on_a_cluster_each_slot_of_an_append_waits_for_its_own_replica() {
        use crate::testing::RedisCluster;

        let mut cluster = RedisCluster::start();
        let redis = Redis::new_cluster(&cluster.seeds())
            .unwrap()
            .with_replica_wait(ReplicaWait {
                replicas: 1,
                timeout: Duration::from_millis(500),
            });
        let first = append(&redis, &entries(4), None).await.unwrap();
        assert_eq!(first.ids.len(), 4);

        let old_master = cluster.kill_master_serving("t:{1}:in");
        cluster.wait_until_stable();
        let once = Once {
            key: "t:idem:failover",
            ttl_ms: 60_000,
        };
        match append(&redis, &entries(4), Some(once)).await {
            Err(AppendError::NotConfirmed { wanted: 1, .. }) => {}
            other => panic!("expected NotConfirmed, got {other:?}"),
        }
        cluster.restart_node(old_master);
        cluster.wait_until_stable();
        let retried = append(&redis, &entries(4), Some(once)).await.unwrap();
        assert_eq!(retried.ids.len(), 4);
        assert_eq!(len(&redis, "t:{0}:in").await, 4);
        assert_eq!(len(&redis, "t:{1}:in").await, 4);
    }
}
