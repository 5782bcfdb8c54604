-- REPLAY_DEAD_LETTERS: KEYS[1] dead-letter stream, KEYS[2] the stream its entries came
-- from. ARGV[1] how many at most. Appends each dead-lettered entry's original fields
-- (those not starting with 'dlq.') back to the stream and deletes it from the dead-letter
-- stream. Both keys' types are checked and every entry's size is looked at before the
-- first write: an entry with more than MAX_XADD_ARGS / 2 original fields cannot be one
-- XADD (Lua's unpack stops at ~8,000 values) and is kept where it is, and so is a dead
-- letter that kept only the first fields of its entry (`dlq.fields_dropped`): appending
-- those would replay a different, truncated entry. Returns {replayed, kept}.
local MAX_XADD_ARGS = 4096
local count = tonumber(ARGV[1])
if not count or count < 1 then return redis.error_reply('TICKFLOW_INVALID replay count') end
for k = 1, 2 do
  local t = redis.call('TYPE', KEYS[k]).ok
  if t ~= 'none' and t ~= 'stream' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[k] .. ' is a ' .. t .. ', not a stream')
  end
end
local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', count)
local plan = {}
local kept = 0
for _, entry in ipairs(entries) do
  local fields, truncated = {}, false
  local f = entry[2]
  for k = 1, #f, 2 do
    if string.sub(f[k], 1, 4) ~= 'dlq.' then
      fields[#fields + 1] = f[k]
      fields[#fields + 1] = f[k + 1]
    elseif f[k] == 'dlq.fields_dropped' then
      truncated = true
    end
  end
  if truncated or #fields > MAX_XADD_ARGS then
    kept = kept + 1
  else
    plan[#plan + 1] = {entry[1], fields}
  end
end
for _, item in ipairs(plan) do
  local fields = item[2]
  if #fields > 0 then redis.call('XADD', KEYS[2], '*', unpack(fields)) end
  redis.call('XDEL', KEYS[1], item[1])
end
return {#plan, kept}
