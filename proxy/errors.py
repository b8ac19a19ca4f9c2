"""Every error the gateway answers with, each knowing its HTTP meaning.

Class tree (the HTTP status each answers with)::

    GatewayError (500 server_error)
    ├── InvalidRequestError (400 invalid_request_error)
    │   └── RequestTooLargeError (413)
    ├── AuthenticationError (401)
    ├── PermissionDeniedError (403 permission_denied)
    ├── NotFoundError (404)
    │   └── ModelNotFoundError (404 model_not_found)
    ├── MethodNotAllowedError (405)
    ├── ConflictError (409 conflict)
    ├── ExpectationFailedError (417)
    ├── RateLimitError (429 requests | tokens | insufficient_quota)
    ├── OverloadedError (503 overloaded)
    └── UpstreamError (502 upstream_error)
        ├── UpstreamConnectionError (502)
        ├── UpstreamInvalidResponseError (502 upstream_invalid_response)
        ├── UpstreamResponseTooLargeError (502 upstream_response_too_large)
        ├── UpstreamTimeoutError (504 timeout)
        └── UpstreamStatusError (the upstream's own status and error body)

The wire shape is OpenAI's: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI API
reference, "Error codes"). Retry hints follow what openai-python's ``_base_client.py`` reads:
``retry-after`` (seconds), ``retry-after-ms`` and ``x-should-retry``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

JSONDict = dict[str, Any]


class GatewayError(Exception):
    """Base of every error the gateway turns into an OpenAI-shaped answer.

    Args:
        message: human-readable text sent to the client; never contains a key.
        param: the request field at fault, or ``None``.
        code: machine-readable code; ``None`` uses the class default.
        retry_after_s: seconds the client should wait before retrying, or ``None`` for no hint.
        should_retry: ``True``/``False`` sends ``x-should-retry``; ``None`` sends nothing and
            leaves the decision to the client's defaults.
        error_type: the OpenAI ``type``; ``None`` uses the class default.

    ``extra_headers`` (initially empty) are sent with the error too (``x-ratelimit-*``).
    """

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        should_retry: bool | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.type = error_type if error_type is not None else self.error_type
        self.retry_after_s = retry_after_s
        self.should_retry = should_retry
        self.extra_headers: dict[str, str] = {}

    @property
    def http_status(self) -> int:
        """The HTTP status to answer with (the class default unless a subclass overrides)."""
        return self.status

    def to_body(self) -> JSONDict:
        """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        """Headers for this error: ``extra_headers``, then the retry hints ``retry-after``
        (whole seconds, rounded up, RFC 9110 §10.2.3), ``retry-after-ms`` and
        ``x-should-retry``."""
        out: dict[str, str] = dict(self.extra_headers)
        if self.retry_after_s is not None and math.isfinite(self.retry_after_s):
            delay_ms = math.ceil(round(max(0.0, self.retry_after_s) * 1000, 6))
            out["retry-after"] = str(math.ceil(delay_ms / 1000))
            out["retry-after-ms"] = str(delay_ms)
        if self.should_retry is not None:
            out["x-should-retry"] = "true" if self.should_retry else "false"
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.http_status} code={self.code!r}: {self.message}>"


class InvalidRequestError(GatewayError):
    """The request is malformed: bad JSON, a missing or wrong-typed field (400)."""

    status = 400
    error_type = "invalid_request_error"


class RequestTimeoutError(InvalidRequestError):
    """The request body did not arrive within ``server.body_timeout`` (408, RFC 9110 §15.5.9);
    the connection is closed."""

    status = 408
    default_code = "request_timeout"


class RequestTooLargeError(InvalidRequestError):
    """The body exceeds ``server.max_body_bytes`` (413, RFC 9110 §15.5.14)."""

    status = 413
    default_code = "request_too_large"


class AuthenticationError(GatewayError):
    """Missing or unknown API key (401). The message never repeats the key."""

    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    """A valid key that may not do this (403): e.g. a virtual key on ``/admin/*``."""

    status = 403
    error_type = "invalid_request_error"
    default_code = "permission_denied"


class NotFoundError(GatewayError):
    """Unknown path or resource (404)."""

    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ConflictError(GatewayError):
    """The request conflicts with what exists (409): a name already taken, a read-only key."""

    status = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class ModelNotFoundError(NotFoundError):
    """The model does not exist or the key may not use it (404, as OpenAI answers both)."""

    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
        )


class MethodNotAllowedError(GatewayError):
    """The path exists but not for this HTTP method (405)."""

    status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class ExpectationFailedError(GatewayError):
    """An ``Expect`` header other than ``100-continue`` (417, RFC 9110 §10.1.1)."""

    status = 417
    error_type = "invalid_request_error"
    default_code = "expectation_failed"


class RateLimitError(GatewayError):
    """A per-key limit or budget is reached (429); ``retry_after_s`` says when it frees up.
    ``type`` is ``requests`` or ``tokens`` (``insufficient_quota`` for a spent budget), as
    OpenAI sends."""

    status = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"


class OverloadedError(GatewayError):
    """No capacity to serve the request now (503); retry later."""

    status = 503
    error_type = "server_error"
    default_code = "overloaded"


class UpstreamError(GatewayError):
    """The upstream could not produce an answer (502)."""

    status = 502
    error_type = "upstream_error"
    default_code = "upstream_error"


class UpstreamConnectionError(UpstreamError):
    """Connecting to or reading from the upstream failed (502). ``stale``: a pooled
    keep-alive connection was found closed before any of the response arrived. ``local``:
    the gateway itself could not connect (out of file descriptors, sockets or ephemeral
    ports): not the upstream's fault, so it never counts toward outlier ejection."""

    default_code = "upstream_connection_error"

    def __init__(self, message: str, *, stale: bool = False, local: bool = False, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.stale = stale
        self.local = local


class UpstreamInvalidResponseError(UpstreamError):
    """A 2xx answer that is not what the endpoint promises: a unary body that is not JSON
    (an HTML page from a misconfigured load balancer), a stream that is not
    ``text/event-stream``, an SSE event that is not UTF-8 (502). Counted as an upstream
    failure and retried elsewhere before the first byte."""

    default_code = "upstream_invalid_response"


class UpstreamResponseTooLargeError(UpstreamError):
    """The upstream's body, counted after decompression, passed
    ``upstreams.<name>.max_response_bytes`` (502); the connection is closed, never a
    partial answer."""

    default_code = "upstream_response_too_large"


class UpstreamTimeoutError(UpstreamError):
    """The upstream did not answer within a configured timeout (504)."""

    status = 504
    error_type = "timeout"
    default_code = "upstream_timeout"


class UpstreamStatusError(UpstreamError):
    """The upstream answered an error status; its status and error object pass through.

    Args:
        upstream_status: the upstream's HTTP status (4xx or 5xx).
        body: the upstream's ``{"error": {...}}`` object, already in OpenAI shape.
    """

    def __init__(self, upstream_status: int, body: JSONDict, **kwargs: Any) -> None:
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        assert isinstance(error, dict)
        super().__init__(str(error.get("message") or "upstream error"), **kwargs)
        self.upstream_status = upstream_status
        self.body = body

    @property
    def http_status(self) -> int:
        return self.upstream_status

    def to_body(self) -> JSONDict:
        return self.body
