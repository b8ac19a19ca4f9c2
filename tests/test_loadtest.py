"""Tests for scripts/loadtest.py: the choice of load generator and mock, and the wrk runner
(against the fast mock engine, on loopback)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scripts import loadtest


@pytest.mark.parametrize("text", ['{"a": "b"}', "x]]", "x]=", "]==]y", ""])
def test_lua_string_closes_only_at_its_end(text: str) -> None:
    literal = loadtest.lua_string(text)
    level = literal.index("[", 1) - 1
    closer = "]" + "=" * level + "]"
    assert literal == "[" + "=" * level + "[" + text + closer
    assert closer not in text + closer[:-1]


def test_compare_defaults_to_wrk_and_the_fast_mock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    args = loadtest.parse_args(["--compare"])
    assert (args.generator, args.mock_engine, args.wrk_note) == ("wrk", "fast", None)
    assert args.mock_script.endswith("mock_fast.py")
    other = loadtest.parse_args([])
    assert (other.generator, other.mock_engine) == ("python", "aiohttp")
    assert other.mock_script.endswith("mock_upstream.py")


def test_compare_without_wrk_falls_back_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    args = loadtest.parse_args(["--compare"])
    assert (args.generator, args.wrk_note) == ("python", loadtest.WRK_MISSING)


@pytest.mark.parametrize("argv", [["--generator", "wrk"],
                                  ["--scenario", "overload", "--generator", "wrk"]])
def test_wrk_outside_compare_is_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        loadtest.parse_args(argv)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_run_against_the_fast_mock(tmp_path: Path) -> None:
    args = loadtest.parse_args(["--compare", "--duration", "2", "--warmup", "1",
                                "--concurrency", "4", "--no-pin"])
    fleet = loadtest.Fleet(tmp_path)
    try:
        mock, port = loadtest.start_mock(args, fleet)
        loadtest.wait_ready("mock", mock, port, "/v1/models", tmp_path)
        target = loadtest.Target("direct", "direct", port, loadtest.MOCK_KEY, None)
        run = loadtest.PhaseRun(target, loadtest.PHASES[0], "direct non-stream",
                                loadtest.ALL_CPUS, {"under_test": mock.pid, "mock": mock.pid})
        load = loadtest.run_wrk(run, args, fleet, loadtest.Progress(1, tty=False))
    finally:
        fleet.stop_all()
    merged = load.merged
    assert merged["errors"] == {}
    assert merged["ok"] == merged["issued"] > 0
    assert merged["rps"] > 0
    assert 0 < merged["latency_ms"]["p50"] <= merged["latency_ms"]["p99"] <= merged["latency_ms"]["max"]
    assert load.cpu_s > 0
    assert load.after.at_s > load.before.at_s
