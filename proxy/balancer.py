"""Model → deployments, and the pick among them.

A deployment is an upstream (``upstreams.<name>``) whose ``models`` patterns match the
requested model id (``"*"`` matches any, ``gpt-4*`` a prefix). Among the matching deployments
the one with the fewest requests in flight is picked, ties going to config order. Sans-I/O:
the caller reports starts and ends with ``acquire``/``release``.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.config import model_matches
from proxy.errors import ModelNotFoundError


class Balancer:
    """Routes a model id to one deployment.

    Args:
        deployments: upstream name → its model patterns, in config order.
    """

    def __init__(self, deployments: Mapping[str, tuple[str, ...]]) -> None:
        self._patterns = dict(deployments)
        self._in_flight = dict.fromkeys(self._patterns, 0)
        self._route_cache: dict[str, tuple[str, ...]] = {}

    def __repr__(self) -> str:
        flights = ", ".join(f"{name}: {n}" for name, n in self._in_flight.items())
        return f"<Balancer [in flight: {flights}]>"

    def in_flight(self, name: str) -> int:
        """Requests currently in flight on deployment ``name``."""
        return self._in_flight[name]

    def deployments_for(self, model: str) -> tuple[str, ...]:
        """Names of the deployments serving ``model`` in config order (empty if none)."""
        names = self._route_cache.get(model)
        if names is None:
            names = tuple(n for n, p in self._patterns.items() if model_matches(p, model))
            if len(self._route_cache) < 10_000:
                self._route_cache[model] = names
        return names

    def route(self, model: str, allowed: tuple[str, ...]) -> str:
        """Pick the deployment for ``model`` for a key whose model patterns are ``allowed``.

        Raises:
            ModelNotFoundError: the key may not use ``model`` or no deployment serves it
                (one answer for both, as OpenAI gives).
        """
        names = self.deployments_for(model) if model_matches(allowed, model) else ()
        if not names:
            raise ModelNotFoundError(model)
        if len(names) == 1:
            return names[0]
        return min(names, key=self._in_flight.__getitem__)

    def default_for(self, allowed: tuple[str, ...]) -> str:
        """The deployment for a request that names no model (passthrough paths): the first,
        in config order, serving any model or one that the ``allowed`` patterns match."""
        for name, patterns in self._patterns.items():
            if "*" in patterns or any(model_matches(allowed, p) for p in patterns):
                return name
        return next(iter(self._patterns))

    def explicit_models(self) -> list[str]:
        """Model ids named literally (no wildcard) in any deployment's patterns."""
        seen: dict[str, None] = {}
        for patterns in self._patterns.values():
            for p in patterns:
                if not any(ch in p for ch in "*?["):
                    seen.setdefault(p, None)
        return list(seen)

    def acquire(self, name: str) -> None:
        """Count a request starting on deployment ``name``."""
        self._in_flight[name] += 1

    def release(self, name: str) -> None:
        """Count a request on deployment ``name`` ending (never below zero)."""
        self._in_flight[name] = max(0, self._in_flight[name] - 1)
