"""proxy/observability.py: JSON log lines, request context, buffered logging, metrics."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator

import orjson
import pytest

from proxy.ledger import UsageRow
from proxy.observability import (
    JSONFormatter,
    Metrics,
    ModelLabels,
    RequestContext,
    RowTiming,
    _BufferedHandler,
    configure_logging,
    flush_logs,
    new_request_id,
    overhead_value,
    request_context,
    status_class,
    time_per_output_token_s,
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
    ok = {"endpoint": "/v1/chat/completions", "status_class": "2xx"}
    assert get("shepherd_request_seconds_count", ok) == 2.0
    assert get("shepherd_request_seconds_count", {**ok, "status_class": "4xx"}) == 1.0
    assert get("shepherd_request_seconds_sum", ok) == pytest.approx(0.02)


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


# --- request-level metrics (observe_row) --------------------------------------------------------


def stream_row(**fields: object) -> UsageRow:
    row = UsageRow(0.0, "req_1", "tester", "chat.completions", "http", 200, None, "m1", "up",
                   "gs_1", prompt_tokens=10, completion_tokens=11, total_tokens=21, cost_usd=0.5,
                   latency_ms=1100.0, ttft_ms=100.0, overhead_ms=2.0)
    for name, value in fields.items():
        setattr(row, name, value)
    return row


def test_observe_row_counts_tokens_cost_and_times_once_per_request() -> None:
    metrics = Metrics()
    seen: list[tuple[UsageRow, RowTiming]] = []
    metrics.row_listeners.append(lambda row, timing: seen.append((row, timing)))
    metrics.observe_row(stream_row())
    metrics.observe_row(stream_row(ttft_ms=None, status=502, error_code="upstream_error",
                                   completion_tokens=0, cost_usd=None, overhead_ms=None))
    get = metrics.registry.get_sample_value
    assert get("shepherd_tokens_total", {"key": "tester", "model": "m1", "type": "prompt"}) == 20
    assert get("shepherd_tokens_total", {"key": "tester", "model": "m1", "type": "completion"}) == 11
    assert get("shepherd_cost_usd_total", {"key": "tester", "model": "m1"}) == 0.5
    assert get("shepherd_time_to_first_token_seconds_count", {"model": "m1", "upstream": "up"}) == 1
    assert get("shepherd_time_to_first_token_seconds_sum", {"model": "m1", "upstream": "up"}) == 0.1
    assert get("shepherd_time_per_output_token_seconds_sum", {"model": "m1", "upstream": "up"}) \
        == pytest.approx(0.1)  # (1100 - 100) ms over 10 tokens after the first
    assert get("shepherd_gateway_overhead_seconds_count", {"endpoint": "chat.completions"}) == 1
    assert get("shepherd_model_requests_total", {"model": "m1", "upstream": "up", "status_class": "5xx"}) == 1
    assert len(seen) == 2


def test_model_labels_are_bounded() -> None:
    labels = ModelLabels({"known"}, max_extra=1)
    assert labels.label("known", ok=False) == "known"
    assert labels.label("new", ok=False) == "other"  # a failed request never adds a label
    assert labels.label("new", ok=True) == "new"
    assert labels.label("newer", ok=True) == "other"  # past max_extra
    assert labels.label("new", ok=False) == "new"
    assert labels.label(None, ok=True) == "-"


def test_status_class_tpot_and_overhead_header_value() -> None:
    classes = [status_class(s) for s in (200, 304, 429, 499, 503, 0)]
    assert classes == ["2xx", "3xx", "4xx", "4xx", "5xx", "other"]
    assert time_per_output_token_s(stream_row(completion_tokens=1)) is None
    assert time_per_output_token_s(stream_row(ttft_ms=None)) is None
    assert overhead_value(1.23456) == "1.23"
    assert overhead_value(-0.001) == "0.00"
