-- limits_acquire.lua: operation "acquire", one request's check-and-charge (part of the limits
-- script: see limits_state.lua for the batch, the keys and the shared argument objects).
--
-- Argument  {"op": "acquire", "id": "<lease id>", "scopes": [scope...], "tokens": n,
--            "usd": x, "budget": budget (optional)}
--           tokens and usd are the request's reservation (prompt + completion estimate).
-- Reply     {"allowed": true|false,
--            "reason": "requests"|"tokens"|"concurrency"|"tokens_too_large"|"budget"
--                      (refused only; the highest-ranked refusal: budget, then
--                      tokens_too_large, then the first of the others),
--            "retry_after_ms": x (refused only, absent when no wait helps: budget,
--                      tokens_too_large, or concurrency alone, whose hint is the gateway's),
--            "scopes": [report...] (absent when there is none),
--            "window": n (the budget window charged, absent without a budget),
--            "spent_tokens": n, "spent_usd": "x" (refused by the budget only: what the
--                      window has spent)}
--           report: {"id": "<scope id>", "limit_requests", "remaining_requests",
--                    "reset_requests_ms" (GCRA scopes), "limit_tokens", "remaining_tokens",
--                    "reset_tokens_ms" (TPM scopes)}
-- Keys      per scope: <scope>:tat (rpm), <scope>:bucket (tpm), <scope>:leases and
--           <scope>:blocks (max_concurrent, read; the lease is added to :leases);
--           budget:<key>:<window> (tok, usd += the reservation; r:<id> = the reservation).
-- TTLs      set at write-back (limits_batch.lua).
-- Atomicity all or nothing: the request is charged in every scope and the budget, or in none.
--           GCRA in integer microseconds as proxy.limits.gcra_us; the bucket and the budget
--           as proxy.limits.MemoryLimitStore.

local REFUSAL_RANK = {budget = 3, tokens_too_large = 2}

-- Record a refusal for `reason` in `res`, keeping the highest-ranked reason; among rank-1
-- reasons the first one stays and the longest known retry wins (nil: no retry known).
local function refuse(res, reason, retry_ms)
  local new, old = REFUSAL_RANK[reason] or 1, REFUSAL_RANK[res.reason] or 1
  if res.allowed or new > old then
    res.reason, res.retry_after_ms = reason, retry_ms
  elseif new == 1 and old == 1 and retry_ms and
      (not res.retry_after_ms or retry_ms > res.retry_after_ms) then
    res.retry_after_ms = retry_ms
  end
  res.allowed = false
end

-- Check one scope; charges that apply if every check passes go to `commits`.
local function check_scope(sc, op, res, commits)
  local report = {id = sc.id}
  local emission = sc.emission_us
  if emission then  -- GCRA in integer microseconds, as proxy.limits.gcra_us
    local e = tat_of(sc.id)
    local base = math.max(e.tat, now_us)
    local new_tat = base + emission
    local tolerance = sc.burst * emission
    report.limit_requests = sc.rpm
    if new_tat - now_us > tolerance then
      report.remaining_requests, report.reset_requests_ms = 0, (base - now_us) / 1000
      refuse(res, 'requests', (new_tat - now_us - tolerance) / 1000)
    else
      report.remaining_requests = math.floor((tolerance - (new_tat - now_us)) / emission)
      report.reset_requests_ms = (new_tat - now_us) / 1000
      table.insert(commits, function() e.tat, e.dirty = new_tat, true end)
    end
  end
  local tpm = sc.tpm
  if tpm then
    local e = bucket_of(sc.id, tpm)
    local after = e.level - op.tokens
    local shown = after
    if after < 0 then shown = e.level end
    report.limit_tokens = tpm
    report.remaining_tokens = math.max(0, math.floor(shown))
    report.reset_tokens_ms = (tpm - shown) / e.rate
    if op.tokens > tpm then
      refuse(res, 'tokens_too_large', nil)
    elseif after < 0 then
      refuse(res, 'tokens', -after / e.rate)
    else
      table.insert(commits, function() e.level, e.dirty = after, true end)
    end
  end
  local max_concurrent = sc.max_concurrent
  if max_concurrent then
    local e = leases_of(sc.id)
    if lease_count(e) >= max_concurrent then release_pending(e) end
    if e.count >= max_concurrent then
      refuse(res, 'concurrency', nil)
    else
      table.insert(commits, function()
        e.added[op.id] = now + lease_ttl
        e.count = e.count + 1
      end)
    end
  end
  table.insert(res.scopes, report)
end

-- Check the budget; its cache entry if the request fits, nil if refused.
local function check_budget(op, res)
  local budget = op.budget
  local window = budget_window(budget)
  local e = budget_of(budget, window)
  res.window = window
  local function over(slack_tokens, slack_usd)
    return (budget.tokens and e.tokens + slack_tokens + op.tokens > budget.tokens) or
           (budget.usd and e.usd + slack_usd + op.usd > budget.usd + 1e-12)
  end
  if over(e.pending_tokens, e.pending_usd) then
    settle_pending(e)
    if over(0, 0) then
      refuse(res, 'budget', nil)
      res.spent_tokens, res.spent_usd = e.tokens, fmt_usd(e.usd)
      return nil
    end
  end
  return e
end

operations.acquire = function(op)
  local res = {allowed = true, scopes = {}}
  local commits = {}
  for _, sc in ipairs(op.scopes) do check_scope(sc, op, res, commits) end
  local budget = nil
  if op.budget then budget = check_budget(op, res) end
  if res.allowed then
    for _, commit in ipairs(commits) do commit() end
    if budget then
      charge(budget, op.tokens, op.usd)
      -- the reservation, so a settle or a cancel knows what was charged
      budget.reserved[reservation_field(op.id)] = op.tokens .. ' ' .. fmt_usd(op.usd)
    end
  end
  if #res.scopes == 0 then res.scopes = nil end  -- cjson would encode {} as an object
  return res
end
