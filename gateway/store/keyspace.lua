-- keyspace.lua: the embedded store's data (gateway/store/embedded.py), in the same Lua that
-- runs the gateway's scripts, so a script's redis.call never leaves Lua. Redis' strings,
-- hashes and sorted sets with key expiry, and exactly the commands the gateway uses, with
-- Redis' argument rules, replies (nil bulk -> false, status -> {ok=...}) and error messages.
-- Returns {begin, call, shape, run}: begin(now_us) freezes an operation's clock and drops
-- expired keys; call(name, ...) is redis.call; run(script, KEYS, ARGV) a script's shaped reply.

local data, kinds, expires = {}, {}, {}  -- key -> value; key -> 'string'|'hash'|'zset'; key -> ms
local heap, scheduled = {}, {}  -- min-heap of {ms, key}: each key's earliest scheduled expiry
local now_ms, now_us = 0, 0
local floor, tonumber, type, format = math.floor, tonumber, type, string.format

local WRONGTYPE = 'WRONGTYPE Operation against a key holding the wrong kind of value'
local NOT_INT = 'ERR value is not an integer or out of range'

local function fail(message) error(message, 0) end

-- an argument as the string Redis receives (a number printed as Redis prints it)
local function str(x)
  if type(x) == 'number' then
    if x == floor(x) and x > -1e15 and x < 1e15 then return format('%d', x) end
    return format('%.17g', x)
  end
  return x
end

local function int(x, message)
  local n = tonumber(x)
  if not n or n ~= floor(n) or (type(x) == 'string' and not x:match('^-?%d+$')) then fail(message or NOT_INT) end
  return n
end

-- ---- expiry -------------------------------------------------------------------------------

local function push(at, key)
  local h = heap
  local i = #h + 1
  h[i] = {at, key}
  while i > 1 do
    local parent = floor(i / 2)
    if h[parent][1] <= at then break end
    h[i], h[parent] = h[parent], h[i]
    i = parent
  end
end

local function pop()
  local h = heap
  local top, n = h[1], #h
  h[1], h[n] = h[n], nil
  n = n - 1
  local i = 1
  while true do
    local l, r, m = 2 * i, 2 * i + 1, i
    if l <= n and h[l][1] < h[m][1] then m = l end
    if r <= n and h[r][1] < h[m][1] then m = r end
    if m == i then break end
    h[i], h[m] = h[m], h[i]
    i = m
  end
  return top
end

local function schedule(key, at)
  local s = scheduled[key]
  if not s or at < s then
    scheduled[key] = at
    push(at, key)
  end
end

local function remove(key)
  local existed = data[key] ~= nil
  data[key], kinds[key], expires[key] = nil, nil, nil
  return existed
end

local function expire_at(key, at)
  if at == nil then
    expires[key] = nil
  elseif at <= now_ms then
    remove(key)
  else
    expires[key] = at
    schedule(key, at)
  end
end

local function begin(us)
  now_us, now_ms = us, floor(us / 1000)
  while heap[1] and heap[1][1] <= now_ms do
    local entry = pop()
    local at, key = entry[1], entry[2]
    if scheduled[key] == at then  -- else superseded by an earlier schedule
      scheduled[key] = nil
      local expiry = expires[key]
      if expiry and expiry <= now_ms then
        remove(key)
      elseif expiry then
        schedule(key, expiry)
      end
    end
  end
end

local function typed(key, kind)
  local k = kinds[key]
  if k and k ~= kind then fail(WRONGTYPE) end
  return data[key]
end

local C = {}

-- ---- keys ---------------------------------------------------------------------------------

function C.DEL(...)
  local n = 0
  for i = 1, select('#', ...) do
    if remove(str((select(i, ...)))) then n = n + 1 end
  end
  return n
end

function C.EXISTS(...)
  local n = 0
  for i = 1, select('#', ...) do
    if data[str((select(i, ...)))] ~= nil then n = n + 1 end
  end
  return n
end

function C.PEXPIRE(key, ms)
  key = str(key)
  if data[key] == nil then return 0 end
  expire_at(key, now_ms + int(ms))
  return 1
end

function C.EXPIRE(key, s) return C.PEXPIRE(key, int(s) * 1000) end

function C.PTTL(key)
  key = str(key)
  if data[key] == nil then return -2 end
  local at = expires[key]
  return at and at - now_ms or -1
end

function C.TIME()
  return {format('%d', floor(now_us / 1000000)), format('%d', now_us % 1000000)}
end

-- ---- strings ------------------------------------------------------------------------------

function C.GET(key)
  return typed(str(key), 'string') or false
end

function C.SET(key, value, ...)
  key, value = str(key), str(value)
  local ttl, nx, xx, n, i = nil, false, false, select('#', ...), 1
  while i <= n do
    local option = string.upper(str((select(i, ...))))
    if (option == 'PX' or option == 'EX') and i < n then
      ttl = int((select(i + 1, ...))) * (option == 'PX' and 1 or 1000)
      if ttl <= 0 then fail("ERR invalid expire time in 'set' command") end
      i = i + 1
    elseif option == 'NX' then nx = true
    elseif option == 'XX' then xx = true
    else fail('ERR syntax error') end
    i = i + 1
  end
  if (nx and data[key] ~= nil) or (xx and data[key] == nil) then return false end
  data[key], kinds[key] = value, 'string'
  expire_at(key, ttl and now_ms + ttl)
  return {ok = 'OK'}
end

function C.STRLEN(key)
  return #(typed(str(key), 'string') or '')
end

function C.GETRANGE(key, first, last)
  local value = typed(str(key), 'string') or ''
  local n = #value
  first, last = int(first), int(last)
  if first < 0 then first = first + n end
  if last < 0 then last = last + n end
  if first < 0 then first = 0 end
  if last >= n then last = n - 1 end
  if first > last then return '' end
  return value:sub(first + 1, last + 1)
end

-- ---- hashes -------------------------------------------------------------------------------

-- a hash: {v = field -> value, fields = its fields in order of arrival, as HGETALL lists them}
function C.HGET(key, field)
  local h = typed(str(key), 'hash')
  return h and h.v[str(field)] or false
end

function C.HGETALL(key)
  local out, h = {}, typed(str(key), 'hash')
  for _, field in ipairs(h and h.fields or {}) do
    out[#out + 1] = field
    out[#out + 1] = h.v[field]
  end
  return out
end

function C.HINCRBY(key, field, by)
  key, field = str(key), str(field)
  local h = typed(key, 'hash')
  if not h then
    h = {v = {}, fields = {}}
    data[key], kinds[key] = h, 'hash'
  end
  local old = h.v[field]
  local n = int(old or '0', 'ERR hash value is not an integer') + int(by)
  if not old then h.fields[#h.fields + 1] = field end
  h.v[field] = format('%d', n)
  return n
end

-- ---- sorted sets: {scores = member -> score, s = sorted scores, m = their members} ----------

local function before(s1, m1, s2, m2) return s1 < s2 or (s1 == s2 and m1 < m2) end

local function position(z, score, member)  -- first index not before (score, member)
  local lo, hi = 1, #z.s + 1
  while lo < hi do
    local mid = floor((lo + hi) / 2)
    if before(z.s[mid], z.m[mid], score, member) then lo = mid + 1 else hi = mid end
  end
  return lo
end

local function zremove(z, member)
  local old = z.scores[member]
  if old == nil then return false end
  local i = position(z, old, member)
  table.remove(z.s, i)
  table.remove(z.m, i)
  z.scores[member] = nil
  return true
end

local function score_of(x)
  local n = tonumber(x)
  if not n or n ~= n then fail('ERR value is not a valid float') end
  return n
end

local function bound(x)  -- a ZCOUNT / ZRANGEBYSCORE bound: score, exclusive
  x = str(x)
  local open = x:sub(1, 1) == '('
  local n = tonumber(open and x:sub(2) or x)
  if not n or n ~= n then fail('ERR min or max is not a float') end
  return n, open
end

local function span(z, lo, hi)  -- indexes i..j of the scores within Redis' bounds lo and hi
  local low, low_open = bound(lo)
  local high, high_open = bound(hi)
  local s, a, b = z.s, 1, #z.s + 1
  while a < b do  -- first score above low (or at it, unless open)
    local mid = floor((a + b) / 2)
    if s[mid] < low or (low_open and s[mid] == low) then a = mid + 1 else b = mid end
  end
  local i, c, d = a, a, #s + 1
  while c < d do  -- first score above high (or at it, when open)
    local mid = floor((c + d) / 2)
    if s[mid] < high or (not high_open and s[mid] == high) then c = mid + 1 else d = mid end
  end
  return i, c - 1
end

local function zset(key, create)
  local z = typed(key, 'zset')
  if not z and create then
    z = {scores = {}, s = {}, m = {}}
    data[key], kinds[key] = z, 'zset'
  end
  return z
end

local function drop_if_empty(key, z)
  if #z.s == 0 then remove(key) end
end

function C.ZADD(key, ...)
  key = str(key)
  local args, flags = {...}, {}
  while args[1] and ({XX = 1, NX = 1, CH = 1})[string.upper(str(args[1]))] do
    flags[string.upper(str(table.remove(args, 1)))] = true
  end
  if #args == 0 or #args % 2 == 1 then fail('ERR syntax error') end
  for i = 1, #args, 2 do args[i] = score_of(args[i]) end
  local z = zset(key, not flags.XX)
  if not z then return 0 end
  local count = 0
  for i = 1, #args, 2 do
    local score, member = args[i], str(args[i + 1])
    local old = z.scores[member]
    if not ((old == nil and flags.XX) or (old ~= nil and flags.NX)) and old ~= score then
      if old ~= nil then zremove(z, member) end
      local at = position(z, score, member)
      table.insert(z.s, at, score)
      table.insert(z.m, at, member)
      z.scores[member] = score
      if old == nil or flags.CH then count = count + 1 end
    end
  end
  drop_if_empty(key, z)
  return count
end

function C.ZREM(key, ...)
  key = str(key)
  local z = zset(key)
  if not z then return 0 end
  local n = 0
  for i = 1, select('#', ...) do
    if zremove(z, str((select(i, ...)))) then n = n + 1 end
  end
  drop_if_empty(key, z)
  return n
end

function C.ZCARD(key)
  local z = zset(str(key))
  return z and #z.s or 0
end

function C.ZCOUNT(key, lo, hi)
  local z = zset(str(key))
  if not z then return 0 end
  local i, j = span(z, lo, hi)
  return j >= i and j - i + 1 or 0
end

function C.ZRANGE(key, first, last)
  local z = zset(str(key))
  if not z then return {} end
  local n = #z.s
  first, last = int(first), int(last)
  if first < 0 then first = first + n end
  if last < 0 then last = last + n end
  if first < 0 then first = 0 end
  local out = {}
  for i = first + 1, math.min(last + 1, n) do out[#out + 1] = z.m[i] end
  return out
end

function C.ZRANGEBYSCORE(key, lo, hi, ...)
  local scores, offset, count, options = false, 0, -1, {...}
  for i = 1, #options do
    local option = string.upper(str(options[i]))
    if option == 'WITHSCORES' then scores = true end
    if option == 'LIMIT' then offset, count = int(options[i + 1]), int(options[i + 2]) end
  end
  local z = zset(str(key))
  if not z then return {} end
  local i, j = span(z, lo, hi)
  i = i + offset
  if count >= 0 and i + count - 1 < j then j = i + count - 1 end
  local out = {}
  for k = i, j do
    out[#out + 1] = z.m[k]
    if scores then out[#out + 1] = str(z.s[k]) end
  end
  return out
end

function C.ZREMRANGEBYSCORE(key, lo, hi)
  key = str(key)
  local z = zset(key)
  if not z then return 0 end
  local i, j = span(z, lo, hi)
  for k = j, i, -1 do
    z.scores[z.m[k]] = nil
    table.remove(z.s, k)
    table.remove(z.m, k)
  end
  drop_if_empty(key, z)
  return j >= i and j - i + 1 or 0
end

-- KEYS: a glob as Lua pattern (* ? and [...]; the gateway's patterns need no more)
function C.KEYS(pattern)
  local lua = '^' .. str(pattern):gsub('[%^%$%(%)%%%.%+%-]', '%%%0'):gsub('%*', '.*'):gsub('%?', '.') .. '$'
  local out = {}
  for key in pairs(data) do
    if key:match(lua) then out[#out + 1] = key end
  end
  return out
end

local function call(name, ...)
  local command = C[name] or C[string.upper(str(name))]
  if not command then fail("ERR unknown command '" .. str(name) .. "'") end
  return command(...)
end

-- A reply shaped for Python in one crossing: 0, a value | 1, an array's items (up to its first
-- nil, as Redis reads a table) | 2, an error | 3, a status | 4, a long array, left as a table.
local function shape(r)
  if type(r) ~= 'table' then return 0, r end
  if r.err ~= nil then return 2, r.err end
  if r.ok ~= nil then return 3, r.ok end
  local n = 0
  while r[n + 1] ~= nil do n = n + 1 end
  if n > 200 then return 4, r end  -- unpack's results are bounded by Lua's C stack
  return 1, unpack(r, 1, n)
end

local function run(fn, keys, argv) return shape(fn(keys, argv)) end

return {begin = begin, call = call, shape = shape, run = run}
