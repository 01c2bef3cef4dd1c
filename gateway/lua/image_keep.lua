-- A stored image's size, kept alive at least as long as a link about to be handed out.
-- KEYS[1] = gw:img:<sha256 hex>.<ext>
-- ARGV[1] = ms the image must still live from now (0: only its size, the TTL untouched)
-- Returns the image's length in bytes, 0 when it is not stored. A TTL is only ever lengthened,
-- so a link handed out earlier with a longer life never outlives its image.
local size = redis.call('STRLEN', KEYS[1])
local keep = tonumber(ARGV[1])
if size > 0 and keep > 0 then
  local left = redis.call('PTTL', KEYS[1])
  if left >= 0 and left < keep then
    redis.call('PEXPIRE', KEYS[1], keep)
  end
end
return size
