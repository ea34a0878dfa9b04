-- Shared by settle.lua and reap.lua (prepended to each by extproc.store.scripts: a Redis
-- script cannot load another), so a hold is released one way whoever releases it.
--
-- A hold lives in `:resv:data` as two fields: `rid` -> "period|nanos|scope|scope..." (what
-- it holds in each scope) and `rid:o` -> its orphan, what to bill if its sidecar dies
-- (reserve.lua; metering.orphans). One HSET writes both and one HDEL drops both. Holds made
-- by earlier versions keep a serialized settlement in `rid:orphan`, or in `:resv:orphan`
-- before that: both are still read and dropped.
--
-- release_hold(p, rid, want_orphan): give back what hold `rid` of workspace prefix `p` held
-- in each of its scopes and forget the hold and its orphan. Returns the orphan settlement
-- when `want_orphan` (reap writes it; settle drops it), else nil.
local function release_hold(p, rid, want_orphan)
  local data_k = p .. ':resv:data'
  local d, orphan
  if want_orphan then
    local got = redis.call('HMGET', data_k, rid, rid .. ':o', rid .. ':orphan')
    d, orphan = got[1], got[2] or got[3]
  else
    d = redis.call('HGET', data_k, rid)
  end
  if d then
    local parts = {}
    for s in string.gmatch(d, '[^|]+') do parts[#parts + 1] = s end
    -- HINCRBY refuses "-0": a zero-cost reservation (free model, empty input) holds nothing.
    if parts[2] ~= '0' then
      local held_k = p .. ':held:' .. parts[1]
      for i = 3, #parts do
        redis.call('HINCRBY', held_k, parts[i], '-' .. parts[2])
      end
    end
  end
  -- Both fields gone: the hold carried its orphan here (the usual case, one call). Fewer:
  -- it carried none, or an older reserve.lua kept it in the legacy hash, dropped (or
  -- returned) from there.
  if redis.call('HDEL', data_k, rid, rid .. ':o', rid .. ':orphan') < 2 then
    local legacy_k = p .. ':resv:orphan'
    if want_orphan and not orphan then orphan = redis.call('HGET', legacy_k, rid) end
    redis.call('HDEL', legacy_k, rid)
  end
  redis.call('ZREM', p .. ':resv', rid)
  if orphan then return orphan end
  return nil
end

