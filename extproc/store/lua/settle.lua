-- Settle one request: release its reservation, add the actual cost to every scope it is
-- attributed to, and append its usage record to the workspace's ledger, in one round trip.
-- A request id seen before is refused, so a replayed settlement (spool, retry) never bills
-- twice. A reservation that already expired and was reaped is simply gone: the actual cost
-- is still added, because the money was still spent (unless the reaper already wrote this
-- request's estimated record: then this one is a duplicate, see reap.lua).
--
-- KEYS[1]  the workspace's key prefix, e.g. "{ws:dev}"
-- ARGV     request_id, reservation_id, period_id, day_id, hour_id, actual_nanos, record,
--          ledger_maxlen, n, (scope, soft_nanos or -1) * n,
--          hygiene_scope, prefix_fingerprint, prefix_tokens, input_tokens, cached_tokens,
--          miss_nanos_per_token, seen_bucket, seen_window_s
--
-- Returns  {"dup"} or {"ok", scope_newly_over_soft, ...}
--
-- Idempotency costs one set member per request, not a key: request ids are kept in one set
-- per workspace and minute of the request's start (`seen_bucket`), which expires
-- `seen_window_s` after its last write. A replay later than that is checked against the
-- ledger stream by the writer itself before it gets here (see extproc.metering.ledger).
local p = KEYS[1]
local rid, resv, period, day, hour, actual = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local n = ARGV[9] + 0  -- one strtod; tonumber() spends two (see reserve.lua)
local h = 10 + 2 * n

local seen_k = p .. ':seen:' .. ARGV[h + 6]
if redis.call('SADD', seen_k, rid) == 0 then
  return {'dup'}
end
redis.call('EXPIRE', seen_k, ARGV[h + 7])

if resv ~= '' then
  release_hold(p, resv, false)  -- release.lua; its orphan goes with it
end

local out = {'ok'}
local spent_k = p .. ':spent:' .. period
local day_k, hour_k = p .. ':day:' .. day, p .. ':hour:' .. hour
for j = 0, n - 1 do
  local scope, soft = ARGV[10 + 2 * j], ARGV[11 + 2 * j]
  local total = redis.call('HINCRBY', spent_k, scope, actual)
  local in_day = redis.call('HINCRBY', day_k, scope, actual)
  local in_hour = redis.call('HINCRBY', hour_k, scope, actual)
  -- A day (hour) hash is new when its first scope's total is just this request's cost: only
  -- then does it get its expiry, counted from its first write, so one more day (hour) than
  -- it must be kept after its last: 40 days (14 days) after the day (hour) ends.
  if j == 0 then
    local first = actual + 0
    if in_day == first then redis.call('EXPIRE', day_k, 3542400) end
    if in_hour == first then redis.call('EXPIRE', hour_k, 1213200) end
  end
  if string.byte(soft) ~= 45 and total >= soft + 0 then  -- 45: '-', a negative is none
    if redis.call('SET', p .. ':alerted:' .. period .. ':' .. scope .. ':soft', '1', 'NX', 'EX',
        3456000) then
      out[#out + 1] = scope
    end
  end
end
redis.call('HINCRBY', spent_k, '#requests', 1)

-- Prompt-cache hygiene: a prefix seen in the last 15 minutes should have been cached.
local who = ARGV[h]
if who ~= nil and who ~= '' then
  local fp, input, cached = ARGV[h + 1], ARGV[h + 3], ARGV[h + 4]
  redis.call('HINCRBY', spent_k, 'input_tokens:' .. who, input)
  -- Readers take a missing counter for 0 (input_tokens marks the service): no call for 0.
  if cached ~= '0' then redis.call('HINCRBY', spent_k, 'cached_tokens:' .. who, cached) end
  if fp ~= '' then
    local fk = p .. ':prefix:' .. fp
    if redis.call('EXISTS', fk) == 1 then
      local ptoks = ARGV[h + 2] + 0
      redis.call('HINCRBY', spent_k, 'repeat_tokens:' .. who, ptoks)
      local missed = ptoks - cached
      if missed > 0 then
        redis.call('HINCRBY', spent_k, 'cachemiss_tokens:' .. who, missed)
        redis.call('HINCRBY', spent_k, 'cachemiss_nanos:' .. who, missed * ARGV[h + 5])
      end
    end
    redis.call('SET', fk, '1', 'EX', 900)
  end
end
redis.call('XADD', p .. ':ledger', 'MAXLEN', '~', ARGV[8], '*', 'r', ARGV[7])
return out
