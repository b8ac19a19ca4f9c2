"""What a key has left now: a read-only look at the limit state (``GET /admin/keys``).

Nothing here charges or changes a limit. The arithmetic (``requests_left``,
``tokens_left``) is sans-I/O and mirrors ``proxy.limits``; ``key_left`` reads the state
where the limiter keeps it:

* memory backend: this process's ``MemoryLimitStore``, exact for this process (which is the
  whole gateway: the memory backend runs one process);
* Redis backend: the shared keys in Redis (one pipelined round trip, at most
  ``PEEK_TIMEOUT_S``), read with this host's clock. Approximate: quota booked in blocks
  (``limits.block_ttl``) counts as used, and a budget's reservations of requests in flight
  count as spent until they settle;
* Redis unreachable: ``None`` (unknown), never an error.

Only the key-wide scope is shown (a key's ``per_model`` scopes are not).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from proxy.limits import Budget, Limiter, MemoryLimitStore, Scope, emission_us, refill
from proxy.limits_redis import RedisLimitStore

#: The longest ``key_left`` waits for Redis, in seconds.
PEEK_TIMEOUT_S = 0.5


@dataclass(frozen=True, slots=True)
class Left:
    """What one key has left now; ``None``: no such limit, or unknown.

    Attributes:
        requests: requests that may start at once (GCRA: the burst not yet used).
        requests_reset_s: seconds until the full burst is back.
        tokens: tokens in the TPM bucket now (may be below 0: a debt).
        tokens_reset_s: seconds until the bucket is full.
        concurrent: more requests that may be in flight (``max_concurrent`` less the
            leases held).
        budget_tokens, budget_usd: what the budget's current window has left.
        budget_reset_s: seconds until the budget's window ends.
    """

    requests: int | None = None
    requests_reset_s: float | None = None
    tokens: int | None = None
    tokens_reset_s: float | None = None
    concurrent: int | None = None
    budget_tokens: int | None = None
    budget_usd: float | None = None
    budget_reset_s: float | None = None


def requests_left(tat_us: int, now_us: int, emission: int, burst: int) -> tuple[int, float]:
    """GCRA: ``(requests that may start now, seconds until the whole burst is back)``
    from the theoretical arrival time ``tat_us`` (see ``proxy.limits.gcra_us``)."""
    ahead = max(0, tat_us - now_us)
    room = burst * emission - ahead
    return max(0, room // emission), ahead / 1e6


def tokens_left(held: float, updated_s: float, now_s: float, tpm: int) -> tuple[int, float]:
    """Token bucket: ``(tokens in the bucket now, seconds until it is full)``."""
    level = refill(held, updated_s, now_s, tpm, tpm / 60.0)
    return math.floor(level), max(0.0, (tpm - level) / (tpm / 60.0))


def budget_left(budget: Budget, spent_tokens: float, spent_usd: float, now_s: float
                ) -> dict[str, float | int | None]:
    """What ``budget`` has left in the window holding ``now_s`` after ``spent_*``."""
    tokens = None if budget.tokens is None else max(0, budget.tokens - int(spent_tokens))
    usd = None if budget.usd is None else max(0.0, round(budget.usd - spent_usd, 9))
    reset_s = (budget.window(now_s) + 1) * budget.period_s - now_s
    return {"budget_tokens": tokens, "budget_usd": usd, "budget_reset_s": round(reset_s, 3)}


def memory_left(store: MemoryLimitStore, scope: Scope, budget: Budget | None, now_s: float) -> Left:
    """``Left`` from a ``MemoryLimitStore`` (exact for its process)."""
    fields: dict[str, float | int | None] = {}
    if scope.rpm and scope.burst:
        fields["requests"], fields["requests_reset_s"] = requests_left(
            store.tat.get(scope.scope_id, 0), int(now_s * 1e6), emission_us(scope.emission_s), scope.burst)
    if scope.tpm:
        held, updated = store.buckets.get(scope.scope_id, (float(scope.tpm), now_s))
        fields["tokens"], fields["tokens_reset_s"] = tokens_left(held, updated, now_s, scope.tpm)
    if scope.max_concurrent:
        held_leases = sum(1 for expiry in store.leases.get(scope.scope_id, {}).values() if expiry > now_s)
        fields["concurrent"] = max(0, scope.max_concurrent - held_leases)
    if budget is not None:
        tokens, usd = store.spent.get((budget.key_name, budget.window(now_s)), (0, 0.0))
        fields.update(budget_left(budget, tokens, usd, now_s))
    return Left(**fields)  # type: ignore[arg-type]


async def redis_left(store: RedisLimitStore, scope: Scope, budget: Budget | None, now_s: float) -> Left:
    """``Left`` from Redis (one pipelined round trip; approximate, see the module docstring).

    Raises:
        redis.exceptions.RedisError, OSError: Redis did not answer.
    """
    prefix, sid, now_ms = store.key_prefix, scope.scope_id, int(now_s * 1000)
    pipe = store.redis.pipeline(transaction=False)
    pipe.get(f"{prefix}{sid}:tat")
    pipe.hmget(f"{prefix}{sid}:bucket", ["level", "updated_ms"])  # the scripts' format 2
    pipe.hmget(f"{prefix}{sid}:tb", ["v", "t"])  # format 1
    pipe.zcount(f"{prefix}{sid}:leases", now_ms + 1, "+inf")
    pipe.zrangebyscore(f"{prefix}{sid}:blocks", now_ms + 1, "+inf")
    window = int(now_ms // int(budget.period_s * 1000)) if budget is not None else 0
    pipe.hmget(f"{prefix}budget:{budget.key_name if budget else ''}:{window}", ["tok", "usd"])
    tat, bucket, old_bucket, leases, blocks, spent = await pipe.execute()
    bucket = bucket if bucket[0] is not None else old_bucket
    fields: dict[str, float | int | None] = {}
    if scope.rpm and scope.burst:
        fields["requests"], fields["requests_reset_s"] = requests_left(
            int(tat or 0), int(now_s * 1e6), emission_us(scope.emission_s), scope.burst)
    if scope.tpm:
        held, updated = (float(bucket[0]), float(bucket[1]) / 1000) if bucket[0] is not None else (
            float(scope.tpm), now_s)
        fields["tokens"], fields["tokens_reset_s"] = tokens_left(held, updated, now_s, scope.tpm)
    if scope.max_concurrent:
        in_blocks = sum(int(member.rsplit(b"*", 1)[1]) for member in blocks)
        fields["concurrent"] = max(0, scope.max_concurrent - int(leases) - in_blocks)
    if budget is not None:
        fields.update(budget_left(budget, float(spent[0] or 0), float(spent[1] or 0), now_s))
    return Left(**fields)  # type: ignore[arg-type]


async def key_left(limiter: Limiter, scope: Scope, budget: Budget | None) -> tuple[Left | None, str]:
    """What the key of ``scope`` has left now, and where that was read: ``process`` (the
    memory backend, or the per-process fallback while Redis is down), ``redis``, or
    ``unavailable`` (``None``: Redis did not answer within ``PEEK_TIMEOUT_S``)."""
    now_s = time.time()
    store = limiter.store
    if isinstance(store, RedisLimitStore) and not limiter.degraded:
        try:
            async with asyncio.timeout(PEEK_TIMEOUT_S):
                return await redis_left(store, scope, budget, now_s), "redis"
        except Exception:  # Redis down or slow: unknown, never an error here
            return None, "unavailable"
    local = store if isinstance(store, MemoryLimitStore) else limiter.fallback
    if local is None:
        return None, "unavailable"
    return memory_left(local, scope, budget, now_s), "process"
