-- settle.lua: after a request, true up what admit.lua reserved, release the lease and write
-- the usage ledger, in one round trip. The request belongs to the UTC day and month it was
-- admitted in, so the caller passes those ledger keys (same hash tag as the team's limits).
--
-- KEYS[1] tpm bucket   KEYS[2] leases   KEYS[3] day ledger hash   KEYS[4] month ledger hash
-- Per request: ARGV[1] now_ms or ''   ARGV[2] tokens reserved at admission
-- ARGV[3] tokens to charge (the real usage; 0 for a cache hit)   ARGV[4] lease id or ''
-- Per team: ARGV[5] tokens_per_minute or ''   ARGV[6] day ledger ttl s   ARGV[7] month ledger ttl s
-- ARGV[8] day field counting tokens against the quota   ARGV[9] month field of micro-dollars
-- ARGV[10..] ledger field, increment, field, increment, ... (added to the day and the month)
-- Returns {day tokens counted against the quota, month micro-dollars spent}

local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local MINUTE, KEEP = 60000, 60000
local reserved, charged = tonumber(ARGV[2]), tonumber(ARGV[3])
local delta = charged - reserved

-- The token bucket: a refund moves the arrival time back (never before now), an extra
-- charge moves it forward (never refused: the work is already done).
local tpm = tonumber(ARGV[5])
if tpm and delta ~= 0 then
  local tat = tonumber(redis.call('GET', KEYS[1])) or now
  if tat < now then tat = now end
  tat = math.max(now, tat + delta * MINUTE / tpm)
  if tat > now then
    redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + KEEP)
  else
    redis.call('DEL', KEYS[1])
  end
end

if ARGV[4] ~= '' then redis.call('ZREM', KEYS[2], ARGV[4]) end

if delta ~= 0 then redis.call('HINCRBY', KEYS[3], ARGV[8], delta) end
for i = 10, #ARGV - 1, 2 do
  local n = tonumber(ARGV[i + 1])
  if n ~= 0 then
    redis.call('HINCRBY', KEYS[3], ARGV[i], n)
    redis.call('HINCRBY', KEYS[4], ARGV[i], n)
  end
end
redis.call('EXPIRE', KEYS[3], ARGV[6])
redis.call('EXPIRE', KEYS[4], ARGV[7])

return {tonumber(redis.call('HGET', KEYS[3], ARGV[8])) or 0,
        tonumber(redis.call('HGET', KEYS[4], ARGV[9])) or 0}
