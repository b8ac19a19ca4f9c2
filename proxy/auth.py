"""Virtual keys: API key → ``Principal``.

Keys are held only as SHA-256 digests (``keys.<name>.key`` is hashed at start-up; runtime
keys are stored hashed) and a presented key is found by its digest, so the timing of a
lookup shows nothing of a stored key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config import KeyConfig, KeyLimitsConfig, model_matches
from proxy.errors import AuthenticationError


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller.

    Attributes:
        name: the key's name from config (``keys.<name>``): what logs and metrics show.
        models: model patterns the key may use; ``"*"`` matches any, ``gpt-4*`` a prefix.
        rpm, tpm, max_concurrent: the key's limits, ``None`` when unlimited.
        priority: the key's place in admission queues (higher first).
        max_websockets: WebSockets the key may hold open at once in this process.
    """

    name: str
    models: tuple[str, ...]
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    priority: int = 0
    max_websockets: int = 64

    def may_use(self, model: str) -> bool:
        """Whether this key may call ``model`` (shell-style patterns, case-sensitive)."""
        return model_matches(self.models, model)


def hash_key(key: str) -> str:
    """The lowercase hex SHA-256 of ``key``, as ``keys.<name>.key_sha256`` expects."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


#: The WebSocket subprotocol prefix that carries an API key where a browser cannot set
#: headers (OpenAI Realtime API, "WebSocket" connection from a browser).
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The API key from ``Authorization: Bearer <key>``, ``x-api-key`` or, on a WebSocket
    handshake, the subprotocol ``openai-insecure-api-key.<key>`` (``Sec-WebSocket-Protocol``);
    ``None`` when there is none."""
    scheme, _, credentials = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    api_key = headers.get("x-api-key", "").strip()
    return api_key or websocket_key(headers)


def websocket_key(headers: Mapping[str, str]) -> str | None:
    """The key in a ``Sec-WebSocket-Protocol: openai-insecure-api-key.<key>`` offer (RFC 6455
    §4.1: a comma-separated list of tokens), or ``None``."""
    for offered in headers.get("Sec-WebSocket-Protocol", "").split(","):
        offered = offered.strip()
        if offered.startswith(KEY_SUBPROTOCOL_PREFIX) and len(offered) > len(KEY_SUBPROTOCOL_PREFIX):
            return offered[len(KEY_SUBPROTOCOL_PREFIX):]
    return None


class KeyConflictError(ValueError):
    """Two keys that cannot both be held: the same name, or the same secret (digest), in
    the config and among runtime keys. ``str()`` names them, never a secret."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One key as the ``KeyStore`` holds it: its principal, its limits (models, rates,
    per-model limits, budget: a ``KeyLimitsConfig``), its ``source`` (``config`` for
    ``keys.<name>``, ``runtime`` for ``POST /admin/keys``) and its SHA-256 digest."""

    principal: Principal
    limits: KeyLimitsConfig
    source: str
    digest: bytes

    @property
    def name(self) -> str:
        return self.principal.name


def key_entry(name: str, limits: KeyLimitsConfig, digest_hex: str, source: str) -> KeyEntry:
    """The entry of the key ``name`` whose secret hashes to ``digest_hex`` (64 hex digits)."""
    principal = Principal(name, limits.models, limits.rpm, limits.tpm, limits.max_concurrent,
                          limits.priority, limits.max_websockets)
    return KeyEntry(principal, limits, source, bytes.fromhex(digest_hex))


class KeyStore:
    """Every virtual key, by SHA-256 digest: the config's (``keys.<name>``) and the runtime
    ones (created with ``POST /admin/keys``, held in the ledger database), in one lookup.

    A presented key is hashed and looked up by its digest in a dict: the lookup's timing
    depends only on that digest, which a guesser cannot steer, never on a stored key.

    The two parts change independently: ``replace_config`` swaps the config's keys (hot
    reload) and keeps the runtime ones; ``put_runtime``/``remove_runtime`` change one runtime
    key. A name or a digest held by both parts is refused (``KeyConflictError``). ``version``
    grows by one with every change (``DemandBuilder`` drops its cached limits then).

    Args:
        keys: ``keys.<name>`` config entries by name.
    """

    def __init__(self, keys: Mapping[str, KeyConfig]) -> None:
        self._config: dict[str, KeyEntry] = {}
        self._runtime: dict[str, KeyEntry] = {}
        self._by_digest: dict[bytes, KeyEntry] = {}
        self.version = 0
        self.replace_config(keys)

    def __repr__(self) -> str:
        return (f"<KeyStore [{len(self._by_digest)} keys: {len(self._config)} config, "
                f"{len(self._runtime)} runtime | version {self.version}]>")

    def replace_config(self, keys: Mapping[str, KeyConfig]) -> None:
        """Hold ``keys`` as the config's keys instead of the current ones; runtime keys stay.
        All or nothing.

        Raises:
            KeyConflictError: a config key has the name or the secret of a runtime key
                (nothing is changed).
        """
        entries = {name: key_entry(name, cfg, _digest_hex(cfg), "config") for name, cfg in keys.items()}
        clashes = sorted(name for name in entries if name in self._runtime)
        runtime_digests = {e.digest: e.name for e in self._runtime.values()}
        clashes += sorted(f"{name} (same secret as runtime key {runtime_digests[e.digest]})"
                          for name, e in entries.items() if e.digest in runtime_digests)
        if clashes:
            raise KeyConflictError(f"keys {clashes} clash with runtime keys; revoke those first")
        self._config = entries
        self._reindex()

    def put_runtime(self, entry: KeyEntry) -> None:
        """Add the runtime key ``entry``, or replace the runtime key of the same name.

        Raises:
            KeyConflictError: a config key has its name, or another key its digest.
        """
        if entry.name in self._config:
            raise KeyConflictError(f"{entry.name} is a key of the config (keys.{entry.name})")
        holder = self._by_digest.get(entry.digest)
        if holder is not None and holder.name != entry.name:
            raise KeyConflictError(f"{entry.name} has the secret of key {holder.name}")
        old = self._runtime.get(entry.name)
        if old is not None:
            self._by_digest.pop(old.digest, None)
        self._runtime[entry.name] = entry
        self._by_digest[entry.digest] = entry
        self.version += 1

    def remove_runtime(self, name: str) -> bool:
        """Forget the runtime key ``name`` (its next request gets 401); ``False`` if there
        was none. In-flight requests are not affected."""
        entry = self._runtime.pop(name, None)
        if entry is None:
            return False
        self._by_digest.pop(entry.digest, None)
        self.version += 1
        return True

    def _reindex(self) -> None:
        self._by_digest = {e.digest: e for e in (*self._config.values(), *self._runtime.values())}
        self.version += 1

    def entry(self, name: str) -> KeyEntry | None:
        """The key named ``name`` (config or runtime), or ``None``."""
        return self._config.get(name) or self._runtime.get(name)

    def limits_of(self, name: str) -> KeyLimitsConfig | None:
        """The limits of the key named ``name``, or ``None`` when there is none."""
        entry = self.entry(name)
        return entry.limits if entry is not None else None

    def entries(self) -> list[KeyEntry]:
        """Every key: the config's (in config order), then the runtime ones."""
        return [*self._config.values(), *self._runtime.values()]

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """Return the ``Principal`` for the request's key.

        Raises:
            AuthenticationError: no key, or a key that matches none (the message never
                repeats the key).
        """
        key = presented_key(headers)
        if key is None:
            raise AuthenticationError(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                code="missing_api_key",
            )
        principal = self.lookup(key)
        if principal is None:
            raise AuthenticationError("Incorrect API key provided.")
        return principal

    def lookup(self, key: str) -> Principal | None:
        """The principal whose key is ``key``, or ``None``."""
        entry = self._by_digest.get(hashlib.sha256(key.encode("utf-8")).digest())
        return entry.principal if entry is not None else None


def _digest_hex(cfg: KeyConfig) -> str:
    return cfg.key_sha256 or hash_key(cfg.key.get_secret_value() if cfg.key else "")
