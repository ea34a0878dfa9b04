-- Shared by settle.lua and reap.lua (prepended to each by extproc.store.scripts: a Redis
-- script cannot load another), so a hold is released one way whoever releases it.
--
-- release_hold(p, rid): give back what hold `rid` of workspace prefix `p` held in each of
-- its scopes (reserve.lua stored them as "period|nanos|scope|scope...") and forget the hold.
-- Its orphan settlement, if any, is left to the caller: reap returns it, settle drops it.
local function release_hold(p, rid)
  local data_k = p .. ':resv:data'
  local d = redis.call('HGET', data_k, rid)
  if d then
    local parts = {}
    for s in string.gmatch(d, '[^|]+') do parts[#parts + 1] = s end
    -- HINCRBY refuses "-0": a zero-cost reservation (free model, empty input) holds nothing.
    if parts[2] ~= '0' then
      for i = 3, #parts do
        redis.call('HINCRBY', p .. ':held:' .. parts[1], parts[i], '-' .. parts[2])
      end
    end
    redis.call('HDEL', data_k, rid)
  end
  redis.call('ZREM', p .. ':resv', rid)
end

