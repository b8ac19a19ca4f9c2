"""proxy/cli.py: `python -m proxy check-config` and `hash-key`, run as a user runs them."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-cli-secret-do-not-print"
CONFIG_VARS = {"DEMO_KEY", "MOCK_UPSTREAM_KEY", "MOCK_UPSTREAM_URL", "SHEPHERD_HOST", "SHEPHERD_PORT"}


def shepherd(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=30, check=False,
    )


def test_check_config_ok_on_repo_config() -> None:
    result = shepherd("check-config", "config/gateway.yaml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "1 upstreams, 1 keys" in result.stdout


def test_check_config_prints_every_error_with_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(f"""\
        server:
          max_body_bytes: 10 furlongs
        upstreams:
          mock:
            base_url: http://127.0.0.1:9001/v1
            api_key: ${{SHEPHERD_TEST_UNSET_VAR}}
            timeouts: {{connect: 5 parsecs, read_gap: 120s}}
        keys:
          demo:
            key: {SECRET}
            key_sha256: "{"ab" * 32}"
        """))

    result = shepherd("check-config", str(path))

    assert result.returncode == 1
    assert "OK" not in result.stdout
    for key_path in ("server.max_body_bytes", "upstreams.mock.api_key",
                     "upstreams.mock.timeouts.connect", "keys.demo"):
        assert f"{key_path}: " in result.stderr
    assert "SHEPHERD_TEST_UNSET_VAR" in result.stderr
    assert "4 error(s)" in result.stderr
    assert str(path) in result.stderr
    assert SECRET not in result.stderr + result.stdout


def test_check_config_uses_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "env.yaml"
    path.write_text("upstreams: {mock: {base_url: '${SHEPHERD_TEST_URL}'}}\nkeys: {demo: {key: k}}\n")
    assert shepherd("check-config", str(path)).returncode == 1
    assert shepherd("check-config", str(path), SHEPHERD_TEST_URL="http://h:1/v1").returncode == 0


def test_check_config_missing_file(tmp_path: Path) -> None:
    result = shepherd("check-config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 1
    assert "absent.yaml" in result.stderr


def test_hash_key_prints_sha256() -> None:
    result = shepherd("hash-key", SECRET)
    assert result.returncode == 0
    assert result.stdout == hashlib.sha256(SECRET.encode()).hexdigest() + "\n"


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    import socket

    config = tmp_path / "gateway.yaml"
    config.write_text((REPO / "config" / "gateway.yaml").read_text() + "\nledger: {enabled: false}\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = shepherd("serve", "--config", str(config), "--port", str(port))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert errors == [f"shepherd: cannot listen on 127.0.0.1:{port}: error while attempting to bind "
                      f"on address ('127.0.0.1', {port}): address already in use"]
    assert "Traceback" not in result.stderr
