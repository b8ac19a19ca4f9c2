"""proxy/balancer.py: model routing and least-in-flight picks."""

from __future__ import annotations

import pytest

from proxy.balancer import Balancer
from proxy.errors import ModelNotFoundError

ANY = ("*",)


@pytest.fixture
def balancer() -> Balancer:
    return Balancer({
        "openai": ("gpt-4o", "gpt-4o-mini", "gpt-3.5*"),
        "vllm-a": ("llama-3", "qwen*"),
        "vllm-b": ("llama-3",),
        "azure": ("gpt-4o",),
    })


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-4o-mini", "openai"), ("gpt-3.5-turbo", "openai"), ("qwen2-7b", "vllm-a")],
)
def test_routes_by_pattern(balancer: Balancer, model: str, expected: str) -> None:
    assert balancer.route(model, ANY) == expected


def test_deployments_for_in_config_order(balancer: Balancer) -> None:
    assert balancer.deployments_for("gpt-4o") == ("openai", "azure")
    assert balancer.deployments_for("llama-3") == ("vllm-a", "vllm-b")
    assert balancer.deployments_for("llama-3.1") == ()


def test_unknown_model_is_model_not_found(balancer: Balancer) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        balancer.route("claude-3", ANY)
    assert info.value.http_status == 404
    assert "claude-3" in info.value.message


def test_model_the_key_may_not_use_answers_like_an_unknown_one(balancer: Balancer) -> None:
    with pytest.raises(ModelNotFoundError) as forbidden:
        balancer.route("gpt-4o", ("llama-*",))
    with pytest.raises(ModelNotFoundError) as unknown:
        balancer.route("gpt-5", ("gpt-*",))
    assert forbidden.value.to_body()["error"]["code"] == unknown.value.to_body()["error"]["code"]
    assert balancer.route("llama-3", ("llama-*",)) in {"vllm-a", "vllm-b"}


def test_catch_all_deployment_serves_any_model() -> None:
    balancer = Balancer({"specific": ("gpt-4o",), "fallback": ("*",)})
    assert balancer.route("whatever/model", ANY) == "fallback"
    assert balancer.deployments_for("gpt-4o") == ("specific", "fallback")


def test_least_in_flight_pick(balancer: Balancer) -> None:
    assert balancer.route("llama-3", ANY) == "vllm-a"  # tie → config order
    balancer.acquire("vllm-a")
    assert balancer.route("llama-3", ANY) == "vllm-b"
    balancer.acquire("vllm-b")
    assert balancer.route("llama-3", ANY) == "vllm-a"  # tie again
    balancer.acquire("vllm-b")
    assert balancer.route("llama-3", ANY) == "vllm-a"
    balancer.release("vllm-a")
    assert (balancer.in_flight("vllm-a"), balancer.in_flight("vllm-b")) == (0, 2)
    balancer.release("vllm-b")
    balancer.release("vllm-b")
    assert balancer.route("llama-3", ANY) == "vllm-a"


def test_pick_spreads_concurrent_requests(balancer: Balancer) -> None:
    picks = []
    for _ in range(6):
        name = balancer.route("gpt-4o", ANY)
        balancer.acquire(name)
        picks.append(name)
    assert picks.count("openai") == picks.count("azure") == 3


def test_release_never_goes_below_zero(balancer: Balancer) -> None:
    balancer.release("azure")
    balancer.release("azure")
    assert balancer.in_flight("azure") == 0
    balancer.acquire("azure")
    assert balancer.in_flight("azure") == 1


def test_repr_shows_in_flight(balancer: Balancer) -> None:
    balancer.acquire("vllm-b")
    assert repr(balancer) == "<Balancer [in flight: openai: 0, vllm-a: 0, vllm-b: 1, azure: 0]>"


def test_default_for(balancer: Balancer) -> None:
    assert balancer.default_for(ANY) == "openai"
    assert balancer.default_for(("llama-*",)) == "vllm-a"
    assert balancer.default_for(("qwen*",)) == "vllm-a"
    assert balancer.default_for(("nothing-matches",)) == "openai"
    catch_all = Balancer({"a": ("gpt-4o",), "b": ("*",)})
    assert catch_all.default_for(("llama-3",)) == "b"


def test_explicit_models(balancer: Balancer) -> None:
    assert balancer.explicit_models() == ["gpt-4o", "gpt-4o-mini", "llama-3"]
    assert Balancer({"x": ("*",), "y": ("m[12]", "m?")}).explicit_models() == []
