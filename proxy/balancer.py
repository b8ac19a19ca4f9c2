"""Model → deployments, their health, and the pick among them.

A deployment is an upstream (``upstreams.<name>``) whose ``models`` patterns match the
requested model id (``"*"`` any, ``gpt-4*`` a prefix) or that ``models.<id>.upstreams`` names.

Health has three parts, all sans-I/O (results are reported in, the clock is injected):

* **Active probes** (``record_probe``): ``unhealthy_threshold`` consecutive failed probes mark
  a deployment unhealthy, ``healthy_threshold`` successes mark it healthy again. An
  unhealthy deployment gets no traffic, even in panic (below).
* **Passive outlier ejection** (``record_failure`` / ``record_success``): ``consecutive_failures``
  connect errors, timeouts or 5xx in a row eject it for ``base_ejection * 2^k`` (k: ejections
  in the recent past, capped at ``max_ejection``). At most ``max_ejection_percent`` of a
  model's deployments (at least one) are kept out at once; beyond that the longest-ejected
  ones take traffic again (Envoy's outlier detection). A failure the gateway caused itself
  (``record_failure(..., local=True)``: out of file descriptors, event loop stalled) is not
  held against the upstream.
* **Cooldown** (``record_rate_limited``): an upstream answering 429 with ``Retry-After`` gets
  no traffic for that long. That is the upstream's rate limit, not a health judgement: a
  cooling-down deployment is left out of the panic arithmetic and never routed, even in panic.

**Panic** (Envoy, "Panic threshold"): a deployment is *healthy* when probes say so, it is not
kept out by an ejection and not cooling down. Tiers (``priority``, lower first) are strict
failover: the serving tier is the best one with a healthy deployment. When the healthy share
of that tier's deployments that are not cooling down (probe-unhealthy and ejected ones both
count as unhealthy, as in Envoy) is below ``panic_threshold_percent``, the tier is in panic
and its ejected deployments take traffic alongside the healthy ones, so outlier detection
never removes the last capacity and a few survivors are not buried under the whole load.
When no tier has a healthy deployment, the whole model is in panic and the best tier with an
ejected (probe-healthy, not cooling down) deployment serves: a model whose only deployment
was ejected is still routed to, not answered 503. Unlike Envoy, probe-unhealthy deployments
stay out even in panic: a failed probe is first-hand evidence that nobody answers, every
request sent there would be a connect error or a time-out paid by a client, and ``/readyz``
stays meaningful. ``panic_threshold_percent: 0`` turns panic off.

Among the deployments of the best tier that may take traffic, the pick is the power of two
choices: two drawn at random in proportion to ``weight``, the one with fewer requests in
flight per unit of weight wins.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from proxy.config import model_matches
from proxy.errors import GatewayError, ModelNotFoundError, OverloadedError, RateLimitError


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """What the balancer needs to know of one upstream (from ``upstreams.<name>``)."""

    name: str
    patterns: tuple[str, ...] = ("*",)
    priority: int = 0
    weight: int = 1
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    consecutive_failures: int = 5
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0


@dataclass(slots=True)
class Health:
    """Mutable health of one deployment. Times are on the balancer's clock (seconds)."""

    healthy: bool = True
    probe_streak: int = 0  # > 0: consecutive successes, < 0: consecutive failures
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    ejected_at: float = -math.inf
    ejections: int = 0
    cooldown_until: float = 0.0


class Balancer:
    """Routes a model to the deployments that may take it now and picks one.

    Args:
        specs: deployment name → spec, in config order.
        model_upstreams: model id → deployments named for it (``models.<id>.upstreams``).
        max_ejection_percent: ``routing.max_ejection_percent``.
        panic_threshold_percent: ``routing.panic_threshold_percent`` (0 turns panic off).
        in_flight: requests in flight on a deployment (the admission's count).
        clock: monotonic seconds; ``rng``: randomness for the pick (tests seed it).
        on_panic: called with the model id and its deployments each time routing of a model
            enters panic (it was not in panic at its previous routing decision).

    Attributes:
        panics: times routing of some model entered panic.
        local_failures: failures reported as the gateway's own (``record_failure(local=True)``).
    """

    def __init__(self, specs: Mapping[str, DeploymentSpec],
                 model_upstreams: Mapping[str, tuple[str, ...]] | None = None,
                 max_ejection_percent: float = 50.0,
                 in_flight: Callable[[str], int] = lambda _: 0,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 panic_threshold_percent: float = 50.0,
                 on_panic: Callable[[str, tuple[str, ...]], None] = lambda _model, _names: None,
                 ) -> None:
        self.specs = dict(specs)
        self.health = {name: Health() for name in self.specs}
        self._model_upstreams = dict(model_upstreams or {})
        self._max_ejection_percent = max_ejection_percent
        self._panic_threshold_percent = panic_threshold_percent
        self.in_flight = in_flight
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_panic = on_panic
        self.panics = 0
        self.local_failures = 0
        self._panicking: set[str] = set()  # models whose last routing decision was in panic
        self._route_cache: dict[str, tuple[str, ...]] = {}
        # model -> (health epoch, valid until, candidates); health changes bump the epoch
        self._candidates_cache: dict[str, tuple[int, float, list[str]]] = {}
        self._epoch = 0

    def __repr__(self) -> str:
        states = ", ".join(f"{name}: {self.status(name)}" for name in self.specs)
        panic = self.panic_models()
        return f"<Balancer [{states}{' | panic: ' + ', '.join(panic) if panic else ''}]>"

    def status(self, name: str) -> str:
        """``healthy``, ``unhealthy`` (probes), ``ejected`` (outlier) or ``cooldown`` (429).
        An ``ejected`` deployment may still take traffic (``max_ejection_percent``, panic)."""
        health, now = self.health[name], self._clock()
        if not health.healthy:
            return "unhealthy"
        if health.ejected_until > now:
            return "ejected"
        if health.cooldown_until > now:
            return "cooldown"
        return "healthy"

    def any_healthy(self) -> bool:
        """Whether some deployment takes traffic now or once its 429 cooldown ends
        (``/readyz``), as routing decides it.

        With panic on, that is any deployment the probes call healthy: an ejected one still
        takes traffic when its model has nothing healthier. With panic off, an ejected one
        counts only where ``max_ejection_percent`` lets it back in, for the models that the
        config names or that requests asked for so far.
        """
        if self._panic_threshold_percent > 0:
            return any(health.healthy for health in self.health.values())
        if any(self.status(name) in ("healthy", "cooldown") for name in self.specs):
            return True
        now = self._clock()
        groups = {self.deployments_for(m) for m in self.explicit_models()} | set(self._route_cache.values())
        return any(self._routable(names, now)[0] for names in groups)

    def panic_models(self) -> list[str]:
        """Model ids whose routing is in panic now, sorted (among those routed since)."""
        now = self._clock()
        return sorted(m for m in self._panicking if self._routable(self.deployments_for(m), now)[1])

    def deployments_for(self, model: str) -> tuple[str, ...]:
        """Names of the deployments serving ``model`` in config order (empty if none)."""
        names = self._route_cache.get(model)
        if names is None:
            named = self._model_upstreams.get(model, ())
            names = tuple(n for n, s in self.specs.items()
                          if n in named or model_matches(s.patterns, model))
            if len(self._route_cache) < 10_000:
                self._route_cache[model] = names
        return names

    def require(self, model: str, allowed: tuple[str, ...]) -> None:
        """Raise ``ModelNotFoundError`` (404) unless the key may use ``model`` and some
        deployment serves it, healthy or not."""
        if not model_matches(allowed, model) or not self.deployments_for(model):
            raise ModelNotFoundError(model)

    def candidates(self, model: str, allowed: tuple[str, ...], exclude: frozenset[str] = frozenset()
                   ) -> list[str]:
        """The deployments that may take a request for ``model`` now (see the module
        docstring: healthy ones, plus ejected ones in panic) of the best tier, preferring
        those not in ``exclude`` (already tried).

        Raises:
            ModelNotFoundError: the key may not use ``model`` or nothing serves it (404).
            RateLimitError: every live deployment is cooling down after a 429 (429, with the
                time left as retry hint).
            OverloadedError: every deployment is unhealthy by probe or cooling down, or (panic
                off) kept out by an ejection (503, with a retry hint).
        """
        names = self.deployments_for(model) if model_matches(allowed, model) else ()
        if not names:
            raise ModelNotFoundError(model)
        now = self._clock()
        cached = self._candidates_cache.get(model) if not exclude else None
        if cached is not None and cached[0] == self._epoch and now < cached[1]:
            return cached[2]  # the hot path: nothing changed since this was worked out
        routable, panic = self._routable(names, now)
        self._note_panic(model, names, panic)
        if not routable:
            raise self._unavailable(model, names, now)
        fresh = [n for n in routable if n not in exclude] or routable
        best = min(self.specs[n].priority for n in fresh)
        result = [n for n in fresh if self.specs[n].priority == best]
        if not exclude:
            self._candidates_cache[model] = (self._epoch, self._next_expiry(names, now), result)
        return result

    def _next_expiry(self, names: tuple[str, ...], now: float) -> float:
        """When the first ejection or cooldown among ``names`` ends (inf if none runs)."""
        ends = [t for n in names for t in (self.health[n].ejected_until, self.health[n].cooldown_until)
                if t > now]
        return min(ends, default=math.inf)

    def _routable(self, names: tuple[str, ...], now: float) -> tuple[list[str], bool]:
        """The deployments among ``names`` that may take traffic now, in config order, and
        whether the best tier serving them is in panic (the module docstring has the rules).

        The serving tiers are those with a healthy deployment (or, with none anywhere, every
        tier): the best one takes the traffic, the others are where retries fail over to.
        """
        kept_out = self._kept_out(names, now)
        open_ = [n for n in names if self.health[n].cooldown_until <= now]  # not rate-limited
        healthy = {n for n in open_ if self.health[n].healthy and n not in kept_out}
        serving = {self.specs[n].priority for n in (healthy or open_)}
        chosen: set[str] = set()
        panic_tiers: set[int] = set()
        for tier in serving:
            members = [n for n in open_ if self.specs[n].priority == tier]
            up = [n for n in members if n in healthy]
            if len(up) * 100 < self._panic_threshold_percent * len(members):  # share < threshold
                panic_tiers.add(tier)
                up = [n for n in members if self.health[n].healthy]  # ejected ones too
            chosen.update(up)
        return [n for n in names if n in chosen], bool(serving) and min(serving) in panic_tiers

    def _kept_out(self, names: tuple[str, ...], now: float) -> set[str]:
        """Ejected deployments kept out: the most recently ejected, at most
        ``max_ejection_percent`` of ``names`` (at least one)."""
        ejected = sorted((n for n in names if self.health[n].healthy and self.health[n].ejected_until > now),
                         key=lambda n: self.health[n].ejected_at, reverse=True)
        allowed_out = max(1, math.floor(len(names) * self._max_ejection_percent / 100))
        return set(ejected[:allowed_out])

    def _note_panic(self, model: str, names: tuple[str, ...], panic: bool) -> None:
        """Count and report ``model`` entering panic; remember it leaving."""
        if not panic:
            self._panicking.discard(model)
        elif model not in self._panicking and len(self._panicking) < 10_000:
            self._panicking.add(model)
            self.panics += 1
            self._on_panic(model, names)

    def _unavailable(self, model: str, names: tuple[str, ...], now: float) -> GatewayError:
        """429 when every live deployment is only cooling down after its own 429 (the client
        should wait as the upstream asked), else 503 ``no_healthy_upstream``."""
        live = [self.health[n] for n in names if self.health[n].healthy]
        cooling = [h for h in live if h.cooldown_until > now]
        ejections_matter = self._panic_threshold_percent == 0  # in panic an ejection never blocks
        if live and len(cooling) == len(live) and not (
                ejections_matter and any(h.ejected_until > now for h in live)):
            return RateLimitError(f"The upstreams serving model `{model}` are rate-limited; retry "
                                  "after the delay given.", code="upstream_rate_limited",
                                  retry_after_s=max(0.001, min(h.cooldown_until for h in live) - now))
        waits = [max(h.ejected_until, h.cooldown_until) - now for h in live]
        retry_after_s = max(1.0, min(waits)) if waits else 5.0
        return OverloadedError(f"No healthy upstream is available for model `{model}`.",
                               code="no_healthy_upstream", retry_after_s=retry_after_s)

    def choose(self, free: list[str]) -> str:
        """Power of two choices among ``free``: two draws in proportion to weight, the one with
        fewer requests in flight per unit of weight wins (ties: the first draw)."""
        if len(free) == 1:
            return free[0]
        weights = [self.specs[n].weight for n in free]
        first = self._rng.choices(free, weights)[0]
        second = self._rng.choices(free, weights)[0]
        if second == first:
            second = self._rng.choice([n for n in free if n != first])
        # Lower load per weight wins; a tie keeps the first draw, itself weighted, so an idle
        # pool is shared in proportion to weight.
        def load(name: str) -> float:
            return self.in_flight(name) / self.specs[name].weight

        return second if load(second) < load(first) else first

    def default_for(self, allowed: tuple[str, ...]) -> str:
        """The deployment for a request that names no model (passthrough paths): the first,
        in config order, serving any model or one that the ``allowed`` patterns match."""
        for name, spec in self.specs.items():
            if "*" in spec.patterns or any(model_matches(allowed, p) for p in spec.patterns):
                return name
        return next(iter(self.specs))

    def explicit_models(self) -> list[str]:
        """Model ids named literally (no wildcard) in deployments' patterns or ``models``."""
        seen: dict[str, None] = dict.fromkeys(self._model_upstreams)
        for spec in self.specs.values():
            for p in spec.patterns:
                if not any(ch in p for ch in "*?["):
                    seen.setdefault(p, None)
        return list(seen)

    def reconfigure(self, specs: Mapping[str, DeploymentSpec], model_upstreams: Mapping[str, tuple[str, ...]],
                    max_ejection_percent: float, panic_threshold_percent: float,
                    replaced: Collection[str] = ()) -> None:
        """Hot reload (``proxy.reload``): route over ``specs`` from now on. A deployment kept
        by name keeps its health unless it is in ``replaced`` (a new pool under the same name:
        it starts healthy, as at start-up). Reports about deployments no longer configured
        (requests that were in flight on them) are ignored from now on."""
        self.specs = dict(specs)
        self.health = {name: self.health[name] if name in self.health and name not in replaced else Health()
                       for name in self.specs}
        self._model_upstreams = dict(model_upstreams)
        self._max_ejection_percent = max_ejection_percent
        self._panic_threshold_percent = panic_threshold_percent
        self._route_cache.clear()
        self._candidates_cache.clear()
        self._panicking.clear()
        self._epoch += 1

    # --- health reports (ignored for a deployment a reload removed) --------------------------

    def record_success(self, name: str) -> None:
        """An attempt on ``name`` got a response that is not a server failure."""
        if name in self.health:
            self.health[name].consecutive_failures = 0

    def record_failure(self, name: str, *, local: bool = False) -> bool:
        """An attempt on ``name`` failed (connect error, timeout, 5xx); returns whether this
        ejected it.

        ``local``: the gateway caused the failure itself, not the upstream (it was out of file
        descriptors or ephemeral ports, or its event loop stalled past the connect timeout).
        Such a failure is only counted in ``local_failures``: it neither adds to nor breaks
        the upstream's streak of consecutive failures, and never ejects.
        """
        if local:
            self.local_failures += 1
            return False
        if name not in self.health:
            return False
        health, spec, now = self.health[name], self.specs[name], self._clock()
        health.consecutive_failures += 1
        if health.consecutive_failures < spec.consecutive_failures or health.ejected_until > now:
            return False
        if now - health.ejected_at > spec.max_ejection_s + spec.base_ejection_s:
            health.ejections = 0  # long enough since the last one: start from the base again
        duration = min(spec.max_ejection_s, spec.base_ejection_s * 2 ** health.ejections)
        health.ejections += 1
        health.ejected_at, health.ejected_until = now, now + duration
        health.consecutive_failures = 0
        self._epoch += 1
        return True

    def record_rate_limited(self, name: str, retry_after_s: float) -> None:
        """``name`` answered 429 with ``Retry-After``: no traffic for ``retry_after_s``."""
        health = self.health.get(name)
        if health is None:
            return
        health.cooldown_until = max(health.cooldown_until, self._clock() + retry_after_s)
        self._epoch += 1

    def record_probe(self, name: str, ok: bool) -> bool | None:
        """Count one active probe result; returns the new ``healthy`` value when it changed,
        else ``None``."""
        if name not in self.health:
            return None
        health, spec = self.health[name], self.specs[name]
        if ok:
            health.probe_streak = max(1, health.probe_streak + 1)
            if not health.healthy and health.probe_streak >= spec.healthy_threshold:
                health.healthy = True
                health.ejected_until = 0.0  # a recovered upstream starts clean
                health.consecutive_failures = 0
                self._epoch += 1
                return True
        else:
            health.probe_streak = min(-1, health.probe_streak - 1)
            if health.healthy and -health.probe_streak >= spec.unhealthy_threshold:
                health.healthy = False
                self._epoch += 1
                return False
        return None


class RetryBudget:
    """Envoy's retry budget: retries in flight may be at most ``percent`` % of the requests
    in flight, and always at least ``minimum``.

    Use ``start_request``/``end_request`` around every request and ``try_retry`` /
    ``end_retry`` around every retry attempt.
    """

    def __init__(self, percent: float = 20.0, minimum: int = 3) -> None:
        self.percent = percent
        self.minimum = minimum
        self.requests = 0
        self.retries = 0
        self.exhausted = 0

    def __repr__(self) -> str:
        return f"<RetryBudget [retries: {self.retries}/{self.allowed()} | requests: {self.requests}]>"

    def allowed(self) -> int:
        """Retries that may be in flight now."""
        return max(self.minimum, math.floor(self.requests * self.percent / 100))

    def start_request(self) -> None:
        self.requests += 1

    def end_request(self) -> None:
        self.requests = max(0, self.requests - 1)

    def try_retry(self) -> bool:
        """Take a retry from the budget; False (and counted in ``exhausted``) if none left."""
        if self.retries >= self.allowed():
            self.exhausted += 1
            return False
        self.retries += 1
        return True

    def end_retry(self) -> None:
        self.retries = max(0, self.retries - 1)
