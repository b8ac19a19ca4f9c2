"""Admission: bounded in-flight slots per deployment and a bounded wait queue in front of them.

Each deployment (upstream) has ``max_in_flight`` slots. A request names the deployments that
may serve it (its candidates, healthy ones of the best tier); it takes a free slot on one of
them at once, or waits in a FIFO ordered by key priority then arrival. A waiter is served the
moment a slot frees on any of its candidates. Past the queue bound, or past its deadline, it
is refused with 503 ``overloaded`` and a retry hint, fast; the overflow is counted
(Envoy's ``max_pending_requests`` and its overflow counter; HAProxy's ``timeout queue``).

The queue of a set of candidates holds at most the sum of their ``max_queue`` waiters; for a
model served by one upstream that is exactly ``upstreams.<name>.max_queue``.

Decisions are made synchronously (STYLE §3): ``release`` hands the slot to the next waiter in
the same step, so no slot is ever free while someone waits for it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from proxy.errors import OverloadedError


@dataclass(frozen=True, slots=True)
class SlotLimits:
    """One deployment's bounds: ``max_in_flight`` slots (``None`` = unbounded), ``max_queue``
    waiters, ``queue_timeout_s`` seconds of waiting at most."""

    max_in_flight: int | None = None
    max_queue: int = 0
    queue_timeout_s: float = 0.0


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    candidates: frozenset[str] = field(compare=False)
    future: asyncio.Future[str] = field(compare=False)
    served: bool = field(default=False, compare=False)  # handed a slot; no longer queued


#: Picks one deployment among those with a free slot (the balancer's choice).
Chooser = Callable[[list[str]], str]


class Admission:
    """Slots and the wait queue for every deployment.

    Args:
        limits: deployment name → its ``SlotLimits``.
        on_overflow: called with the candidates' key when a request is refused for a full
            queue or a missed deadline (a metric).
    """

    def __init__(self, limits: Mapping[str, SlotLimits],
                 on_overflow: Callable[[str], None] | None = None) -> None:
        self._limits = dict(limits)
        self._in_flight = dict.fromkeys(self._limits, 0)
        self._heap: list[_Waiter] = []
        self._queued: dict[frozenset[str], int] = {}
        self._seq = itertools.count()
        self._on_overflow = on_overflow or (lambda _: None)

    def __repr__(self) -> str:
        busy = ", ".join(f"{n}: {c}/{self._limits[n].max_in_flight or '-'}"
                         for n, c in self._in_flight.items())
        return f"<Admission [in flight: {busy} | queued: {self.queue_depth}]>"

    @property
    def queue_depth(self) -> int:
        """Requests waiting now (all deployments)."""
        return sum(self._queued.values())

    def queued_for(self, name: str) -> int:
        """Requests waiting that ``name`` could serve."""
        return sum(n for key, n in self._queued.items() if name in key)

    def in_flight(self, name: str) -> int:
        """Slots of ``name`` in use (0 for a name unknown here, e.g. removed by a reload)."""
        return self._in_flight.get(name, 0)

    def has_free_slot(self, name: str) -> bool:
        """Whether ``name`` can take a request now."""
        limit = self._limits[name].max_in_flight
        return limit is None or self._in_flight[name] < limit

    def try_acquire(self, candidates: list[str], choose: Chooser) -> str | None:
        """Take a free slot on one of ``candidates`` (picked by ``choose``), or ``None``.
        Waiters already queued for these candidates go first (FIFO fairness)."""
        if self._queued.get(frozenset(candidates)):
            return None
        free = [name for name in candidates if self.has_free_slot(name)]
        if not free:
            return None
        name = free[0] if len(free) == 1 else choose(free)
        self._in_flight[name] += 1
        return name

    async def acquire(self, candidates: list[str], choose: Chooser, priority: int = 0) -> str:
        """A slot on one of ``candidates``, waiting in the queue if all are busy.

        Args:
            candidates: deployment names that may serve the request (non-empty).
            choose: picks among several free deployments.
            priority: higher is served first among waiters (``keys.<name>.priority``).

        Raises:
            OverloadedError: the queue is full, or the deadline (the longest
                ``queue_timeout`` of the candidates) passed first (503, with retry-after).
        Cancelling is safe: a cancelled waiter leaves the queue, and a slot handed to it in
        the same instant is passed on to the next waiter.
        """
        name = self.try_acquire(candidates, choose)
        if name is not None:
            return name
        key = frozenset(candidates)
        bound = sum(self._limits[n].max_queue for n in candidates)
        timeout_s = max(self._limits[n].queue_timeout_s for n in candidates)
        if self._queued.get(key, 0) >= bound or timeout_s <= 0:
            self._on_overflow(",".join(sorted(key)))
            raise OverloadedError("All upstreams for this model are busy and the queue is full.",
                                  retry_after_s=max(1.0, timeout_s))
        return await self._wait(key, priority, timeout_s)

    async def _wait(self, key: frozenset[str], priority: int, timeout_s: float) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(-priority, next(self._seq), key, future)  # min-heap: highest first
        heapq.heappush(self._heap, waiter)
        self._queued[key] = self._queued.get(key, 0) + 1
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            if future.done() and not future.cancelled():
                return future.result()  # the slot arrived in the same instant as the deadline
            self._on_overflow(",".join(sorted(key)))
            raise OverloadedError("Timed out waiting for a free upstream slot.",
                                  retry_after_s=max(1.0, timeout_s)) from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())  # a slot arrived as we were cancelled: pass it on
            raise
        finally:
            if not future.done():
                future.cancel()  # release() skips it from now on
            if not waiter.served:
                self._dequeue(key)

    def _dequeue(self, key: frozenset[str]) -> None:
        self._queued[key] -= 1
        if not self._queued[key]:
            del self._queued[key]

    def release(self, name: str) -> None:
        """Give back a slot of ``name``; the first waiter that ``name`` can serve gets it."""
        self._in_flight[name] = max(0, self._in_flight[name] - 1)
        self._serve_waiters(name)

    def _serve_waiters(self, name: str) -> None:
        """Hand the free slots of ``name`` to the first waiters it can serve."""
        skipped: list[_Waiter] = []
        while self._heap and self.has_free_slot(name):
            waiter = heapq.heappop(self._heap)
            if waiter.future.done():
                continue  # timed out or cancelled
            if name not in waiter.candidates:
                skipped.append(waiter)
                continue
            self._in_flight[name] += 1
            waiter.served = True
            self._dequeue(waiter.candidates)  # counted as in flight now, not as queued
            waiter.future.set_result(name)
        for waiter in skipped:
            heapq.heappush(self._heap, waiter)

    def reconfigure(self, limits: Mapping[str, SlotLimits]) -> None:
        """Hot reload (``proxy.reload``): the bounds of ``limits`` from now on. Slots in use
        stay counted; a deployment no longer in ``limits`` keeps its count until its requests
        release their slots and hands no slot to a waiter (a waiter whose candidates were all
        removed times out). Waiters keep their place; raised bounds serve them at once."""
        retired = {name: SlotLimits(max_in_flight=0)
                   for name, count in self._in_flight.items() if name not in limits and count > 0}
        self._limits = {**retired, **limits}
        self._in_flight = {name: self._in_flight.get(name, 0) for name in self._limits}
        for name in limits:
            self._serve_waiters(name)
