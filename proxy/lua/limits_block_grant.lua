-- limits_block_grant.lua: operation "block_grant", a block of quota for one gateway process
-- (see proxy/quota_blocks.py and RedisLimitStore). Part of the limits script: see
-- limits_state.lua for the batch, the keys and the shared arguments.
--
-- Argument  {"op": "block_grant", "id": "<block id>", "scopes": [scope...],
--            "budget": budget (optional), "size": k, "tokens": n, "usd": x,
--            "duration_us": d, "min_size": n, "share": n}
--           up to k requests, each reserving tokens and usd, that the process admits on its
--           own until now + d.
-- Reply     {"size": k'} with k' = 0: refused (too close to a limit); else
--           {"size": k', "scopes": [report...] (absent when none), "window": n (absent
--           without a budget)}, reports as "acquire" replies them, after the block.
-- Keys      per scope: <scope>:tat (booked: TAT = max(TAT, now + d) + k' * emission),
--           <scope>:bucket (level -= k' * tokens), <scope>:leases/:blocks (read; member
--           "<id>*<k'>" added to :blocks, scored now + lease_ttl_ms);
--           budget:<key>:<window> (tok/usd += k' * the reservation, r:<id> = that amount).
-- TTLs      set at write-back (limits_batch.lua).
-- Atomicity all or nothing, like "acquire". Granted only with k' >= min_size, and k' is cut
--           so that the block takes at most what a rate limit grants during d, and at most
--           1/share of what each limit has left (other gateways are not starved; near a
--           limit every request is checked here). GCRA stays exact: the block is booked as
--           k' requests starting at max(TAT, now + d), which no admission within
--           [now, now + d] can precede, and it is granted only if its last request conforms
--           even if admitted at now.

-- How many requests the scopes allow; the bookings to make once k is known go to `plan`.
local function grant_scopes(op, k, plan, reports)
  local share = op.share
  for _, sc in ipairs(op.scopes) do
    local report = {id = sc.id}
    table.insert(reports, report)
    local emission = sc.emission_us
    if emission then
      local e = tat_of(sc.id)
      local base = math.max(e.tat, now_us)
      local start = math.max(e.tat, now_us + op.duration_us)
      local room = (sc.burst * emission - (base - now_us)) / share - (start - base)
      k = math.min(k, math.floor(room / emission), math.floor(op.duration_us / emission))
      table.insert(plan, function(n)
        e.tat, e.dirty = start + n * emission, true
        report.limit_requests = sc.rpm
        report.remaining_requests = math.floor((sc.burst * emission - (e.tat - now_us)) / emission)
        report.reset_requests_ms = (e.tat - now_us) / 1000
      end)
    end
    local tpm = sc.tpm
    if tpm then
      local e = bucket_of(sc.id, tpm)
      if op.tokens > 0 then  -- at most what refills during the block, and 1/share of the level
        k = math.min(k, math.floor(tpm * op.duration_us / 6e7 / op.tokens),
                     math.floor(e.level / share / op.tokens))
      end
      table.insert(plan, function(n)
        e.level, e.dirty = e.level - n * op.tokens, true
        report.limit_tokens = tpm
        report.remaining_tokens = math.max(0, math.floor(e.level))
        report.reset_tokens_ms = (tpm - e.level) / e.rate
      end)
    end
    local max_concurrent = sc.max_concurrent
    if max_concurrent then
      local e = leases_of(sc.id)
      if max_concurrent - lease_count(e) < k * share then release_pending(e) end
      k = math.min(k, math.floor((max_concurrent - e.count) / share))
      table.insert(plan, function(n)
        e.block_added[block_member(op.id, n)] = now + lease_ttl
        e.count = e.count + n
      end)
    end
  end
  return k
end

-- How many requests the budget allows (at most k).
local function grant_budget(op, k, e)
  local budget, share = op.budget, op.share
  local function fit(slack_tokens, slack_usd)
    local n = k
    if budget.tokens and op.tokens > 0 then
      n = math.min(n, math.floor((budget.tokens - e.tokens - slack_tokens) / share / op.tokens))
    end
    if budget.usd and op.usd > 0 then
      n = math.min(n, math.floor((budget.usd - e.usd - slack_usd) / share / op.usd))
    end
    return n
  end
  local n = fit(e.pending_tokens, e.pending_usd)
  if n < k then
    settle_pending(e)
    n = fit(0, 0)
  end
  return n
end

operations.block_grant = function(op)
  local plan, reports = {}, {}
  local k = grant_scopes(op, op.size, plan, reports)
  local budget, window = nil, nil
  if op.budget then
    window = budget_window(op.budget)
    budget = budget_of(op.budget, window)
    k = grant_budget(op, k, budget)
  end
  if k < op.min_size then return {size = 0} end
  for _, book in ipairs(plan) do book(k) end
  if budget then
    charge(budget, k * op.tokens, k * op.usd)
    budget.reserved[reservation_field(op.id)] = (k * op.tokens) .. ' ' .. fmt_usd(k * op.usd)
  end
  if #reports == 0 then reports = nil end
  return {size = k, scopes = reports, window = window}
end
