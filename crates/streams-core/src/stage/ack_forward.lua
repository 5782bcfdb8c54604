-- ACK_FORWARD: acknowledge a batch of one or more partitions (sources) and apply the
-- effects of every entry this call acknowledged. Each source is applied whole or not at
-- all: everything that can fail is checked before the first write, because Redis does not
-- roll a script back. Built and read only by `stage/commit.rs` (AckForward, SourceReply).
--
-- KEYS[2s-1], KEYS[2s]: source s's input stream and its lease key (the stream again when
-- unfenced); the keys after those are the keys effects write.
-- ARGV: group, source count S, the envelope's header and payload field names, S fencing
-- tokens ('' = unfenced), S gates: '0', or '1' when the source's entries came from two
-- reads (the gap check), or 'D<window ms>' for a dedupe gate (below),
-- then per source: its entry count, per entry its id, op count and ops, then the source's
-- batch op count and batch ops (applied if any of its entries was acknowledged now).
-- An op is either 'E', key index, header, payload (XADD of an envelope) or a command
-- name, key index, argument count and the arguments ('X' = XADD key * arguments).
--
-- An entry's effects are applied only if this call "claims" it: for a stream source, its
-- XACK removed it from the pending list; for a dedupe gate (Redis Cluster: effects of an
-- entry whose source stream is in another slot, applied before the entry is acknowledged
-- there), KEYS[2s-1] is a sorted set of entry ids in the effects' slot and ZADD NX added
-- the id now (ids older than the window are trimmed first). Either way an entry's effects
-- are applied once, however often the call is repeated.
--
-- Returns, per source, one 0/1 per entry (1: acknowledged by this call, effects applied)
-- or a status: TICKFLOW_FENCED, TICKFLOW_OUT_OF_ORDER or 'TICKFLOW_FAILED <why>', each of
-- which means that nothing of that source was written. A malformed call is refused whole
-- with a TICKFLOW_INVALID error before anything is written.

local group, sources, h_name, p_name = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]

-- Lua's unpack() stops at about 8,000 values: variadic commands are sent in chunks of
-- CHUNK arguments, and an XADD (which cannot be split) takes at most MAX_XADD_ARGS.
local CHUNK = 1000
local MAX_XADD_ARGS = 4096

local function invalid(why)
  return redis.error_reply('TICKFLOW_INVALID ' .. why)
end

-- What an effect command may be (handler.rs's EFFECT_COMMANDS): the type of key it needs
-- ('*': any) and the shape of its arguments: 'pairs' (field value ...), 'scored' (score
-- member ...), 'list' (one or more), 'one' (exactly one), 'range' (min max), 'none'.
local COMMANDS = {
  X = {'stream', 'pairs'},
  HSET = {'hash', 'pairs'},
  HDEL = {'hash', 'list'},
  SADD = {'set', 'list'},
  SREM = {'set', 'list'},
  ZADD = {'zset', 'scored'},
  ZREM = {'zset', 'list'},
  ZREMRANGEBYSCORE = {'zset', 'range'},
  SET = {'string', 'one'},
  DEL = {'*', 'none'},
}

local function is_score(s)
  if s == 'inf' or s == '+inf' or s == '-inf' then return true end
  local x = tonumber(s)
  return x ~= nil and x == x
end

local function is_bound(s)
  if string.sub(s, 1, 1) == '(' then s = string.sub(s, 2) end
  return is_score(s)
end

if not sources or sources < 1 or 2 * sources > #KEYS then
  return invalid('bad source count')
end
local token_at, flag_at = 4, 4 + sources

-- ----- 1. Read the call into flat arrays, checking its shape ----------------------------
-- Op n: kind op_kind[n], key index op_key[n], first argument at op_arg[n], op_nargs[n].
local op_kind, op_key, op_arg, op_nargs = {}, {}, {}, {}
local key_type = {}
local argc = #ARGV
local i = 5 + 2 * sources

local function read_ops(count)
  if not count or count < 0 then return 'bad op count' end
  for _ = 1, count do
    local kind, k = ARGV[i], tonumber(ARGV[i + 1])
    if not k or k <= 2 * sources or k > #KEYS then return 'bad key index' end
    local wanted, n, first
    if kind == 'E' then
      wanted, n, first = 'stream', 2, i + 2
    else
      local spec = COMMANDS[kind]
      if not spec then return 'command not allowed in an effect: ' .. tostring(kind) end
      n, first = tonumber(ARGV[i + 2]), i + 3
      if not n or n < 0 or first + n - 1 > argc then return 'bad argument count' end
      local shape = spec[2]
      wanted = spec[1]
      if shape == 'none' then
        if n ~= 0 then return kind .. ' takes no arguments' end
      elseif shape == 'one' then
        -- SET's value alone: an option (NX, GET, ...) could make it write nothing.
        if n ~= 1 then return kind .. ' takes one argument' end
      elseif shape == 'list' then
        if n < 1 then return kind .. ' needs arguments' end
      elseif shape == 'range' then
        if n ~= 2 or not is_bound(ARGV[first]) or not is_bound(ARGV[first + 1]) then
          return kind .. ' needs a valid score range'
        end
      else
        if n < 2 or n % 2 ~= 0 then return kind .. ' needs pairs' end
        if kind == 'X' and n > MAX_XADD_ARGS then
          return 'an entry of ' .. (n / 2) .. ' fields is over ' .. (MAX_XADD_ARGS / 2)
        end
        if shape == 'scored' then
          for a = first, first + n - 1, 2 do
            if not is_score(ARGV[a]) then return kind .. ' with an invalid score' end
          end
        end
      end
    end
    if first + n - 1 > argc then return 'truncated op' end
    if wanted ~= '*' then
      if key_type[k] and key_type[k] ~= wanted then
        return 'key ' .. KEYS[k] .. ' written as a ' .. key_type[k] .. ' and a ' .. wanted
      end
      key_type[k] = wanted
    end
    local o = #op_kind + 1
    op_kind[o], op_key[o], op_arg[o], op_nargs[o] = kind, k, first, n
    i = first + n
  end
  return nil
end

-- Per source: its entries' ids, each entry's first op and op count, its batch ops.
local plan = {}
for s = 1, sources do
  local n = tonumber(ARGV[i])
  if not n or n < 0 then return invalid('bad entry count') end
  i = i + 1
  local src = {ids = {}, first_op = {}, op_count = {}, ops_from = #op_kind + 1}
  local gate = ARGV[flag_at + s]
  if string.sub(gate, 1, 1) == 'D' then
    src.window = tonumber(string.sub(gate, 2))
    if not src.window or src.window < 1 or ARGV[token_at + s] ~= '' then
      return invalid('bad dedupe gate')
    end
  elseif gate ~= '0' and gate ~= '1' then
    return invalid('bad gate')
  end
  for e = 1, n do
    local id, count = ARGV[i], tonumber(ARGV[i + 1])
    if not id then return invalid('truncated entry') end
    i = i + 2
    src.ids[e], src.first_op[e], src.op_count[e] = id, #op_kind + 1, count
    local bad = read_ops(count)
    if bad then return invalid(bad) end
  end
  src.batch_from = #op_kind + 1
  local batch_count = tonumber(ARGV[i])
  i = i + 1
  local bad = read_ops(batch_count)
  if bad then return invalid(bad) end
  src.ops_to = #op_kind
  plan[s] = src
end
if i ~= argc + 1 then return invalid('trailing arguments') end

-- ----- 2. Check everything that can refuse a source, before any write ------------------
local status = {}

-- Leases, read with MGET in chunks.
local leases, lease_of = {}, {}
for s = 1, sources do
  if ARGV[token_at + s] ~= '' then
    leases[#leases + 1] = KEYS[2 * s]
    lease_of[#leases] = s
  end
end
for from = 1, #leases, CHUNK do
  local to = math.min(from + CHUNK - 1, #leases)
  local values = redis.call('MGET', unpack(leases, from, to))
  for k = from, to do
    local s = lease_of[k]
    if values[k - from + 1] ~= ARGV[token_at + s] then status[s] = 'TICKFLOW_FENCED' end
  end
end

-- Key types: every key an effect writes must be absent or of the type its ops need, and
-- every source stream absent or a stream. The streams (most of the keys) are checked
-- together: one XREAD over all of them fails with WRONGTYPE if any is not a stream, and
-- reads nothing (every id is past the end). Only if it fails is each stream looked at
-- with TYPE, as every other key is.
local streams_ok = true
do
  local names = {}
  for s = 1, sources do
    if not plan[s].window then names[#names + 1] = KEYS[2 * s - 1] end
  end
  for k, wanted in pairs(key_type) do
    if wanted == 'stream' then names[#names + 1] = KEYS[k] end
  end
  local last = '18446744073709551615-18446744073709551615'
  local per_call = CHUNK / 2
  for from = 1, #names, per_call do
    local args = {'COUNT', 1, 'STREAMS'}
    local to = math.min(from + per_call - 1, #names)
    for j = from, to do args[#args + 1] = names[j] end
    for _ = from, to do args[#args + 1] = last end
    local read = redis.pcall('XREAD', unpack(args))
    if type(read) == 'table' and read.err then
      streams_ok = false
      break
    end
  end
end
local wrong = {}
for k, wanted in pairs(key_type) do
  if wanted ~= 'stream' or not streams_ok then
    local t = redis.call('TYPE', KEYS[k]).ok
    if t ~= 'none' and t ~= wanted then
      wrong[k] = 'WRONGTYPE ' .. KEYS[k] .. ' is a ' .. t .. ', not a ' .. wanted
    end
  end
end

for s = 1, sources do
  local src, stream = plan[s], KEYS[2 * s - 1]
  if not status[s] and (src.window or not streams_ok) then
    local t, wanted = redis.call('TYPE', stream).ok, 'stream'
    if src.window then wanted = 'zset' end
    if t ~= 'none' and t ~= wanted then
      status[s] = 'TICKFLOW_FAILED WRONGTYPE ' .. stream .. ' is a ' .. t .. ', not a ' .. wanted
    end
  end
  if not status[s] then
    for o = src.ops_from, src.ops_to do
      if wrong[op_key[o]] then
        status[s] = 'TICKFLOW_FAILED ' .. wrong[op_key[o]]
        break
      end
    end
  end
  local n = #src.ids
  if not status[s] and not src.window and ARGV[token_at + s] ~= '' and n > 0 then
    -- Owned partitions keep order. A batch read twice may also have a gap; but the
    -- partition's pending entries are normally the batch's own (or none, on a retry of a
    -- call that went through), and then there is neither a gap nor anything older.
    local merged = n > 1 and ARGV[flag_at + s] == '1'
    local pending = -1
    if merged then pending = redis.call('XPENDING', stream, group)[1] end
    if pending ~= n and pending ~= 0 then
      if #redis.call('XPENDING', stream, group, '-', '(' .. src.ids[1], 1) > 0 then
        -- Nothing older than this batch may still be pending.
        status[s] = 'TICKFLOW_OUT_OF_ORDER'
      elseif merged then
        -- Read twice: between the first and the last entry, only the batch's own may be
        -- pending (all of them, or none on a retry of a call that went through).
        local rows = #redis.call('XPENDING', stream, group, src.ids[1], src.ids[n], n + 1)
        if rows ~= 0 and rows ~= n then status[s] = 'TICKFLOW_OUT_OF_ORDER' end
      end
    end
  end
end

-- ----- 3. Write --------------------------------------------------------------------------
-- Nothing below can fail on what was checked above; a failure that is left (a stream whose
-- last possible id is used up) stops its source where it happened and is reported.
local function apply(o)
  local kind, key, a, n = op_kind[o], KEYS[op_key[o]], op_arg[o], op_nargs[o]
  local reply
  if kind == 'E' then
    reply = redis.pcall('XADD', key, '*', h_name, ARGV[a], p_name, ARGV[a + 1])
  elseif kind == 'X' then
    reply = redis.pcall('XADD', key, '*', unpack(ARGV, a, a + n - 1))
  elseif n == 0 then
    reply = redis.pcall(kind, key)
  else
    local size = CHUNK - CHUNK % 2
    for from = a, a + n - 1, size do
      reply = redis.pcall(kind, key, unpack(ARGV, from, math.min(from + size - 1, a + n - 1)))
      if type(reply) == 'table' and reply.err then break end
    end
  end
  if type(reply) == 'table' and reply.err then return reply.err end
  return nil
end

local function apply_range(from, to)
  for o = from, to do
    local failure = apply(o)
    if failure then return 'TICKFLOW_FAILED ' .. failure end
  end
  return nil
end

local result = {}
for s = 1, sources do
  local src, stream = plan[s], KEYS[2 * s - 1]
  if status[s] then
    result[s] = status[s]
  else
    local acks, any_acked, failed = {}, false, nil
    local now = nil
    if src.window then
      local t = redis.call('TIME')
      now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      redis.call('ZREMRANGEBYSCORE', stream, '-inf', '(' .. (now - src.window))
    end
    for e = 1, #src.ids do
      local acked = 0
      if not failed then
        if now then
          acked = redis.call('ZADD', stream, 'NX', now, src.ids[e])
        else
          acked = redis.call('XACK', stream, group, src.ids[e])
        end
        if acked == 1 then
          any_acked = true
          local first = src.first_op[e]
          failed = apply_range(first, first + src.op_count[e] - 1)
        end
      end
      acks[e] = acked
    end
    if not failed and any_acked then failed = apply_range(src.batch_from, src.ops_to) end
    result[s] = failed or acks
  end
end
return result
