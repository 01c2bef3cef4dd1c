-- Read one byte range of a cache entry: a hit takes a big entry in ranges, never in one GET.
-- KEYS[1] = gw:cache:{<hex>}:entry
-- ARGV[1], ARGV[2] = the first and the last offset wanted (inclusive, as GETRANGE takes them)
-- ARGV[3] = the entry's first bytes as the hit's first read saw them, or "" on that first read
-- Returns {the bytes, the entry's length, its ms to live (-1: no TTL)}, or false when there is
-- no entry, or it no longer starts with ARGV[3]: it expired or another put replaced it since
-- the hit started, and a range of another entry must not be spliced into the answer.
local size = redis.call('STRLEN', KEYS[1])
if size == 0 then
  return false
end
local check = ARGV[3]
if check ~= '' and redis.call('GETRANGE', KEYS[1], 0, #check - 1) ~= check then
  return false
end
return {redis.call('GETRANGE', KEYS[1], ARGV[1], ARGV[2]), size, redis.call('PTTL', KEYS[1])}
