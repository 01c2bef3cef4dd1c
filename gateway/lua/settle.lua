-- settle.lua: after a request, true up what admit.lua reserved, release the lease and write
-- the usage ledger, in one round trip. Also the release of an admission the gateway gave up
-- on (it never learnt whether admit.lua ran): that undoes exactly what the record says was
-- reserved, and when admit.lua has not run yet, leaves the tombstone that makes it a no-op.
--
-- Idempotent by admission id: the first call leaves 'x' in the record, and every later call
-- (a retry of a settle whose answer was lost, a release after a settle) changes nothing.
-- Every argument is checked before the first write: all or nothing.
--
-- KEYS[1] tpm bucket   KEYS[2] leases   KEYS[3] the admission's record (see admit.lua)
-- KEYS[4] usage prefix: the ledger hashes are KEYS[4]..'day:YYYY-MM-DD' and KEYS[4]..'month:YYYY-MM'
-- Per request: ARGV[1] now_ms or ''   ARGV[2] admission id
-- ARGV[3] tokens to charge (0 for a cache hit), or '' for a release (nothing ran: no charge, no ledger)
-- ARGV[4] micro-$ to charge   ARGV[5] tokens reserved   ARGV[6] micro-$ reserved
-- ARGV[7] 'YYYY-MM-DD', ARGV[8] 'YYYY-MM': the period it was admitted in
--         (ARGV[5..8] stand when there is no record: unlimited team, store down at admission,
--         or the record expired; a release passes 0 0 '' '': it knows only the record)
-- Per team: ARGV[9] tokens_per_minute or ''   ARGV[10] day ledger ttl s   ARGV[11] month ledger ttl s
-- ARGV[12] day field counting tokens against the quota   ARGV[13] month field counting micro-$
-- ARGV[14] how long the 'x' outlives this call, ms
-- ARGV[15..] ledger field, increment, field, increment, ... (added to the day and the month)
-- Returns {1 applied | 0 nothing to do, day tokens counted against the quota, month micro-$ counted}

local BIG = 1e12

local function arg(i, lo, hi, optional, real)
  local s = ARGV[i]
  if optional and s == '' then return nil end
  local n = tonumber(s)
  if not n or n ~= n or n < lo or n > hi or (not real and n ~= math.floor(n)) then
    error('settle: ARGV[' .. i .. '] out of range: ' .. tostring(s))
  end
  return n
end

local now = arg(1, 0, 1e15, true, true)
local charged = arg(3, 0, BIG, true)
local charged_micro, reserved, reserved_micro = arg(4, 0, BIG), arg(5, 0, BIG), arg(6, 0, BIG)
local tpm = arg(9, 1, BIG, true)
arg(10, 1, BIG)
arg(11, 1, BIG)
local marker_ttl = arg(14, 1, BIG)
for i = 16, #ARGV, 2 do arg(i, -BIG, BIG) end
local date, month = ARGV[7], ARGV[8]
if ARGV[2] == '' or ARGV[12] == '' or ARGV[13] == '' then error('settle: empty id or field name') end

local function int(n) return string.format('%d', n) end

local record = redis.call('GET', KEYS[3])
if record == 'x' then return {0, 0, 0} end  -- settled or released already
if record then  -- what admit.lua reserved, exactly
  local t, mc, dt, mo = string.match(record, '^(%d+) (%d+) (%S+) (%S+)$')
  reserved, reserved_micro, date, month = tonumber(t), tonumber(mc), dt, mo
elseif not charged then  -- a release that ran first: admit.lua, if it comes, will find the tombstone
  redis.call('SET', KEYS[3], 'x', 'PX', int(marker_ttl))
  return {0, 0, 0}
end
if date == '' or month == '' then error('settle: no period') end
charged = charged or 0

if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local MINUTE, KEEP = 60000, 60000
local delta, delta_micro = charged - reserved, charged_micro - reserved_micro

-- The token bucket: a refund moves the arrival time back (never before now), an extra
-- charge moves it forward (never refused: the work is already done).
if tpm and delta ~= 0 then
  local tat = tonumber(redis.call('GET', KEYS[1])) or now
  if tat < now then tat = now end
  tat = math.max(now, tat + delta * MINUTE / tpm)
  if tat > now then
    redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', int(math.ceil(tat - now) + KEEP))
  else
    redis.call('DEL', KEYS[1])
  end
end

redis.call('ZREM', KEYS[2], ARGV[2])

local day_key, month_key = KEYS[4] .. 'day:' .. date, KEYS[4] .. 'month:' .. month
if delta ~= 0 then redis.call('HINCRBY', day_key, ARGV[12], int(delta)) end
if delta_micro ~= 0 then redis.call('HINCRBY', month_key, ARGV[13], int(delta_micro)) end
for i = 15, #ARGV - 1, 2 do
  local n = tonumber(ARGV[i + 1])
  if n ~= 0 then
    redis.call('HINCRBY', day_key, ARGV[i], int(n))
    redis.call('HINCRBY', month_key, ARGV[i], int(n))
  end
end
redis.call('EXPIRE', day_key, ARGV[10])
redis.call('EXPIRE', month_key, ARGV[11])
redis.call('SET', KEYS[3], 'x', 'PX', int(marker_ttl))

return {1, tonumber(redis.call('HGET', day_key, ARGV[12])) or 0,
        tonumber(redis.call('HGET', month_key, ARGV[13])) or 0}
