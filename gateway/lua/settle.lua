-- settle.lua: after a request, true up what admit.lua reserved, release the leases and write
-- the usage ledger, in every scope (the team, and the account when the admission checked one),
-- in one round trip. Also the release of an admission, as if it never happened: one the
-- gateway gave up on (it never learnt whether admit.lua ran), or one it took but will not use
-- (one of an n-image request's, when a later one was refused). That undoes exactly what the
-- record says was reserved, gives back the request it took in requests_per_minute, and writes
-- no ledger row; when admit.lua has not run yet, it leaves the tombstone that makes it a no-op.
--
-- Idempotent by admission id: the first call leaves 'x' in the record, and every later call
-- (a retry of a settle whose answer was lost, a release after a settle) changes nothing.
-- Every argument is checked before the first write: all or nothing.
--
-- KEYS[1] the admission's record (see admit.lua)
-- Per scope s (1 team, 2 account; the scopes the admission was checked in), as admit.lua's:
--   KEYS[4s-2..4s+1] rpm bucket, tpm bucket, leases, usage prefix (ledger hashes
--   prefix..'day:YYYY-MM-DD' and prefix..'month:YYYY-MM')
-- Per request: ARGV[1] now_ms or ''   ARGV[2] admission id
-- ARGV[3] tokens to charge (0 for a cache hit), or '' for a release (nothing ran: no charge, no ledger)
-- ARGV[4] micro-$ to charge   ARGV[5] tokens reserved   ARGV[6] micro-$ reserved
-- ARGV[7] 'YYYY-MM-DD', ARGV[8] 'YYYY-MM': the period it was admitted in
--         (ARGV[5..8] stand when there is no record: unlimited, store down at admission,
--         or the record expired; a release passes 0 0 '' '': it knows only the record)
-- Fixed: ARGV[9] day ledger ttl s   ARGV[10] month ledger ttl s
-- ARGV[11] day field counting tokens against tokens_per_day
-- ARGV[12] day and month field counting micro-$ against usd_per_day and usd_per_month
-- ARGV[13] how long the 'x' outlives this call, ms
-- ARGV[12 + 2s], ARGV[13 + 2s] the requests_per_minute and tokens_per_minute of scope s, or ''
-- then: ledger field, increment, field, increment, ... (added to the day and the month of every scope)
-- Returns {1 applied | 0 nothing to do, then per scope: day tokens counted against the quota,
--          day micro-$ counted, month micro-$ counted}

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

local n_scopes = (#KEYS - 1) / 4
if n_scopes ~= 1 and n_scopes ~= 2 then error('settle: bad key count') end
local now = arg(1, 0, 1e15, true, true)
local charged = arg(3, 0, BIG, true)
local charged_micro, reserved, reserved_micro = arg(4, 0, BIG), arg(5, 0, BIG), arg(6, 0, BIG)
arg(9, 1, BIG)
arg(10, 1, BIG)
local marker_ttl = arg(13, 1, BIG)
local rpm, tpm = {}, {}
for s = 1, n_scopes do rpm[s], tpm[s] = arg(12 + 2 * s, 1, BIG, true), arg(13 + 2 * s, 1, BIG, true) end
local pairs_from = 14 + 2 * n_scopes
if (#ARGV - pairs_from + 1) % 2 ~= 0 then error('settle: odd ledger increments') end
for i = pairs_from + 1, #ARGV, 2 do arg(i, -BIG, BIG) end
local date, month = ARGV[7], ARGV[8]
if ARGV[2] == '' or ARGV[11] == '' or ARGV[12] == '' then error('settle: empty id or field name') end

local function int(n) return string.format('%d', n) end

local record = redis.call('GET', KEYS[1])
if record == 'x' then return {0} end  -- settled or released already
if record then  -- what admit.lua reserved, exactly
  local t, mc, dt, mo = string.match(record, '^(%d+) (%d+) (%S+) (%S+)$')
  reserved, reserved_micro, date, month = tonumber(t), tonumber(mc), dt, mo
elseif not charged then  -- a release that ran first: admit.lua, if it comes, will find the tombstone
  redis.call('SET', KEYS[1], 'x', 'PX', int(marker_ttl))
  return {0}
end
if date == '' or month == '' then error('settle: no period') end
local release = not charged
charged = charged or 0

if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local MINUTE, KEEP = 60000, 60000
local delta, delta_micro = charged - reserved, charged_micro - reserved_micro

-- A GCRA bucket moved by ``cost``: a refund moves the arrival time back (never before now), an
-- extra charge moves it forward (never refused: the work is already done).
local function move(key, rate, cost)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  tat = math.max(now, tat + cost * MINUTE / rate)
  if tat > now then
    redis.call('SET', key, string.format('%.3f', tat), 'PX', int(math.ceil(tat - now) + KEEP))
  else
    redis.call('DEL', key)
  end
end

local out = {1}
for s = 1, n_scopes do
  local k = 4 * s - 2
  local rpm_key, tpm_key, leases, usage = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  if rpm[s] and release then move(rpm_key, rpm[s], -1) end
  if tpm[s] and delta ~= 0 then move(tpm_key, tpm[s], delta) end

  redis.call('ZREM', leases, ARGV[2])

  local day_key, month_key = usage .. 'day:' .. date, usage .. 'month:' .. month
  if delta ~= 0 then redis.call('HINCRBY', day_key, ARGV[11], int(delta)) end
  if delta_micro ~= 0 then
    redis.call('HINCRBY', day_key, ARGV[12], int(delta_micro))
    redis.call('HINCRBY', month_key, ARGV[12], int(delta_micro))
  end
  for i = pairs_from, #ARGV - 1, 2 do
    local n = tonumber(ARGV[i + 1])
    if n ~= 0 then
      redis.call('HINCRBY', day_key, ARGV[i], int(n))
      redis.call('HINCRBY', month_key, ARGV[i], int(n))
    end
  end
  redis.call('EXPIRE', day_key, ARGV[9])
  redis.call('EXPIRE', month_key, ARGV[10])
  out[#out + 1] = tonumber(redis.call('HGET', day_key, ARGV[11])) or 0
  out[#out + 1] = tonumber(redis.call('HGET', day_key, ARGV[12])) or 0
  out[#out + 1] = tonumber(redis.call('HGET', month_key, ARGV[12])) or 0
end
redis.call('SET', KEYS[1], 'x', 'PX', int(marker_ttl))
return out
