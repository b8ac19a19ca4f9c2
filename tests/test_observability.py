"""proxy/observability.py: JSON log lines, request context, buffered logging, metrics."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator

import orjson
import pytest

from proxy.observability import (
    JSONFormatter,
    Metrics,
    RequestContext,
    _BufferedHandler,
    configure_logging,
    flush_logs,
    new_request_id,
    request_context,
)


def make_record(msg: str = "request %s", *args: object, level: int = logging.INFO,
                extra: dict[str, object] | None = None,
                exc_info: object = None) -> logging.LogRecord:
    return logging.getLogger("proxy.access").makeRecord(
        "proxy.access", level, __file__, 1, msg, args, exc_info, extra=extra)  # type: ignore[arg-type]


@pytest.fixture
def context() -> Iterator[RequestContext]:
    ctx = RequestContext("req_0123456789abcdef01234567", key_name="tester")
    token = request_context.set(ctx)
    yield ctx
    request_context.reset(token)


# --- JSONFormatter -----------------------------------------------------------------------------


def test_json_line_has_the_standard_fields() -> None:
    record = make_record("request %s done", "chat", level=logging.WARNING)
    line = JSONFormatter().format(record)
    assert "\n" not in line
    out = orjson.loads(line)
    assert out == {"ts": round(record.created, 3), "level": "warning", "logger": "proxy.access",
                   "msg": "request chat done"}


def test_json_line_carries_request_id_and_key_name(context: RequestContext) -> None:
    out = orjson.loads(JSONFormatter().format(make_record("hi")))
    assert out["request_id"] == "req_0123456789abcdef01234567"
    assert out["key"] == "tester"


def test_json_line_without_key_name_has_no_key(context: RequestContext) -> None:
    context.key_name = None
    out = orjson.loads(JSONFormatter().format(make_record("hi")))
    assert out["request_id"] == context.request_id
    assert "key" not in out


def test_json_line_outside_a_request_has_no_request_id() -> None:
    out = orjson.loads(JSONFormatter().format(make_record("hi")))
    assert "request_id" not in out
    assert "key" not in out


def test_json_line_includes_extras_and_stringifies_odd_values() -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd!"

    record = make_record("request", extra={"status": 200, "latency_ms": 1.5, "path": "/v1/x",
                                           "thing": Odd()})
    out = orjson.loads(JSONFormatter().format(record))
    assert out["status"] == 200
    assert out["latency_ms"] == 1.5
    assert out["path"] == "/v1/x"
    assert out["thing"] == "odd!"
    for internal in ("args", "levelno", "pathname", "msecs", "message", "exc_info"):
        assert internal not in out


def test_json_line_includes_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = make_record("failed", level=logging.ERROR, exc_info=sys.exc_info())
    out = orjson.loads(JSONFormatter().format(record))
    assert "ValueError: boom" in out["exc"]
    assert out["level"] == "error"


# --- new_request_id ----------------------------------------------------------------------------


def test_request_ids_are_well_formed_and_unique() -> None:
    ids = [new_request_id() for _ in range(2000)]
    assert all(re.fullmatch(r"req_[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == len(ids)


# --- configure_logging -------------------------------------------------------------------------


class Stderr:
    """What the ``proxy`` handler wrote to ``sys.stderr`` (pytest's capture, bound by
    ``configure_logging`` during the test call), read incrementally."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        self._seen = ""

    def text(self) -> str:
        self._seen += self._capsys.readouterr().err
        return self._seen

    def lines(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in self.text().splitlines()]


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Stderr]:
    """Captured stderr, with the ``proxy`` logger restored afterwards so other tests see it
    unconfigured. (pytest re-points ``sys.stderr`` when the test call starts, so
    ``configure_logging`` must run inside the test, not in a fixture.)"""
    root = logging.getLogger("proxy")
    saved = (list(root.handlers), root.level, root.propagate)
    for handler in saved[0]:  # start from an unconfigured logger
        if isinstance(handler, _BufferedHandler):
            root.removeHandler(handler)
    yield Stderr(capsys)
    for handler in list(root.handlers):
        if handler not in saved[0]:
            root.removeHandler(handler)
            handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]


def test_configure_logging_is_idempotent(stderr: Stderr) -> None:
    configure_logging()
    configure_logging("DEBUG")
    root = logging.getLogger("proxy")
    assert sum(isinstance(h, _BufferedHandler) for h in root.handlers) == 1
    assert root.level == logging.INFO  # the second call changed nothing
    assert root.propagate is False
    logging.getLogger("proxy.access").warning("once")
    assert [line["msg"] for line in stderr.lines()] == ["once"]


def test_info_is_buffered_until_flush(stderr: Stderr) -> None:
    configure_logging()
    logging.getLogger("proxy.access").info("request", extra={"status": 200})
    assert stderr.text() == ""
    flush_logs()
    out = stderr.lines()
    assert len(out) == 1
    assert out[0]["msg"] == "request"
    assert out[0]["status"] == 200
    assert out[0]["logger"] == "proxy.access"


def test_warning_flushes_at_once_in_order(stderr: Stderr) -> None:
    configure_logging()
    logging.getLogger("proxy.access").info("first")
    logging.getLogger("proxy.error").warning("second")
    assert [(line["msg"], line["level"]) for line in stderr.lines()] == [
        ("first", "info"), ("second", "warning")]


def test_level_filters_records(stderr: Stderr) -> None:
    configure_logging("WARNING")
    logging.getLogger("proxy").info("hidden")
    flush_logs()
    assert stderr.text() == ""


def test_log_lines_carry_request_context(stderr: Stderr, context: RequestContext) -> None:
    configure_logging()
    logging.getLogger("proxy.error").error("upstream failed")
    out = stderr.lines()
    assert out[0]["request_id"] == context.request_id
    assert out[0]["key"] == "tester"


def test_buffered_lines_keep_the_context_of_the_request_that_logged_them(stderr: Stderr) -> None:
    # Access lines are formatted when the buffer is flushed, after the request ended.
    configure_logging()
    token = request_context.set(RequestContext("req_aaaaaaaaaaaaaaaaaaaaaaaa", key_name="alpha"))
    logging.getLogger("proxy.access").info("request")
    request_context.reset(token)
    flush_logs()
    out = stderr.lines()
    assert out[0]["request_id"] == "req_aaaaaaaaaaaaaaaaaaaaaaaa"
    assert out[0]["key"] == "alpha"


# --- Metrics -----------------------------------------------------------------------------------


def test_count_request_increments_labelled_counter() -> None:
    metrics = Metrics()
    labels = {"endpoint": "/v1/chat/completions", "key": "tester", "status": "200"}
    assert metrics.registry.get_sample_value("shepherd_requests_total", labels) is None
    metrics.count_request("/v1/chat/completions", "tester", 200, 0.01)
    metrics.count_request("/v1/chat/completions", "tester", 200, 0.01)
    metrics.count_request("/v1/chat/completions", "tester", 429, 0.01)
    metrics.count_request("/v1/embeddings", "other", 200, 0.01)
    get = metrics.registry.get_sample_value
    assert get("shepherd_requests_total", labels) == 2.0
    assert get("shepherd_requests_total", {**labels, "status": "429"}) == 1.0
    assert get("shepherd_requests_total",
               {"endpoint": "/v1/embeddings", "key": "other", "status": "200"}) == 1.0
    assert get("shepherd_requests_total",
               {"endpoint": "/v1/embeddings", "key": "tester", "status": "200"}) is None
    assert get("shepherd_request_seconds_count", {"endpoint": "/v1/chat/completions"}) == 3.0
    assert get("shepherd_request_seconds_sum", {"endpoint": "/v1/chat/completions"}) == pytest.approx(0.03)


def test_count_upstream_error_by_upstream_and_kind() -> None:
    metrics = Metrics()
    metrics.count_upstream_error("mock", "upstream_timeout")
    labels = {"upstream": "mock", "kind": "upstream_timeout"}
    assert metrics.registry.get_sample_value("shepherd_upstream_errors_total", labels) == 1.0


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.count_request("/v1/models", "tester", 200, 0.01)
    labels = {"endpoint": "/v1/models", "key": "tester", "status": "200"}
    assert first.registry.get_sample_value("shepherd_requests_total", labels) == 1.0
    assert second.registry.get_sample_value("shepherd_requests_total", labels) is None
