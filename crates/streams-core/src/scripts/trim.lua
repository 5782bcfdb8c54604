-- TRIM: trim a stream below what every group has acknowledged, then apply the hard cap.
-- Layout in scripts/mod.rs. Only reads come before the first XTRIM, and both XTRIMs act on
-- a stream whose type was checked, so the call trims fully or not at all.
local stream, max_len = KEYS[1], tonumber(ARGV[1])
if not max_len or max_len < 0 then
  return redis.error_reply('TICKFLOW_INVALID trim max length')
end
local t = redis.call('TYPE', stream).ok
if t == 'none' then return {0, 0, ''} end
if t ~= 'stream' then
  return redis.error_reply('WRONGTYPE ' .. stream .. ' is a ' .. t .. ', not a stream')
end
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
