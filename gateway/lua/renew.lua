-- renew.lua: keep the leases and admission records of one team's live requests (on one
-- replica) from expiring: one call per team per renewal tick, however many requests it has.
-- A lease that already expired is not brought back (its slot may have been given to another
-- request meanwhile); its request runs on, and its settle still trues up.
--
-- KEYS[1] leases   KEYS[1 + i] the record of admission ARGV[2 + i] (see admit.lua)
-- ARGV[1] now_ms or ''   ARGV[2] ttl ms   ARGV[3..] admission ids
-- Returns the number of leases renewed.

local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
if not ttl or ttl < 1 or ttl > 1e12 or #KEYS ~= #ARGV - 1 then error('renew: bad arguments') end
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local expiry, px = string.format('%.3f', now + ttl), string.format('%d', ttl)
local renewed = 0
for i = 3, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', expiry, ARGV[i])
  local record = redis.call('GET', KEYS[i - 1])
  if record and record ~= 'x' then redis.call('PEXPIRE', KEYS[i - 1], px) end  -- 'x': settled meanwhile
end
if renewed > 0 then redis.call('PEXPIRE', KEYS[1], string.format('%d', ttl + 60000)) end
return renewed
