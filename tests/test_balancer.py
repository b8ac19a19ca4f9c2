"""proxy/balancer.py: model routing, health (probes, outlier ejection, cooldown), tiers, panic,
the weighted power-of-two-choices pick, and the retry budget. Sans-I/O: a fake clock and a
seeded rng drive everything."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.balancer import Balancer, DeploymentSpec, RetryBudget
from proxy.errors import ModelNotFoundError, OverloadedError, RateLimitError

ANY = ("*",)


class FakeClock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def specs(*items: DeploymentSpec) -> dict[str, DeploymentSpec]:
    return {spec.name: spec for spec in items}


def make(*items: DeploymentSpec, clock: FakeClock | None = None, seed: int = 7,
         model_upstreams: dict[str, tuple[str, ...]] | None = None,
         max_ejection_percent: float = 50.0,
         in_flight: dict[str, int] | None = None, panic_threshold_percent: float = 50.0,
         panics: list[tuple[str, tuple[str, ...]]] | None = None) -> Balancer:
    counts = in_flight if in_flight is not None else {}
    seen = panics if panics is not None else []
    return Balancer(specs(*items), model_upstreams, max_ejection_percent,
                    in_flight=lambda name: counts.get(name, 0),
                    clock=clock or FakeClock(), rng=random.Random(seed),
                    panic_threshold_percent=panic_threshold_percent,
                    on_panic=lambda model, names: seen.append((model, names)))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def routing() -> Balancer:
    return make(
        DeploymentSpec("openai", ("gpt-4o", "gpt-4o-mini", "gpt-3.5*")),
        DeploymentSpec("vllm-a", ("llama-3", "qwen*")),
        DeploymentSpec("vllm-b", ("llama-3",)),
        DeploymentSpec("azure", ("gpt-4o",)),
        model_upstreams={"house-model": ("vllm-b",)},
    )


def pair(clock: FakeClock, **overrides: Any) -> Balancer:
    """Two same-tier deployments of ``m``; ``a`` and ``b`` share ``overrides``."""
    return make(DeploymentSpec("a", ("m",), **overrides), DeploymentSpec("b", ("m",), **overrides),
                clock=clock)


def fail(balancer: Balancer, name: str, times: int) -> list[bool]:
    return [balancer.record_failure(name) for _ in range(times)]


# --- routing -------------------------------------------------------------------------------


def test_deployments_for_matches_patterns_in_config_order(routing: Balancer) -> None:
    assert routing.deployments_for("gpt-4o") == ("openai", "azure")
    assert routing.deployments_for("gpt-3.5-turbo") == ("openai",)
    assert routing.deployments_for("qwen2-7b") == ("vllm-a",)
    assert routing.deployments_for("llama-3") == ("vllm-a", "vllm-b")
    assert routing.deployments_for("llama-3.1") == ()


def test_deployments_for_includes_models_upstreams(routing: Balancer) -> None:
    assert routing.deployments_for("house-model") == ("vllm-b",)
    routing.require("house-model", ANY)
    assert routing.candidates("house-model", ANY) == ["vllm-b"]


def test_catch_all_deployment_serves_any_model() -> None:
    balancer = make(DeploymentSpec("specific", ("gpt-4o",)), DeploymentSpec("fallback", ("*",)))
    assert balancer.deployments_for("whatever/model") == ("fallback",)
    assert balancer.deployments_for("gpt-4o") == ("specific", "fallback")


def test_require_unknown_model_is_model_not_found(routing: Balancer) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        routing.require("claude-3", ANY)
    assert info.value.http_status == 404
    assert info.value.code == "model_not_found"
    assert "claude-3" in info.value.message


def test_model_the_key_may_not_use_answers_like_an_unknown_one(routing: Balancer) -> None:
    with pytest.raises(ModelNotFoundError) as forbidden:
        routing.require("gpt-4o", ("llama-*",))
    with pytest.raises(ModelNotFoundError) as unknown:
        routing.require("gpt-5", ("gpt-*",))
    assert forbidden.value.code == unknown.value.code == "model_not_found"
    with pytest.raises(ModelNotFoundError):
        routing.candidates("gpt-4o", ("llama-*",))
    routing.require("llama-3", ("llama-*",))
    assert routing.candidates("llama-3", ("llama-*",)) == ["vllm-a", "vllm-b"]


def test_require_passes_even_when_every_deployment_is_down(routing: Balancer) -> None:
    for _ in range(3):
        routing.record_probe("azure", False)
        routing.record_probe("openai", False)
    routing.require("gpt-4o", ANY)  # 404 is only for models nothing serves
    with pytest.raises(OverloadedError):
        routing.candidates("gpt-4o", ANY)


def test_default_for_and_explicit_models(routing: Balancer) -> None:
    assert routing.default_for(ANY) == "openai"
    assert routing.default_for(("llama-*",)) == "vllm-a"
    assert routing.default_for(("nothing-matches",)) == "openai"
    assert routing.explicit_models() == ["house-model", "gpt-4o", "gpt-4o-mini", "llama-3"]
    catch_all = make(DeploymentSpec("a", ("gpt-4o",)), DeploymentSpec("b", ("*",)))
    assert catch_all.default_for(("llama-3",)) == "b"
    assert make(DeploymentSpec("x", ("*",)), DeploymentSpec("y", ("m[12]", "m?"))).explicit_models() == []


# --- tiers -----------------------------------------------------------------------------------


def tiered(clock: FakeClock) -> Balancer:
    return make(DeploymentSpec("p0-a", ("m",), priority=0),
                DeploymentSpec("p0-b", ("m",), priority=0),
                DeploymentSpec("p1", ("m",), priority=1, unhealthy_threshold=1),
                clock=clock, max_ejection_percent=100)


def test_candidates_are_the_best_priority_tier_only(clock: FakeClock) -> None:
    balancer = tiered(clock)
    assert balancer.candidates("m", ANY) == ["p0-a", "p0-b"]


def test_lower_tier_takes_traffic_only_when_the_best_tier_is_out(clock: FakeClock) -> None:
    balancer = tiered(clock)
    for name in ("p0-a", "p0-b"):
        for _ in range(3):
            balancer.record_probe(name, False)
    assert balancer.candidates("m", ANY) == ["p1"]
    for _ in range(2):
        balancer.record_probe("p0-b", True)
    assert balancer.candidates("m", ANY) == ["p0-b"]


def test_exclude_prefers_untried_deployments(clock: FakeClock) -> None:
    balancer = tiered(clock)
    assert balancer.candidates("m", ANY, frozenset({"p0-a"})) == ["p0-b"]
    # Both of the best tier tried: the next tier is untried, so it goes there.
    assert balancer.candidates("m", ANY, frozenset({"p0-a", "p0-b"})) == ["p1"]


def test_exclude_falls_back_to_tried_ones_when_nothing_else_is_left(clock: FakeClock) -> None:
    balancer = tiered(clock)
    everything = frozenset({"p0-a", "p0-b", "p1"})
    assert balancer.candidates("m", ANY, everything) == ["p0-a", "p0-b"]
    single = make(DeploymentSpec("only", ("m",)))
    assert single.candidates("m", ANY, frozenset({"only"})) == ["only"]


# --- active probes --------------------------------------------------------------------------


def test_probes_mark_unhealthy_after_threshold_and_healthy_again(clock: FakeClock) -> None:
    balancer = pair(clock, unhealthy_threshold=3, healthy_threshold=2)
    assert [balancer.record_probe("a", False) for _ in range(4)] == [None, None, False, None]
    assert balancer.status("a") == "unhealthy"
    assert balancer.candidates("m", ANY) == ["b"]
    assert [balancer.record_probe("a", True) for _ in range(3)] == [None, True, None]
    assert balancer.status("a") == "healthy"
    assert balancer.candidates("m", ANY) == ["a", "b"]


def test_a_success_breaks_a_failing_probe_streak(clock: FakeClock) -> None:
    balancer = pair(clock, unhealthy_threshold=2, healthy_threshold=2)
    assert balancer.record_probe("a", False) is None
    assert balancer.record_probe("a", True) is None
    assert balancer.record_probe("a", False) is None  # streak restarted
    assert balancer.status("a") == "healthy"
    assert balancer.record_probe("a", False) is False
    assert balancer.record_probe("a", True) is None
    assert balancer.record_probe("a", False) is None  # a success does not count towards healthy
    assert balancer.record_probe("a", True) is None
    assert balancer.record_probe("a", True) is True


def test_probe_recovery_clears_an_ejection(clock: FakeClock) -> None:
    balancer = pair(clock, consecutive_failures=1, unhealthy_threshold=1, healthy_threshold=1)
    assert balancer.record_failure("a") is True
    balancer.record_probe("a", False)
    assert balancer.status("a") == "unhealthy"
    assert balancer.record_probe("a", True) is True
    assert balancer.status("a") == "healthy"


# --- outlier ejection -----------------------------------------------------------------------


def test_consecutive_failures_eject_for_base_ejection(clock: FakeClock) -> None:
    balancer = pair(clock, consecutive_failures=3, base_ejection_s=30.0)
    assert fail(balancer, "a", 3) == [False, False, True]
    assert balancer.status("a") == "ejected"
    assert balancer.candidates("m", ANY) == ["b"]
    clock.advance(29.9)
    assert balancer.status("a") == "ejected"
    clock.advance(0.2)
    assert balancer.status("a") == "healthy"
    assert balancer.candidates("m", ANY) == ["a", "b"]


def test_record_success_resets_the_failure_streak(clock: FakeClock) -> None:
    balancer = pair(clock, consecutive_failures=3)
    fail(balancer, "a", 2)
    balancer.record_success("a")
    assert fail(balancer, "a", 2) == [False, False]
    assert balancer.status("a") == "healthy"
    assert balancer.record_failure("a") is True


def test_failures_while_ejected_do_not_extend_the_ejection(clock: FakeClock) -> None:
    balancer = pair(clock, consecutive_failures=1, base_ejection_s=30.0)
    assert balancer.record_failure("a") is True
    clock.advance(10)
    assert fail(balancer, "a", 5) == [False] * 5
    clock.advance(20.1)
    assert balancer.status("a") == "healthy"


def ejection_length_s(balancer: Balancer, clock: FakeClock, name: str) -> float:
    """Eject ``name`` now (one failure suffices) and measure how long it stays out."""
    assert balancer.record_failure(name) is True
    health = balancer.health[name]
    length = health.ejected_until - clock.now
    clock.now = health.ejected_until + 1.0  # just after it ends
    return length


def test_repeated_ejections_double_up_to_max_ejection(clock: FakeClock) -> None:
    balancer = pair(clock, consecutive_failures=1, base_ejection_s=30.0, max_ejection_s=200.0)
    lengths = [ejection_length_s(balancer, clock, "a") for _ in range(5)]
    assert lengths == [30.0, 60.0, 120.0, 200.0, 200.0]


def test_ejection_length_resets_after_a_long_quiet_period(clock: FakeClock) -> None:
    balancer = pair(clock, consecutive_failures=1, base_ejection_s=30.0, max_ejection_s=200.0)
    assert [ejection_length_s(balancer, clock, "a") for _ in range(3)] == [30.0, 60.0, 120.0]
    clock.advance(1000.0)  # far longer than max_ejection + base_ejection since the last one
    assert ejection_length_s(balancer, clock, "a") == 30.0
    assert ejection_length_s(balancer, clock, "a") == 60.0


def test_max_ejection_percent_keeps_the_rest_serving(clock: FakeClock) -> None:
    names = ("d1", "d2", "d3", "d4")
    balancer = make(*(DeploymentSpec(n, ("m",), consecutive_failures=1) for n in names),
                    clock=clock, max_ejection_percent=50)
    for name in ("d1", "d2", "d3"):  # ejected in this order, a second apart
        assert balancer.record_failure(name) is True
        clock.advance(1)
    # At most 2 of 4 out: the most recently ejected (d2, d3) stay out, d1 serves again.
    assert balancer.candidates("m", ANY) == ["d1", "d4"]
    assert balancer.status("d1") == "ejected"  # still ejected on paper, just not kept out


@pytest.mark.parametrize("percent", [0.0, 10.0])
def test_max_ejection_percent_lets_at_least_one_out(clock: FakeClock, percent: float) -> None:
    balancer = make(*(DeploymentSpec(n, ("m",), consecutive_failures=1) for n in ("a", "b", "c")),
                    clock=clock, max_ejection_percent=percent)
    balancer.record_failure("a")
    clock.advance(1)
    assert balancer.candidates("m", ANY) == ["b", "c"]
    balancer.record_failure("b")
    assert balancer.candidates("m", ANY) == ["a", "c"]  # b, the newest, is the one kept out


def test_single_deployment_ejected_without_panic_is_unavailable(clock: FakeClock) -> None:
    balancer = make(DeploymentSpec("only", ("m",), consecutive_failures=1, base_ejection_s=30.0),
                    clock=clock, max_ejection_percent=50, panic_threshold_percent=0)
    balancer.record_failure("only")
    with pytest.raises(OverloadedError) as info:
        balancer.candidates("m", ANY)
    assert info.value.retry_after_s == pytest.approx(30.0)
    assert not balancer.any_healthy()
    assert balancer.panics == 0


# --- cooldown (429) --------------------------------------------------------------------------


def test_rate_limited_deployment_cools_down(clock: FakeClock) -> None:
    balancer = pair(clock)
    balancer.record_rate_limited("a", 7.0)
    assert balancer.status("a") == "cooldown"
    assert balancer.candidates("m", ANY) == ["b"]
    balancer.record_rate_limited("a", 2.0)  # a shorter hint never shortens the cooldown
    clock.advance(6.9)
    assert balancer.candidates("m", ANY) == ["b"]
    clock.advance(0.2)
    assert balancer.status("a") == "healthy"
    assert balancer.candidates("m", ANY) == ["a", "b"]


# --- nothing available -----------------------------------------------------------------------


def test_all_cooling_down_is_429_with_the_shortest_wait(clock: FakeClock) -> None:
    # The upstreams asked to wait: the client gets the upstreams' own answer, a 429.
    balancer = pair(clock)
    balancer.record_rate_limited("a", 12.0)
    balancer.record_rate_limited("b", 4.0)
    with pytest.raises(RateLimitError) as info:
        balancer.candidates("m", ANY)
    err = info.value
    assert err.http_status == 429
    assert err.code == "upstream_rate_limited"
    assert err.retry_after_s == pytest.approx(4.0)
    assert err.headers()["retry-after"] == "4"
    assert "`m`" in err.message


@pytest.mark.parametrize("threshold", [0.0, 50.0])
def test_cooling_down_and_ejected(clock: FakeClock, threshold: float) -> None:
    # The cooling-down a is out of the panic arithmetic: b is all that is left, so in panic
    # it takes the traffic; with panic off the answer is 503 no_healthy_upstream.
    balancer = make(DeploymentSpec("a", ("m",)), DeploymentSpec("b", ("m",)), clock=clock,
                    panic_threshold_percent=threshold)
    balancer.record_rate_limited("a", 12.0)
    for _ in range(balancer.specs["b"].consecutive_failures):
        balancer.record_failure("b")
    if threshold:
        assert balancer.candidates("m", ANY) == ["b"]
        return
    with pytest.raises(OverloadedError) as info:
        balancer.candidates("m", ANY)
    assert info.value.http_status == 503
    assert info.value.code == "no_healthy_upstream"


def test_cooldown_retry_hint_is_the_exact_wait(clock: FakeClock) -> None:
    # retry-after-ms carries it to the millisecond; retry-after rounds up to 1 s.
    balancer = pair(clock)
    balancer.record_rate_limited("a", 0.2)
    balancer.record_rate_limited("b", 0.3)
    with pytest.raises(RateLimitError) as info:
        balancer.candidates("m", ANY)
    assert info.value.retry_after_s == pytest.approx(0.2)
    assert info.value.headers()["retry-after"] == "1"
    assert info.value.headers()["retry-after-ms"] == "200"


def test_ejection_retry_hint_is_at_least_one_second(clock: FakeClock) -> None:
    balancer = make(DeploymentSpec("a", ("m",), consecutive_failures=1, base_ejection_s=0.2), clock=clock,
                    panic_threshold_percent=0)
    balancer.record_failure("a")
    with pytest.raises(OverloadedError) as info:
        balancer.candidates("m", ANY)
    assert info.value.retry_after_s == 1.0


def test_all_unhealthy_is_503_with_a_default_hint(clock: FakeClock) -> None:
    balancer = pair(clock, unhealthy_threshold=1)
    balancer.record_probe("a", False)
    balancer.record_probe("b", False)
    with pytest.raises(OverloadedError) as info:
        balancer.candidates("m", ANY)
    assert info.value.code == "no_healthy_upstream"
    assert info.value.retry_after_s == 5.0


# --- panic (Envoy's panic threshold) ---------------------------------------------------------


def test_single_deployment_ejected_is_still_routed_in_panic(clock: FakeClock) -> None:
    # The 10,000-stream incident: the only deployment of a model was ejected; it must still
    # get the traffic (0 % healthy < 50 %), not a 503.
    panics: list[tuple[str, tuple[str, ...]]] = []
    balancer = make(DeploymentSpec("only", ("m",), consecutive_failures=1), clock=clock, panics=panics)
    assert balancer.record_failure("only") is True
    assert balancer.status("only") == "ejected"
    assert balancer.candidates("m", ANY) == ["only"]
    assert balancer.candidates("m", ANY, frozenset({"only"})) == ["only"]  # the retry too
    assert balancer.any_healthy()
    assert balancer.panic_models() == ["m"]
    assert repr(balancer) == "<Balancer [only: ejected | panic: m]>"
    assert (balancer.panics, panics) == (1, [("m", ("only",))])


def test_entering_panic_is_counted_once_per_episode(clock: FakeClock) -> None:
    panics: list[tuple[str, tuple[str, ...]]] = []
    balancer = make(DeploymentSpec("a", ("m", "n"), consecutive_failures=1, base_ejection_s=10.0),
                    clock=clock, panics=panics)
    balancer.record_failure("a")
    for _ in range(3):
        balancer.candidates("m", ANY)
    balancer.record_rate_limited("a", 0.5)  # a health change: worked out again, still in panic
    clock.advance(0.6)
    balancer.candidates("m", ANY)
    balancer.candidates("n", ANY)
    assert panics == [("m", ("a",)), ("n", ("a",))]
    clock.advance(10)  # the ejection ends: no panic, even before the next request
    assert balancer.panic_models() == []
    assert repr(balancer) == "<Balancer [a: healthy]>"
    assert balancer.candidates("m", ANY) == ["a"]
    balancer.record_failure("a")  # a second episode counts again
    balancer.candidates("m", ANY)
    assert balancer.panics == 3


@pytest.mark.parametrize(("threshold", "expected"), [(0.0, ["b"]), (50.0, ["b"]), (50.1, ["a", "b"]),
                                                     (100.0, ["a", "b"])])
def test_panic_starts_below_the_threshold(clock: FakeClock, threshold: float, expected: list[str]) -> None:
    # One of two ejected: 50 % healthy. Envoy's rule is "below": 50 % is not in panic at 50.
    balancer = make(DeploymentSpec("a", ("m",), consecutive_failures=1), DeploymentSpec("b", ("m",)),
                    clock=clock, panic_threshold_percent=threshold)
    balancer.record_failure("a")
    assert balancer.candidates("m", ANY) == expected
    assert balancer.panic_models() == (["m"] if len(expected) == 2 else [])


def test_panic_spreads_over_ejected_but_never_probe_unhealthy_ones(clock: FakeClock) -> None:
    # 1 healthy of 4 (25 %): the ejected one joins it; the two that probes found down do not.
    balancer = make(*(DeploymentSpec(n, ("m",), consecutive_failures=1, unhealthy_threshold=1)
                      for n in ("ok", "ejected", "down1", "down2")),
                    clock=clock, max_ejection_percent=100)
    balancer.record_failure("ejected")
    balancer.record_probe("down1", False)
    balancer.record_probe("down2", False)
    assert balancer.candidates("m", ANY) == ["ok", "ejected"]
    lower = make(*(DeploymentSpec(n, ("m",), consecutive_failures=1, unhealthy_threshold=1)
                   for n in ("ok", "ejected", "down1", "down2")),
                 clock=clock, max_ejection_percent=100, panic_threshold_percent=20)
    lower.record_failure("ejected")
    lower.record_probe("down1", False)
    lower.record_probe("down2", False)
    assert lower.candidates("m", ANY) == ["ok"]  # 25 % is not below 20 %


def test_only_probe_unhealthy_left_is_503_even_in_panic(clock: FakeClock) -> None:
    balancer = make(DeploymentSpec("only", ("m",), unhealthy_threshold=1), clock=clock)
    balancer.record_probe("only", False)
    with pytest.raises(OverloadedError) as info:
        balancer.candidates("m", ANY)
    assert info.value.code == "no_healthy_upstream"
    assert not balancer.any_healthy()


def test_cooldown_stays_out_in_panic_and_keeps_its_429(clock: FakeClock) -> None:
    balancer = make(DeploymentSpec("only", ("m",), consecutive_failures=1), clock=clock)
    balancer.record_failure("only")
    balancer.record_rate_limited("only", 3.0)  # the upstream asked to wait: that holds
    with pytest.raises(RateLimitError) as info:
        balancer.candidates("m", ANY)
    assert info.value.retry_after_s == pytest.approx(3.0)
    assert balancer.any_healthy()  # rate-limited is alive
    clock.advance(3.1)
    assert balancer.candidates("m", ANY) == ["only"]  # still ejected: routed in panic


def test_cooling_down_deployments_are_out_of_the_panic_arithmetic(clock: FakeClock) -> None:
    names = ("cool", "ejected", "down", "ok")
    balancer = make(*(DeploymentSpec(n, ("m",), consecutive_failures=1, unhealthy_threshold=1)
                      for n in names), clock=clock, max_ejection_percent=100)
    balancer.record_rate_limited("cool", 60)
    balancer.record_failure("ejected")
    balancer.record_probe("down", False)
    # Of the three not cooling down only "ok" is healthy (33 %): panic adds "ejected".
    assert balancer.candidates("m", ANY) == ["ejected", "ok"]


def test_panic_never_pulls_traffic_back_to_a_tier_with_nothing_healthy(clock: FakeClock) -> None:
    balancer = make(DeploymentSpec("p0-a", ("m",), consecutive_failures=1),
                    DeploymentSpec("p0-b", ("m",), consecutive_failures=1),
                    DeploymentSpec("p1", ("m",), priority=1),
                    clock=clock, max_ejection_percent=100)
    balancer.record_failure("p0-a")
    balancer.record_failure("p0-b")
    assert balancer.candidates("m", ANY) == ["p1"]  # tier 1 is healthy: plain failover
    assert balancer.panic_models() == []


def test_nothing_healthy_anywhere_panics_in_the_best_tier_with_an_ejected_one(clock: FakeClock) -> None:
    balancer = make(DeploymentSpec("p0", ("m",), unhealthy_threshold=1),
                    DeploymentSpec("p1-a", ("m",), priority=1, consecutive_failures=1),
                    DeploymentSpec("p1-b", ("m",), priority=1, consecutive_failures=1),
                    DeploymentSpec("p2", ("m",), priority=2, consecutive_failures=1),
                    clock=clock, max_ejection_percent=100)
    balancer.record_probe("p0", False)
    for name in ("p1-a", "p1-b", "p2"):
        balancer.record_failure(name)
    assert balancer.candidates("m", ANY) == ["p1-a", "p1-b"]
    assert balancer.candidates("m", ANY, frozenset({"p1-a", "p1-b"})) == ["p2"]  # then fail over
    assert balancer.panic_models() == ["m"]


def test_panic_in_the_serving_tier_keeps_lower_tiers_for_failover(clock: FakeClock) -> None:
    balancer = make(*(DeploymentSpec(n, ("m",), consecutive_failures=1, unhealthy_threshold=1)
                      for n in ("ok", "ejected", "down")),
                    DeploymentSpec("p1", ("m",), priority=1), clock=clock, max_ejection_percent=100)
    balancer.record_failure("ejected")
    balancer.record_probe("down", False)
    assert balancer.candidates("m", ANY) == ["ok", "ejected"]  # tier 0: 1 of 3 healthy
    assert balancer.candidates("m", ANY, frozenset({"ok", "ejected"})) == ["p1"]


def test_local_failures_are_not_held_against_the_upstream(clock: FakeClock) -> None:
    balancer = pair(clock, consecutive_failures=3)
    fail(balancer, "a", 2)
    assert [balancer.record_failure("a", local=True) for _ in range(10)] == [False] * 10
    assert balancer.status("a") == "healthy"
    assert balancer.local_failures == 10
    assert balancer.health["a"].consecutive_failures == 2  # neither counted nor reset
    assert balancer.record_failure("a") is True


# The property below: random health per deployment, tiers, thresholds and max_ejection_percent.
STATES = ("healthy", "unhealthy", "ejected", "cooldown", "ejected+cooldown", "unhealthy+cooldown")
fleets = st.lists(st.tuples(st.sampled_from(STATES), st.integers(0, 2)), min_size=1, max_size=7)
percents = st.one_of(st.sampled_from([0.0, 1.0, 50.0, 100.0]), st.floats(0, 100))


def build_fleet(fleet: list[tuple[str, int]], threshold: float, max_ejection: float
                ) -> tuple[Balancer, list[str]]:
    """A balancer over ``d0..dn`` in the drawn states; returns it and the ejection order."""
    clock = FakeClock()
    balancer = make(*(DeploymentSpec(f"d{i}", ("m",), priority=tier, consecutive_failures=1,
                                     unhealthy_threshold=1, base_ejection_s=1000.0)
                      for i, (_, tier) in enumerate(fleet)),
                    clock=clock, max_ejection_percent=max_ejection, panic_threshold_percent=threshold)
    order = []
    for i, (state, _) in enumerate(fleet):
        name = f"d{i}"
        if "ejected" in state:
            assert balancer.record_failure(name)
            order.append(name)
            clock.advance(1)
        if "unhealthy" in state:
            balancer.record_probe(name, False)
        if "cooldown" in state:
            balancer.record_rate_limited(name, 500)
    return balancer, order


@settings(max_examples=600, deadline=None)
@given(fleet=fleets, threshold=percents, max_ejection=percents)
def test_panic_property(fleet: list[tuple[str, int]], threshold: float, max_ejection: float) -> None:
    balancer, ejection_order = build_fleet(fleet, threshold, max_ejection)
    names = [f"d{i}" for i in range(len(fleet))]
    tier = {f"d{i}": t for i, (_, t) in enumerate(fleet)}
    state = {f"d{i}": s for i, (s, _) in enumerate(fleet)}
    probe_ok = {n for n in names if "unhealthy" not in state[n]}
    open_ = {n for n in probe_ok if "cooldown" not in state[n]}  # may take traffic at all
    ejected = [n for n in reversed(ejection_order) if n in probe_ok]  # newest first
    kept_out = set(ejected[:max(1, math.floor(len(names) * max_ejection / 100))])
    healthy = open_ - kept_out

    try:
        chosen = balancer.candidates("m", ANY)
    except (OverloadedError, RateLimitError):
        # Only when nothing is left but probe-unhealthy and cooling-down deployments, or
        # with panic off and nothing healthy.
        assert not open_ or (threshold == 0 and not healthy)
        return
    assert chosen
    assert set(chosen) <= open_  # never a probe-unhealthy or cooling-down one, even in panic
    served = {tier[n] for n in chosen}
    assert len(served) == 1  # one tier at a time ...
    best = served.pop()
    # ... the best with a healthy deployment, else (panic) the best with any that may serve.
    assert best == min(tier[n] for n in (healthy or open_))
    members = [n for n in names if tier[n] == best and "cooldown" not in state[n]]
    up = [n for n in members if n in healthy]
    if len(up) * 100 >= threshold * len(members):
        assert chosen == up  # at or above the threshold: the healthy ones, all of them
        assert balancer.panic_models() == []
    else:
        assert chosen == [n for n in members if n in open_]  # panic: ejected ones join
        assert balancer.panic_models() == ["m"]
    assert balancer.any_healthy() == (bool(probe_ok) if threshold > 0 else True)
    # A retry goes to a deployment not tried yet when one may serve, else back to the same.
    retry = balancer.candidates("m", ANY, frozenset(chosen))
    assert retry == chosen or (not set(retry) & set(chosen) and min(tier[n] for n in retry) > best)


# --- status / any_healthy / repr -------------------------------------------------------------


def test_status_any_healthy_and_repr(clock: FakeClock) -> None:
    balancer = make(DeploymentSpec("a", ("m",), unhealthy_threshold=1),
                    DeploymentSpec("b", ("m",), consecutive_failures=1),
                    DeploymentSpec("c", ("m",)), clock=clock, max_ejection_percent=100)
    assert repr(balancer) == "<Balancer [a: healthy, b: healthy, c: healthy]>"
    balancer.record_probe("a", False)
    balancer.record_failure("b")
    balancer.record_rate_limited("c", 5)
    assert [balancer.status(n) for n in "abc"] == ["unhealthy", "ejected", "cooldown"]
    assert repr(balancer) == "<Balancer [a: unhealthy, b: ejected, c: cooldown]>"
    assert balancer.any_healthy()  # cooling down is still healthy (ready)
    clock.advance(5.1)
    assert balancer.status("c") == "healthy"
    # a down by probe, b ejected: in panic b still takes traffic, so the gateway is ready.
    only_bad = make(DeploymentSpec("a", ("m",), unhealthy_threshold=1),
                    DeploymentSpec("b", ("m",), consecutive_failures=1), clock=clock)
    only_bad.record_probe("a", False)
    only_bad.record_failure("b")
    assert only_bad.any_healthy()
    assert only_bad.candidates("m", ANY) == ["b"]
    assert repr(only_bad) == "<Balancer [a: unhealthy, b: ejected | panic: m]>"
    # With panic off nothing takes traffic until the ejection ends.
    no_panic = make(DeploymentSpec("a", ("m",), unhealthy_threshold=1),
                    DeploymentSpec("b", ("m",), consecutive_failures=1), clock=clock,
                    panic_threshold_percent=0)
    no_panic.record_probe("a", False)
    no_panic.record_failure("b")
    assert not no_panic.any_healthy()
    clock.advance(31)
    assert no_panic.any_healthy()


def test_any_healthy_without_panic_counts_deployments_max_ejection_percent_lets_back(
        clock: FakeClock) -> None:
    # Both ejected, at most 50 % (one) kept out: a, the longest ejected, takes traffic again,
    # and /readyz must agree (it used to answer not ready).
    balancer = make(DeploymentSpec("a", ("m",), consecutive_failures=1),
                    DeploymentSpec("b", ("m",), consecutive_failures=1), clock=clock,
                    panic_threshold_percent=0)
    balancer.record_failure("a")
    clock.advance(1)
    balancer.record_failure("b")
    assert balancer.candidates("m", ANY) == ["a"]
    assert balancer.any_healthy()


# --- choose: weighted power of two choices ---------------------------------------------------


def test_choose_single_candidate_needs_no_draw() -> None:
    balancer = make(DeploymentSpec("a", ("m",)))
    assert balancer.choose(["a"]) == "a"


def test_choose_prefers_fewer_in_flight() -> None:
    in_flight = {"a": 5, "b": 0}
    balancer = make(DeploymentSpec("a", ("m",)), DeploymentSpec("b", ("m",)), in_flight=in_flight)
    assert {balancer.choose(["a", "b"]) for _ in range(50)} == {"b"}
    in_flight.update(a=0, b=1)
    assert {balancer.choose(["a", "b"]) for _ in range(50)} == {"a"}


def test_choose_never_picks_the_busiest_of_three() -> None:
    in_flight = {"a": 0, "b": 1, "c": 9}
    balancer = make(*(DeploymentSpec(n, ("m",)) for n in "abc"), in_flight=in_flight)
    picks = Counter(balancer.choose(["a", "b", "c"]) for _ in range(600))
    assert picks["c"] == 0
    # a wins every pair it is drawn into (2 of 3 pairs), b only the pair (b, c).
    assert 0.58 < picks["a"] / 600 < 0.75


def test_choose_compares_in_flight_per_unit_of_weight() -> None:
    # a: 5 in flight on weight 10 (0.6 per weight with this request); b: 1 on weight 1 (2.0).
    in_flight = {"a": 5, "b": 1}
    balancer = make(DeploymentSpec("a", ("m",), weight=10), DeploymentSpec("b", ("m",)),
                    in_flight=in_flight)
    assert {balancer.choose(["a", "b"]) for _ in range(50)} == {"a"}


def test_weights_bias_the_draw() -> None:
    # Idle pool, equal load per weight (0/1 == 0/3): the first deployment drawn wins, and the
    # draw is in proportion to weight, so b (weight 3) takes about 3/4 of the picks.
    in_flight = {"a": 0, "b": 0}
    balancer = make(DeploymentSpec("a", ("m",), weight=1), DeploymentSpec("b", ("m",), weight=3),
                    in_flight=in_flight, seed=1234)
    picks = Counter(balancer.choose(["a", "b"]) for _ in range(4000))
    assert 0.72 < picks["b"] / 4000 < 0.78


def test_equal_weights_and_load_spread_evenly() -> None:
    balancer = make(*(DeploymentSpec(n, ("m",)) for n in "abc"), seed=99)
    picks = Counter(balancer.choose(["a", "b", "c"]) for _ in range(3000))
    assert all(900 < picks[n] < 1100 for n in "abc"), picks


def test_choose_is_reproducible_with_a_seeded_rng() -> None:
    def run() -> list[str]:
        balancer = make(*(DeploymentSpec(n, ("m",), weight=w) for n, w in zip("abc", (1, 2, 3),
                                                                            strict=True)), seed=5)
        return [balancer.choose(["a", "b", "c"]) for _ in range(50)]

    assert run() == run()


# --- RetryBudget ------------------------------------------------------------------------------


@pytest.mark.parametrize(("requests", "allowed"), [(0, 3), (10, 3), (19, 3), (20, 4), (100, 20), (101, 20)])
def test_retry_budget_allows_max_of_minimum_and_percent(requests: int, allowed: int) -> None:
    budget = RetryBudget(percent=20.0, minimum=3)
    for _ in range(requests):
        budget.start_request()
    assert budget.allowed() == allowed


def test_retry_budget_counts_exhaustion_and_frees_on_end() -> None:
    budget = RetryBudget(percent=20.0, minimum=2)
    budget.start_request()
    assert [budget.try_retry() for _ in range(4)] == [True, True, False, False]
    assert budget.exhausted == 2
    assert repr(budget) == "<RetryBudget [retries: 2/2 | requests: 1]>"
    budget.end_retry()
    assert budget.try_retry() is True
    assert budget.exhausted == 2


def test_retry_budget_zero_allows_no_retry() -> None:
    budget = RetryBudget(percent=0.0, minimum=0)
    budget.start_request()
    assert budget.try_retry() is False
    assert budget.exhausted == 1


def test_retry_budget_counters_never_go_negative() -> None:
    budget = RetryBudget()
    budget.end_retry()
    budget.end_request()
    assert (budget.retries, budget.requests) == (0, 0)


def test_lower_load_per_weight_wins_over_the_draw() -> None:
    # a: 1 in flight / weight 1 = 1.0; b: 2 / 3 = 0.67 -> b whenever both are drawn.
    balancer = make(DeploymentSpec("a", ("m",), weight=1), DeploymentSpec("b", ("m",), weight=3),
                    in_flight={"a": 1, "b": 2}, seed=7)
    picks = Counter(balancer.choose(["a", "b"]) for _ in range(2000))
    assert picks["a"] == 0
