-- MEMBERSHIP: keep the live members of an owned group. Layout in scripts/mod.rs. The key's
-- type and the arguments are checked before the first write.
local ttl = tonumber(ARGV[2])
if not ttl or (ARGV[3] ~= 'join' and ARGV[3] ~= 'leave') then
  return redis.error_reply('TICKFLOW_INVALID membership arguments')
end
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'none' and kind ~= 'zset' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' is a ' .. kind .. ', not a zset')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == 'leave' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
