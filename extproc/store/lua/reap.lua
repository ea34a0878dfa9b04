-- Reap holds whose sidecar never settled them: it was killed, lost its Redis connection for
-- longer than the hold lives, or hung. Any replica runs this for every workspace.
--
-- A live sidecar keeps renewing the expiry of the holds it still owns (Budgets.renew), so an
-- expired hold means nobody will settle it. Each one is released, and the estimated
-- settlement the sidecar stored with it at reservation time (reserve.lua's orphan argument)
-- is returned for the caller to write through the ledger, like any other settlement: its
-- request id makes the write idempotent, and a settlement arriving later for the same
-- request is refused as a duplicate.
--
-- KEYS[1]  the workspace's key prefix, e.g. "{ws:dev}"
-- ARGV     now_ms, limit (holds reaped per call)
--
-- Returns  {orphan_settlement, ...}: one per reaped hold that carried one
local p = KEYS[1]
local now, limit = ARGV[1], tonumber(ARGV[2])
local out = {}
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', p .. ':resv', '-inf', now, 'LIMIT', 0, limit)) do
  local orphan = release_hold(p, rid, true)  -- release.lua
  if orphan then out[#out + 1] = orphan end
end
return out
