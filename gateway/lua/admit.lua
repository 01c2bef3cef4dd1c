-- admit.lua: check ALL of one team's limits and quotas; consume them only if every one passes.
-- One call is the whole admission (one round trip). The same script runs on Redis, on Redis
-- Cluster (every key carries the team's hash tag) and on the embedded store. Times are in
-- milliseconds since the epoch, from Redis' own clock unless a test injects one.
--
-- All or nothing: every argument, then every limit, is checked before the first write, so a
-- bad argument or a refusal leaves the store exactly as it was (Redis does not roll back).
--
-- KEYS[1] rpm bucket, KEYS[2] tpm bucket: GCRA "theoretical arrival time" (a token bucket whose
--         burst is one minute's worth), KEYS[3] leases: zset admission id -> expiry,
-- KEYS[4] usage prefix: the day and month ledger hashes are KEYS[4]..'day:YYYY-MM-DD' and
--         KEYS[4]..'month:YYYY-MM' (same hash tag; derived here because the day comes from TIME),
-- KEYS[5] the admission's record: what it reserved, 'tokens micro-$ day month', so that
--         settle.lua and a release undo exactly that. Holding 'x' (a release ran first: the
--         gateway gave this admission up), nothing is admitted or written.
-- Per request:  ARGV[1] now_ms or ''   ARGV[2] tokens reserved   ARGV[3] micro-$ reserved
--               ARGV[4] admission id
-- Per team (the same for each of its requests):
-- ARGV[5] requests_per_minute or ''   ARGV[6] tokens_per_minute or ''   ARGV[7] max_concurrent or ''
-- ARGV[8] lease (and record) ttl ms   ARGV[9] tokens_per_day or ''   ARGV[10] usd_per_month in micro-$ or ''
-- ARGV[11] day ledger ttl s           ARGV[12] month ledger ttl s
-- ARGV[13] day field counting tokens against tokens_per_day
-- ARGV[14] month field counting micro-dollars against usd_per_month
-- Returns {admitted 1|0, refused limit or '', retry_ms, now_ms, 'YYYY-MM-DD', 'YYYY-MM',
--          rpm_remaining, rpm_reset_ms, tpm_remaining, tpm_reset_ms, day_tokens,
--          month_micro, day_reset_ms, month_reset_ms}

local BIG = 1e12  -- any count or rate above this is a caller's bug; keeps every sum exact

-- ARGV[i] as a number in [lo, hi] (a whole one unless real), nil when optional and ''.
local function arg(i, lo, hi, optional, real)
  local s = ARGV[i]
  if optional and s == '' then return nil end
  local n = tonumber(s)
  if not n or n ~= n or n < lo or n > hi or (not real and n ~= math.floor(n)) then
    error('admit: ARGV[' .. i .. '] out of range: ' .. tostring(s))
  end
  return n
end

local now = arg(1, 0, 1e15, true, true)
local tokens, micro = arg(2, 0, BIG), arg(3, 0, BIG)
local rpm, tpm, max_conc = arg(5, 1, BIG, true), arg(6, 1, BIG, true), arg(7, 1, BIG, true)
local ttl, tpd, upm = arg(8, 1, BIG), arg(9, 1, BIG, true), arg(10, 0, BIG, true)
arg(11, 1, BIG)
arg(12, 1, BIG)
local id = ARGV[4]
if id == '' or ARGV[13] == '' or ARGV[14] == '' then error('admit: empty id or field name') end

if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local MINUTE, DAY, EPS, KEEP = 60000, 86400000, 0.01, 60000

-- Proleptic Gregorian date of a day number (days since 1970-01-01), by 400-year eras.
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local function month_days(y, m)
  if m == 2 then
    if (y % 4 == 0 and y % 100 ~= 0) or y % 400 == 0 then return 29 end
    return 28
  end
  if m == 4 or m == 6 or m == 9 or m == 11 then return 30 end
  return 31
end

-- GCRA: allowed?, current tat, tat after this request, retry_ms. A cost above a whole
-- minute's worth passes once the bucket is full (else it never could).
local function bucket(key, rate, cost)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + cost * MINUTE / rate
  local allow_at = new_tat - MINUTE
  if cost > rate then allow_at = tat end
  return allow_at <= now + EPS, tat, new_tat, allow_at - now
end

-- What is left in a bucket whose tat is given, and when it will be full again.
local function level(rate, tat)
  local left = math.floor((MINUTE - (tat - now)) * rate / MINUTE + EPS)
  return math.max(0, left), math.max(0, tat - now)
end

local function int(n) return string.format('%d', n) end

local refused, retry = '', -1
local function refuse(limit, ms)
  if ms > retry then refused, retry = limit, ms end
end

local day_n = math.floor(now / DAY)
local y, m, d = civil(day_n)
local date = string.format('%04d-%02d-%02d', y, m, d)
local month = string.format('%04d-%02d', y, m)
local day_key, month_key = KEYS[4] .. 'day:' .. date, KEYS[4] .. 'month:' .. month
local day_reset = (day_n + 1) * DAY - now
local month_reset = (day_n - d + 1 + month_days(y, m)) * DAY - now

if redis.call('EXISTS', KEYS[5]) == 1 then  -- released before it ran: the gateway gave it up
  return {0, 'released', 0, math.floor(now), date, month, 0, 0, 0, 0, 0, 0, 0, 0}
end

-- Quotas: in-flight reservations count, so only the request that crosses a quota overspends.
local day_tokens = tonumber(redis.call('HGET', day_key, ARGV[13])) or 0
local month_micro = tonumber(redis.call('HGET', month_key, ARGV[14])) or 0
if tpd and day_tokens >= tpd then refuse('tokens_per_day', day_reset) end
if upm and month_micro >= upm then refuse('usd_per_month', month_reset) end

local live = string.format('(%.3f', now)  -- leases still running (expired ones are dead replicas')
if max_conc and redis.call('ZCOUNT', KEYS[3], live, '+inf') >= max_conc then
  -- the earliest a slot can free: when the lease that expires first runs out (if not renewed)
  local first = redis.call('ZRANGEBYSCORE', KEYS[3], live, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  refuse('max_concurrent', math.max(1, tonumber(first[2]) - now))
end

local r_ok, r_tat, r_new, r_retry, t_ok, t_tat, t_new, t_retry
if rpm then
  r_ok, r_tat, r_new, r_retry = bucket(KEYS[1], rpm, 1)
  if not r_ok then refuse('requests_per_minute', r_retry) end
end
if tpm then
  t_ok, t_tat, t_new, t_retry = bucket(KEYS[2], tpm, tokens)
  if not t_ok then refuse('tokens_per_minute', t_retry) end
end

-- Every check passed: from here on, only writes.
local admitted = 0
if refused == '' then
  admitted, retry = 1, 0
  if rpm then
    r_tat = r_new
    redis.call('SET', KEYS[1], string.format('%.3f', r_tat), 'PX', int(math.ceil(r_tat - now) + KEEP))
  end
  if tpm then
    t_tat = t_new
    redis.call('SET', KEYS[2], string.format('%.3f', t_tat), 'PX', int(math.ceil(t_tat - now) + KEEP))
  end
  if max_conc then
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', string.format('%.3f', now))  -- dead replicas' leases
    redis.call('ZADD', KEYS[3], string.format('%.3f', now + ttl), id)
    redis.call('PEXPIRE', KEYS[3], int(ttl + KEEP))
  end
  if tokens > 0 then
    day_tokens = redis.call('HINCRBY', day_key, ARGV[13], int(tokens))
    redis.call('EXPIRE', day_key, ARGV[11])
  end
  if micro > 0 then
    month_micro = redis.call('HINCRBY', month_key, ARGV[14], int(micro))
    redis.call('EXPIRE', month_key, ARGV[12])
  end
  redis.call('SET', KEYS[5], int(tokens) .. ' ' .. int(micro) .. ' ' .. date .. ' ' .. month, 'PX', int(ttl))
end

local r_left, r_reset, t_left, t_reset = 0, 0, 0, 0
if rpm then r_left, r_reset = level(rpm, r_tat) end
if tpm then t_left, t_reset = level(tpm, t_tat) end
return {admitted, refused, math.ceil(retry), math.floor(now), date, month,
        r_left, math.ceil(r_reset), t_left, math.ceil(t_reset),
        day_tokens, month_micro, math.ceil(day_reset), math.ceil(month_reset)}
