-- admit.lua: check ALL the limits and quotas of a team and, when one is configured, of the
-- account shared by every team; consume them only if every one passes. One call is the whole
-- admission (one round trip). The same script runs on Redis, on Redis Cluster (every limits
-- key carries one hash tag, so team and account keys share a slot) and on the embedded store.
-- Times are in milliseconds since the epoch, from Redis' own clock unless a test injects one.
--
-- All or nothing: every argument, then every limit of every scope, is checked before the first
-- write, so a bad argument or a refusal (by the team or by the account) leaves the store
-- exactly as it was (Redis does not roll back).
--
-- A scope is the team (scope 1) or the account (scope 2, optional). Per scope s, keys
-- KEYS[4s-2..4s+1]: rpm bucket, tpm bucket (GCRA "theoretical arrival time": a token bucket
--   whose burst is one minute's worth), leases (zset admission id -> expiry), usage prefix (the
--   day and month ledger hashes are prefix..'day:YYYY-MM-DD' and prefix..'month:YYYY-MM';
--   derived here because the day comes from TIME).
-- KEYS[1] the admission's record: what it reserved, 'tokens micro-$ day month', so that
--   settle.lua and a release undo exactly that in every scope. Holding 'x' (a release ran
--   first: the gateway gave this admission up), nothing is admitted or written.
-- Per request:  ARGV[1] now_ms or ''   ARGV[2] tokens reserved   ARGV[3] micro-$ reserved
--               ARGV[4] admission id
-- Fixed:        ARGV[5] lease (and record) ttl ms   ARGV[6] day ledger ttl s   ARGV[7] month ledger ttl s
--               ARGV[8] field counting tokens against tokens_per_day (day hash)
--               ARGV[9] field counting micro-$ against usd_per_day and usd_per_month (day and month hashes)
-- Per scope s:  ARGV[6s+4..6s+9] requests_per_minute, tokens_per_minute, max_concurrent,
--               tokens_per_day, usd_per_day in micro-$, usd_per_month in micro-$ (each or '')
-- Returns {admitted 1|0, refused limit or '' ('account_' before the account's), retry_ms,
--          now_ms, 'YYYY-MM-DD', 'YYYY-MM', then the team's rpm_remaining, rpm_reset_ms,
--          tpm_remaining, tpm_reset_ms}

local BIG = 1e12  -- any count or rate above this is a caller's bug; keeps every sum exact
local SCOPES = {'', 'account_'}  -- how a refusal names a limit of each scope

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

local n_scopes = (#KEYS - 1) / 4
if (n_scopes ~= 1 and n_scopes ~= 2) or #ARGV ~= 9 + 6 * n_scopes then error('admit: bad key or argument count') end
local now = arg(1, 0, 1e15, true, true)
local tokens, micro = arg(2, 0, BIG), arg(3, 0, BIG)
local ttl = arg(5, 1, BIG)
arg(6, 1, BIG)
arg(7, 1, BIG)
local id = ARGV[4]
if id == '' or ARGV[8] == '' or ARGV[9] == '' then error('admit: empty id or field name') end
local scopes = {}
for s = 1, n_scopes do
  local a, k = 6 * s + 3, 4 * s - 3
  scopes[s] = {name = SCOPES[s], rpm_key = KEYS[k + 1], tpm_key = KEYS[k + 2], leases = KEYS[k + 3],
               usage = KEYS[k + 4], rpm = arg(a + 1, 1, BIG, true), tpm = arg(a + 2, 1, BIG, true),
               max_conc = arg(a + 3, 1, BIG, true), tpd = arg(a + 4, 1, BIG, true),
               upd = arg(a + 5, 0, BIG, true), upm = arg(a + 6, 0, BIG, true)}
end

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
local day_reset = (day_n + 1) * DAY - now
local month_reset = (day_n - d + 1 + month_days(y, m)) * DAY - now

if redis.call('EXISTS', KEYS[1]) == 1 then  -- released before it ran: the gateway gave it up
  return {0, 'released', 0, math.floor(now), date, month, 0, 0, 0, 0}
end

-- Every check of one scope; what it would write is kept in the scope's table.
local live = string.format('(%.3f', now)  -- leases still running (expired ones are dead replicas')
local function check(sc)
  local pre = sc.name
  sc.day_key, sc.month_key = sc.usage .. 'day:' .. date, sc.usage .. 'month:' .. month
  -- Quotas: in-flight reservations count, so only the request that crosses a quota overspends.
  if sc.tpd and (tonumber(redis.call('HGET', sc.day_key, ARGV[8])) or 0) >= sc.tpd then
    refuse(pre .. 'tokens_per_day', day_reset)
  end
  if sc.upd and (tonumber(redis.call('HGET', sc.day_key, ARGV[9])) or 0) >= sc.upd then
    refuse(pre .. 'usd_per_day', day_reset)
  end
  if sc.upm and (tonumber(redis.call('HGET', sc.month_key, ARGV[9])) or 0) >= sc.upm then
    refuse(pre .. 'usd_per_month', month_reset)
  end
  if sc.max_conc and redis.call('ZCOUNT', sc.leases, live, '+inf') >= sc.max_conc then
    -- the earliest a slot can free: when the lease that expires first runs out (if not renewed)
    local first = redis.call('ZRANGEBYSCORE', sc.leases, live, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    refuse(pre .. 'max_concurrent', math.max(1, tonumber(first[2]) - now))
  end
  local ok, r
  if sc.rpm then
    ok, sc.r_tat, sc.r_new, r = bucket(sc.rpm_key, sc.rpm, 1)
    if not ok then refuse(pre .. 'requests_per_minute', r) end
  end
  if sc.tpm then
    ok, sc.t_tat, sc.t_new, r = bucket(sc.tpm_key, sc.tpm, tokens)
    if not ok then refuse(pre .. 'tokens_per_minute', r) end
  end
end

-- Only writes: called once every check of every scope passed.
local function consume(sc)
  if sc.rpm then
    sc.r_tat = sc.r_new
    redis.call('SET', sc.rpm_key, string.format('%.3f', sc.r_tat), 'PX', int(math.ceil(sc.r_tat - now) + KEEP))
  end
  if sc.tpm then
    sc.t_tat = sc.t_new
    redis.call('SET', sc.tpm_key, string.format('%.3f', sc.t_tat), 'PX', int(math.ceil(sc.t_tat - now) + KEEP))
  end
  if sc.max_conc then
    redis.call('ZREMRANGEBYSCORE', sc.leases, '-inf', string.format('%.3f', now))  -- dead replicas' leases
    redis.call('ZADD', sc.leases, string.format('%.3f', now + ttl), id)
    redis.call('PEXPIRE', sc.leases, int(ttl + KEEP))
  end
  if tokens > 0 then
    redis.call('HINCRBY', sc.day_key, ARGV[8], int(tokens))
  end
  if micro > 0 then
    redis.call('HINCRBY', sc.day_key, ARGV[9], int(micro))
    redis.call('HINCRBY', sc.month_key, ARGV[9], int(micro))
    redis.call('EXPIRE', sc.month_key, ARGV[7])
  end
  if tokens > 0 or micro > 0 then redis.call('EXPIRE', sc.day_key, ARGV[6]) end
end

for s = 1, n_scopes do check(scopes[s]) end

local admitted = 0
if refused == '' then
  admitted, retry = 1, 0
  for s = 1, n_scopes do consume(scopes[s]) end
  redis.call('SET', KEYS[1], int(tokens) .. ' ' .. int(micro) .. ' ' .. date .. ' ' .. month, 'PX', int(ttl))
end

local team = scopes[1]
local r_left, r_reset, t_left, t_reset = 0, 0, 0, 0
if team.rpm then r_left, r_reset = level(team.rpm, team.r_tat) end
if team.tpm then t_left, t_reset = level(team.tpm, team.t_tat) end
return {admitted, refused, math.ceil(retry), math.floor(now), date, month,
        r_left, math.ceil(r_reset), t_left, math.ceil(t_reset)}
