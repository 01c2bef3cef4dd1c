-- renew.lua: keep the leases and admission records of one team's live requests (on one
-- replica) from expiring: one call per team per renewal tick, however many requests it has.
-- A team's admissions checked against the account also hold a lease in the account's zset,
-- renewed in the same call (every limits key shares one hash tag). A lease that already
-- expired is not brought back (its slot may have been given to another request meanwhile);
-- its request runs on, and its settle still trues up.
--
-- KEYS[1..n] lease zsets (n = ARGV[3]: the team's, then the account's)
-- KEYS[n + i] the record of admission ARGV[3 + i] (see admit.lua)
-- ARGV[1] now_ms or ''   ARGV[2] ttl ms   ARGV[3] n   ARGV[4..] admission ids
-- Returns the number of leases renewed.

local now, ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if not ttl or ttl < 1 or ttl > 1e12 or (n ~= 1 and n ~= 2) or #KEYS ~= n + #ARGV - 3 then
  error('renew: bad arguments')
end
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local expiry, px = string.format('%.3f', now + ttl), string.format('%d', ttl)
local renewed = 0
for z = 1, n do
  local here = 0
  for i = 4, #ARGV do here = here + redis.call('ZADD', KEYS[z], 'XX', 'CH', expiry, ARGV[i]) end
  if here > 0 then redis.call('PEXPIRE', KEYS[z], string.format('%d', ttl + 60000)) end
  renewed = renewed + here
end
for i = 4, #ARGV do
  local key = KEYS[n + i - 3]
  local record = redis.call('GET', key)
  if record and record ~= 'x' then redis.call('PEXPIRE', key, px) end  -- 'x': settled meanwhile
end
return renewed
