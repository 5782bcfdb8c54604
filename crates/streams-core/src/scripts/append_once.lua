-- APPEND_ONCE: append a request's entries, all or none, and at most once per idempotency
-- key (ttl 0: no key; KEYS[1] is then not read). Layout in scripts/mod.rs. A script is not rolled back on error, so everything that can fail (the
-- key's and every stream's type, the arguments, the size of each entry) is checked before
-- the first write. An XADD cannot be split, and Lua's unpack stops at ~8,000 values: an
-- entry may have at most MAX_XADD_ARGS field and value arguments.
local MAX_XADD_ARGS = 4096
local ttl = tonumber(ARGV[1])
if not ttl or ttl < 0 then return redis.error_reply('TICKFLOW_INVALID append ttl') end
local prior = false
if ttl > 0 then prior = redis.call('GET', KEYS[1]) end
if prior then
  local space = string.find(prior, ' ', 1, true)
  local fingerprint = space and string.sub(prior, 1, space - 1) or prior
  if fingerprint ~= ARGV[2] then
    return redis.error_reply('TICKFLOW_KEY_REUSED the key was used for another request')
  end
  return {1, space and string.sub(prior, space + 1) or ''}
end
-- Every stream must be absent or a stream: one XREAD over the distinct ones checks them
-- all (it fails with WRONGTYPE otherwise, and reads nothing: every id is past the end).
local names, seen = {}, {}
for k = 2, #KEYS do
  if not seen[KEYS[k]] then
    seen[KEYS[k]] = true
    names[#names + 1] = KEYS[k]
  end
end
local last = '18446744073709551615-18446744073709551615'
for from = 1, #names, 500 do
  local args = {'COUNT', 1, 'STREAMS'}
  local to = math.min(from + 499, #names)
  for j = from, to do args[#args + 1] = names[j] end
  for _ = from, to do args[#args + 1] = last end
  local read = redis.pcall('XREAD', unpack(args))
  if type(read) == 'table' and read.err then
    for j = from, to do
      local t = redis.call('TYPE', names[j]).ok
      if t ~= 'none' and t ~= 'stream' then
        return redis.error_reply('WRONGTYPE ' .. names[j] .. ' is a ' .. t .. ', not a stream')
      end
    end
  end
end
local a = 3
for k = 2, #KEYS do
  local n = tonumber(ARGV[a])
  if not n or n < 2 or n % 2 ~= 0 or a + n > #ARGV then
    return redis.error_reply('TICKFLOW_INVALID entry ' .. (k - 1) .. ' has a bad field count')
  end
  if n > MAX_XADD_ARGS then
    return redis.error_reply('TICKFLOW_INVALID entry ' .. (k - 1) .. ' has ' .. (n / 2) ..
      ' fields, over ' .. (MAX_XADD_ARGS / 2))
  end
  a = a + n + 1
end
if a ~= #ARGV + 1 then return redis.error_reply('TICKFLOW_INVALID trailing arguments') end
local ids = {}
a = 3
for k = 2, #KEYS do
  local n = tonumber(ARGV[a])
  ids[#ids + 1] = redis.call('XADD', KEYS[k], '*', unpack(ARGV, a + 1, a + n))
  a = a + n + 1
end
local joined = table.concat(ids, ' ')
if ttl > 0 then redis.call('SET', KEYS[1], ARGV[2] .. ' ' .. joined, 'PX', ttl) end
return {0, joined}
