"""Virtual keys: API key → ``Principal``.

Keys are held only as SHA-256 digests (``keys.<name>.key`` is hashed at start-up) and a
presented key is compared against every digest with ``hmac.compare_digest``, so neither a
wrong guess's position nor its length shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config import KeyConfig, model_matches
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


class KeyStore:
    """Holds the digests of all virtual keys and authenticates requests.

    Args:
        keys: ``keys.<name>`` config entries by name.
    """

    def __init__(self, keys: Mapping[str, KeyConfig]) -> None:
        self._entries: list[tuple[bytes, Principal]] = []
        for name, cfg in keys.items():
            digest_hex = cfg.key_sha256 or hash_key(cfg.key.get_secret_value() if cfg.key else "")
            principal = Principal(name, cfg.models, cfg.rpm, cfg.tpm, cfg.max_concurrent, cfg.priority,
                                  cfg.max_websockets)
            self._entries.append((bytes.fromhex(digest_hex), principal))

    def __repr__(self) -> str:
        return f"<KeyStore [{len(self._entries)} keys]>"

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
        """The principal whose key is ``key``, or ``None``; compares with every digest."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: Principal | None = None
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest):
                found = principal
        return found
