-- Shared by reserve.lua and lease.lua (prepended by extproc.store.scripts): a scope's cap is
-- its hard limit from the policy plus its live temporary top-ups.
--
-- Top-ups live in one hash per workspace, `:topups`, field = scope, value = one or more
-- "nanos@expires_ms" entries joined by ',' (governance.topups writes them). An entry counts
-- while now < expires_ms; expired ones are ignored here and pruned by their writer.
--
-- topups(p, scopes, now): extra[j] (a number) for each scope, and the earliest future expiry
-- among the entries that count (nil: none), so a lease can end no later than the first
-- top-up it relied on.
local function topups(p, scopes, now)
  local raw = redis.call('HMGET', p .. ':topups', unpack(scopes))
  local extra, earliest = {}, nil
  for j = 1, #scopes do
    local sum = 0
    local value = raw[j]
    if value then
      for nanos, expires in string.gmatch(value, '(%d+)@(%d+)') do
        expires = expires + 0
        if expires > now then
          sum = sum + nanos
          if earliest == nil or expires < earliest then earliest = expires end
        end
      end
    end
    extra[j] = sum
  end
  return extra, earliest
end
