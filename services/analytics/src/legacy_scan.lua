-- LEGACY_SCAN: one page of SCAN on the server that holds KEYS[1] (on a Redis Cluster, the
-- master of a partition's slot, where every key of the partition lives; a plain SCAN would go
-- to any node). Read only; used by analytics (`store.rs`, `legacy_keys`) to find what the
-- earlier per-symbol layout stored in a partition it takes over.
--
-- KEYS[1]: a key in the partition's slot. ARGV: cursor, MATCH pattern, COUNT.
-- Returns SCAN's reply: the next cursor and a page of key names.
return redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
