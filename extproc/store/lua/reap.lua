-- Reap holds and leases whose sidecar never settled them: it was killed, lost its Redis
-- connection for longer than they live, or hung. Any replica runs this for every workspace.
--
-- A live sidecar keeps renewing the expiry of the holds and leases it still owns
-- (Budgets.renew), so an expired one means nobody will settle it. Each one is released, and
-- what is owed for the requests it admitted is returned for the caller to write through the
-- ledger, like any other settlement: its request id makes the write idempotent, and a
-- settlement arriving later for the same request is refused as a duplicate.
--
-- * A hold (reserve.lua) gives back what it held and returns the orphan stored with it.
-- * A lease (lease.lua, in `:leases:exp`) gives back what it still holds and returns the
--   compact orphan of every request admitted under it whose settlement never landed.
--
-- KEYS[1]  the workspace's key prefix, e.g. "{ws:dev}"
-- ARGV     now_ms, limit (holds, and leases, reaped per call)
--
-- Returns  {orphan, ...}: serialized settlements (older holds) or compact orphans, in any
--          order
local p = KEYS[1]
local now, limit = ARGV[1], tonumber(ARGV[2])
local out = {}
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', p .. ':resv', '-inf', now, 'LIMIT', 0, limit)) do
  local orphan = release_hold(p, rid, true)  -- release.lua
  if orphan then out[#out + 1] = orphan end
end
local leases_k, data_k = p .. ':leases', p .. ':resv:data'
local expiry_k = p .. ':leases:exp'
for _, id in ipairs(redis.call('ZRANGEBYSCORE', expiry_k, '-inf', now, 'LIMIT', 0, limit)) do
  local left = redis.call('HGET', leases_k, id)
  local shape = redis.call('HGET', data_k, id)
  if left and shape and left ~= '0' then
    local parts = {}
    for s in string.gmatch(shape, '[^|]+') do parts[#parts + 1] = s end
    local held_k = p .. ':held:' .. parts[1]
    for k = 3, #parts do redis.call('HINCRBY', held_k, parts[k], '-' .. left) end
  end
  local orphans_k = p .. ':orphans:' .. id
  for _, orphan in ipairs(redis.call('HVALS', orphans_k)) do out[#out + 1] = orphan end
  redis.call('DEL', orphans_k)
  redis.call('HDEL', leases_k, id)
  redis.call('HDEL', data_k, id)
  redis.call('ZREM', expiry_k, id)
end
return out
