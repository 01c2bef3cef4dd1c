-- Release a cache single-flight lock only if it is still ours.
-- KEYS[1] = gw:cache:{<hex>}:lock, ARGV[1] = the leader's random token.
-- A leader whose lock expired (and was taken by another request) must not delete the new
-- holder's lock, so the check and the delete are one atomic step.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
