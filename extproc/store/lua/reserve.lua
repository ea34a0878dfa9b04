-- Reserve the worst-case cost of one request against every budget scope that applies,
-- and count it against its rate limits: atomically, in one round trip.
--
-- KEYS[1]  the workspace's key prefix, e.g. "{ws:dev}": every key below shares its hash
--          slot, so the script runs on one Redis Cluster node.
-- ARGV     now_ms, reservation_id, amount_nanos, ttl_ms, tokens, key_id, period_id,
--          n_scopes, (scope, hard_cap_nanos or -1) * n_scopes,
--          n_rates, (scope, rpm or -1, tpm or -1) * n_rates,
--          session_id ("" for none; at most schema.SESSION_ID_MAX characters),
--          session_input_tokens, orphan
--          (what to bill if the hold expires unsettled, metering.orphans; "" for none)
--
-- Returns  {"ok", spent_1, held_1, ..., spent_n, held_n, session_total}
--          (spent/held before this reservation; session_total: the session's input tokens
--          including this request, "0" without a session)
--          {"revoked"}
--          {"rate", scope, "rpm"|"tpm", retry_after_ms, limit, used}
--          {"budget", scope, spent, held, first_denial ("1"/"0")}
--
-- Amounts stay strings when stored or returned: Lua 5.1 prints large numbers in exponent
-- form, and money must never round.
--
-- Numbers: `s + 0` turns a numeric string into a number with one strtod; tonumber(s) costs
-- two (Lua 5.1 checks, then converts), and a request makes a score of conversions.
local p = KEYS[1]
local now = ARGV[1] + 0
local id, amount, ttl, tokens = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key_id, period = ARGV[6], ARGV[7]
local resv_k, data_k = p .. ':resv', p .. ':resv:data'
-- Holds whose sidecar never settled them (killed, hung) are not reclaimed here but by
-- reap.lua, which any replica runs: it also writes each one's estimated usage record.
local spent_k, held_k = p .. ':spent:' .. period, p .. ':held:' .. period

if key_id ~= '' and redis.call('SISMEMBER', p .. ':revoked', key_id) == 1 then
  return {'revoked'}
end

local i = 8
local n = ARGV[i] + 0; i = i + 1
local scopes, caps = {}, {}
for j = 1, n do
  scopes[j] = ARGV[i]; caps[j] = ARGV[i + 1] + 0; i = i + 2
end
local nr = ARGV[i] + 0; i = i + 1
local minute = math.floor(now / 60000)
local rl_k = nr > 0 and p .. ':rl:' .. minute
local rates = {}
for j = 1, nr do
  -- A limit of "-1" is no limit.
  local s, rpm, tpm = ARGV[i], ARGV[i + 1], ARGV[i + 2]; i = i + 3
  rates[j] = s
  if rpm ~= '-1' then
    local used = (redis.call('HGET', rl_k, s .. ':r') or 0) + 0
    if used + 1 > rpm + 0 then
      return {'rate', s, 'rpm', tostring((minute + 1) * 60000 - now), rpm, tostring(used)}
    end
  end
  if tpm ~= '-1' then
    local used = (redis.call('HGET', rl_k, s .. ':t') or 0) + 0
    if used + tokens > tpm + 0 then
      return {'rate', s, 'tpm', tostring((minute + 1) * 60000 - now), tpm, tostring(used)}
    end
  end
end

local session, session_tokens, orphan = ARGV[i], ARGV[i + 1], ARGV[i + 2]

local out = {'ok'}
local amt = amount + 0
if n > 0 then
  -- One HMGET per hash for every scope: each redis.call costs more than its command.
  local spent_all = redis.call('HMGET', spent_k, unpack(scopes))
  local held_all = redis.call('HMGET', held_k, unpack(scopes))
  for j = 1, n do
    local spent, held = spent_all[j] or '0', held_all[j] or '0'
    if caps[j] >= 0 and spent + held + amt > caps[j] then
      local first = redis.call('SET', p .. ':alerted:' .. period .. ':' .. scopes[j] .. ':hard',
        '1', 'NX', 'EX', 3456000)
      return {'budget', scopes[j], spent, held, first and '1' or '0'}
    end
    out[#out + 1] = spent
    out[#out + 1] = held
  end
end

for j = 1, n do redis.call('HINCRBY', held_k, scopes[j], amount) end
redis.call('ZADD', resv_k, now + ttl, id)
-- The hold and its orphan in one hash, one write (release.lua reads them back). The orphan's
-- field is `<id>:o`: replicas from before compact orphans read `<id>:orphan` as a serialized
-- settlement, and during a rolling upgrade they must not find a compact one there.
local hold = period .. '|' .. amount .. '|' .. table.concat(scopes, '|')
if orphan ~= nil and orphan ~= '' then
  redis.call('HSET', data_k, id, hold, id .. ':o', orphan)
else
  redis.call('HSET', data_k, id, hold)
end
for j = 1, nr do
  -- The minute's hash is new when its first counter is: only then does it need an expiry
  -- (it is read during its own minute only, so 2 minutes from its first write will do).
  if redis.call('HINCRBY', rl_k, rates[j] .. ':r', 1) == 1 and j == 1 then
    redis.call('PEXPIRE', rl_k, 120000)
  end
  redis.call('HINCRBY', rl_k, rates[j] .. ':t', tokens)
end
-- A session's input tokens over its life (context-growth guard); idle sessions fade. The
-- session belongs to the key that sends it: another key naming the same id has its own.
if session ~= nil and session ~= '' then
  local sk = p .. ':sess:' .. key_id .. ':' .. session
  out[#out + 1] = tostring(redis.call('INCRBY', sk, session_tokens))
  redis.call('EXPIRE', sk, 86400)
else
  out[#out + 1] = '0'
end
return out
