-- RENEW_LEASE: KEYS[1] lease. ARGV: token, ttl ms. Extends the lease if the caller still
-- holds it. One write, after its checks.
if not tonumber(ARGV[2]) then return redis.error_reply('TICKFLOW_INVALID lease ttl') end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
