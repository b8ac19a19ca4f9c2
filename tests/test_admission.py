"""proxy/admission.py: in-flight slots, the FIFO/priority wait queue, its bound and deadline,
and cancellation safety, on real asyncio (deadlines are tens of milliseconds)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.admission import Admission, SlotLimits
from proxy.errors import OverloadedError

TIMEOUT_S = 2.0


def first(free: list[str]) -> str:
    return free[0]


async def settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


def admission(overflows: list[str] | None = None, **limits: SlotLimits) -> Admission:
    sink = overflows if overflows is not None else []
    return Admission(limits, on_overflow=sink.append)


def one_slot(max_queue: int = 10, queue_timeout_s: float = TIMEOUT_S) -> SlotLimits:
    return SlotLimits(1, max_queue, queue_timeout_s)


def waiter(adm: Admission, candidates: list[str], priority: int = 0) -> asyncio.Task[str]:
    return asyncio.create_task(adm.acquire(candidates, first, priority))


async def finish(*tasks: asyncio.Task[str]) -> list[str]:
    return await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)


# --- free slots -----------------------------------------------------------------------------


def test_try_acquire_takes_free_slots_until_full() -> None:
    adm = admission(a=SlotLimits(2), b=SlotLimits(1))
    assert adm.try_acquire(["a"], first) == "a"
    assert adm.try_acquire(["a"], first) == "a"
    assert adm.try_acquire(["a"], first) is None
    assert adm.in_flight("a") == 2
    assert not adm.has_free_slot("a")
    assert adm.try_acquire(["a", "b"], first) == "b"  # only b is free
    assert adm.try_acquire(["a", "b"], first) is None
    adm.release("a")
    assert adm.has_free_slot("a")
    assert adm.in_flight("a") == 1


def test_try_acquire_lets_the_chooser_pick_among_free_slots() -> None:
    adm = admission(a=SlotLimits(3), b=SlotLimits(3))
    seen: list[list[str]] = []

    def last(free: list[str]) -> str:
        seen.append(free)
        return free[-1]

    assert adm.try_acquire(["a", "b"], last) == "b"
    assert seen == [["a", "b"]]


def test_unbounded_slots_never_fill() -> None:
    adm = admission(a=SlotLimits(None))
    assert all(adm.try_acquire(["a"], first) == "a" for _ in range(1000))
    assert adm.in_flight("a") == 1000
    assert repr(adm) == "<Admission [in flight: a: 1000/- | queued: 0]>"


def test_release_never_goes_below_zero() -> None:
    adm = admission(a=SlotLimits(1))
    adm.release("a")
    adm.release("a")
    assert adm.in_flight("a") == 0
    assert adm.try_acquire(["a"], first) == "a"
    assert adm.try_acquire(["a"], first) is None


async def test_acquire_takes_a_free_slot_without_waiting() -> None:
    adm = admission(a=one_slot())
    assert await adm.acquire(["a"], first) == "a"
    assert adm.in_flight("a") == 1
    assert adm.queue_depth == 0


# --- the queue ------------------------------------------------------------------------------


async def test_waiters_are_served_fifo_on_release() -> None:
    adm = admission(a=one_slot())
    adm.try_acquire(["a"], first)
    tasks = []
    for _ in range(3):
        tasks.append(waiter(adm, ["a"]))
        await settle()
    assert adm.queue_depth == 3
    served: list[int] = []
    for i, task in enumerate(tasks):
        task.add_done_callback(lambda _, i=i: served.append(i))
    for _ in range(3):
        adm.release("a")
        await settle()
        assert adm.in_flight("a") == 1  # handed straight to the next waiter
    assert served == [0, 1, 2]
    assert await finish(*tasks) == ["a", "a", "a"]
    adm.release("a")
    assert (adm.in_flight("a"), adm.queue_depth) == (0, 0)


async def test_higher_key_priority_is_served_before_earlier_arrivals() -> None:
    adm = admission(a=one_slot())
    adm.try_acquire(["a"], first)
    low = waiter(adm, ["a"], priority=0)
    await settle()
    mid = waiter(adm, ["a"], priority=1)
    await settle()
    high = waiter(adm, ["a"], priority=5)
    await settle()
    adm.release("a")
    await settle()
    assert (high.done(), mid.done(), low.done()) == (True, False, False)
    adm.release("a")
    await settle()
    assert (mid.done(), low.done()) == (True, False)
    adm.release("a")
    assert await finish(low) == ["a"]


async def test_no_slot_stays_free_while_someone_waits() -> None:
    """A slot released while a waiter is queued goes to that waiter in the same step."""
    adm = admission(a=one_slot())
    adm.try_acquire(["a"], first)
    task = waiter(adm, ["a"])
    await settle()
    adm.release("a")
    assert adm.in_flight("a") == 1
    assert not adm.has_free_slot("a")
    assert adm.try_acquire(["a"], first) is None  # the slot is already the waiter's
    assert await finish(task) == ["a"]


async def test_new_arrivals_queue_behind_waiters_for_the_same_candidates() -> None:
    adm = admission(a=SlotLimits(2, 10, TIMEOUT_S))
    adm.try_acquire(["a"], first)
    adm.try_acquire(["a"], first)
    early = waiter(adm, ["a"])
    await settle()
    assert adm.try_acquire(["a"], first) is None
    adm.release("a")
    assert await finish(early) == ["a"]


@pytest.mark.parametrize("freed", ["a", "b"])
async def test_a_waiter_for_two_deployments_is_served_by_either(freed: str) -> None:
    adm = admission(a=one_slot(), b=one_slot())
    adm.try_acquire(["a"], first)
    adm.try_acquire(["b"], first)
    task = waiter(adm, ["a", "b"])
    await settle()
    assert (adm.queued_for("a"), adm.queued_for("b"), adm.queue_depth) == (1, 1, 1)
    adm.release(freed)
    assert await finish(task) == [freed]
    assert (adm.in_flight("a"), adm.in_flight("b")) == (1, 1)
    assert adm.queue_depth == 0


async def test_release_skips_waiters_it_cannot_serve() -> None:
    adm = admission(a=one_slot(), b=one_slot())
    adm.try_acquire(["a"], first)
    adm.try_acquire(["b"], first)
    wants_b = waiter(adm, ["b"], priority=9)  # first in the heap, but only b serves it
    await settle()
    wants_a = waiter(adm, ["a"])
    await settle()
    adm.release("a")
    assert await finish(wants_a) == ["a"]
    assert not wants_b.done()
    adm.release("b")
    assert await finish(wants_b) == ["b"]


async def test_queued_for_and_queue_depth() -> None:
    adm = admission(a=one_slot(), b=one_slot(), c=one_slot())
    for name in "abc":
        adm.try_acquire([name], first)
    tasks = [waiter(adm, ["a"]), waiter(adm, ["a", "b"]), waiter(adm, ["a", "b"]), waiter(adm, ["c"])]
    await settle()
    assert adm.queue_depth == 4
    assert (adm.queued_for("a"), adm.queued_for("b"), adm.queued_for("c")) == (3, 2, 1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert adm.queue_depth == 0
    assert adm.queued_for("a") == 0


async def test_repr_shows_slots_and_queue() -> None:
    adm = admission(a=one_slot(), b=SlotLimits(None))
    assert repr(adm) == "<Admission [in flight: a: 0/1, b: 0/- | queued: 0]>"
    adm.try_acquire(["a"], first)
    adm.try_acquire(["b"], first)
    tasks = [waiter(adm, ["a"]), waiter(adm, ["a"])]
    await settle()
    assert repr(adm) == "<Admission [in flight: a: 1/1, b: 1/- | queued: 2]>"
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- bound and deadline ------------------------------------------------------------------------


async def test_full_queue_refuses_at_once_and_counts_the_overflow() -> None:
    overflows: list[str] = []
    adm = admission(overflows, a=SlotLimits(1, 1, 5.0), b=SlotLimits(1, 2, 3.0))
    adm.try_acquire(["a"], first)
    adm.try_acquire(["b"], first)
    tasks = [waiter(adm, ["b", "a"]) for _ in range(3)]  # the bound is 1 + 2
    await settle()
    assert adm.queue_depth == 3
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(OverloadedError) as info:
        await adm.acquire(["b", "a"], first)
    assert loop.time() - started < 0.1
    err = info.value
    assert err.http_status == 503
    assert err.code == "overloaded"
    assert err.retry_after_s == 5.0  # the longest queue_timeout of the candidates
    assert err.headers()["retry-after"] == "5"
    assert overflows == ["a,b"]
    assert adm.queue_depth == 3
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_zero_queue_refuses_when_busy() -> None:
    overflows: list[str] = []
    adm = admission(overflows, a=SlotLimits(1, 0, 5.0))
    adm.try_acquire(["a"], first)
    with pytest.raises(OverloadedError) as info:
        await adm.acquire(["a"], first)
    assert info.value.retry_after_s == 5.0
    assert overflows == ["a"]


async def test_deadline_refuses_with_retry_after_and_leaves_the_queue() -> None:
    overflows: list[str] = []
    adm = admission(overflows, a=SlotLimits(1, 10, 0.05))
    adm.try_acquire(["a"], first)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(OverloadedError) as info:
        await asyncio.wait_for(adm.acquire(["a"], first), TIMEOUT_S)
    assert 0.04 <= loop.time() - started < 1.0
    assert info.value.retry_after_s == 1.0  # at least a second
    assert "Timed out" in info.value.message
    assert overflows == ["a"]
    assert adm.queue_depth == 0
    adm.release("a")
    assert adm.in_flight("a") == 0  # the timed-out waiter got nothing


# --- cancellation -----------------------------------------------------------------------------


async def test_cancelled_waiter_leaves_the_queue() -> None:
    adm = admission(a=one_slot())
    adm.try_acquire(["a"], first)
    gone, stays = waiter(adm, ["a"]), waiter(adm, ["a"])
    await settle()
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert adm.queue_depth == 1
    adm.release("a")
    assert await finish(stays) == ["a"]
    adm.release("a")
    assert (adm.in_flight("a"), adm.queue_depth) == (0, 0)


async def test_slot_handed_to_a_waiter_cancelled_in_the_same_instant_passes_on() -> None:
    adm = admission(a=one_slot())
    adm.try_acquire(["a"], first)
    unlucky, next_one = waiter(adm, ["a"]), waiter(adm, ["a"])
    await settle()
    adm.release("a")  # the slot goes to `unlucky` ...
    unlucky.cancel()  # ... which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await unlucky
    assert await finish(next_one) == ["a"]
    assert adm.in_flight("a") == 1
    adm.release("a")
    assert (adm.in_flight("a"), adm.queue_depth) == (0, 0)


async def test_slot_handed_to_the_last_waiter_cancelled_in_the_same_instant_is_freed() -> None:
    adm = admission(a=one_slot())
    adm.try_acquire(["a"], first)
    unlucky = waiter(adm, ["a"])
    await settle()
    adm.release("a")
    unlucky.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unlucky
    assert (adm.in_flight("a"), adm.queue_depth) == (0, 0)
    assert adm.try_acquire(["a"], first) == "a"


async def test_many_waiters_some_cancelled_leak_no_slot() -> None:
    adm = admission(a=SlotLimits(2, 100, TIMEOUT_S), b=SlotLimits(1, 100, TIMEOUT_S))

    async def user(i: int) -> None:
        name = await adm.acquire(["a", "b"] if i % 2 else ["a"], first, priority=i % 3)
        try:
            await asyncio.sleep(0)
        finally:
            adm.release(name)

    tasks = [asyncio.create_task(user(i)) for i in range(40)]
    await asyncio.sleep(0)
    for task in tasks[::3]:
        task.cancel()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), TIMEOUT_S)
    assert sum(1 for t in tasks if t.cancelled()) >= 1
    assert (adm.in_flight("a"), adm.in_flight("b"), adm.queue_depth) == (0, 0, 0)


async def test_a_slot_freed_after_a_waiter_was_served_is_taken_at_once() -> None:
    """No slot stays free while someone waits, even in the instant between a waiter being
    handed its slot and it running: a waiter that was already served must not make a new
    request for the same candidates queue behind it (the stale-connection retry in
    ``Dispatcher`` re-acquires in exactly that instant)."""
    adm = admission(a=SlotLimits(2, 10, 0.2))
    adm.try_acquire(["a"], first)
    adm.try_acquire(["a"], first)
    served = waiter(adm, ["a"])
    await settle()
    adm.release("a")  # handed to `served`, which has not run yet
    adm.release("a")  # nobody else waits: this slot is free
    assert adm.has_free_slot("a")
    assert adm.try_acquire(["a"], first) == "a"
    adm.release("a")
    assert await finish(served) == ["a"]
