-- RELEASE_LEASE: KEYS[1] lease. ARGV: token. Deletes the lease if the caller still holds
-- it. One write, after its check.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
