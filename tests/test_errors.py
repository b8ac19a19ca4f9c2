"""proxy/errors.py: the OpenAI error shape, HTTP statuses and retry headers."""

from __future__ import annotations

import pytest

from proxy.errors import (
    AuthenticationError,
    GatewayError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    OverloadedError,
    RateLimitError,
    RequestTooLargeError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)


@pytest.mark.parametrize(
    ("cls", "status", "error_type", "code"),
    [
        (GatewayError, 500, "server_error", None),
        (InvalidRequestError, 400, "invalid_request_error", None),
        (RequestTooLargeError, 413, "invalid_request_error", "request_too_large"),
        (AuthenticationError, 401, "invalid_request_error", "invalid_api_key"),
        (NotFoundError, 404, "invalid_request_error", "not_found"),
        (MethodNotAllowedError, 405, "invalid_request_error", "method_not_allowed"),
        (RateLimitError, 429, "requests", "rate_limit_exceeded"),
        (OverloadedError, 503, "server_error", "overloaded"),
        (UpstreamError, 502, "upstream_error", "upstream_error"),
        (UpstreamConnectionError, 502, "upstream_error", "upstream_connection_error"),
        (UpstreamTimeoutError, 504, "timeout", "upstream_timeout"),
    ],
)
def test_body_shape_and_status(
    cls: type[GatewayError], status: int, error_type: str, code: str | None
) -> None:
    error = cls("something went wrong")
    assert error.http_status == status
    assert error.to_body() == {
        "error": {"message": "something went wrong", "type": error_type, "param": None, "code": code}
    }
    assert isinstance(error, GatewayError)
    assert str(error) == "something went wrong"


def test_param_and_explicit_code_override_the_default() -> None:
    error = InvalidRequestError("bad max_tokens", param="max_tokens", code="invalid_value")
    assert error.to_body()["error"] == {
        "message": "bad max_tokens", "type": "invalid_request_error",
        "param": "max_tokens", "code": "invalid_value",
    }


def test_model_not_found() -> None:
    error = ModelNotFoundError("gpt-9")
    assert error.http_status == 404
    body = error.to_body()["error"]
    assert body["code"] == "model_not_found"
    assert body["param"] == "model"
    assert body["type"] == "invalid_request_error"
    assert "gpt-9" in body["message"]
    assert isinstance(error, NotFoundError)


def test_repr_shows_class_status_and_code() -> None:
    assert repr(RateLimitError("slow down")) == "<RateLimitError 429 code='rate_limit_exceeded': slow down>"


def test_no_hint_no_headers() -> None:
    assert RateLimitError("x").headers() == {}


@pytest.mark.parametrize(
    ("retry_after_s", "seconds", "millis"),
    [
        (1.2, "2", "1200"),
        (2.0, "2", "2000"),
        (0.0001, "1", "1"),
        (0.5, "1", "500"),
        (0, "0", "0"),
        (-3.0, "0", "0"),
        (59.999, "60", "59999"),
        (4.03, "5", "4030"),
    ],
)
def test_retry_after_rounded_up(retry_after_s: float, seconds: str, millis: str) -> None:
    headers = RateLimitError("x", retry_after_s=retry_after_s).headers()
    assert headers == {"retry-after": seconds, "retry-after-ms": millis}


@pytest.mark.parametrize(("should_retry", "value"), [(True, "true"), (False, "false")])
def test_x_should_retry(should_retry: bool, value: str) -> None:
    assert OverloadedError("x", should_retry=should_retry).headers() == {"x-should-retry": value}
    assert OverloadedError("x", retry_after_s=3, should_retry=should_retry).headers() == {
        "retry-after": "3", "retry-after-ms": "3000", "x-should-retry": value,
    }


def test_upstream_status_error_passes_status_and_body() -> None:
    body = {"error": {"message": "context too long", "type": "invalid_request_error",
                      "param": "messages", "code": "context_length_exceeded"}}
    error = UpstreamStatusError(400, body)
    assert error.http_status == 400
    assert error.to_body() == body
    assert error.message == "context too long"
    assert isinstance(error, UpstreamError)


def test_upstream_status_error_without_error_object() -> None:
    error = UpstreamStatusError(503, {"detail": "busy"}, retry_after_s=2, should_retry=False)
    assert error.http_status == 503
    assert error.to_body() == {"detail": "busy"}
    assert error.message == "upstream error"
    assert error.headers() == {"retry-after": "2", "retry-after-ms": "2000", "x-should-retry": "false"}
    assert UpstreamStatusError(502, {"error": "flat string"}).message == "upstream error"
