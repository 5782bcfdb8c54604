//! Appending envelopes from outside the pipeline (an API request), all or nothing, and at
//! most once per idempotency key.
//!
//! A client that sends a request and loses the answer (a timeout, a dropped connection, a
//! Redis restart between the write and the reply) cannot know whether its events went in.
//! Retrying without a key may append them twice; retrying with the same key returns the
//! ids of the first append and appends nothing. The key is stored (with a time to live)
//! in the same atomic step as the entries, so no crash can separate them.

use redis::Value;

use crate::{Envelope, Redis, error::Result, scripts::scripts};

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
    /// The Redis key that remembers the append (already namespaced by the caller).
    pub key: &'a str,
    /// How long it is remembered, in milliseconds.
    pub ttl_ms: u64,
}

/// Appends each `(stream, envelope)` atomically (all or none). With `once`, an append
/// already done under the same key is not repeated: its ids are returned instead.
pub async fn append(
    redis: &Redis,
    entries: &[(String, Envelope)],
    once: Option<Once<'_>>,
) -> Result<Appended> {
    let mut conn = redis.pooled().await?;
    let Some(once) = once else {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (stream, envelope) in entries {
            let cmd = pipe.cmd("XADD").arg(stream).arg("*");
            envelope.for_each_field(|name, value| {
                cmd.arg(name).arg(value);
            });
        }
        let ids: Vec<String> = pipe.query_async(&mut *conn).await?;
        return Ok(Appended {
            ids,
            replayed: false,
        });
    };
    let reply = scripts()
        .append_once
        .run_with(&mut *conn, 1 + entries.len(), |cmd| {
            cmd.arg(once.key);
            for (stream, _) in entries {
                cmd.arg(stream);
            }
            cmd.arg(once.ttl_ms.max(1));
            for (_, envelope) in entries {
                cmd.arg(envelope.field_count() * 2);
                envelope.for_each_field(|name, value| {
                    cmd.arg(name).arg(value);
                });
            }
        })
        .await?;
    parse_once(reply)
}

/// `{replayed (0|1), "id id …"}`.
fn parse_once(reply: Value) -> Result<Appended> {
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
    use super::*;
    use crate::testing::RedisServer;

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
}
