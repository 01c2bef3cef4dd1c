-- admit.lua: check ALL of one team's limits and quotas; consume them only if every one passes.
-- One call is the whole admission (one round trip). The same script runs on Redis, on Redis
-- Cluster (every key carries the team's hash tag) and on the embedded store. Times are in
-- milliseconds since the epoch, from Redis' own clock unless a test injects one.
--
-- KEYS[1] rpm bucket, KEYS[2] tpm bucket: GCRA "theoretical arrival time" (a token bucket whose
--         burst is one minute's worth), KEYS[3] leases: zset lease id -> expiry,
-- KEYS[4] usage prefix: the day and month ledger hashes are KEYS[4]..'day:YYYY-MM-DD' and
--         KEYS[4]..'month:YYYY-MM' (same hash tag; derived here because the day comes from TIME).
-- Per request:  ARGV[1] now_ms or ''   ARGV[2] tokens reserved   ARGV[3] lease id
-- Per team (the same for each of its requests):
-- ARGV[4] requests_per_minute or ''   ARGV[5] tokens_per_minute or ''   ARGV[6] max_concurrent or ''
-- ARGV[7] lease ttl ms      ARGV[8] tokens_per_day or ''        ARGV[9] usd_per_month in micro-$ or ''
-- ARGV[10] day ledger ttl s ARGV[11] day field counting tokens against the quota
-- ARGV[12] month field holding micro-dollars spent
-- Returns {admitted 1|0, refused limit or '', retry_ms, now_ms, 'YYYY-MM-DD', 'YYYY-MM',
--          rpm_remaining, rpm_reset_ms, tpm_remaining, tpm_reset_ms, day_tokens,
--          month_cost_micro, day_reset_ms, month_reset_ms}

local now = tonumber(ARGV[1])
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

local tpd, upm = tonumber(ARGV[8]), tonumber(ARGV[9])
local day_tokens = tonumber(redis.call('HGET', day_key, ARGV[11])) or 0
local month_cost = tonumber(redis.call('HGET', month_key, ARGV[12])) or 0
if tpd and day_tokens >= tpd then refuse('tokens_per_day', day_reset) end
if upm and month_cost >= upm then refuse('usd_per_month', month_reset) end

local max_conc = tonumber(ARGV[6])
if max_conc then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= max_conc then
    local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    refuse('max_concurrent', math.max(1, math.min(1000, tonumber(first[2]) - now)))
  end
end

local tokens = tonumber(ARGV[2])
local rpm, tpm = tonumber(ARGV[4]), tonumber(ARGV[5])
local r_ok, r_tat, r_new, r_retry, t_ok, t_tat, t_new, t_retry
if rpm then
  r_ok, r_tat, r_new, r_retry = bucket(KEYS[1], rpm, 1)
  if not r_ok then refuse('requests_per_minute', r_retry) end
end
if tpm then
  t_ok, t_tat, t_new, t_retry = bucket(KEYS[2], tpm, tokens)
  if not t_ok then refuse('tokens_per_minute', t_retry) end
end

local admitted = 0
if refused == '' then
  admitted, retry = 1, 0
  if rpm then
    r_tat = r_new
    redis.call('SET', KEYS[1], string.format('%.3f', r_tat), 'PX', math.ceil(r_tat - now) + KEEP)
  end
  if tpm then
    t_tat = t_new
    redis.call('SET', KEYS[2], string.format('%.3f', t_tat), 'PX', math.ceil(t_tat - now) + KEEP)
  end
  if max_conc then
    local ttl = tonumber(ARGV[7])
    redis.call('ZADD', KEYS[3], now + ttl, ARGV[3])
    redis.call('PEXPIRE', KEYS[3], math.ceil(ttl) + KEEP)
  end
  if tokens > 0 then
    day_tokens = redis.call('HINCRBY', day_key, ARGV[11], tokens)
    redis.call('EXPIRE', day_key, ARGV[10])
  end
end

local r_left, r_reset, t_left, t_reset = 0, 0, 0, 0
if rpm then r_left, r_reset = level(rpm, r_tat) end
if tpm then t_left, t_reset = level(tpm, t_tat) end
return {admitted, refused, math.ceil(retry), math.floor(now), date, month,
        r_left, math.ceil(r_reset), t_left, math.ceil(t_reset),
        day_tokens, month_cost, math.ceil(day_reset), math.ceil(month_reset)}
