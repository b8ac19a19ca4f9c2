"""proxy/config.py: interpolation, units, key-path errors, frozen settings, masked secrets."""

from __future__ import annotations

import copy
import hashlib
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from proxy.config import ConfigError, Settings, load_settings, load_settings_file

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_SECRET = "sk-upstream-very-secret-1"
CLIENT_SECRET = "sk-client-very-secret-2"


def tree(**sections: Any) -> dict[str, Any]:
    """A minimal valid config tree; keyword sections are deep-merged over it."""
    base: dict[str, Any] = {
        "upstreams": {"mock": {"base_url": "http://127.0.0.1:9001/v1", "api_key": UPSTREAM_SECRET}},
        "keys": {"demo": {"key": CLIENT_SECRET}},
    }
    return _merge(base, sections)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def errors_of(raw: object, env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_settings(raw, env={} if env is None else env)
    return info.value.errors


def paths_of(raw: object, env: dict[str, str] | None = None) -> list[str]:
    return [path for path, _ in errors_of(raw, env)]


def with_timeout(key: str, value: object) -> dict[str, Any]:
    return tree(upstreams={"mock": {"timeouts": {key: value}}})


# --- ${ENV} interpolation -------------------------------------------------------------------


def test_env_variable_is_substituted() -> None:
    raw = tree(upstreams={"mock": {"api_key": "${UP_KEY}", "base_url": "http://${HOST}:9001/v1"}})
    settings = load_settings(raw, env={"UP_KEY": "sk-from-env", "HOST": "10.0.0.7"})
    assert settings.upstreams["mock"].api_key is not None
    assert settings.upstreams["mock"].api_key.get_secret_value() == "sk-from-env"
    assert settings.upstreams["mock"].base_url == "http://10.0.0.7:9001/v1"


def test_default_used_only_when_unset() -> None:
    raw = tree(server={"port": "${PORT:-8081}", "host": "${HOST:-}"})
    assert load_settings(raw, env={}).server.port == 8081
    assert load_settings(raw, env={}).server.host == ""
    assert load_settings(raw, env={"PORT": "9999", "HOST": "0.0.0.0"}).server.port == 9999


def test_double_dollar_escapes_a_literal() -> None:
    raw = tree(upstreams={"mock": {"headers": {"X-Template": "$${NOT_A_VAR} and ${V}"}}})
    settings = load_settings(raw, env={"V": "v"})
    assert settings.upstreams["mock"].headers == {"X-Template": "${NOT_A_VAR} and v"}


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHEPHERD_TEST_CLIENT_KEY", "sk-os-env")
    settings = load_settings(tree(keys={"demo": {"key": "${SHEPHERD_TEST_CLIENT_KEY}"}}))
    assert settings.keys["demo"].key is not None
    assert settings.keys["demo"].key.get_secret_value() == "sk-os-env"


def test_unset_variable_error_names_key_path_and_variable() -> None:
    errors = errors_of(tree(keys={"demo": {"key": "${DEMO_KEY_UNSET}", "models": ["${MODEL_UNSET}"]}}))
    by_path = dict(errors)
    assert set(by_path) == {"keys.demo.key", "keys.demo.models.0"}
    assert "DEMO_KEY_UNSET" in by_path["keys.demo.key"]
    assert "MODEL_UNSET" in by_path["keys.demo.models.0"]


def test_env_value_cannot_change_yaml_structure(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(textwrap.dedent("""\
        upstreams:
          mock: {base_url: "http://127.0.0.1:9001/v1", api_key: "${UP}"}
        keys:
          demo: {key: "${K}"}
        """))
    settings = load_settings_file(path, env={"UP": "a: b\n- c", "K": "{x: 1}"})
    assert settings.upstreams["mock"].api_key is not None
    assert settings.upstreams["mock"].api_key.get_secret_value() == "a: b\n- c"
    assert settings.keys["demo"].key is not None
    assert settings.keys["demo"].key.get_secret_value() == "{x: 1}"


# --- durations and sizes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1d", 86400.0),
     ("1.5s", 1.5), (" 2s ", 2.0), ("7", 7.0), (5, 5.0), (2.5, 2.5)],
)
def test_durations(value: object, seconds: float) -> None:
    settings = load_settings(with_timeout("connect", value), env={})
    assert settings.upstreams["mock"].timeouts.connect_s == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5 parsecs", "soon", "-1s", "1 s s", "", "30S", True, -1, 0, "0s"])
def test_bad_durations_name_the_yaml_key(value: object) -> None:
    assert paths_of(with_timeout("connect", value)) == ["upstreams.mock.timeouts.connect"]


@pytest.mark.parametrize("key", ["connect", "first_byte", "read_gap"])
def test_duration_errors_use_yaml_key_not_attribute_name(key: str) -> None:
    assert paths_of(with_timeout(key, "never")) == [f"upstreams.mock.timeouts.{key}"]


def test_other_aliased_keys_in_error_paths() -> None:
    raw = tree(server={"sse_keepalive": "x", "drain_timeout": "y"},
               upstreams={"mock": {"keepalive_expiry": "z"}})
    assert sorted(paths_of(raw)) == [
        "server.drain_timeout", "server.sse_keepalive", "upstreams.mock.keepalive_expiry",
    ]


@pytest.mark.parametrize(
    ("value", "size"),
    [("10MiB", 10 * 2**20), ("1KB", 1000), ("512KiB", 512 * 1024), ("1GiB", 2**30),
     ("10MB", 10**7), ("10mib", 10 * 2**20), ("100B", 100), ("4096", 4096), (4096, 4096)],
)
def test_sizes(value: object, size: int) -> None:
    assert load_settings(tree(server={"max_body_bytes": value}), env={}).server.max_body_bytes == size


@pytest.mark.parametrize("value", ["10 furlongs", "lots", "MiB", "1.2.3MiB", "-1KB", 0, -5, True])
def test_bad_sizes_name_the_key(value: object) -> None:
    assert paths_of(tree(server={"max_body_bytes": value})) == ["server.max_body_bytes"]


# --- structure errors -----------------------------------------------------------------------


def test_all_errors_reported_at_once() -> None:
    raw = tree(
        server={"max_body_bytes": "huge", "port": 70000},
        upstreams={"mock": {"base_url": "ftp://nope", "timeouts": {"read_gap": "forever"}}},
        keys={"demo": {"key": "${MISSING_VAR}", "rpm": 0}},
    )
    with pytest.raises(ConfigError) as info:
        load_settings(raw, env={})
    paths = {path for path, _ in info.value.errors}
    assert paths == {
        "server.max_body_bytes", "server.port", "upstreams.mock.base_url",
        "upstreams.mock.timeouts.read_gap", "keys.demo.key", "keys.demo.rpm",
    }
    text = str(info.value)
    assert "6 error(s)" in text
    for path in paths:
        assert f"  {path}: " in text


def test_unknown_key_is_an_error_with_its_path() -> None:
    raw = tree(upstreams={"mock": {"timeout": {"connect": "5s"}}})
    assert paths_of(raw) == ["upstreams.mock.timeout"]


def test_missing_sections_are_errors() -> None:
    assert sorted(paths_of({})) == ["keys", "upstreams"]
    assert sorted(paths_of(None)) == ["keys", "upstreams"]
    assert sorted(paths_of({"upstreams": {}, "keys": {}})) == ["keys", "upstreams"]


def test_top_level_must_be_a_mapping() -> None:
    errors = errors_of(["a", "list"])
    assert len(errors) == 1
    assert "mapping" in errors[0][1]


@pytest.mark.parametrize(
    "key",
    [{"key": "sk-a", "key_sha256": "ab" * 32}, {"models": ["*"]}],
    ids=["both", "neither"],
)
def test_key_needs_exactly_one_of_key_and_key_sha256(key: dict[str, Any]) -> None:
    errors = errors_of({**tree(), "keys": {"demo": key}})
    assert [path for path, _ in errors] == ["keys.demo"]
    assert "key_sha256" in errors[0][1]


def test_key_sha256_must_be_64_hex_and_error_does_not_echo_it() -> None:
    raw = {**tree(), "keys": {"demo": {"key_sha256": CLIENT_SECRET}}}
    with pytest.raises(ConfigError) as info:
        load_settings(raw, env={})
    assert [path for path, _ in info.value.errors] == ["keys.demo.key_sha256"]
    assert CLIENT_SECRET not in str(info.value)


def test_key_sha256_alone_is_accepted() -> None:
    settings = load_settings({**tree(), "keys": {"h": {"key_sha256": "AB" * 32}}}, env={})
    assert settings.keys["h"].key is None
    assert settings.keys["h"].key_sha256 == "AB" * 32


def test_several_workers_need_redis() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tree(server={"workers": 4}), env={})
    assert len(info.value.errors) == 1
    assert "redis" in info.value.errors[0][1]
    assert "redis" in str(info.value)
    settings = load_settings(tree(server={"workers": 4}, state={"backend": "redis"}), env={})
    assert settings.server.workers == 4


def test_cross_field_errors_come_with_the_others_at_their_key_paths() -> None:
    raw = tree(server={"workers": 2, "port": "nope"},
               models={"gpt": {"upstreams": ["mock", "ghost"]}},
               keys={"demo": {"key": CLIENT_SECRET}, "twin": {"key": CLIENT_SECRET}})
    with pytest.raises(ConfigError) as info:
        load_settings(raw, env={})
    paths = dict(info.value.errors)
    assert set(paths) == {"server.port", "server.workers", "models.gpt.upstreams", "keys.twin.key"}
    assert "ghost" in paths["models.gpt.upstreams"]
    assert "keys.demo" in paths["keys.twin.key"]
    assert CLIENT_SECRET not in str(info.value)


def test_two_keys_with_one_secret_are_refused_also_as_a_digest() -> None:
    digest = hashlib.sha256(CLIENT_SECRET.encode()).hexdigest().upper()
    with pytest.raises(ConfigError) as info:
        load_settings(tree(keys={"hashed": {"key_sha256": digest}}), env={})
    assert [path for path, _ in info.value.errors] == ["keys.hashed.key_sha256"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "https://api.openai.com/"])
def test_base_url_without_a_path_is_refused(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tree(upstreams={"mock": {"base_url": url}}), env={})
    ((path, message),) = info.value.errors
    assert path == "upstreams.mock.base_url"
    assert "/v1" in message


def test_blocks_of_quota_settings() -> None:
    limits = load_settings(tree(), env={}).limits
    assert (limits.block_ttl_s, limits.block_max_requests) == (0.25, 256)
    limits = load_settings(tree(limits={"block_ttl": 0, "block_max_requests": 64}), env={}).limits
    assert (limits.block_ttl_s, limits.block_max_requests) == (0.0, 64)
    raw = tree(limits={"block_ttl": "1m", "block_max_requests": 2})
    assert sorted(paths_of(raw)) == ["limits.block_max_requests", "limits.block_ttl"]


def test_base_url_trailing_slash_dropped() -> None:
    settings = load_settings(tree(upstreams={"mock": {"base_url": "https://api.example.com/v1/"}}), env={})
    assert settings.upstreams["mock"].base_url == "https://api.example.com/v1"


# --- frozen, masked -------------------------------------------------------------------------


def test_settings_are_frozen() -> None:
    settings = load_settings(tree(), env={})
    with pytest.raises(ValidationError):
        settings.server.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        settings.upstreams["mock"].timeouts.connect_s = 1.0  # type: ignore[misc]
    with pytest.raises(ValidationError):
        settings.keys["demo"].rpm = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        settings.state = settings.state  # type: ignore[misc]
    assert settings.server.port == 8080


def test_repr_and_str_never_show_secrets() -> None:
    settings = load_settings(tree(), env={})
    for text in (repr(settings), str(settings), repr(settings.upstreams), repr(settings.keys["demo"]),
                 settings.model_dump_json()):
        assert UPSTREAM_SECRET not in text
        assert CLIENT_SECRET not in text
    assert settings.upstreams["mock"].api_key is not None
    assert settings.upstreams["mock"].api_key.get_secret_value() == UPSTREAM_SECRET


def test_config_error_does_not_show_secrets_of_a_bad_config() -> None:
    raw = tree(keys={"demo": {"key": CLIENT_SECRET, "key_sha256": "00" * 32}},
               upstreams={"mock": {"base_url": "nope"}})
    with pytest.raises(ConfigError) as info:
        load_settings(raw, env={})
    assert CLIENT_SECRET not in str(info.value)
    assert UPSTREAM_SECRET not in str(info.value)


# --- files ----------------------------------------------------------------------------------


def test_yaml_syntax_error_is_a_config_error_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("server:\n  port: 8080\nupstreams: [unclosed\nkeys: {}\n")
    with pytest.raises(ConfigError) as info:
        load_settings_file(path, env={})
    assert str(path) in str(info.value)
    assert len(info.value.errors) == 1
    assert "line" in info.value.errors[0][1]


def test_yaml_syntax_error_does_not_echo_the_secret_on_the_bad_line(tmp_path: Path) -> None:
    # `shepherd serve` / `check-config` print this error to stderr, i.e. into service logs.
    path = tmp_path / "broken.yaml"
    path.write_text(f"upstreams: {{mock: {{base_url: 'http://x/v1'}}}}\nkeys:\n  demo:\n"
                    f"    key: {CLIENT_SECRET}: oops\n")
    with pytest.raises(ConfigError) as info:
        load_settings_file(path, env={})
    assert "line 4" in str(info.value)
    assert CLIENT_SECRET not in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings_file(tmp_path / "absent.yaml", env={})
    assert "absent.yaml" in str(info.value)


def test_file_errors_carry_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("upstreams: {mock: {base_url: 'http://x/v1'}}\nkeys: {demo: {}}\n")
    with pytest.raises(ConfigError) as info:
        load_settings_file(path, env={})
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: 1 error(s)")


def test_repo_gateway_yaml_loads_with_its_defaults() -> None:
    settings = load_settings_file(REPO / "config" / "gateway.yaml", env={})
    assert isinstance(settings, Settings)
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.state.backend == "memory"
    mock = settings.upstreams["mock"]
    assert mock.base_url == "http://127.0.0.1:9001/v1"
    assert mock.api_key is not None
    assert mock.api_key.get_secret_value() == "sk-mock"
    assert (mock.timeouts.connect_s, mock.timeouts.first_byte_s, mock.timeouts.read_gap_s) == (5, 60, 120)
    assert settings.keys["demo"].key is not None
    assert settings.keys["demo"].key.get_secret_value() == "sk-shepherd-demo"


def test_repo_gateway_yaml_takes_env_overrides() -> None:
    env = {"SHEPHERD_PORT": "9090", "DEMO_KEY": "sk-mine", "MOCK_UPSTREAM_URL": "http://10.1.1.1:1/v1"}
    settings = load_settings_file(REPO / "config" / "gateway.yaml", env=env)
    assert settings.server.port == 9090
    assert settings.upstreams["mock"].base_url == "http://10.1.1.1:1/v1"
    assert settings.keys["demo"].key is not None
    assert settings.keys["demo"].key.get_secret_value() == "sk-mine"


# --- server: listener bounds ----------------------------------------------------------------


def test_listener_bounds_defaults() -> None:
    server = load_settings(tree(), env={}).server
    assert server.max_connections == 10_000
    assert server.header_timeout_s == 10.0
    assert server.keepalive_timeout_s == 15.0  # aiohttp's run_app says 75 s
    assert server.backlog == 1024  # aiohttp's TCPSite says 128


def test_listener_bounds_take_units() -> None:
    server = load_settings(tree(server={"max_connections": 20, "header_timeout": "500ms",
                                        "keepalive_timeout": "2m", "backlog": 4096}), env={}).server
    assert (server.max_connections, server.header_timeout_s, server.keepalive_timeout_s,
            server.backlog) == (20, 0.5, 120.0, 4096)


@pytest.mark.parametrize(("key", "value"), [
    ("max_connections", 0), ("max_connections", "many"), ("header_timeout", 0),
    ("header_timeout", "soon"), ("keepalive_timeout", "0s"), ("keepalive_timeout", -1),
    ("backlog", 0), ("backlog", 65536),
])
def test_bad_listener_bounds_name_their_key(key: str, value: object) -> None:
    assert paths_of(tree(server={key: value})) == [f"server.{key}"]


def test_bad_listener_bounds_are_reported_together() -> None:
    raw = tree(server={"max_connections": 0, "header_timeout": "x", "keepalive_timeout": "y",
                       "backlog": -5})
    assert sorted(paths_of(raw)) == ["server.backlog", "server.header_timeout",
                                     "server.keepalive_timeout", "server.max_connections"]


# --- routing.panic_threshold_percent ------------------------------------------------------------


def test_panic_threshold_percent_defaults_to_envoys_50() -> None:
    assert load_settings(tree(), env={}).routing.panic_threshold_percent == 50.0


@pytest.mark.parametrize("value", [0, 12.5, 100])
def test_panic_threshold_percent_takes_0_to_100(value: float) -> None:
    settings = load_settings(tree(routing={"panic_threshold_percent": value}), env={})
    assert settings.routing.panic_threshold_percent == value


@pytest.mark.parametrize("value", [-1, 100.5, "half"])
def test_panic_threshold_percent_out_of_range_names_its_key(value: object) -> None:
    assert paths_of(tree(routing={"panic_threshold_percent": value})) == [
        "routing.panic_threshold_percent"]


def test_panic_threshold_percent_reaches_the_balancer() -> None:
    from proxy.admission import Admission, SlotLimits
    from proxy.app import build_balancer
    from proxy.errors import OverloadedError

    settings = load_settings(tree(routing={"panic_threshold_percent": 0},
                                  upstreams={"mock": {"outlier_detection": {"consecutive_failures": 1}}}),
                             env={})
    balancer = build_balancer(settings, Admission({"mock": SlotLimits(1, 0, 1.0)}))
    balancer.record_failure("mock")
    with pytest.raises(OverloadedError):  # panic off: the ejected only deployment is out
        balancer.candidates("m", ("*",))
    default = build_balancer(load_settings(tree(), env={}), Admission({"mock": SlotLimits(1, 0, 1.0)}))
    for _ in range(5):
        default.record_failure("mock")
    assert default.candidates("m", ("*",)) == ["mock"]


def test_cors_origins_must_be_origins() -> None:
    settings = load_settings(tree(server={"cors_origins": ["https://app.example.com", "*"]}), env={})
    assert settings.server.cors_origins == ("https://app.example.com", "*")
    with pytest.raises(ConfigError) as info:
        load_settings(tree(server={"cors_origins": ["https://app.example.com/path"]}), env={})
    assert [path for path, _ in info.value.errors] == ["server.cors_origins"]
