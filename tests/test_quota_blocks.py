"""proxy/quota_blocks.py: blocks of quota, decided without I/O on a fake clock.

The property test drives ``QuotaBlocks`` through random sequences of requests, settles,
clock steps, the store's answers (granted, cut, refused, unanswered) and expiry timers, plays
the store's part by hand (it reads ``messages()`` and answers the grant requests), and checks
the rules the Redis store relies on: a block never admits more than it was granted, nor
after its time; a shape has at most one block request in flight; a block is given back in
full exactly once, after its last request; and what comes back plus what was used is
exactly what was reserved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from proxy.quota_blocks import MIN_BLOCK, Block, GiveBack, GrantRequest, QuotaBlocks

TTL_S = 0.25
T0 = 1_000.0
USD_PER_TOKEN = 1 / 128  # dyadic: sums of dollars are exact


class FakeClock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ids() -> Any:
    n = 0

    def new_id() -> str:
        nonlocal n
        n += 1
        return f"blk_{n}"
    return new_id


def new_blocks(clock: FakeClock, max_requests: int = 64) -> QuotaBlocks[str, str]:
    return QuotaBlocks(TTL_S, max_requests, clock, new_block_id=ids())


def grants(blocks: QuotaBlocks[str, str]) -> list[GrantRequest[str]]:
    return [m for m in blocks.messages() if isinstance(m, GrantRequest)]


def admit_n(blocks: QuotaBlocks[str, str], shape: str, n: int, tokens: int = 10,
            prefix: str = "ls") -> list[Block[str, str] | None]:
    return [blocks.admit(shape, f"{prefix}_{i}", tokens, tokens * USD_PER_TOKEN) for i in range(n)]


# --- one behaviour at a time -----------------------------------------------------------------


def test_a_busy_shape_asks_for_a_block_and_admits_from_it() -> None:
    clock = FakeClock()
    blocks = new_blocks(clock)
    assert admit_n(blocks, "k", MIN_BLOCK - 1) == [None] * (MIN_BLOCK - 1)
    assert not blocks.messages()  # not busy enough yet
    assert blocks.admit("k", "ls_x", 10, 0.0) is None
    [request] = grants(blocks)
    assert (request.shape, request.size, request.tokens) == ("k", MIN_BLOCK, 10)
    assert request.expires_at == T0 + TTL_S
    assert blocks.granting("k")
    block = blocks.granted(request, MIN_BLOCK, "payload", slots=MIN_BLOCK, refunds=True)
    assert not blocks.granting("k")
    assert repr(blocks) == ("<QuotaBlocks [in use: blk_1 4/4 | spare: - | ending: 0 | granting: 0"
                            " | requests in flight: 0]>")
    assert blocks.admit("k", "a", 10, 0.0) is block
    assert blocks.block_of("a") is block
    assert repr(block) == f"<Block blk_1 [3 of 4 requests left, 1 in flight, until {T0 + TTL_S:.3f}]>"


def test_the_next_block_is_asked_for_at_half_and_follows_the_current_one() -> None:
    clock = FakeClock()
    blocks = new_blocks(clock)
    admit_n(blocks, "k", MIN_BLOCK)
    first = blocks.granted(grants(blocks)[0], 4, "one", slots=0, refunds=True)
    assert blocks.admit("k", "a", 10, 0.0) is first
    assert not blocks.messages()
    assert blocks.admit("k", "b", 10, 0.0) is first  # half used: the next one is asked for
    [request] = grants(blocks)
    second = blocks.granted(request, 4, "two", slots=0, refunds=True)
    assert "spare: blk_2 4/4" in repr(blocks)
    assert [blocks.admit("k", x, 10, 0.0) for x in "cd"] == [first, first]
    assert blocks.admit("k", "e", 10, 0.0) is second  # the first is used up: closed
    assert first.closed
    assert not second.closed
    assert "ending: 1" in repr(blocks)


def test_refused_or_unanswered_shapes_are_checked_one_by_one_for_a_ttl() -> None:
    clock = FakeClock()
    blocks = new_blocks(clock)
    admit_n(blocks, "k", MIN_BLOCK)
    blocks.refused(grants(blocks)[0])
    admit_n(blocks, "k", 10, prefix="again")
    assert not blocks.messages()
    clock.t += TTL_S
    admit_n(blocks, "k", MIN_BLOCK, prefix="later")
    request = grants(blocks)[0]
    assert request.size == MIN_BLOCK
    blocks.failed(request)
    clock.t += TTL_S / 2
    admit_n(blocks, "k", MIN_BLOCK, prefix="still")
    assert not blocks.messages()


def test_a_block_is_given_back_once_after_its_last_request() -> None:
    clock = FakeClock()
    blocks = new_blocks(clock)
    admit_n(blocks, "k", MIN_BLOCK)
    block = blocks.granted(grants(blocks)[0], 4, "p", slots=4, refunds=True)
    blocks.admit("k", "a", 10, 10 * USD_PER_TOKEN)
    clock.t += TTL_S
    blocks.expire(block)
    assert not blocks.messages()  # "a" is still running
    assert blocks.settle("a", 10, 10 * USD_PER_TOKEN, 4, 4 * USD_PER_TOKEN)
    [give] = blocks.messages()
    assert give == GiveBack(block, 40 - 4, (40 - 4) * USD_PER_TOKEN, final=True)
    blocks.expire(block)
    assert not blocks.messages()
    assert not blocks.settle("a", 10, 0.0, 4, 0.0)  # not from a block any more


def test_a_debt_is_charged_at_once() -> None:
    clock = FakeClock()
    blocks = new_blocks(clock)
    admit_n(blocks, "k", MIN_BLOCK)
    block = blocks.granted(grants(blocks)[0], 4, "p", slots=0, refunds=True)
    blocks.admit("k", "a", 10, 0.0)
    blocks.settle("a", 10, 0.0, 15, 0.0)
    assert blocks.messages() == [GiveBack(block, -5, 0.0, final=False)]


def test_requests_only_blocks_give_nothing_back() -> None:
    clock = FakeClock()
    blocks = new_blocks(clock)
    admit_n(blocks, "k", MIN_BLOCK)
    block = blocks.granted(grants(blocks)[0], 4, "p", slots=0, refunds=False)
    blocks.admit("k", "a", 10, 0.0)
    blocks.expire(block)
    blocks.settle("a", 10, 0.0, 3, 0.0)
    assert not blocks.messages()


def test_a_block_granted_too_late_is_closed_at_once() -> None:
    clock = FakeClock()
    blocks = new_blocks(clock)
    admit_n(blocks, "k", MIN_BLOCK)
    request = grants(blocks)[0]
    clock.t += TTL_S
    block = blocks.granted(request, 4, "p", slots=4, refunds=True)
    assert block.closed
    assert blocks.messages() == [GiveBack(block, 40, 40 * USD_PER_TOKEN, final=True)]
    assert blocks.admit("k", "a", 10, 0.0) is None


def test_the_next_block_lasts_half_a_ttl_at_the_rate_the_last_was_used() -> None:
    clock = FakeClock()
    blocks = new_blocks(clock, max_requests=100)
    admit_n(blocks, "k", MIN_BLOCK)
    block = blocks.granted(grants(blocks)[0], 4, "p", slots=0, refunds=False)
    clock.t += 1 / 128
    assert blocks.admit("k", "a", 10, 0.0) is block
    blocks.expire(block)  # 1 request in 1/128 s: 128/s, half a TTL of that is 16
    assert blocks.admit("k", "b", 10, 0.0) is None
    assert [r.size for r in grants(blocks)] == [16]


def test_close_gives_back_every_idle_block() -> None:
    clock = FakeClock()
    blocks = new_blocks(clock)
    admit_n(blocks, "k", MIN_BLOCK)
    admit_n(blocks, "j", MIN_BLOCK, prefix="j")
    [rk, rj] = grants(blocks)
    bk = blocks.granted(rk, 4, "p", slots=4, refunds=False)
    bj = blocks.granted(rj, 4, "p", slots=0, refunds=True)
    blocks.close()
    assert blocks.messages() == [GiveBack(bk, 40, 40 * USD_PER_TOKEN, True),
                                 GiveBack(bj, 40, 40 * USD_PER_TOKEN, True)]
    assert "in use: - | spare: -" in repr(blocks)


# --- the property: any sequence keeps the rules ------------------------------------------------

SHAPES = ("k1", "k2")


@dataclass
class Ledger:
    """What the test saw of one block."""

    block: Block[str, str]
    reserved_tokens: int
    admitted: int = 0
    used_tokens: int = 0
    returned_tokens: int = 0
    returned_usd: float = 0.0
    used_usd: float = 0.0
    finals: int = 0


@dataclass
class World:
    clock: FakeClock
    blocks: QuotaBlocks[str, str]
    asked: list[GrantRequest[str]] = field(default_factory=list)  # unanswered, oldest first
    leases: dict[str, tuple[Block[str, str], int]] = field(default_factory=dict)  # id -> block, tokens
    single: set[str] = field(default_factory=set)  # checked in the store
    ledgers: dict[str, Ledger] = field(default_factory=dict)
    timers: list[Block[str, str]] = field(default_factory=list)
    n: int = 0

    def drain(self) -> None:
        for message in self.blocks.messages():
            if isinstance(message, GrantRequest):
                assert not any(r.shape == message.shape for r in self.asked), "two grants in flight"
                assert self.blocks.granting(message.shape)
                self.asked.append(message)
                continue
            ledger = self.ledgers[message.block.block_id]
            assert ledger.finals == 0, "given back after its final give-back"
            ledger.returned_tokens += message.tokens
            ledger.returned_usd += message.usd
            if message.final:
                assert message.block.in_flight == 0, "final give-back with requests in flight"
                assert message.block.closed
                ledger.finals += 1


def act(world: World, action: tuple[Any, ...]) -> None:
    kind = action[0]
    blocks = world.blocks
    if kind == "advance":
        world.clock.t += action[1]
    elif kind == "to expiry" and (open_ := [b for b in world.timers if not b.closed]):
        # the instant a block ends: a request may come before its timer fires
        world.clock.t = max(world.clock.t, min(b.expires_at for b in open_) + action[1])
    elif kind == "acquire":
        _, shape, tokens, count = action
        for _ in range(count):
            world.n += 1
            acquire(world, shape, f"ls_{world.n}", tokens)
    elif kind == "settle" and (world.leases or world.single):
        _, pick, used = action
        every = sorted(world.leases) + sorted(world.single)
        lease = every[pick % len(every)]
        if lease in world.single:
            world.single.discard(lease)
            assert not blocks.settle(lease, 10, 0.0, used, 0.0)
        else:
            block, tokens = world.leases.pop(lease)
            actual = min(used, 2 * tokens)
            assert blocks.settle(lease, tokens, tokens * USD_PER_TOKEN, actual, actual * USD_PER_TOKEN)
            ledger = world.ledgers[block.block_id]
            ledger.used_tokens += actual
            ledger.used_usd += actual * USD_PER_TOKEN
    elif kind == "answer" and world.asked:
        _, outcome, cut = action
        answer(world, world.asked.pop(0), outcome, cut)
    elif kind == "timers":
        for block in [b for b in world.timers if b.expires_at <= world.clock.t]:
            world.timers.remove(block)
            blocks.expire(block)
    world.drain()


def acquire(world: World, shape: str, lease: str, tokens: int) -> None:
    block = world.blocks.admit(shape, lease, tokens, tokens * USD_PER_TOKEN)
    if block is None:
        world.single.add(lease)
        return
    ledger = world.ledgers[block.block_id]
    assert world.clock.t < block.expires_at, "admitted after its time"
    ledger.admitted += 1
    assert ledger.admitted <= block.size, "admitted more than granted"
    assert block.tokens_left >= 0
    world.leases[lease] = (block, tokens)


def answer(world: World, request: GrantRequest[str], outcome: str, cut: int) -> None:
    if outcome == "refused":
        world.blocks.refused(request)
    elif outcome == "failed":
        world.blocks.failed(request)
    else:
        size = max(1, request.size - cut)
        slots = size if outcome == "granted with slots" else 0
        block = world.blocks.granted(request, size, "p", slots, refunds=request.shape == "k1")
        world.ledgers[block.block_id] = Ledger(block, size * request.tokens)
        if not block.closed:
            world.timers.append(block)
    assert not world.blocks.granting(request.shape)


ACTIONS = st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.1, 0.3])),
    st.tuples(st.just("acquire"), st.sampled_from(SHAPES), st.integers(1, 20), st.integers(1, 8)),
    st.tuples(st.just("acquire"), st.sampled_from(SHAPES), st.integers(1, 20), st.integers(1, 8)),
    st.tuples(st.just("acquire"), st.sampled_from(SHAPES), st.integers(1, 20), st.integers(1, 8)),
    st.tuples(st.just("settle"), st.integers(0, 1000), st.integers(0, 40)),
    st.tuples(st.just("answer"), st.sampled_from(["granted", "granted with slots", "refused", "failed"]),
              st.integers(0, 6)),
    st.tuples(st.just("timers")),
    st.tuples(st.just("to expiry"), st.sampled_from([-0.001, 0.0, 0.001])),
)


@settings(max_examples=600, deadline=None)
@given(actions=st.lists(ACTIONS, min_size=10, max_size=150))
def test_any_sequence_keeps_every_block_exact(actions: list[tuple[Any, ...]]) -> None:
    clock = FakeClock()
    world = World(clock, new_blocks(clock, max_requests=32))
    for action in actions:
        act(world, action)
    # The end: the store answers what is asked, time passes, every request settles, and the
    # process closes.
    while world.asked:
        answer(world, world.asked.pop(0), "failed", 0)
        world.drain()
    clock.t += TTL_S
    act(world, ("timers",))
    for lease in list(world.leases) + list(world.single):
        act(world, ("settle", (sorted(world.leases) + sorted(world.single)).index(lease), 7))
    world.blocks.close()
    world.drain()
    assert repr(world.blocks).endswith("ending: 0 | granting: 0 | requests in flight: 0]>")
    for ledger in world.ledgers.values():
        block = ledger.block
        assert block.closed
        assert block.in_flight == 0
        if block.refunds or block.slots:
            assert ledger.finals == 1, ledger
        if block.refunds:  # exact: what was used plus what came back is what was reserved
            assert ledger.used_tokens + ledger.returned_tokens == ledger.reserved_tokens, ledger
            assert ledger.used_usd + ledger.returned_usd == ledger.reserved_tokens * USD_PER_TOKEN
    event(f"blocks granted: {min(len(world.ledgers), 5)}+" if len(world.ledgers) >= 5
          else f"blocks granted: {len(world.ledgers)}")
    event("admitted from a block" if any(x.admitted for x in world.ledgers.values()) else "none admitted")
