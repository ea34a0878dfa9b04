-- Settle a batch of finished requests of one workspace in one call: for each, release what
-- its reservation held, add its actual cost to every scope it is attributed to, and append
-- its usage record to the workspace's ledger. The ledger writer sends one call per workspace
-- and loop turn (at most metering.ledger.SETTLE_MAX requests each, so one call never blocks
-- Redis for long), with the effects of settling each request on its own:
--
-- * A request id seen before is refused (status '0'), so a replayed settlement (spool,
--   retry) never bills twice; a repeat inside the batch too.
-- * Its reservation is released: a hold (reserve.lua) gives back what it held in each of its
--   scopes; a request admitted under a lease (lease.lua, ids start with 'L') moves its
--   actual cost out of the lease (up to what the lease still holds) and drops its compact
--   orphan. A reservation that already expired and was reaped is gone: the actual cost is
--   still added, because the money was spent (unless the reaper already wrote this
--   request's estimated record: then this one is a duplicate, see reap.lua).
-- * Spent, day and hour grow by the actual cost per scope; `#requests` counts requests; a
--   scope whose spend reaches its soft limit is reported once per period; the prompt-cache
--   counters grow per service. Each counter a batch touches is incremented once, by the
--   batch's sum.
-- * Each record is appended to the ledger stream (XADD per record).
--
-- Order: reads and argument checks, then releases and counters, then the records and their
-- idempotency marks. A script that fails half way is not undone; this order keeps each
-- record exactly once: a call failing on its arguments wrote nothing, one failing on a key
-- of the wrong type (a damaged keyspace) wrote no record and marked none seen, so a retry
-- writes them (its counters may then count twice: an operator's problem, logged).
--
-- KEYS[1]  the workspace's key prefix, e.g. "{ws:dev}"
-- ARGV     m, ledger_maxlen, seen_window_s, then m items, each:
--          request_id, reservation_id, period_id, day_id, hour_id, actual_nanos, record,
--          n, (scope, soft_nanos or -1) * n,
--          hygiene_scope, prefix_fingerprint, prefix_tokens, input_tokens, cached_tokens,
--          miss_nanos_per_token, seen_bucket
--
-- Returns  {statuses, scope_newly_over_soft, ...}: statuses a string of m characters, '1'
--          written, '0' duplicate, in the order of the items.
--
-- Idempotency costs one set member per request, not a key: request ids are kept in one set
-- per workspace and minute of the request's start (`seen_bucket`), which expires
-- `seen_window_s` after its last write. A replay later than that is checked against the
-- ledger stream by the writer itself before it gets here (see extproc.metering.ledger).
--
-- Money is summed as Lua numbers (exact below 2^53 nanos, $9M) and written back through
-- string.format('%d'): Lua 5.1 would print a large number in exponent form.
local p = KEYS[1]
local m, maxlen, window = ARGV[1] + 0, ARGV[2], ARGV[3]
-- Tables and strings cost Redis more than the commands' arguments (each is allocated and
-- later collected), so the batch lives in flat arrays, indexed by item.
local at, nscopes, hyg, actual = {}, {}, {}, {}

-- 1. Reads and arguments first: a settlement whose arguments are bad fails the call here,
--    before anything is written, so the writer can retry the others without it.
local i = 4
for r = 1, m do
  local n = ARGV[i + 7] + 0
  local h = i + 8 + 2 * n
  at[r], nscopes[r], hyg[r], actual[r] = i, n, h, ARGV[i + 5] + 0
  for j = i + 9, i + 7 + 2 * n, 2 do
    if string.byte(ARGV[j]) ~= 45 then local _ = ARGV[j] + 0 end  -- 45: '-', none
  end
  local _ = ARGV[h + 2] + ARGV[h + 3] + ARGV[h + 4] + ARGV[h + 5]
  i = h + 7
end
if i ~= #ARGV + 1 then return redis.error_reply('ERR settle: ' .. m .. ' items do not fit') end

-- Idempotency: one SMISMEMBER per minute bucket (usually one); the ids are added last.
local fresh, seen_in_batch = {}, {}
local bucket_of, bucket_order = {}, {}  -- bucket -> its ids; buckets in order
for r = 1, m do
  local b = ARGV[hyg[r] + 6]
  local ids = bucket_of[b]
  if not ids then
    ids = {}
    bucket_of[b] = ids
    bucket_order[#bucket_order + 1] = b
  end
  ids[#ids + 1] = r
end
local adds = {}  -- bucket -> request ids to mark seen
for _, b in ipairs(bucket_order) do
  local idx = bucket_of[b]
  local ids = {}
  for j, r in ipairs(idx) do ids[j] = ARGV[at[r]] end
  local known = redis.call('SMISMEMBER', p .. ':seen:' .. b, unpack(ids))
  local add = {}
  for j, rid in ipairs(ids) do
    if known[j] == 0 and not seen_in_batch[rid] then
      seen_in_batch[rid] = true
      fresh[idx[j]] = true
      add[#add + 1] = rid
    end
  end
  adds[b] = add
end

-- Counters: one HINCRBY per (hash, field) for the batch's sum. Effects of each: a day or
-- hour hash this batch creates gets its expiry (counted from its first write), a spent field
-- reaching its soft limit is reported once per period.
local softs, soft_period, expiries, touched, crossed = {}, {}, {}, {}, {}
local function incr(key, field, amount)
  local arg = type(amount) == 'string' and amount or string.format('%d', amount)
  if arg == '0' then return end
  local total = redis.call('HINCRBY', key, field, arg)
  local expiry = expiries[key]
  if expiry and not touched[key] then
    touched[key] = true
    if total == arg + 0 then redis.call('EXPIRE', key, expiry) end
  end
  local soft_t = softs[key]
  local soft = soft_t and soft_t[field]
  if soft and total >= soft then
    local marker = p .. ':alerted:' .. soft_period[key] .. ':' .. field .. ':soft'
    if redis.call('SET', marker, '1', 'NX', 'EX', 3456000) then crossed[#crossed + 1] = field end
  end
end
-- One settlement: each counter written at once. More: summed first, sums[key] listing its
-- fields in the order of first use (array part) with each one's amount (by name); an amount
-- added once stays the argument string it came as.
local direct = m == 1
local sums, sum_keys = {}, {}
local function add(key, field, amount)
  if direct then return incr(key, field, amount) end
  local t = sums[key]
  if not t then
    t = {}
    sums[key] = t
    sum_keys[#sum_keys + 1] = key
  end
  local v = t[field]
  if v then
    t[field] = v + amount
  else
    t[field] = amount
    t[#t + 1] = field
  end
end

-- 2. Release: holds by what they held; leases by what their requests cost.
local data_k = p .. ':resv:data'
local holds, hold_fields = {}, {}
local lease_cost, lease_rids, lease_order = {}, {}, {}
for r = 1, m do
  if fresh[r] then
    local resv = ARGV[at[r] + 1]
    if string.byte(resv) == 76 then  -- 'L': a lease
      if not lease_cost[resv] then
        lease_cost[resv], lease_rids[resv] = 0, {}
        lease_order[#lease_order + 1] = resv
      end
      lease_cost[resv] = lease_cost[resv] + actual[r]
      local rids = lease_rids[resv]
      rids[#rids + 1] = ARGV[at[r]]
    elseif resv ~= '' then
      holds[#holds + 1] = resv
      hold_fields[#hold_fields + 1] = resv
      hold_fields[#hold_fields + 1] = resv .. ':o'
      hold_fields[#hold_fields + 1] = resv .. ':orphan'
    end
  end
end
-- What a hold or lease gives back, `period|nanos|scope|scope...` (its :resv:data entry).
local function give_back(shape, amount)
  local period_end = string.find(shape, '|', 1, true)
  local held_k = p .. ':held:' .. string.sub(shape, 1, period_end - 1)
  local first = string.find(shape, '|', period_end + 1, true)
  for scope in string.gmatch(string.sub(shape, first + 1), '[^|]+') do
    add(held_k, scope, -amount)
  end
end
if #holds > 0 then
  local got = redis.call('HMGET', data_k, unpack(holds))
  for j = 1, #holds do
    local d = got[j]
    if d then
      local period_end = string.find(d, '|', 1, true)
      local amount = string.sub(d, period_end + 1, string.find(d, '|', period_end + 1, true) - 1)
      if amount ~= '0' then give_back(d, amount + 0) end
    end
  end
  -- Each hold has two fields (its orphan in `:o`, or `:orphan` from an earlier version);
  -- holds made before orphans moved into :resv:data keep theirs in the legacy hash.
  if redis.call('HDEL', data_k, unpack(hold_fields)) < 2 * #holds then
    redis.call('HDEL', p .. ':resv:orphan', unpack(holds))
  end
  redis.call('ZREM', p .. ':resv', unpack(holds))
end
if #lease_order > 0 then
  local leases_k = p .. ':leases'
  local left = redis.call('HMGET', leases_k, unpack(lease_order))
  local shape = redis.call('HMGET', data_k, unpack(lease_order))
  for j, id in ipairs(lease_order) do
    -- A lease no longer in Redis (returned, or reaped after its replica went silent) gives
    -- back nothing more: what it held went back when it ended.
    if left[j] and shape[j] then
      local used = math.min(lease_cost[id], left[j] + 0)
      if used > 0 then
        redis.call('HINCRBY', leases_k, id, string.format('%d', -used))
        give_back(shape[j], used)
      end
    end
    redis.call('HDEL', p .. ':orphans:' .. id, unpack(lease_rids[id]))
  end
end

-- 3. Spend.
local requests, prefixes = {}, {}
for r = 1, m do
  if fresh[r] then
    local a = at[r]
    local period, cost = ARGV[a + 2], ARGV[a + 5]
    local spent_k = p .. ':spent:' .. period
    local day_k, hour_k = p .. ':day:' .. ARGV[a + 3], p .. ':hour:' .. ARGV[a + 4]
    expiries[day_k], expiries[hour_k] = 3542400, 1213200  -- 40 (14) days after the day (hour)
    requests[spent_k] = (requests[spent_k] or 0) + 1
    for j = a + 8, a + 6 + 2 * nscopes[r], 2 do
      local scope, soft = ARGV[j], ARGV[j + 1]
      if string.byte(soft) ~= 45 then
        local t = softs[spent_k]
        if not t then
          t = {}
          softs[spent_k], soft_period[spent_k] = t, period
        end
        t[scope] = soft + 0
      end
      add(spent_k, scope, cost)
      add(day_k, scope, cost)
      add(hour_k, scope, cost)
    end
    -- Prompt-cache hygiene: a prefix seen in the last 15 minutes should have been cached.
    local h = hyg[r]
    local who = ARGV[h]
    if who ~= '' then
      local cached = ARGV[h + 4]
      add(spent_k, 'input_tokens:' .. who, ARGV[h + 3])
      -- Readers take a missing counter for 0 (input_tokens marks the service): no call for 0.
      if cached ~= '0' then add(spent_k, 'cached_tokens:' .. who, cached) end
      local fp = ARGV[h + 1]
      if fp ~= '' then
        local fk = p .. ':prefix:' .. fp
        if prefixes[fk] or redis.call('EXISTS', fk) == 1 then
          local ptoks = ARGV[h + 2]
          add(spent_k, 'repeat_tokens:' .. who, ptoks)
          local missed = ptoks - cached
          if missed > 0 then
            add(spent_k, 'cachemiss_tokens:' .. who, missed)
            add(spent_k, 'cachemiss_nanos:' .. who, missed * ARGV[h + 5])
          end
        end
        prefixes[fk] = true
      end
    end
  end
end
for _, key in ipairs(sum_keys) do
  local t = sums[key]
  for j = 1, #t do incr(key, t[j], t[t[j]]) end
end
for key, count in pairs(requests) do redis.call('HINCRBY', key, '#requests', count) end
for fk in pairs(prefixes) do redis.call('SET', fk, '1', 'EX', 900) end

-- 4. The ledger: one entry per record, in the batch's order; then their ids as seen.
local status = {}
for r = 1, m do
  if fresh[r] then
    redis.call('XADD', p .. ':ledger', 'MAXLEN', '~', maxlen, '*', 'r', ARGV[at[r] + 6])
    status[r] = '1'
  else
    status[r] = '0'
  end
end
for _, b in ipairs(bucket_order) do
  local ids = adds[b]
  if #ids > 0 then
    local seen_k = p .. ':seen:' .. b
    redis.call('SADD', seen_k, unpack(ids))
    redis.call('EXPIRE', seen_k, window)
  end
end
return {table.concat(status), unpack(crossed)}
