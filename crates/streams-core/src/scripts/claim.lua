-- CLAIM: claim pending entries of one partition, with their delivery counts. Layout in
-- scripts/mod.rs. Everything that can refuse the call (the lease, the stream's type, the
-- arguments) is checked before the first write (XAUTOCLAIM/XCLAIM change the pending
-- list); XCLAIM takes its ids in chunks, since Lua's unpack stops at ~8,000 values.
local CHUNK = 1000
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local min_idle, start, count, token, mode = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7]
if not count or count < 1 or not tonumber(min_idle) or (mode ~= 'auto' and mode ~= 'own') then
  return redis.error_reply('TICKFLOW_INVALID claim arguments')
end
if token ~= '' and redis.call('GET', KEYS[2]) ~= token then
  return redis.error_reply('TICKFLOW_FENCED lease ' .. KEYS[2] .. ' is not held by this consumer')
end
local t = redis.call('TYPE', stream).ok
if t ~= 'stream' and t ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. stream .. ' is a ' .. t .. ', not a stream')
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
    for from = 1, #ids, CHUNK do
      local to = math.min(from + CHUNK - 1, #ids)
      local claimed = redis.call('XCLAIM', stream, group, consumer, 0, unpack(ids, from, to))
      for _, entry in ipairs(claimed) do
        if entry then entries[#entries + 1] = entry end
      end
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
