-- Budget leases: a slice of every capped scope's room that one replica admits requests
-- against on its own, for one caller (a key, with its workspace, team and service), so a
-- busy caller's requests need no script call before they are forwarded (governance.lease).
--
-- A lease is a hold, like reserve.lua's: while it lives, `held` carries what it still holds
-- in each of its capped scopes, so every other grant and hold is checked against it. It is in
-- `:leases:exp` with an expiry its replica renews (not in `:resv`: replicas from before leases
-- reap that, and must never find a lease there), its shape "period|granted|scope|scope..." is
-- in `:resv:data` under its id (ids start with 'L'), and `:leases` has what it still holds.
-- settle.lua moves each settled request's actual cost out of it; reap.lua gives back the
-- rest of a lease whose replica went silent and returns the compact orphans its requests
-- left in `:orphans:<id>`, to be billed.
--
-- KEYS[1]  the workspace's key prefix, e.g. "{ws:dev}"
-- ARGV[1]  'grant', 'refresh' or 'return'
--
-- grant    now_ms, lease_id, want_nanos, least_nanos, share, ttl_ms, period_id, key_id,
--          valid_ms, n, (scope, hard_cap_nanos or -1) * n,
--          nr, (scope, rpm or -1, tpm or -1) * nr, want_requests, tokens_per_request
--   Takes min(want, room / share) where room is the least of cap - spent - held over the
--   capped scopes (cap: hard limit plus live top-ups, as the caller gives it: top-ups are
--   added in Python, governance.budget.with_topups); below `least` there is no
--   lease and the caller holds each request exactly (reserve.lua). Rate limits: a chunk of
--   the minute's requests and tokens is counted now, at most (limit - used) / share of each.
--   {'ok', amount, valid_ms, requests, tokens, minute, spent_1, held_1, ...}
--   {'exact', why}, {'revoked'}
--
-- refresh  now_ms, lease_id, key_id, period_id, valid_ms, share, n, (scope, cap) * n,
--          nr, (scope, rpm, tpm) * nr, want_requests (0: keep the chunk), tokens_per_request
--   A live lease may go on for valid_ms more (the caller shortens it to the end of the
--   first top-up its caps count) while spent + held is within every cap now: a lowered
--   cap closes it.
--   {'ok', valid_ms, requests, tokens, minute, spent_1, held_1, ...}
--   {'over', scope}, {'gone'}, {'revoked'}
--
-- return   lease_id, now_ms, minute, nr, (scope, unused_requests, unused_tokens) * nr
--   Gives back what the lease still holds, and the unused part of its rate chunk if its
--   minute is still the current one. Refused ({'busy'}) while orphans of it remain: a
--   request whose settlement has not landed must stay billable by the reaper.
--   {'ok', nanos_given_back}, {'busy'}, {'gone'}
local p = KEYS[1]
local mode = ARGV[1]
local leases_k, data_k = p .. ':leases', p .. ':resv:data'

local function standings(period, scopes, n)
  local spent = redis.call('HMGET', p .. ':spent:' .. period, unpack(scopes))
  local held = redis.call('HMGET', p .. ':held:' .. period, unpack(scopes))
  return spent, held
end

local function read_caps(i)
  -- Reads n and n (scope, cap) pairs from ARGV[i]; returns the scopes, caps, n, next index.
  local n = ARGV[i] + 0
  local scopes, caps = {}, {}
  i = i + 1
  for j = 1, n do
    scopes[j], caps[j] = ARGV[i], ARGV[i + 1] + 0
    i = i + 2
  end
  return scopes, caps, n, i
end

local function with_standings(out, spent, held, n)
  for j = 1, n do
    out[#out + 1] = spent[j] or '0'
    out[#out + 1] = held[j] or '0'
  end
  return out
end

local function rate_chunk(now, i, share)
  -- Reads nr rate scopes from ARGV[i]; returns chunk_r, chunk_t, minute key, the scopes, and
  -- the index after them. A chunk of 0 means no room for one more request.
  local nr = ARGV[i] + 0
  i = i + 1
  local minute = math.floor(now / 60000)
  local rl_k = p .. ':rl:' .. minute
  local scopes, limits = {}, {}
  for j = 1, nr do
    scopes[j] = ARGV[i]
    limits[j] = {ARGV[i + 1] + 0, ARGV[i + 2] + 0}
    i = i + 3
  end
  local want_r, per_t = ARGV[i] + 0, ARGV[i + 1] + 0
  local chunk_r, chunk_t = want_r, want_r * per_t
  for j = 1, nr do
    local rpm, tpm = limits[j][1], limits[j][2]
    if rpm >= 0 then
      local used = (redis.call('HGET', rl_k, scopes[j] .. ':r') or 0) + 0
      chunk_r = math.min(chunk_r, math.floor((rpm - used) / share))
    end
    if tpm >= 0 then
      local used = (redis.call('HGET', rl_k, scopes[j] .. ':t') or 0) + 0
      chunk_t = math.min(chunk_t, math.floor((tpm - used) / share))
    end
  end
  -- Tokens come in whole requests' worth; both must allow at least one.
  if per_t > 0 then chunk_r = math.min(chunk_r, math.floor(chunk_t / per_t)) end
  if chunk_r < 1 then return 0, 0, minute, scopes, rl_k end
  chunk_t = chunk_r * per_t
  for j = 1, nr do
    if redis.call('HINCRBY', rl_k, scopes[j] .. ':r', chunk_r) == chunk_r and j == 1 then
      redis.call('PEXPIRE', rl_k, 120000)
    end
    redis.call('HINCRBY', rl_k, scopes[j] .. ':t', string.format('%d', chunk_t))
  end
  return chunk_r, chunk_t, minute, scopes, rl_k
end

if mode == 'grant' then
  local now, id, want, least = ARGV[2] + 0, ARGV[3], ARGV[4] + 0, ARGV[5] + 0
  local share, ttl, period, key_id, valid_ms = ARGV[6] + 0, ARGV[7] + 0, ARGV[8], ARGV[9], ARGV[10] + 0
  if key_id ~= '' and redis.call('SISMEMBER', p .. ':revoked', key_id) == 1 then
    return {'revoked'}
  end
  local scopes, caps, n, i = read_caps(11)
  if n == 0 then return {'exact', 'uncapped'} end
  local spent, held = standings(period, scopes, n)
  local room = nil
  for j = 1, n do
    if caps[j] >= 0 then
      local left = caps[j] - (spent[j] or 0) - (held[j] or 0)
      if room == nil or left < room then room = left end
    end
  end
  local amount = want
  if room ~= nil then amount = math.min(want, math.floor(room / share)) end
  if amount < least then return {'exact', 'room'} end
  local chunk_r, chunk_t, minute = rate_chunk(now, i, share)
  if chunk_r < 1 then return {'exact', 'rate'} end
  local text = string.format('%d', amount)
  local held_k = p .. ':held:' .. period
  for j = 1, n do redis.call('HINCRBY', held_k, scopes[j], text) end
  redis.call('ZADD', p .. ':leases:exp', now + ttl, id)
  redis.call('HSET', data_k, id, period .. '|' .. text .. '|' .. table.concat(scopes, '|'))
  redis.call('HSET', leases_k, id, text)
  return with_standings({'ok', text, tostring(valid_ms), tostring(chunk_r),
    string.format('%d', chunk_t), tostring(minute)}, spent, held, n)
end

if mode == 'refresh' then
  local now, id, key_id, period, valid_ms = ARGV[2] + 0, ARGV[3], ARGV[4], ARGV[5], ARGV[6] + 0
  local share = ARGV[7] + 0
  if not redis.call('HGET', leases_k, id) then return {'gone'} end
  if key_id ~= '' and redis.call('SISMEMBER', p .. ':revoked', key_id) == 1 then
    return {'revoked'}
  end
  local scopes, caps, n, i = read_caps(8)
  local spent, held = standings(period, scopes, n)
  for j = 1, n do
    if caps[j] >= 0 and (spent[j] or 0) + (held[j] or 0) > caps[j] then
      return {'over', scopes[j]}
    end
  end
  local chunk_r, chunk_t, minute = 0, 0, math.floor(now / 60000)
  if ARGV[i + 1 + 3 * (ARGV[i] + 0)] + 0 > 0 then
    chunk_r, chunk_t, minute = rate_chunk(now, i, share)
  end
  return with_standings({'ok', tostring(valid_ms), tostring(chunk_r),
    string.format('%d', chunk_t), tostring(minute)}, spent, held, n)
end

if mode == 'return' then
  local id, now, minute = ARGV[2], ARGV[3] + 0, ARGV[4] + 0
  local left = redis.call('HGET', leases_k, id)
  if not left then return {'gone'} end
  if redis.call('EXISTS', p .. ':orphans:' .. id) == 1 then return {'busy'} end
  local shape = redis.call('HGET', data_k, id)
  if shape and left ~= '0' then
    local parts = {}
    for s in string.gmatch(shape, '[^|]+') do parts[#parts + 1] = s end
    local held_k = p .. ':held:' .. parts[1]
    for k = 3, #parts do redis.call('HINCRBY', held_k, parts[k], '-' .. left) end
  end
  redis.call('HDEL', leases_k, id)
  redis.call('HDEL', data_k, id)
  redis.call('ZREM', p .. ':leases:exp', id)
  -- The rate chunk's unused part goes back to its minute, if that minute is not over.
  local nr = ARGV[5] + 0
  if nr > 0 and minute == math.floor(now / 60000) then
    local rl_k = p .. ':rl:' .. minute
    for j = 0, nr - 1 do
      local scope, r, t = ARGV[6 + 3 * j], ARGV[7 + 3 * j], ARGV[8 + 3 * j]
      if r ~= '0' then redis.call('HINCRBY', rl_k, scope .. ':r', '-' .. r) end
      if t ~= '0' then redis.call('HINCRBY', rl_k, scope .. ':t', '-' .. t) end
    end
  end
  return {'ok', left}
end

return redis.error_reply('ERR lease: unknown mode ' .. tostring(mode))
