-- ACK_FORWARD: acknowledge a batch of one or more partitions (sources) and apply the
-- effects of every entry this call acknowledged. Each source is applied whole or not at
-- all: everything that can fail is checked before the first write, because Redis does not
-- roll a script back. Built and read only by `stage/commit.rs` (AckForward, SourceReply),
-- which also checks what does not depend on Redis's data before it sends a call: every
-- effect is one of the allowed commands with arguments of the right shape, and no entry it
-- appends has more fields than one XADD can take from a script (Lua's unpack stops at
-- ~8,000 values).
--
-- KEYS[2s-1], KEYS[2s]: source s's input stream (for a dedupe gate, its sorted set) and
-- its lease key (the stream again when unfenced); the keys after those are the keys
-- effects write.
-- ARGV: group, source count S, the envelope's header and payload field names, then S
-- values each of: fencing tokens ('' = unfenced); gates ('0', '1' when the source's
-- entries came from two reads: the gap check, 'W' when they are whole, 'W<id> <id>' when
-- they are whole from two reads, with the seam between them: see below, or
-- 'D<window ms>': a dedupe gate); the ARGV
-- index where the source's section starts; the id of the source's last entry ('' if
-- none). Then one string with the type each key must have, a character per source stream
-- and then per effect key ('s' stream, 'h' hash, 'S' set, 'z' sorted set, 't' string, '*'
-- not checked: any type, or checked by this process moments ago). Then the sections:
-- per source its entry count, per entry its id, op count and ops, then the source's batch
-- op count and batch ops (applied if any of its entries was acknowledged now). An op is
-- either 'E', key index, header, payload (XADD of an envelope) or a command name, key
-- index, argument count and the arguments ('X' = XADD key * arguments). An entry whose one
-- op appends an envelope (most entries) is sent short: its id, 'e<key index>', header,
-- payload.
--
-- An entry's effects are applied only if this call "claims" it: for a stream source, its
-- XACK removed it from the pending list; for a dedupe gate (Redis Cluster: effects of an
-- entry whose source stream is in another slot, applied before the entry is acknowledged
-- there), ZADD NX added its id to the sorted set now (ids older than the window are
-- trimmed first). Either way an entry's effects are applied once, however often the call
-- is repeated.
--
-- A whole source ('W'): its entries are every entry of its stream from the first to the
-- last, as one XREADGROUP '>' delivered them (no claim, none left out), its stream is no
-- other source's, and no effect of the call writes it. Stream ids only grow and such a
-- read hands out the stream's next entries, so no other entry between the first and the
-- last id can be pending in the group: if the group's pending list is n entries, the
-- least the first and the greatest the last, it is exactly the source's entries (all
-- pending: one XACK per 1,000 entries instead of one per entry); if it is empty, none is.
-- Entries of two such reads (one right after the other, but another consumer's read may
-- come between them) qualify when no entry strictly between the seam's ids is pending. Otherwise (a retry of a call that went through while others are pending,
-- another consumer's entries, some claimed and acknowledged by another consumer) the
-- entries are acknowledged one by one, as any source's.
-- The proof fails only if ids were reused (a failover to a replica whose clock is behind
-- the lost entries' ids, an operator's XGROUP SETID back): then the variadic XACK removes
-- fewer than n after the effects were applied, and the source is reported as
-- 'TICKFLOW_FAILED k of n whole entries were pending' although its effects were written
-- (the one-by-one path would mis-acknowledge such ids too).
--
-- Returns, per source, one 0/1 per entry (or, when this call acknowledged every entry, their
-- count) or a status: TICKFLOW_FENCED, TICKFLOW_OUT_OF_ORDER or 'TICKFLOW_FAILED <why>',
-- each of which means that nothing of that source was written.

local KEYS, ARGV, rcall, rpcall = KEYS, ARGV, redis.call, redis.pcall
local group, sources, h_name, p_name = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local token_at, gate_at, offset_at, last_at = 4, 4 + sources, 4 + 2 * sources, 4 + 3 * sources
local types = ARGV[5 + 4 * sources]
-- Variadic commands go in chunks of this many arguments (Lua's unpack stops at ~8,000).
local CHUNK = 1000
local TYPE_NAMES = {s = 'stream', h = 'hash', S = 'set', z = 'zset', t = 'string'}
-- Numbers and key indexes recur (op counts are mostly '1', a few output keys): each
-- distinct string is converted once (a tonumber of a string runs strtod twice: about a
-- thousand instructions, as much as the rest of an entry's Lua work).
local num = setmetatable({}, {__index = function(t, text)
  local v = tonumber(text)
  t[text] = v
  return v
end})
local key_at = setmetatable({}, {__index = function(t, text)
  local v = KEYS[tonumber(text)]
  t[text] = v
  return v
end})
-- An entry's op count, or 'e<key index>' for an entry whose one op appends an envelope:
-- that key index, else false.
local single = setmetatable({}, {__index = function(t, text)
  local v = string.byte(text, 1) == 101 and tonumber(string.sub(text, 2)) or false -- 'e'
  t[text] = v
  return v
end})
local status = {}
local window = {}
-- Per whole source: true when all its entries are pending, false when none is (nil: not
-- known, acknowledged one by one).
local all_pending = {}
for s = 1, sources do
  local gate = ARGV[gate_at + s]
  if string.byte(gate, 1) == 68 then window[s] = tonumber(string.sub(gate, 2)) end -- 'D'
end

-- ----- Checks: nothing is written before all of them passed ------------------------------

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
  local values = rcall('MGET', unpack(leases, from, to))
  for k = from, to do
    local s = lease_of[k]
    if values[k - from + 1] ~= ARGV[token_at + s] then status[s] = 'TICKFLOW_FENCED' end
  end
end

-- Types. The streams (most keys) are checked together: one XREAD over all of them fails
-- with WRONGTYPE if any is not a stream, and reads nothing (every id is past the end).
-- Only if it fails is each looked at with TYPE, as every other key is.
local first_effect = 2 * sources
local wrong = nil
local function check(key, wanted)
  local t = rcall('TYPE', key).ok
  if t ~= 'none' and t ~= wanted then
    return 'WRONGTYPE ' .. key .. ' is a ' .. t .. ', not a ' .. wanted
  end
  return nil
end
local streams_ok = true
-- Most calls check nothing: every key was checked by this process moments ago.
if string.find(types, '[^*]') then
  local names = {}
  for k = 1, #types do
    if string.byte(types, k) == 115 then -- 's'
      if k <= sources then
        names[#names + 1] = KEYS[2 * k - 1]
      else
        names[#names + 1] = KEYS[first_effect + k - sources]
      end
    end
  end
  local past_end = '18446744073709551615-18446744073709551615'
  for from = 1, #names, CHUNK / 2 do
    local to = math.min(from + CHUNK / 2 - 1, #names)
    local args = {'COUNT', 1, 'STREAMS'}
    for j = from, to do args[#args + 1] = names[j] end
    for _ = from, to do args[#args + 1] = past_end end
    local read = rpcall('XREAD', unpack(args))
    if type(read) == 'table' and read.err then streams_ok = false end
  end
  for k = sources + 1, #types do
    local code = string.sub(types, k, k)
    if code ~= '*' and (code ~= 's' or not streams_ok) then
      local why = check(KEYS[first_effect + k - sources], TYPE_NAMES[code])
      if why then
        wrong = wrong or {}
        wrong[first_effect + k - sources] = why
      end
    end
  end
end

-- The ARGV length of the op at index i.
local function op_size(i)
  if ARGV[i] == 'E' then return 4 end
  return 3 + num[ARGV[i + 2]]
end

for s = 1, sources do
  local stream, at = KEYS[2 * s - 1], tonumber(ARGV[offset_at + s])
  local n = tonumber(ARGV[at])
  local code = string.sub(types, s, s)
  if not status[s] and code ~= '*' and (code ~= 's' or not streams_ok) then
    local why = check(stream, TYPE_NAMES[code])
    if why then status[s] = 'TICKFLOW_FAILED ' .. why end
  end
  if not status[s] and wrong then
    -- A key of another type: refuse the sources that write it (a walk over their ops,
    -- only on this rare path).
    local i = at + 1
    for _ = 1, n do
      local k = single[ARGV[i + 1]]
      if k then
        local why = wrong[k]
        if why and not status[s] then status[s] = 'TICKFLOW_FAILED ' .. why end
        i = i + 4
      else
        local ops = num[ARGV[i + 1]]
        i = i + 2
        for _ = 1, ops do
          local why = wrong[tonumber(ARGV[i + 1])]
          if why and not status[s] then status[s] = 'TICKFLOW_FAILED ' .. why end
          i = i + op_size(i)
        end
      end
    end
    local ops = tonumber(ARGV[i])
    i = i + 1
    for _ = 1, ops do
      local why = wrong[tonumber(ARGV[i + 1])]
      if why and not status[s] then status[s] = 'TICKFLOW_FAILED ' .. why end
      i = i + op_size(i)
    end
  end
  if not status[s] and n > 0 and string.byte(ARGV[gate_at + s], 1) == 87 then -- 'W'
    -- Read before any write; nothing of the call but this source's XACK changes it.
    local summary = rpcall('XPENDING', stream, group)
    if not summary.err then
      if summary[1] == n and summary[2] == ARGV[at + 1] and summary[3] == ARGV[last_at + s] then
        local gate = ARGV[gate_at + s]
        local space = string.find(gate, ' ', 2, true)
        if not space then
          all_pending[s] = true
        else
          local between = rpcall('XPENDING', stream, group, '(' .. string.sub(gate, 2, space - 1),
            '(' .. string.sub(gate, space + 1), 1)
          if not between.err and #between == 0 then all_pending[s] = true end
        end
      elseif summary[1] == 0 then
        all_pending[s] = false
      end
    end
  end
  -- (A whole source with all or none of its entries pending has none older pending.)
  if not status[s] and not window[s] and ARGV[token_at + s] ~= '' and n > 0
      and all_pending[s] == nil then
    -- Owned partitions keep order. A batch read twice may also have a gap; but the
    -- partition's pending entries are normally the batch's own (or none, on a retry of a
    -- call that went through), and then there is neither a gap nor anything older.
    local first, last = ARGV[at + 1], ARGV[last_at + s]
    local merged = n > 1 and (ARGV[gate_at + s] == '1' or string.find(ARGV[gate_at + s], ' ', 2, true))
    local pending = -1
    if merged then pending = rcall('XPENDING', stream, group)[1] end
    if pending ~= n and pending ~= 0 then
      if #rcall('XPENDING', stream, group, '-', '(' .. first, 1) > 0 then
        -- Nothing older than this batch may still be pending.
        status[s] = 'TICKFLOW_OUT_OF_ORDER'
      elseif merged then
        -- Read twice: between the first and the last entry, only the batch's own may be
        -- pending (all of them, or none on a retry of a call that went through).
        local rows = #rcall('XPENDING', stream, group, first, last, n + 1)
        if rows ~= 0 and rows ~= n then status[s] = 'TICKFLOW_OUT_OF_ORDER' end
      end
    end
  end
end

-- ----- Writes ------------------------------------------------------------------------------
-- Nothing below can fail on what was checked above; a failure that is left (a stream whose
-- last possible id is used up) stops its source where it happened and is reported.
local i = 0
local function apply()
  local kind, key = ARGV[i], key_at[ARGV[i + 1]]
  local reply
  if kind == 'E' then
    reply = rpcall('XADD', key, '*', h_name, ARGV[i + 2], p_name, ARGV[i + 3])
    i = i + 4
  else
    local n = num[ARGV[i + 2]]
    local a = i + 3
    if kind == 'X' then
      reply = rpcall('XADD', key, '*', unpack(ARGV, a, a + n - 1))
    elseif n == 0 then
      reply = rpcall(kind, key)
    else
      for from = a, a + n - 1, CHUNK do
        reply = rpcall(kind, key, unpack(ARGV, from, math.min(from + CHUNK - 1, a + n - 1)))
        if type(reply) == 'table' and reply.err then break end
      end
    end
    i = a + n
  end
  if type(reply) == 'table' and reply.err then return 'TICKFLOW_FAILED ' .. reply.err end
  return nil
end
local function apply_ops(count)
  for _ = 1, count do
    local failure = apply()
    if failure then return failure end
  end
  return nil
end

local result = {}
for s = 1, sources do
  if status[s] then
    result[s] = status[s]
  elseif all_pending[s] == false then
    -- None pending: nothing to acknowledge or apply.
    local acks = {}
    for e = 1, tonumber(ARGV[tonumber(ARGV[offset_at + s])]) do acks[e] = 0 end
    result[s] = acks
  else
    local stream = KEYS[2 * s - 1]
    i = tonumber(ARGV[offset_at + s])
    local n = tonumber(ARGV[i])
    i = i + 1
    local acks, acked_count, failed = {}, 0, nil
    local now = nil
    -- All pending: each entry counts as acknowledged, and their ids are acknowledged
    -- together below.
    local whole = all_pending[s]
    local ids = whole and {}
    if window[s] then
      local t = rcall('TIME')
      now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      rcall('ZREMRANGEBYSCORE', stream, '-inf', '(' .. (now - window[s]))
    end
    for e = 1, n do
      local id, ops = ARGV[i], ARGV[i + 1]
      local k = single[ops]
      local acked
      if whole then
        acked = 1
        ids[e] = id
      elseif now then
        acked = rcall('ZADD', stream, 'NX', now, id)
      else
        acked = rcall('XACK', stream, group, id)
      end
      acks[e] = acked
      acked_count = acked_count + acked
      if k then
        -- The common entry, inline: one envelope appended.
        if acked == 1 then
          local reply = rpcall('XADD', KEYS[k], '*', h_name, ARGV[i + 2], p_name, ARGV[i + 3])
          -- An id (a string: its .err is string.err, nil) or an error table; cheaper than
          -- type(), which interns the type's name on every call.
          if reply.err then
            -- The rest of this source stays as it is (its entries pending).
            failed = 'TICKFLOW_FAILED ' .. reply.err
            break
          end
        end
        i = i + 4
      else
        ops = num[ops]
        i = i + 2
        if acked == 1 then
          failed = apply_ops(ops)
          if failed then break end
        else
          for _ = 1, ops do i = i + op_size(i) end
        end
      end
    end
    if whole then
      -- The entries up to a failure (included), as one by one they would have been.
      local removed = 0
      for from = 1, #ids, CHUNK do
        removed = removed + rcall('XACK', stream, group, unpack(ids, from, math.min(from + CHUNK - 1, #ids)))
      end
      if removed ~= #ids and not failed then
        failed = 'TICKFLOW_FAILED ' .. removed .. ' of ' .. #ids .. ' whole entries were pending'
      end
    end
    if not failed then
      local batch_ops = tonumber(ARGV[i])
      i = i + 1
      if acked_count > 0 then failed = apply_ops(batch_ops) end
    end
    -- All acknowledged (the usual case): their count, a shorter reply.
    if not failed and acked_count == n then acks = n end
    result[s] = failed or acks
  end
end
return result
