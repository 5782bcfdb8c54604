//! The server-side scripts that make each step atomic, and a small way to call them.
//!
//! Every script touches only keys passed in `KEYS`. Each partition's keys share its hash
//! tag; ACK_FORWARD takes a whole batch, which may span partitions (one call per batch was
//! measured to matter more than one slot per call), so on a Redis Cluster, which tickflow does
//! not support yet, its calls would have to be split by slot.

use redis::{Cmd, Value, aio::ConnectionLike};

use crate::error::{Result, StreamsError};

/// A Lua script sent by SHA, loaded on first use or after a Redis restart (NOSCRIPT).
#[derive(Debug)]
pub(crate) struct LuaScript {
    code: &'static str,
    sha: String,
}

impl LuaScript {
    fn new(code: &'static str) -> Self {
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
        ack_forward: LuaScript::new(ACK_FORWARD),
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
    pub(crate) ack_forward: LuaScript,
    pub(crate) claim: LuaScript,
    pub(crate) trim: LuaScript,
    pub(crate) renew_lease: LuaScript,
    pub(crate) release_lease: LuaScript,
    pub(crate) membership: LuaScript,
    pub(crate) replay_dead_letters: LuaScript,
    pub(crate) append_once: LuaScript,
}

/// The prefix of the error a script returns when the caller's lease is not current.
pub(crate) const FENCED: &str = "TICKFLOW_FENCED";

/// The prefix of the error ACK_FORWARD returns when older entries of an owned partition are
/// still pending.
pub(crate) const OUT_OF_ORDER: &str = "TICKFLOW_OUT_OF_ORDER";

/// The prefix of the error APPEND_ONCE returns when its key was used for another request.
pub(crate) const KEY_REUSED: &str = "TICKFLOW_KEY_REUSED";

/// The prefix of the status ACK_FORWARD gives a source whose effect command failed.
pub(crate) const FAILED: &str = "TICKFLOW_FAILED";

/// Acknowledge a batch of one or more partitions (sources) and apply each entry's effects,
/// atomically: one call per batch, whatever the number of partitions it holds.
///
/// KEYS[2s-1] and KEYS[2s]: source s's input stream and lease key (the input again when
/// unfenced); the KEYS after them are the keys effects write. ARGV: group, source count S,
/// the envelope's two field names, each source's fencing token ('' = none; the leases are
/// read with one MGET), each source's gap flag ('1' when its entries came from two reads),
/// then per source: entry count, then per entry: id, op count, and per op either 'E', key
/// index, envelope header, payload (XADD of an envelope) or kind ('X' = XADD, else a command
/// name), key index, argument count, arguments; then the source's batch op count and ops
/// (e.g. a state snapshot), applied if any entry of the source was acknowledged by this
/// call.
///
/// An entry's effects are applied only if its XACK removed it from the pending list, so an
/// entry handled twice is forwarded once. With a fencing token, a source is refused
/// (TICKFLOW_FENCED) unless the lease holds the token, and (TICKFLOW_OUT_OF_ORDER) while
/// entries older than its first one are pending, or, with the gap flag, while an entry
/// between its first and last that is not one of them is; a refused source changes
/// nothing. An
/// effect command that fails stops its source there (TICKFLOW_FAILED and the error): the
/// entries before it are done, the failing entry keeps its acknowledgement, the later ones
/// stay pending. Other sources are not affected by a refused or failed one. Returns, per
/// source, one 0/1 per entry or the status string.
const ACK_FORWARD: &str = r#"
local group, sources, h_name, p_name = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local token_at, flag_at = 4, 4 + sources
local held = {}
local leases = {}
for s = 1, sources do
  if ARGV[token_at + s] ~= '' then leases[#leases + 1] = KEYS[2 * s] end
end
if #leases > 0 then
  local values = redis.call('MGET', unpack(leases))
  local k = 1
  for s = 1, sources do
    if ARGV[token_at + s] ~= '' then
      held[s] = values[k] == ARGV[token_at + s]
      k = k + 1
    end
  end
end
local i = 5 + 2 * sources
local result = {}
-- The ARGV length of the op at k: an envelope ('E', key index, header, payload) or any
-- other (kind, key index, argument count, arguments).
local function op_size(k)
  if ARGV[k] == 'E' then return 4 end
  return 3 + tonumber(ARGV[k + 2])
end
local function skip(count)
  for _ = 1, count do i = i + op_size(i) end
end
local function apply()
  local kind, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
  local reply
  if kind == 'E' then
    reply = redis.pcall('XADD', key, '*', h_name, ARGV[i + 2], p_name, ARGV[i + 3])
    i = i + 4
  else
    local nargs = tonumber(ARGV[i + 2])
    if kind == 'X' then
      reply = redis.pcall('XADD', key, '*', unpack(ARGV, i + 3, i + 2 + nargs))
    else
      reply = redis.pcall(kind, key, unpack(ARGV, i + 3, i + 2 + nargs))
    end
    i = i + 3 + nargs
  end
  if type(reply) == 'table' and reply.err then return reply.err end
  return nil
end
-- The current source's status: nil while it goes well.
local status = nil
-- Applies `count` ops, or skips them once one has failed.
local function apply_ops(count)
  for _ = 1, count do
    if status then
      skip(1)
    else
      local failure = apply()
      if failure then status = 'TICKFLOW_FAILED ' .. failure end
    end
  end
end
for s = 1, sources do
  local stream = KEYS[2 * s - 1]
  local token, n = ARGV[token_at + s], tonumber(ARGV[i])
  i = i + 1
  status = nil
  if token ~= '' then
    if not held[s] then
      status = 'TICKFLOW_FENCED'
    elseif n > 0 then
      -- Owned partitions keep order. A batch read twice may also have a gap; but the
      -- partition's pending entries are normally the batch's own (or none, on a retry of a
      -- call that went through), and then there is neither a gap nor anything older.
      local merged = n > 1 and ARGV[flag_at + s] == '1'
      local pending = -1
      if merged then pending = redis.call('XPENDING', stream, group)[1] end
      if pending ~= n and pending ~= 0 then
        if #redis.call('XPENDING', stream, group, '-', '(' .. ARGV[i], 1) > 0 then
          -- Nothing older than this batch may still be pending.
          status = 'TICKFLOW_OUT_OF_ORDER'
        elseif merged then
          -- Read twice: between the first and the last entry, only the batch's own may be
          -- pending (all of them, or none on a retry of a call that went through).
          local last = ARGV[i]
          local k = i
          for _ = 1, n do
            last = ARGV[k]
            local ops = tonumber(ARGV[k + 1])
            k = k + 2
            for _ = 1, ops do k = k + op_size(k) end
          end
          local rows = #redis.call('XPENDING', stream, group, ARGV[i], last, n + 1)
          if rows ~= 0 and rows ~= n then status = 'TICKFLOW_OUT_OF_ORDER' end
        end
      end
    end
  end
  local acks = {}
  local any_acked = false
  for e = 1, n do
    local id, ops = ARGV[i], tonumber(ARGV[i + 1])
    i = i + 2
    if status then
      skip(ops)
    else
      local acked = redis.call('XACK', stream, group, id)
      acks[e] = acked
      if acked == 1 then
        any_acked = true
        apply_ops(ops)
      else
        skip(ops)
      end
    end
  end
  local batch_ops = tonumber(ARGV[i])
  i = i + 1
  if status or not any_acked then
    skip(batch_ops)
  else
    apply_ops(batch_ops)
  end
  result[s] = status or acks
end
return result
"#;

/// Claim pending entries of one partition, with their delivery counts.
///
/// KEYS[1] stream, KEYS[2] lease (or the stream when unfenced). ARGV: group, consumer,
/// min idle ms, start cursor, count, token ('' = none), mode: 'auto' (XAUTOCLAIM entries
/// idle at least min idle, from any consumer) or 'own' (this consumer's own pending
/// entries, re-delivered with XCLAIM). Returns {next cursor, entries, delivery counts};
/// the cursor is '0-0' when done.
const CLAIM: &str = r#"
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local min_idle, start, count, token, mode = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7]
if token ~= '' and redis.call('GET', KEYS[2]) ~= token then
  return redis.error_reply('TICKFLOW_FENCED lease ' .. KEYS[2] .. ' is not held by this consumer')
end
local next_cursor, entries = '0-0', {}
if mode == 'auto' then
  local r = redis.call('XAUTOCLAIM', stream, group, consumer, min_idle, start, 'COUNT', count)
  next_cursor = r[1]
  for _, entry in ipairs(r[2]) do
    if entry then entries[#entries + 1] = entry end
  end
else
  local pending = redis.call('XPENDING', stream, group, start, '+', count, consumer)
  if #pending > 0 then
    local ids = {}
    for k, p in ipairs(pending) do ids[k] = p[1] end
    local claimed = redis.call('XCLAIM', stream, group, consumer, 0, unpack(ids))
    for _, entry in ipairs(claimed) do
      if entry then entries[#entries + 1] = entry end
    end
    if #pending == count then next_cursor = '(' .. ids[#ids] end
  end
end
local counts = {}
if #entries > 0 then
  local info = redis.call('XPENDING', stream, group, entries[1][1], entries[#entries][1], #entries * 2 + 16, consumer)
  local by_id = {}
  for _, p in ipairs(info) do by_id[p[1]] = p[4] end
  for k, entry in ipairs(entries) do counts[k] = by_id[entry[1]] or 1 end
end
return {next_cursor, entries, counts}
"#;

/// Trim a stream below what every group has acknowledged, then apply the hard cap.
///
/// KEYS[1] stream. ARGV[1] max length (0 = no cap). The safe point is the smallest, over
/// all groups, of the oldest pending id and the last-delivered id; entries below it were
/// acknowledged by every group, and so was the entry at it unless it is some group's oldest
/// pending entry. Returns {deleted safely, deleted by the cap, safe point}: an acknowledged
/// entry the cap deletes counts as deleted safely.
const TRIM: &str = r#"
local stream, max_len = KEYS[1], tonumber(ARGV[1])
if redis.call('EXISTS', stream) == 0 then return {0, 0, ''} end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local floor = nil
local oldest_pending = {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local info = {}
  for k = 1, #g, 2 do info[g[k]] = g[k + 1] end
  local candidate = info['last-delivered-id']
  if tonumber(info['pending']) > 0 then
    local summary = redis.call('XPENDING', stream, info['name'])
    oldest_pending[summary[2]] = true
    if less(summary[2], candidate) then candidate = summary[2] end
  end
  if floor == nil or less(candidate, floor) then floor = candidate end
end
local safe = 0
if floor ~= nil then safe = redis.call('XTRIM', stream, 'MINID', floor) end
local forced = 0
if max_len > 0 and redis.call('XLEN', stream) > max_len then
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  forced = redis.call('XTRIM', stream, 'MAXLEN', max_len)
  -- MINID keeps the entry at the floor; the cap deletes it first. Every group has
  -- acknowledged it unless it is a group's oldest pending entry.
  if first[1] == floor and not oldest_pending[floor] then
    safe, forced = safe + 1, forced - 1
  end
end
return {safe, forced, floor or ''}
"#;

/// KEYS[1] lease. ARGV: token, ttl ms. Extends the lease if the caller still holds it.
const RENEW_LEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// KEYS[1] lease. ARGV: token. Deletes the lease if the caller still holds it.
const RELEASE_LEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// KEYS[1] members (sorted set, score = expiry in ms by the Redis clock). ARGV: consumer,
/// ttl ms, 'join' or 'leave'. Returns the live members (ordered by expiry; callers sort).
const MEMBERSHIP: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == 'leave' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
"#;

/// KEYS[1] idempotency key, KEYS[2..] the stream of each entry. ARGV[1] ttl ms, ARGV[2]
/// the request's fingerprint, then per entry: its number of field and value arguments,
/// then those. If the key exists with the same fingerprint, returns {1, its stored ids};
/// with another, refuses (TICKFLOW_KEY_REUSED). Else appends every entry, stores
/// 'fingerprint ids…' (space-separated) under the key with the ttl, and returns {0, ids}.
/// All in one atomic step; it refuses, writing nothing, when a stream key holds another
/// type.
const APPEND_ONCE: &str = r#"
local prior = redis.call('GET', KEYS[1])
if prior then
  local space = string.find(prior, ' ', 1, true)
  local fingerprint = space and string.sub(prior, 1, space - 1) or prior
  if fingerprint ~= ARGV[2] then
    return redis.error_reply('TICKFLOW_KEY_REUSED the key was used for another request')
  end
  return {1, space and string.sub(prior, space + 1) or ''}
end
-- A script is not rolled back on error: refuse before writing anything.
for k = 2, #KEYS do
  local t = redis.call('TYPE', KEYS[k]).ok
  if t ~= 'none' and t ~= 'stream' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[k] .. ' is a ' .. t .. ', not a stream')
  end
end
local ids = {}
local a = 3
for k = 2, #KEYS do
  local n = tonumber(ARGV[a])
  local args = {KEYS[k], '*'}
  for j = 1, n do
    args[j + 2] = ARGV[a + j]
  end
  a = a + n + 1
  ids[#ids + 1] = redis.call('XADD', unpack(args))
end
local joined = table.concat(ids, ' ')
redis.call('SET', KEYS[1], ARGV[2] .. ' ' .. joined, 'PX', ARGV[1])
return {0, joined}
"#;

/// KEYS[1] dead-letter stream, KEYS[2] the stream its entries came from. ARGV[1] how many
/// at most. Appends each dead-lettered entry's original fields (those not starting with
/// 'dlq.') back to the stream and deletes it from the dead-letter stream, atomically.
const REPLAY_DEAD_LETTERS: &str = r#"
local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', tonumber(ARGV[1]))
for _, entry in ipairs(entries) do
  local fields = {}
  local f = entry[2]
  for k = 1, #f, 2 do
    if string.sub(f[k], 1, 4) ~= 'dlq.' then
      fields[#fields + 1] = f[k]
      fields[#fields + 1] = f[k + 1]
    end
  end
  if #fields > 0 then redis.call('XADD', KEYS[2], '*', unpack(fields)) end
  redis.call('XDEL', KEYS[1], entry[1])
end
return #entries
"#;

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
    use super::*;
    use crate::testing::RedisServer;

    /// Calls ACK_FORWARD for `ids` of one source, each forwarding one entry `{id}` to
    /// `out`; a status reply (fenced, out of order, failed) comes back as an error.
    async fn ack_forward(
        conn: &mut redis::aio::MultiplexedConnection,
        ids: &[String],
        token: &str,
    ) -> Result<Vec<i64>> {
        let lease = if token.is_empty() { "in" } else { "lease" };
        let reply = scripts()
            .ack_forward
            .run_with(conn, 3, |cmd| {
                cmd.arg("in").arg(lease).arg("out");
                cmd.arg("g").arg(1).arg("h").arg("p").arg(token).arg("0");
                cmd.arg(ids.len());
                for id in ids {
                    entry_forwarded(cmd, id, 3);
                }
                cmd.arg(0);
            })
            .await?;
        match reply {
            Value::Array(mut sources) if sources.len() == 1 => match sources.remove(0) {
                Value::Array(acks) => acks.iter().map(as_int).collect(),
                status => Err(StreamsError::Protocol(as_string(status)?)),
            },
            other => Err(protocol("array", &other)),
        }
    }

    /// ACK_FORWARD arguments of an entry `id` with one effect: XADD `from id` to KEYS[key].
    fn entry_forwarded(cmd: &mut Cmd, id: &str, key: usize) {
        cmd.arg(id)
            .arg(1)
            .arg("X")
            .arg(key)
            .arg(2)
            .arg("from")
            .arg(id);
    }

    /// Group `g` on stream `key`, from its start (creating the stream).
    async fn create_group(conn: &mut redis::aio::MultiplexedConnection, key: &str) {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg("g")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await
            .unwrap();
    }

    async fn set(conn: &mut redis::aio::MultiplexedConnection, key: &str, value: &str) {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(conn)
            .await
            .unwrap();
    }

    async fn read_all(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("STREAMS")
            .arg("in")
            .arg(">")
            .query_async(conn)
            .await
            .unwrap();
        let Value::Array(mut streams) = reply else {
            panic!("no entries")
        };
        let Value::Array(mut pair) = streams.remove(0) else {
            panic!("stream")
        };
        parse_entries(pair.remove(1))
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect()
    }

    #[tokio::test]
    async fn the_same_batch_submitted_twice_is_forwarded_once() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "in").await;
        for i in 0..5 {
            let _: String = redis::cmd("XADD")
                .arg("in")
                .arg("*")
                .arg("n")
                .arg(i)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        let ids = read_all(&mut conn).await;
        assert_eq!(ids.len(), 5);
        assert_eq!(ack_forward(&mut conn, &ids, "").await.unwrap(), vec![1; 5]);
        // A retry after a lost reply, or a second consumer's commit: acknowledged already.
        assert_eq!(ack_forward(&mut conn, &ids, "").await.unwrap(), vec![0; 5]);
        let out_len: u64 = redis::cmd("XLEN")
            .arg("out")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(out_len, 5);
        let pending: Value = redis::cmd("XPENDING")
            .arg("in")
            .arg("g")
            .query_async(&mut conn)
            .await
            .unwrap();
        let Value::Array(summary) = pending else {
            panic!("summary")
        };
        assert_eq!(as_int(&summary[0]).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_wrong_fencing_token_acknowledges_and_forwards_nothing() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "in").await;
        let _: String = redis::cmd("XADD")
            .arg("in")
            .arg("*")
            .arg("n")
            .arg(1)
            .query_async(&mut conn)
            .await
            .unwrap();
        let ids = read_all(&mut conn).await;
        set(&mut conn, "lease", "new-owner#2").await;
        let err = ack_forward(&mut conn, &ids, "old-owner#1")
            .await
            .unwrap_err();
        assert!(err.to_string().contains(FENCED), "{err}");
        let out_len: u64 = redis::cmd("XLEN")
            .arg("out")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(out_len, 0);
        assert_eq!(
            ack_forward(&mut conn, &ids, "new-owner#2").await.unwrap(),
            vec![1]
        );
    }

    async fn xadd(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> String {
        redis::cmd("XADD")
            .arg(key)
            .arg("*")
            .arg("n")
            .arg(1)
            .query_async(conn)
            .await
            .unwrap()
    }

    async fn len(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> u64 {
        redis::cmd("XLEN").arg(key).query_async(conn).await.unwrap()
    }

    async fn pending(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
        let summary: Value = redis::cmd("XPENDING")
            .arg(key)
            .arg("g")
            .query_async(conn)
            .await
            .unwrap();
        let Value::Array(summary) = summary else {
            panic!("summary")
        };
        as_int(&summary[0]).unwrap()
    }

    /// Two sources in one call: a refused or failing source leaves the other one's commit
    /// whole, and changes nothing of its own but what came before the failure.
    #[tokio::test]
    async fn one_call_commits_each_source_on_its_own() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        for key in ["a", "b", "c"] {
            create_group(&mut conn, key).await;
        }
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            a.push(xadd(&mut conn, "a").await);
            b.push(xadd(&mut conn, "b").await);
            c.push(xadd(&mut conn, "c").await);
        }
        let _: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("x")
            .arg("STREAMS")
            .arg("a")
            .arg("b")
            .arg("c")
            .arg(">")
            .arg(">")
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        set(&mut conn, "lease:b", "someone-else#1").await;
        set(&mut conn, "not-a-hash", "x").await;
        // KEYS: a, a (unfenced), b, lease:b, c, c, then out (7), not-a-hash (8).
        let reply = scripts()
            .ack_forward
            .run_with(&mut conn, 8, |cmd| {
                cmd.arg("a")
                    .arg("a")
                    .arg("b")
                    .arg("lease:b")
                    .arg("c")
                    .arg("c");
                cmd.arg("out").arg("not-a-hash");
                cmd.arg("g").arg(3).arg("h").arg("p");
                cmd.arg("").arg("my-token#2").arg("");
                cmd.arg("0").arg("0").arg("0");
                // a: every entry forwarded, plus a batch op.
                cmd.arg(a.len());
                for id in &a {
                    entry_forwarded(cmd, id, 7);
                }
                cmd.arg(1).arg("X").arg(7).arg(2).arg("batch").arg("a");
                // b: fenced.
                cmd.arg(b.len());
                for id in &b {
                    entry_forwarded(cmd, id, 7);
                }
                cmd.arg(0);
                // c: the second entry's effect fails (a string is not a hash).
                cmd.arg(c.len());
                for (k, id) in c.iter().enumerate() {
                    if k == 1 {
                        cmd.arg(id)
                            .arg(1)
                            .arg("HINCRBY")
                            .arg(8)
                            .arg(2)
                            .arg("f")
                            .arg(1);
                    } else {
                        entry_forwarded(cmd, id, 7);
                    }
                }
                cmd.arg(1).arg("X").arg(7).arg(2).arg("batch").arg("c");
            })
            .await
            .unwrap();
        let Value::Array(items) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(items.len(), 3);
        let Value::Array(acks) = &items[0] else {
            panic!("{items:?}")
        };
        assert_eq!(
            acks.iter().map(|v| as_int(v).unwrap()).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        assert_eq!(as_string(items[1].clone()).unwrap(), FENCED);
        let failed = as_string(items[2].clone()).unwrap();
        assert!(
            failed.starts_with(FAILED) && failed.contains("WRONGTYPE"),
            "{failed}"
        );
        // a's three entries and its batch op, then c's first entry: nothing of b, nothing
        // after c's failure.
        assert_eq!(len(&mut conn, "out").await, 5);
        assert_eq!(pending(&mut conn, "a").await, 0);
        assert_eq!(pending(&mut conn, "b").await, 3);
        // c: the first two acknowledged (the failing one keeps its acknowledgement), the
        // third still pending.
        assert_eq!(pending(&mut conn, "c").await, 1);
    }

    /// A batch of one partition read in two reads is refused when another consumer holds an
    /// entry between its first and last (a gap), and accepted without one.
    #[tokio::test]
    async fn a_gap_between_two_reads_of_an_owned_partition_is_refused() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "in").await;
        set(&mut conn, "lease", "me#1").await;
        let read = async |conn: &mut redis::aio::MultiplexedConnection, consumer: &str| {
            let _: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("g")
                .arg(consumer)
                .arg("STREAMS")
                .arg("in")
                .arg(">")
                .query_async(conn)
                .await
                .unwrap();
        };
        let mut ids = Vec::new();
        for consumer in ["me", "zombie", "me"] {
            ids.push(xadd(&mut conn, "in").await);
            read(&mut conn, consumer).await;
        }
        let commit = async |conn: &mut redis::aio::MultiplexedConnection,
                            ids: &[&String],
                            gap_flag: &str| {
            let reply = scripts()
                .ack_forward
                .run_with(conn, 3, |cmd| {
                    cmd.arg("in").arg("lease").arg("out");
                    cmd.arg("g")
                        .arg(1)
                        .arg("h")
                        .arg("p")
                        .arg("me#1")
                        .arg(gap_flag);
                    cmd.arg(ids.len());
                    for id in ids {
                        entry_forwarded(cmd, id, 3);
                    }
                    cmd.arg(0);
                })
                .await
                .unwrap();
            let Value::Array(mut items) = reply else {
                panic!("{reply:?}")
            };
            items.remove(0)
        };
        // Entries 0 and 2 were read by two reads, with entry 1 taken by another consumer in
        // between: refused, nothing done.
        let refused = commit(&mut conn, &[&ids[0], &ids[2]], "1").await;
        assert_eq!(as_string(refused).unwrap(), OUT_OF_ORDER);
        assert_eq!(len(&mut conn, "out").await, 0);
        assert_eq!(pending(&mut conn, "in").await, 3);
        // Entry 0 alone has no gap; then, once entry 1 is done, entry 2.
        let Value::Array(acks) = commit(&mut conn, &[&ids[0]], "1").await else {
            panic!("acks")
        };
        assert_eq!(as_int(&acks[0]).unwrap(), 1);
        let _: i64 = redis::cmd("XACK")
            .arg("in")
            .arg("g")
            .arg(&ids[1])
            .query_async(&mut conn)
            .await
            .unwrap();
        let Value::Array(acks) = commit(&mut conn, &[&ids[2]], "1").await else {
            panic!("acks")
        };
        assert_eq!(as_int(&acks[0]).unwrap(), 1);
        assert_eq!(len(&mut conn, "out").await, 2);
    }
}
