//! The server-side scripts that make each step atomic, and a small way to call them.
//!
//! Each script is a `.lua` file beside this one (ACK_FORWARD, the commit, lives with the
//! stage loop in `stage/`). Every script touches only keys passed in `KEYS`. Each
//! partition's keys share its hash tag; ACK_FORWARD takes a whole batch, which may span
//! partitions (one call per batch was measured to matter more than one slot per call), so
//! on a Redis Cluster, which tickflow does not support yet, its calls would have to be
//! split by slot.
//!
//! **Every script applies everything or nothing.** Redis does not roll a script back when a
//! command fails half-way, so each one checks all that can fail (key types, sizes, fences,
//! the shape of its arguments) before its first write, and none `unpack`s a list whose
//! length it does not bound: Lua's `unpack` stops at about 8,000 values ("too many results
//! to unpack"), so variadic commands go in chunks of 1,000 values.

use std::time::Duration;

use redis::{Cmd, Value, aio::ConnectionLike};

use crate::{
    connection::{MAX_WAIT_TIMEOUT, ReplicaWait},
    error::{Result, StreamsError},
};

/// A Lua script sent by SHA, loaded on first use or after a Redis restart (NOSCRIPT).
#[derive(Debug)]
pub(crate) struct LuaScript {
    code: &'static str,
    sha: String,
}

impl LuaScript {
    pub(crate) fn new(code: &'static str) -> Self {
        Self {
            code,
            sha: redis::Script::new(code).get_hash().to_owned(),
        }
    }

    /// Runs the script with `keys` and `args`.
    pub(crate) async fn run<C, K, A>(&self, conn: &mut C, keys: &[K], args: &[A]) -> Result<Value>
    where
        C: ConnectionLike + Send,
        K: redis::ToRedisArgs + Sync,
        A: redis::ToRedisArgs + Sync,
    {
        self.run_with(conn, keys.len(), |cmd| {
            for key in keys {
                cmd.arg(key);
            }
            for arg in args {
                cmd.arg(arg);
            }
        })
        .await
    }

    /// Runs the script by its SHA only, returning NOSCRIPT if Redis does not have it (for
    /// a connection where a second request would queue behind a blocking one).
    pub(crate) async fn run_loaded<C>(
        &self,
        conn: &mut C,
        key_count: usize,
        fill: impl Fn(&mut Cmd),
    ) -> Result<Value>
    where
        C: ConnectionLike + Send,
    {
        let cmd = command("EVALSHA", &self.sha, key_count, &fill);
        Ok(cmd.query_async::<Value>(conn).await?)
    }

    /// Runs the script with `key_count` keys; `fill` appends the keys, then the arguments.
    /// `fill` may be called twice (once more with EVAL after a NOSCRIPT).
    pub(crate) async fn run_with<C>(
        &self,
        conn: &mut C,
        key_count: usize,
        fill: impl Fn(&mut Cmd),
    ) -> Result<Value>
    where
        C: ConnectionLike + Send,
    {
        match self.run_loaded(conn, key_count, &fill).await {
            Err(e) if e.is_no_script() => {
                let cmd = command("EVAL", self.code, key_count, &fill);
                Ok(cmd.query_async::<Value>(conn).await?)
            }
            other => other,
        }
    }

    /// Runs the script as [`Self::run_with`] does (as [`Self::run_loaded`] when
    /// `load_script` is false), then, when `wait` asks for replicas, `WAIT` in the same
    /// pipeline: on the same socket (a pipeline goes whole over one connection, on a
    /// cluster to the master of the script's first key), right behind the write it counts
    /// replicas for, and ahead of anything queued on that connection after it (a blocking
    /// read). Fewer replicas than asked is [`StreamsError::NotConfirmed`]: the script's
    /// writes were applied on the master but may not survive a failover. Without replicas
    /// to wait for, the request is exactly [`Self::run_with`]'s: no `WAIT`, no pipeline.
    pub(crate) async fn run_confirmed<C>(
        &self,
        conn: &mut C,
        key_count: usize,
        fill: impl Fn(&mut Cmd),
        load_script: bool,
        wait: ReplicaWait,
    ) -> Result<Value>
    where
        C: ConnectionLike + Send,
    {
        if !wait.is_on() {
            return if load_script {
                self.run_with(conn, key_count, fill).await
            } else {
                self.run_loaded(conn, key_count, fill).await
            };
        }
        let by_sha = command("EVALSHA", &self.sha, key_count, &fill);
        match run_and_wait(conn, by_sha, wait).await {
            Err(e) if load_script && e.is_no_script() => {
                run_and_wait(conn, command("EVAL", self.code, key_count, &fill), wait).await
            }
            other => other,
        }
    }
}

/// `script` then `WAIT` in one pipeline (see [`LuaScript::run_confirmed`]).
async fn run_and_wait<C>(conn: &mut C, script: Cmd, wait: ReplicaWait) -> Result<Value>
where
    C: ConnectionLike + Send,
{
    // A WAIT with timeout 0 blocks for good, and one longer than MAX_WAIT_TIMEOUT would
    // outlast the connection's response timeout; the configuration refuses both, and this
    // keeps a hand-built ReplicaWait within them too.
    let timeout = wait
        .timeout
        .clamp(Duration::from_millis(1), MAX_WAIT_TIMEOUT);
    let mut pipe = redis::pipe();
    // The script's own error reply (NOSCRIPT, a refused call) is returned as it would be
    // without the WAIT, not folded into a pipeline error.
    pipe.ignore_errors();
    pipe.add_command(script);
    pipe.cmd("WAIT")
        .arg(wait.replicas)
        .arg(timeout.as_millis() as u64);
    let replies: Vec<Value> = pipe.query_async(conn).await?;
    let [reply, confirmed] = <[Value; 2]>::try_from(replies)
        .map_err(|r| StreamsError::Protocol(format!("{} replies to a script and WAIT", r.len())))?;
    let reply = reply.extract_error()?;
    let confirmed: u32 = redis::from_redis_value(confirmed.extract_error()?)?;
    if confirmed < wait.replicas {
        return Err(StreamsError::NotConfirmed {
            wanted: wait.replicas,
            confirmed,
        });
    }
    Ok(reply)
}

/// `verb body key_count`, then what `fill` appends (keys, then arguments).
fn command(verb: &str, body: &str, key_count: usize, fill: &impl Fn(&mut Cmd)) -> Cmd {
    let mut cmd = Cmd::new();
    cmd.arg(verb).arg(body).arg(key_count);
    fill(&mut cmd);
    cmd
}

/// The scripts, compiled once per process.
pub(crate) fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        claim: LuaScript::new(CLAIM),
        trim: LuaScript::new(TRIM),
        renew_lease: LuaScript::new(RENEW_LEASE),
        release_lease: LuaScript::new(RELEASE_LEASE),
        membership: LuaScript::new(MEMBERSHIP),
        replay_dead_letters: LuaScript::new(REPLAY_DEAD_LETTERS),
        append_once: LuaScript::new(APPEND_ONCE),
    })
}

#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) claim: LuaScript,
    pub(crate) trim: LuaScript,
    pub(crate) renew_lease: LuaScript,
    pub(crate) release_lease: LuaScript,
    pub(crate) membership: LuaScript,
    pub(crate) replay_dead_letters: LuaScript,
    pub(crate) append_once: LuaScript,
}

/// The most fields an entry a script appends may have (an XADD cannot be split into
/// chunks): ACK_FORWARD's and APPEND_ONCE's `MAX_XADD_ARGS` / 2. A dead letter of an entry
/// with more fields keeps the first ones and says how many it dropped.
pub(crate) const MAX_ENTRY_FIELDS: usize = 2048;

/// The prefix of the error a script returns when the caller's lease is not current.
pub(crate) const FENCED: &str = "TICKFLOW_FENCED";

/// The prefix of the error ACK_FORWARD returns when older entries of an owned partition are
/// still pending.
pub(crate) const OUT_OF_ORDER: &str = "TICKFLOW_OUT_OF_ORDER";

/// The prefix of the error APPEND_ONCE returns when its key was used for another request.
pub(crate) const KEY_REUSED: &str = "TICKFLOW_KEY_REUSED";

/// The prefix of the status ACK_FORWARD gives a source that a check refused (a key of
/// another type) before anything of it was written.
pub(crate) const FAILED: &str = "TICKFLOW_FAILED";

/// Claim pending entries of one partition, with their delivery counts.
///
/// KEYS[1] stream, KEYS[2] lease (or the stream when unfenced). ARGV: group, consumer,
/// min idle ms, start cursor, count, token ('' = none), mode: 'auto' (XAUTOCLAIM entries
/// idle at least min idle, from any consumer) or 'own' (this consumer's own pending
/// entries, re-delivered with XCLAIM). Returns {next cursor, entries, delivery counts};
/// the cursor is '0-0' when done.
const CLAIM: &str = include_str!("claim.lua");

/// Trim a stream below what every group has acknowledged, then apply the hard cap.
///
/// KEYS[1] stream. ARGV[1] max length (0 = no cap). The safe point is the smallest, over
/// all groups, of the oldest pending id and the last-delivered id; entries below it were
/// acknowledged by every group, and so was the entry at it unless it is some group's oldest
/// pending entry. Returns {deleted safely, deleted by the cap, safe point}: an acknowledged
/// entry the cap deletes counts as deleted safely.
const TRIM: &str = include_str!("trim.lua");

/// KEYS[1] lease. ARGV: token, ttl ms. Extends the lease if the caller still holds it.
const RENEW_LEASE: &str = include_str!("renew_lease.lua");

/// KEYS[1] lease. ARGV: token. Deletes the lease if the caller still holds it.
const RELEASE_LEASE: &str = include_str!("release_lease.lua");

/// KEYS[1] members (sorted set, score = expiry in ms by the Redis clock). ARGV: consumer,
/// ttl ms, 'join' or 'leave'. Returns the live members (ordered by expiry; callers sort).
const MEMBERSHIP: &str = include_str!("membership.lua");

/// KEYS[1] idempotency key, KEYS[2..] the stream of each entry. ARGV[1] ttl ms, ARGV[2]
/// the request's fingerprint, then per entry: its number of field and value arguments,
/// then those. If the key exists with the same fingerprint, returns {1, its stored ids};
/// with another, refuses (TICKFLOW_KEY_REUSED). Else appends every entry, stores
/// 'fingerprint ids…' (space-separated) under the key with the ttl, and returns {0, ids}.
/// All in one atomic step; it refuses, writing nothing, when a stream key holds another
/// type.
const APPEND_ONCE: &str = include_str!("append_once.lua");

/// KEYS[1] dead-letter stream, KEYS[2] the stream its entries came from. ARGV[1] how many
/// at most. Appends each dead-lettered entry's original fields (those not starting with
/// 'dlq.') back to the stream and deletes it from the dead-letter stream, atomically.
const REPLAY_DEAD_LETTERS: &str = include_str!("replay_dead_letters.lua");

/// One stream entry as read: id and field/value pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEntry {
    /// The stream id, e.g. `1700000000000-0`.
    pub id: String,
    /// Field/value pairs in entry order.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Parses an entry list as XRANGE and XREADGROUP return it, `[[id, [f, v, ...]], ...]`,
/// skipping nil entries (deleted but still pending).
pub fn parse_entries(value: Value) -> Result<Vec<RawEntry>> {
    let items = match value {
        Value::Array(items) => items,
        Value::Nil => return Ok(Vec::new()),
        other => return Err(protocol("entry list", &other)),
    };
    let mut entries = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut parts) = item else {
            continue;
        };
        if parts.len() != 2 {
            return Err(StreamsError::Protocol("entry without two parts".into()));
        }
        let raw_fields = parts.pop().unwrap_or(Value::Nil);
        let id = as_string(parts.pop().unwrap_or(Value::Nil))?;
        let flat = match raw_fields {
            Value::Array(flat) => flat,
            Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            Value::Nil => continue,
            other => return Err(protocol("entry fields", &other)),
        };
        let mut fields = Vec::with_capacity(flat.len() / 2);
        let mut iter = flat.into_iter();
        while let (Some(name), Some(value)) = (iter.next(), iter.next()) {
            fields.push((as_bytes(name)?, as_bytes(value)?));
        }
        entries.push(RawEntry { id, fields });
    }
    Ok(entries)
}

/// Parses an XREADGROUP (or XREAD) reply into (stream key, entries) pairs: RESP2 gives
/// `[[key, entries], ...]`, RESP3 a map, and nil means nothing came.
pub fn parse_read_reply(value: Value) -> Result<Vec<(String, Vec<RawEntry>)>> {
    let streams = match value {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let entries = pair.pop()?;
                    let key = pair.pop()?;
                    Some((key, entries))
                }
                _ => None,
            })
            .collect::<Vec<_>>(),
        Value::Map(pairs) => pairs,
        other => return Err(protocol("XREADGROUP reply", &other)),
    };
    streams
        .into_iter()
        .map(|(key, entries)| Ok((as_string(key)?, parse_entries(entries)?)))
        .collect()
}

pub(crate) fn as_bytes(value: Value) -> Result<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Ok(bytes),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        Value::Okay => Ok(b"OK".to_vec()),
        other => Err(protocol("string", &other)),
    }
}

pub(crate) fn as_string(value: Value) -> Result<String> {
    String::from_utf8(as_bytes(value)?).map_err(|_| StreamsError::Protocol("non-UTF-8 id".into()))
}

pub(crate) fn as_int(value: &Value) -> Result<i64> {
    match value {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| protocol("integer", value)),
        Value::SimpleString(s) => s.parse().map_err(|_| protocol("integer", value)),
        Value::Nil => Ok(0),
        other => Err(protocol("integer", other)),
    }
}

pub(crate) fn protocol(expected: &str, got: &Value) -> StreamsError {
    StreamsError::Protocol(format!("expected {expected}, got {got:?}"))
}

#[cfg(test)]
mod tests {
    //! The scripts other than ACK_FORWARD (tested with its builder in `stage/commit.rs`):
    //! input past every size a script handles in one command, and refusals before the first
    //! write.

    use redis::aio::MultiplexedConnection;

    use super::*;
    use crate::testing::RedisServer;

    async fn query<T: redis::FromRedisValue>(conn: &mut MultiplexedConnection, cmd: &mut Cmd) -> T {
        cmd.query_async(conn).await.unwrap()
    }

    async fn xadd(
        conn: &mut MultiplexedConnection,
        key: &str,
        fields: &[(String, String)],
    ) -> String {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(key).arg("*");
        for (name, value) in fields {
            cmd.arg(name).arg(value);
        }
        query(conn, &mut cmd).await
    }

    fn fields(n: usize) -> Vec<(String, String)> {
        (0..n).map(|k| (format!("f{k}"), "v".to_owned())).collect()
    }

    /// A consumer restarted with 9,000 of its own entries pending (more than Lua's unpack
    /// takes at once) claims them all in one call.
    #[tokio::test]
    async fn claiming_more_own_entries_than_unpack_takes_claims_them_all() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        let pending = 9_000;
        let mut pipe = redis::pipe();
        for k in 0..pending {
            pipe.cmd("XADD").arg("in").arg("*").arg("n").arg(k).ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
        let () = query(
            &mut conn,
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg("in")
                .arg("g")
                .arg("0"),
        )
        .await;
        let _: Value = query(
            &mut conn,
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("g")
                .arg("c")
                .arg("STREAMS")
                .arg("in")
                .arg(">"),
        )
        .await;
        let reply = scripts()
            .claim
            .run(
                &mut conn,
                &["in", "in"],
                &["g", "c", "0", "-", "10000", "", "own"],
            )
            .await
            .unwrap();
        let Value::Array(parts) = reply else {
            panic!("{reply:?}")
        };
        let entries = parse_entries(parts[1].clone()).unwrap();
        assert_eq!(entries.len(), pending);
        assert_eq!(as_string(parts[0].clone()).unwrap(), "0-0");
    }

    /// A dead letter too large to append in one XADD stays in the dead-letter stream; the
    /// others are replayed. A target of another type refuses the replay before any write.
    #[tokio::test]
    async fn a_replay_moves_what_fits_and_keeps_what_does_not() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        let mut small = fields(2);
        small.push(("dlq.reason".into(), "bad".into()));
        let mut huge = fields(MAX_ENTRY_FIELDS + 100);
        huge.push(("dlq.reason".into(), "too big".into()));
        xadd(&mut conn, "dlq", &small).await;
        let huge_id = xadd(&mut conn, "dlq", &huge).await;
        xadd(&mut conn, "dlq", &small).await;

        let () = query(&mut conn, redis::cmd("SET").arg("wrong").arg("x")).await;
        let err = scripts()
            .replay_dead_letters
            .run(&mut conn, &["dlq", "wrong"], &[100])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("WRONGTYPE"), "{err}");
        assert_eq!(
            query::<u64>(&mut conn, redis::cmd("XLEN").arg("dlq")).await,
            3
        );

        let reply = scripts()
            .replay_dead_letters
            .run(&mut conn, &["dlq", "in"], &[100])
            .await
            .unwrap();
        let Value::Array(counts) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(
            (as_int(&counts[0]).unwrap(), as_int(&counts[1]).unwrap()),
            (2, 1)
        );
        let replayed: Value =
            query(&mut conn, redis::cmd("XRANGE").arg("in").arg("-").arg("+")).await;
        let replayed = parse_entries(replayed).unwrap();
        assert_eq!(replayed.len(), 2);
        assert!(
            replayed.iter().all(|e| e.fields.len() == 2),
            "no dlq.* field comes back"
        );
        let left: Value = query(&mut conn, redis::cmd("XRANGE").arg("dlq").arg("-").arg("+")).await;
        let left = parse_entries(left).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, huge_id);
    }

    /// Trim and membership refuse a key of another type before writing anything.
    #[tokio::test]
    async fn trim_and_membership_refuse_a_key_of_another_type() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        let () = query(&mut conn, redis::cmd("HSET").arg("h").arg("f").arg("v")).await;
        let err = scripts()
            .trim
            .run(&mut conn, &["h"], &[1])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("WRONGTYPE"), "{err}");
        let err = scripts()
            .membership
            .run(&mut conn, &["h"], &["me", "1000", "join"])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("WRONGTYPE"), "{err}");
        let hash: Vec<String> = query(&mut conn, redis::cmd("HGETALL").arg("h")).await;
        assert_eq!(hash, ["f", "v"]);
        // Arguments that would fail after a write are refused before it.
        let () = query(&mut conn, redis::cmd("ZADD").arg("m").arg(1).arg("old")).await;
        let err = scripts()
            .membership
            .run(&mut conn, &["m"], &["me", "soon", "join"])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("TICKFLOW_INVALID"), "{err}");
        assert_eq!(
            query::<u64>(&mut conn, redis::cmd("ZCARD").arg("m")).await,
            1
        );
    }
}
