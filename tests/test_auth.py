"""proxy/auth.py: API key → Principal, hashed keys, model patterns."""

from __future__ import annotations

import hashlib

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.auth import KeyConflictError, KeyEntry, KeyStore, Principal, hash_key, key_entry, presented_key
from proxy.config import KeyConfig, KeyLimitsConfig
from proxy.errors import AuthenticationError

FULL_KEY = "sk-full-0123456789abcdef"
HASHED_KEY = "sk-hashed-fedcba9876543210"
LIMITED_KEY = "sk-limited-aaaa"


def headers(**values: str) -> CIMultiDictProxy[str]:
    """Request headers as aiohttp hands them over (case-insensitive)."""
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


@pytest.fixture
def store() -> KeyStore:
    return KeyStore({
        "full": KeyConfig.model_validate({"key": FULL_KEY, "rpm": 60, "tpm": 1000, "max_concurrent": 2}),
        "hashed": KeyConfig.model_validate({"key_sha256": hash_key(HASHED_KEY), "models": ["gpt-4*"]}),
        "limited": KeyConfig.model_validate({"key": LIMITED_KEY, "models": ["mock-gpt", "llama-3"]}),
    })


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("sk-x") == hashlib.sha256(b"sk-x").hexdigest()
    assert hash_key("ключ") == hashlib.sha256("ключ".encode()).hexdigest()


def test_bearer_key_authenticates(store: KeyStore) -> None:
    principal = store.authenticate(headers(Authorization=f"Bearer {FULL_KEY}"))
    assert principal == Principal("full", ("*",), 60, 1000, 2)


@pytest.mark.parametrize("value", [f"bearer {FULL_KEY}", f"BEARER   {FULL_KEY}  ", f" Bearer {FULL_KEY}"])
def test_bearer_scheme_is_case_insensitive_and_whitespace_tolerant(store: KeyStore, value: str) -> None:
    assert store.authenticate(headers(Authorization=value)).name == "full"


def test_lowercase_header_names_work(store: KeyStore) -> None:
    assert store.authenticate(headers(authorization=f"Bearer {FULL_KEY}")).name == "full"
    assert store.authenticate(headers(X_API_KEY=LIMITED_KEY)).name == "limited"


def test_x_api_key_authenticates(store: KeyStore) -> None:
    assert store.authenticate(headers(x_api_key=FULL_KEY)).name == "full"
    assert store.authenticate({"x-api-key": f" {LIMITED_KEY} "}).name == "limited"


@pytest.mark.parametrize(
    "hdrs",
    [{}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"}, {"Authorization": ""},
     {"x-api-key": ""}, {"x-api-key": "   "}, {"Authorization": f"Basic {FULL_KEY}"}],
    ids=["none", "bearer-empty", "bearer-only", "auth-empty", "xkey-empty", "xkey-blank", "basic"],
)
def test_missing_key(store: KeyStore, hdrs: dict[str, str]) -> None:
    with pytest.raises(AuthenticationError) as info:
        store.authenticate(headers(**{k.replace("-", "_"): v for k, v in hdrs.items()}))
    assert info.value.code == "missing_api_key"
    assert info.value.http_status == 401
    assert info.value.to_body()["error"]["code"] == "missing_api_key"


@pytest.mark.parametrize(
    "hdrs",
    [{"Authorization": "Bearer sk-wrong-key-9999"}, {"x-api-key": "sk-wrong-key-9999"},
     {"Authorization": f"Bearer {FULL_KEY}x"}, {"Authorization": f"Bearer {FULL_KEY[:-1]}"},
     {"Authorization": f"Bearer {hash_key(HASHED_KEY)}"}],
    ids=["bearer", "x-api-key", "longer", "shorter", "the-digest-itself"],
)
def test_wrong_key_is_invalid_and_not_echoed(store: KeyStore, hdrs: dict[str, str]) -> None:
    presented = next(iter(hdrs.values())).removeprefix("Bearer ")
    with pytest.raises(AuthenticationError) as info:
        store.authenticate(hdrs)
    error = info.value
    assert error.code == "invalid_api_key"
    assert error.http_status == 401
    for text in (error.message, str(error), repr(error), str(error.to_body())):
        assert presented not in text


def test_key_sha256_entries_work(store: KeyStore) -> None:
    principal = store.authenticate(headers(Authorization=f"Bearer {HASHED_KEY}"))
    assert principal.name == "hashed"
    assert principal.models == ("gpt-4*",)
    assert principal.rpm is None


def test_uppercase_key_sha256_works() -> None:
    store = KeyStore({"up": KeyConfig.model_validate({"key_sha256": hash_key(HASHED_KEY).upper()})})
    assert store.authenticate({"x-api-key": HASHED_KEY}).name == "up"


def test_lookup_returns_none_for_unknown_key(store: KeyStore) -> None:
    assert store.lookup("sk-nope") is None
    assert store.lookup(LIMITED_KEY) is not None
    assert store.lookup(LIMITED_KEY).name == "limited"  # type: ignore[union-attr]


def test_presented_key_prefers_authorization() -> None:
    assert presented_key(headers(Authorization="Bearer a", x_api_key="b")) == "a"
    assert presented_key(headers(x_api_key="b")) == "b"
    assert presented_key(headers()) is None


def test_keystore_repr_shows_count_not_keys(store: KeyStore) -> None:
    assert repr(store) == "<KeyStore [3 keys: 3 config, 0 runtime | version 1]>"
    assert FULL_KEY not in repr(store)


@pytest.mark.parametrize(
    ("patterns", "model", "allowed"),
    [
        (("*",), "anything/at-all:v1", True),
        (("gpt-4o",), "gpt-4o", True),
        (("gpt-4o",), "gpt-4o-mini", False),
        (("gpt-4o",), "GPT-4o", False),
        (("gpt-4*",), "gpt-4", True),
        (("gpt-4*",), "gpt-4o-mini", True),
        (("gpt-4*",), "gpt-3.5-turbo", False),
        (("gpt-4*",), "my-gpt-4", False),
        (("mock-gpt", "llama-3"), "llama-3", True),
        (("mock-gpt", "llama-3"), "llama-3.1", False),
        (("meta-llama/*",), "meta-llama/Llama-3-8B", True),
    ],
)
def test_model_patterns(patterns: tuple[str, ...], model: str, allowed: bool) -> None:
    assert Principal("k", patterns).may_use(model) is allowed


def test_principal_from_store_applies_its_patterns(store: KeyStore) -> None:
    hashed = store.authenticate({"Authorization": f"Bearer {HASHED_KEY}"})
    limited = store.authenticate({"Authorization": f"Bearer {LIMITED_KEY}"})
    assert hashed.may_use("gpt-4-turbo")
    assert not hashed.may_use("mock-gpt")
    assert limited.may_use("mock-gpt")
    assert not limited.may_use("gpt-4-turbo")


# --- config and runtime keys in one store -------------------------------------------------------

RUNTIME_KEY = "sk-shp-runtime-0123456789abcdefghijklmn"


def runtime_entry(name: str = "rt", secret: str = RUNTIME_KEY, **limits: object) -> KeyEntry:
    return key_entry(name, KeyLimitsConfig.model_validate(limits), hash_key(secret), "runtime")


def test_runtime_keys_are_looked_up_with_the_config_keys(store: KeyStore) -> None:
    version = store.version
    store.put_runtime(runtime_entry(rpm=5))
    assert store.lookup(RUNTIME_KEY) == Principal("rt", ("*",), rpm=5)
    assert store.lookup(FULL_KEY) is not None
    assert store.entry("rt").source == "runtime"  # type: ignore[union-attr]
    assert store.limits_of("full").rpm == 60  # type: ignore[union-attr]
    assert store.version == version + 1
    store.put_runtime(runtime_entry(rpm=7))  # a change replaces it
    assert store.lookup(RUNTIME_KEY).rpm == 7  # type: ignore[union-attr]
    assert store.remove_runtime("rt") is True
    assert store.lookup(RUNTIME_KEY) is None
    assert store.remove_runtime("rt") is False
    assert store.version == version + 3


def test_replace_config_keeps_runtime_keys(store: KeyStore) -> None:
    store.put_runtime(runtime_entry())
    store.replace_config({"fresh": KeyConfig.model_validate({"key": "sk-fresh-key-123", "rpm": 1})})
    assert store.lookup(RUNTIME_KEY) is not None
    assert store.lookup("sk-fresh-key-123") is not None
    assert store.lookup(FULL_KEY) is None
    assert [e.name for e in store.entries()] == ["fresh", "rt"]
    assert repr(store) == "<KeyStore [2 keys: 1 config, 1 runtime | version 3]>"


def test_a_name_or_secret_in_both_parts_is_refused(store: KeyStore) -> None:
    with pytest.raises(KeyConflictError, match="full"):
        store.put_runtime(runtime_entry(name="full"))
    with pytest.raises(KeyConflictError, match="secret of key full"):
        store.put_runtime(runtime_entry(secret=FULL_KEY))
    store.put_runtime(runtime_entry())
    before = store.entries()
    with pytest.raises(KeyConflictError, match="rt"):
        store.replace_config({"rt": KeyConfig.model_validate({"key": "sk-other-0000"})})
    with pytest.raises(KeyConflictError, match="same secret as runtime key rt"):
        store.replace_config({"copy": KeyConfig.model_validate({"key": RUNTIME_KEY})})
    assert store.entries() == before  # nothing changed
    assert RUNTIME_KEY not in repr(store)
