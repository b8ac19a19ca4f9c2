"""Blocks of quota: requests one gateway process admits on its own, from a share of every
limit that the shared store (Redis) granted it.

A *shape* is one kind of demand (the same scopes and budget: one key and model). A shape
that arrives at least ``MIN_BLOCK`` times within ``ttl_s`` is no longer checked in the store
request by request: ``QuotaBlocks`` asks for a block of requests (``GrantRequest``), and once
the store granted one (``granted``), admits that shape's requests from it (``admit``) for
``ttl_s`` seconds. The next block is asked for when half of one is used, kept as a spare and
used once the current one is; the first block asked for holds ``MIN_BLOCK`` requests, later
ones are sized to last half a ``ttl_s`` at the rate the previous one was used (at most
``max_requests``). A block ends when it is used up or its time is up (``expire``); what its
requests did not use, and what it did not admit, is given back (``GiveBack``) once its last
request has settled. A request that used more than it reserved is charged at once (a
``GiveBack`` of a negative amount, not final). A shape the store refused a block (too close
to a limit) or did not answer for is checked request by request for ``ttl_s``.

Sans-I/O (DESIGN.md §2): plain values in, decisions out, time from the injected ``clock``.
Every call that decides to talk to the store appends a message to the outbox, which the
caller drains with ``messages()`` and sends; the answers come back through ``granted``,
``refused`` and ``failed``. What a block means for each limit (how GCRA, token buckets,
budgets and concurrency leases stay exact) is the store's part: see
``proxy.limits_redis.RedisLimitStore`` and ``proxy/lua/limits_block_grant.lua``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

#: The fewest requests worth taking a block for (a shape must also arrive this often within
#: ``ttl_s`` before a block is asked for).
MIN_BLOCK = 4

#: A block's ``usd_left`` may fall this far below a request's cost and still admit it
#: (float sums of per-request costs).
USD_EPSILON = 1e-12

S = TypeVar("S", bound=Hashable)  # a shape of demand
P = TypeVar("P")  # what the caller keeps with a block (its wire arguments, the grant's answer)


def _new_block_id() -> str:
    return f"blk_{random.getrandbits(64):016x}"


@dataclass(frozen=True, slots=True)
class GrantRequest(Generic[S]):
    """Ask the store for a block of up to ``size`` requests of ``shape``, each reserving
    ``tokens`` tokens and ``usd`` dollars (those of the request that asked), admitted until
    ``expires_at`` (clock seconds)."""

    block_id: str
    shape: S
    size: int
    tokens: int
    usd: float
    expires_at: float


@dataclass(slots=True, eq=False, repr=False)
class Block(Generic[S, P]):
    """A block of quota granted by the store: ``size`` requests of ``shape`` admitted here
    without asking the store, until ``expires_at`` (clock seconds).

    ``requests_left``/``tokens_left``/``usd_left`` are what is left of the block's
    reservation; ``back_tokens``/``back_usd`` is what settled requests did not use
    (negative: used more) and is not given back yet; ``slots`` is the number of concurrency
    leases the block holds in each ``max_concurrent`` scope (0: none); ``refunds``: whether
    unused tokens and dollars are worth giving back (a TPM limit or a budget; GCRA requests
    are never refunded). ``payload`` is the caller's, untouched.
    """

    block_id: str
    shape: S
    payload: P
    size: int
    expires_at: float
    requests_left: int
    tokens_left: int
    usd_left: float
    slots: int
    refunds: bool
    started_at: float = 0.0
    in_flight: int = 0
    back_tokens: int = 0
    back_usd: float = 0.0
    closed: bool = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"until {self.expires_at:.3f}"
        return (f"<Block {self.block_id} [{self.requests_left} of {self.size} requests left, "
                f"{self.in_flight} in flight, {state}]>")

    def can_take(self, now: float, tokens: int, usd: float) -> bool:
        """Whether one more request reserving ``tokens`` and ``usd`` fits, at ``now``."""
        return (not self.closed and now < self.expires_at and self.requests_left > 0
                and self.tokens_left >= tokens and self.usd_left >= usd - USD_EPSILON)

    def used_up(self, now: float) -> bool:
        """Whether the block can admit nothing more: no request left, or its time is up."""
        return now >= self.expires_at or self.requests_left == 0


@dataclass(frozen=True, slots=True)
class GiveBack(Generic[S, P]):
    """Give ``tokens`` and ``usd`` of ``block`` back to the store (negative: charge them);
    ``final``: the block has ended (its last request settled), so its concurrency leases are
    released and its reservation is closed."""

    block: Block[S, P]
    tokens: int
    usd: float
    final: bool


class QuotaBlocks(Generic[S, P]):
    """The blocks of quota one process holds, by shape, and the decisions about them.

    Args:
        ttl_s: how long a block admits requests (``limits.block_ttl``), in seconds, > 0.
        max_requests: the largest block asked for (``limits.block_max_requests``); at least
            ``MIN_BLOCK`` is used.
        clock: the time in seconds, monotonic (the gateway passes its event loop's clock).
        new_block_id: makes the id of a block asked for (default: ``blk_`` + 64 random bits).

    Not thread-safe; every method runs to completion without waiting (call it from one
    event loop).
    """

    def __init__(self, ttl_s: float, max_requests: int, clock: Callable[[], float],
                 new_block_id: Callable[[], str] = _new_block_id) -> None:
        self.ttl_s = ttl_s
        self.max_requests = max(MIN_BLOCK, max_requests)
        self.clock = clock
        self._new_block_id = new_block_id
        self._current: dict[S, Block[S, P]] = {}    # the block each shape admits from now
        self._spares: dict[S, Block[S, P]] = {}     # the block that follows it
        self._granting: dict[S, GrantRequest[S]] = {}  # asked for, not answered yet
        self._next_size: dict[S, int] = {}          # the size to ask for next
        self._no_block_until: dict[S, float] = {}   # refused or unanswered: not before
        self._leased_from: dict[str, Block[S, P]] = {}  # lease id -> the block that admitted it
        self._arrivals: dict[S, tuple[float, int]] = {}  # (since, requests) checked in the store
        #: What is to be sent to the store, oldest first (read-only: ``messages()`` takes it).
        self.outbox: list[GrantRequest[S] | GiveBack[S, P]] = []

    def __repr__(self) -> str:
        def show(block: Block[S, P]) -> str:
            return f"{block.block_id} {block.requests_left}/{block.size}"

        ending = {b.block_id for b in self._leased_from.values() if b.closed}
        return (f"<QuotaBlocks [in use: {', '.join(map(show, self._current.values())) or '-'}"
                f" | spare: {', '.join(map(show, self._spares.values())) or '-'}"
                f" | ending: {len(ending)} | granting: {len(self._granting)}"
                f" | requests in flight: {len(self._leased_from)}]>")

    # --- the request path ------------------------------------------------------------------

    def admit(self, shape: S, lease_id: str, tokens: int, usd: float) -> Block[S, P] | None:
        """Admit one request of ``shape`` reserving ``tokens`` and ``usd`` from a block
        under ``lease_id``; the block that admitted it, or ``None``: check it in the store.

        May ask for a block (a busy shape without one, or the next one when half of the
        current one is used) and close blocks that are used up (giving them back once their
        last request has settled): see ``messages()``.
        """
        now = self.clock()
        block = self._current.get(shape) or self._promote_spare(shape, now)
        while block is not None:
            if block.can_take(now, tokens, usd):
                self._take(block, lease_id, tokens, usd)
                if block.requests_left * 2 <= block.size and shape not in self._spares:
                    self._ask(shape, tokens, usd, now)  # the next one, in time
                return block
            if block.used_up(now):
                self._close(block, now)
            if self._current.get(shape) is block:
                break  # it cannot take this demand, but may take smaller ones
            block = self._promote_spare(shape, now)
        self._arrived(shape, tokens, usd, now)
        return None

    def granting(self, shape: S) -> bool:
        """Whether a block of ``shape`` has been asked for and not answered yet."""
        return shape in self._granting

    def settle(self, lease_id: str, reserved_tokens: int, reserved_usd: float,
               actual_tokens: int, actual_usd: float) -> bool:
        """The request ``lease_id`` ended, having used ``actual_tokens``/``actual_usd`` of
        the ``reserved_tokens``/``reserved_usd`` it was admitted with. ``False``: no block
        admitted it (settle it in the store).

        Its block gives back at once what it used beyond its reservation (a debt), and gives
        everything back when this was the last request of a block that has ended.
        """
        block = self._leased_from.pop(lease_id, None)
        if block is None:
            return False
        block.in_flight -= 1
        block.back_tokens += reserved_tokens - actual_tokens
        block.back_usd += reserved_usd - actual_usd
        if block.closed and block.in_flight == 0:
            self._give_back(block, final=True)
        elif block.back_tokens < 0 or block.back_usd < -USD_EPSILON:
            self._give_back(block, final=False)
        return True

    def block_of(self, lease_id: str) -> Block[S, P] | None:
        """The block that admitted the request ``lease_id`` (not settled yet), or ``None``."""
        return self._leased_from.get(lease_id)

    # --- the store's answers ---------------------------------------------------------------

    def granted(self, request: GrantRequest[S], size: int, payload: P, slots: int,
                refunds: bool) -> Block[S, P]:
        """The store granted ``size`` (> 0) requests for ``request``; ``payload`` is kept
        with the block, ``slots`` and ``refunds`` as ``Block`` describes them.

        The block becomes the shape's current one, or its spare if the current one is still
        in use (a previous spare is closed). A block granted after its ``expires_at`` is
        closed at once. The caller must call ``expire(block)`` at ``block.expires_at``
        unless it is already closed.
        """
        self._answered(request)
        now = self.clock()
        block: Block[S, P] = Block(
            request.block_id, request.shape, payload, size, request.expires_at,
            requests_left=size, tokens_left=size * request.tokens, usd_left=size * request.usd,
            slots=slots, refunds=refunds, started_at=now)
        if request.shape not in self._current:
            self._current[request.shape] = block
        else:  # the current block is still in use: this one follows it
            spare = self._spares.get(request.shape)
            if spare is not None:
                self._close(spare, now)
            self._spares[request.shape] = block
        if now >= block.expires_at:
            self._close(block, now)
        return block

    def refused(self, request: GrantRequest[S]) -> None:
        """The store refused ``request`` (a limit is too close): the shape is checked request
        by request for ``ttl_s``, and its next block asked for is the smallest."""
        self._answered(request)
        self._no_block_until[request.shape] = self.clock() + self.ttl_s
        self._next_size[request.shape] = MIN_BLOCK

    def failed(self, request: GrantRequest[S]) -> None:
        """The store did not answer ``request`` (the caller undoes it in the store): the shape
        is checked request by request for ``ttl_s``."""
        self._answered(request)
        self._no_block_until[request.shape] = self.clock() + self.ttl_s

    # --- time and the end ------------------------------------------------------------------

    def expire(self, block: Block[S, P]) -> None:
        """``block``'s time is up: it admits no more (no-op if it already ended); it is given
        back once its last request has settled."""
        self._close(block, self.clock())

    def close(self) -> None:
        """Close every block (the process is stopping): those with no request in flight are
        given back now, the others when their last request settles."""
        now = self.clock()
        for block in [*self._current.values(), *self._spares.values()]:
            self._close(block, now)

    def messages(self) -> Sequence[GrantRequest[S] | GiveBack[S, P]]:
        """Take what is to be sent to the store, oldest first (the outbox is emptied)."""
        if not self.outbox:
            return ()
        out, self.outbox = self.outbox, []
        return out

    # --- inside ----------------------------------------------------------------------------

    def _take(self, block: Block[S, P], lease_id: str, tokens: int, usd: float) -> None:
        block.requests_left -= 1
        block.tokens_left -= tokens
        block.usd_left -= usd
        block.in_flight += 1
        self._leased_from[lease_id] = block

    def _arrived(self, shape: S, tokens: int, usd: float, now: float) -> None:
        """Count a request of ``shape`` checked in the store; ask for a block once the shape
        is busy enough (``MIN_BLOCK`` within ``ttl_s``)."""
        since, seen = self._arrivals.get(shape, (now, 0))
        if now - since > self.ttl_s:
            since, seen = now, 0
        self._arrivals[shape] = (since, seen + 1)
        if seen + 1 >= MIN_BLOCK:
            self._ask(shape, tokens, usd, now)

    def _ask(self, shape: S, tokens: int, usd: float, now: float) -> None:
        if shape in self._granting or now < self._no_block_until.get(shape, 0.0):
            return
        request = GrantRequest(self._new_block_id(), shape, self._next_size.get(shape, MIN_BLOCK),
                               tokens, usd, now + self.ttl_s)
        self._granting[shape] = request
        self.outbox.append(request)

    def _answered(self, request: GrantRequest[S]) -> None:
        if self._granting.get(request.shape) is request:
            del self._granting[request.shape]

    def _promote_spare(self, shape: S, now: float) -> Block[S, P] | None:
        """Make the spare (the block asked for in time) current, if there is one."""
        block = self._spares.pop(shape, None)
        if block is not None:
            block.started_at = now
            self._current[shape] = block
        return block

    def _close(self, block: Block[S, P], now: float) -> None:
        """Admit no more from ``block``; give it back once its last request has ended.

        The next block asked for is sized to last half a ``ttl_s`` at the rate this one was
        used, so blocks are used up rather than left to expire (requests of a block that
        expires are lost to the RPM limit).
        """
        if block.closed:
            return
        block.closed = True
        if self._current.get(block.shape) is block:
            del self._current[block.shape]
        if self._spares.get(block.shape) is block:
            del self._spares[block.shape]
        used = block.size - block.requests_left
        rate_per_s = used / max(now - block.started_at, 0.001)
        self._next_size[block.shape] = min(self.max_requests,
                                           max(MIN_BLOCK, math.ceil(rate_per_s * self.ttl_s / 2)))
        if block.in_flight == 0:
            self._give_back(block, final=True)

    def _give_back(self, block: Block[S, P], final: bool) -> None:
        if not (block.refunds or (final and block.slots)):
            return  # requests only: unused GCRA requests are not refunded
        tokens, usd = block.back_tokens, block.back_usd
        block.back_tokens, block.back_usd = 0, 0.0
        if final:
            tokens, usd = tokens + block.tokens_left, usd + block.usd_left
            block.tokens_left, block.usd_left = 0, 0.0
        self.outbox.append(GiveBack(block, tokens, usd, final))
