-- Decides a batch of limiter decisions atomically; each decision consumes all of its limits
-- or none. The arithmetic is tally.limits.model's, in exact integers (all values < 2^53).
--
-- KEYS: every limit's key, decision after decision.
-- ARGV[1]: now in microseconds, or "" to use the server's clock (shared by every replica).
-- ARGV[2]: the shortest expiry of a counter, ms (a caller's own clock need not move with
--          Redis's, so its counters must outlive what its clock says).
-- ARGV[3]: number of decisions; then per decision its limit count n, then per limit:
--          window ("R" rolling / "C" calendar), amount, period_us, capacity, cost, hard (1/0).
-- Returns, per decision: allowed (1/0), retry_after_us, n, n remaining values, the number of
-- denying limits d, then their 0-based indexes.

local now
if ARGV[1] == "" then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end

local function idiv(a, b)  -- floor(a / b), exact for integers below 2^53
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end

local SLOTS = 10  -- tally.limits.model.SLOTS
local min_ttl = tonumber(ARGV[2])
local out = {}
local arg = 4
local key_at = 1
for _ = 1, tonumber(ARGV[3]) do
  local n = tonumber(ARGV[arg]); arg = arg + 1
  local writes, if_consumed, if_not, denied = {}, {}, {}, {}
  local retry = 0
  for i = 1, n do
    local key = KEYS[key_at]; key_at = key_at + 1
    local window, amount, period = ARGV[arg], tonumber(ARGV[arg + 1]), tonumber(ARGV[arg + 2])
    local capacity, cost, hard = tonumber(ARGV[arg + 3]), tonumber(ARGV[arg + 4]), ARGV[arg + 5] == "1"
    arg = arg + 6
    local held = redis.call("GET", key)
    local fits, wait
    if window == "R" then
      -- the token bucket and the sliding window of tally.limits.model (SLOTS slots a period);
      -- stored as "backlog:last:base:c0,c1,...,cSLOTS" (window counts oldest first)
      local backlog, last, base = 0, now, 0
      local counts = {}
      for j = 1, SLOTS + 1 do counts[j] = 0 end
      if held then
        local b, l, rest = string.match(held, "^(%d+):(%d+)(.*)$")
        backlog, last = tonumber(b), tonumber(l)
        local bs, cs = string.match(rest, "^:(%d+):([%d,]+)$")
        if bs then
          base = tonumber(bs)
          local j = 1
          for c in string.gmatch(cs, "%d+") do counts[j] = tonumber(c); j = j + 1 end
        end
      end
      local elapsed = now - last
      if elapsed > 0 then
        if elapsed * amount >= backlog then backlog = 0 else backlog = backlog - elapsed * amount end
      end
      local after = backlog + cost * period
      local ceiling = capacity * period
      local bucket_fits = after <= ceiling
      wait = 0
      if not bucket_fits then wait = idiv(after - ceiling + amount - 1, amount) end
      local length = idiv(period + SLOTS - 1, SLOTS)
      local slot = idiv(now, length)
      local gap = slot - base
      local win = {}
      for j = 1, SLOTS + 1 do
        local from = j + gap
        if gap <= 0 then from = j end
        if from <= SLOTS + 1 then win[j] = counts[from] else win[j] = 0 end
      end
      local counted = 0
      for j = 1, SLOTS + 1 do counted = counted + win[j] end
      local window_fits = counted + cost <= capacity
      if not window_fits then
        local running = counted
        local wwait = (slot + SLOTS + 1) * length - now
        for j = 1, SLOTS + 1 do
          running = running - win[j]
          if running + cost <= capacity then
            wwait = (slot + j) * length - now
            break
          end
        end
        if wwait > wait then wait = wwait end
      end
      fits = bucket_fits and window_fits
      if_consumed[i] = math.min(idiv(ceiling - after, period), capacity - counted - cost)
      if_not[i] = math.min(idiv(ceiling - backlog, period), capacity - counted)
      win[SLOTS + 1] = win[SLOTS + 1] + cost
      local idle_us = math.max(idiv(after + amount - 1, amount), (slot + SLOTS + 1) * length - now)
      local parts = {}
      for j = 1, SLOTS + 1 do parts[j] = string.format("%d", win[j]) end
      writes[i] = {key, string.format("%d:%d:%d:%s", after, now, slot, table.concat(parts, ",")),
                   idiv(idle_us + 999, 1000) + 1}
    else
      local current = idiv(now, period)
      local used = 0
      if held then
        local w, c = string.match(held, "^(%d+):(%d+)$")
        if tonumber(w) == current then used = tonumber(c) end
      end
      local after = used + cost
      fits = after <= amount
      wait = 0
      if not fits then wait = (current + 1) * period - now end
      if_consumed[i] = amount - after
      if_not[i] = amount - used
      writes[i] = {key, string.format("%d:%d", current, after),
                   idiv((current + 1) * period - now + 999, 1000) + 1}
    end
    if hard and not fits then
      denied[#denied + 1] = i - 1
      if wait > retry then retry = wait end
    end
  end
  local remaining = if_consumed
  if #denied == 0 then
    for i = 1, n do
      redis.call("SET", writes[i][1], writes[i][2], "PX", math.max(writes[i][3], min_ttl))
    end
    out[#out + 1] = 1
  else
    remaining = if_not
    out[#out + 1] = 0
  end
  out[#out + 1] = retry
  out[#out + 1] = n
  for i = 1, n do out[#out + 1] = remaining[i] end
  out[#out + 1] = #denied
  for i = 1, #denied do out[#out + 1] = denied[i] end
end
return out
