-- usage.lua: read a team's ledger hashes (day and/or month) in one round trip.
-- All KEYS share the team's hash tag, so this is Cluster-safe. Returns one HGETALL per key.
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HGETALL', KEYS[i]) end
return out
