"""Server-sent events: an incremental parser and the encoder the gateway writes with.

Follows the WHATWG HTML Living Standard, §9.2 "Server-sent events", "Interpreting an event
stream": lines end in CRLF, LF or CR; a line starting with ``:`` is a comment; ``data`` lines
of one event join with ``\\n``; a blank line dispatches the event, but only if it has data.

Bytes in, bytes out: event data stays ``bytes`` so the relay can hand it to ``orjson``
without decoding twice.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The keep-alive line written during upstream silence. A comment line with no blank line
#: after it dispatches nothing, so openai-python sees no empty event (DESIGN §4 Wire rules).
KEEP_ALIVE = b": keep-alive\n"

#: The terminal ``data`` payload of OpenAI chat and completion streams.
DONE = b"[DONE]"

DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024


class SSEError(ValueError):
    """The stream cannot be parsed: an event or line grew beyond ``max_event_bytes``."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event.

    Attributes:
        data: the ``data`` lines joined with ``\\n`` (no trailing newline).
        event: the ``event`` field, or ``None`` when absent (meaning type "message").
        id: the ``id`` field of this event, or ``None`` when the event carried none.
        retry_ms: the ``retry`` field in milliseconds, or ``None``.
    """

    data: bytes
    event: bytes | None = None
    id: bytes | None = None
    retry_ms: int | None = None


class SSEParser:
    """Incremental SSE parser: feed it chunks split anywhere, get whole events back.

    Args:
        max_event_bytes: the largest pending line plus event data held, in bytes (default
            16 MiB). Lines longer than 1 MiB are fine; beyond this bound ``feed`` raises
            ``SSEError`` instead of growing memory without limit.

    Not thread-safe; one parser per stream. Events left incomplete when the input ends are
    discarded, as the WHATWG spec says.
    """

    __slots__ = ("_max_event_bytes", "_pending", "_skip_lf", "_data", "_event", "_id", "_retry_ms")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max_event_bytes = max_event_bytes
        self._pending = bytearray()
        self._skip_lf = False
        self._data: list[bytes] = []
        self._event: bytes | None = None
        self._id: bytes | None = None
        self._retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume ``chunk`` and return the events it completed, in order.

        Raises:
            SSEError: a line or event exceeds ``max_event_bytes``.
        """
        if not chunk:
            return []
        chunk = self._normalize_newlines(chunk)
        if b"\n" not in chunk:
            self._pending += chunk
            self._check_size()
            return []
        lines = chunk.split(b"\n")
        if self._pending:
            lines[0] = bytes(self._pending) + lines[0]
            self._pending.clear()
        self._pending += lines.pop()
        events: list[SSEEvent] = []
        for line in lines:
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        self._check_size()
        return events

    def _normalize_newlines(self, chunk: bytes) -> bytes:
        """Map CRLF and CR to LF, remembering a CR at a chunk end so a following LF is dropped."""
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return chunk

    def _check_size(self) -> None:
        if not self._data and len(self._pending) <= self._max_event_bytes:
            return
        held = len(self._pending) + sum(len(part) for part in self._data)
        if held > self._max_event_bytes:
            raise SSEError(f"SSE event exceeds {self._max_event_bytes} bytes")

    def _process_line(self, line: bytes) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if len(line) > self._max_event_bytes:
            raise SSEError(f"SSE line exceeds {self._max_event_bytes} bytes")
        if line[0] == 0x3A:  # ":" starts a comment
            return None
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
            if len(self._data) > 1:
                self._check_size()
        elif field == b"event":
            self._event = value
        elif field == b"id" and b"\x00" not in value:
            self._id = value
        elif field == b"retry" and value.isdigit():
            self._retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, event, event_id, retry_ms = self._data, self._event, self._id, self._retry_ms
        self._data, self._event, self._id, self._retry_ms = [], None, None, None
        if not data:
            return None
        joined = data[0] if len(data) == 1 else b"\n".join(data)
        return SSEEvent(joined, event, event_id, retry_ms)


def encode_event(data: bytes, *, event: bytes | None = None, event_id: bytes | None = None) -> bytes:
    """Encode one SSE event, ending in the blank line that dispatches it.

    Args:
        data: the payload; embedded newlines become several ``data:`` lines.
        event: the ``event:`` field, or ``None`` to omit it.
        event_id: the ``id:`` field, or ``None`` to omit it.
    """
    parts = []
    if event_id is not None:
        parts.append(b"id: " + event_id + b"\n")
    if event is not None:
        parts.append(b"event: " + event + b"\n")
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        parts.extend(b"data: " + line + b"\n" for line in lines)
    else:
        parts.append(b"data: " + data + b"\n")
    parts.append(b"\n")
    return b"".join(parts)


def decode_frame(frame: bytes) -> tuple[bytes | None, bytes]:
    """The inverse of ``encode_event`` for one frame it encoded: ``(event, data)``, the
    ``event:`` field (``None`` when absent) and the ``data:`` lines joined by ``\n``.
    Only for frames ``encode_event`` wrote (``field: value`` lines, one space, no
    comments); use ``SSEParser`` for anything else."""
    event: bytes | None = None
    data: list[bytes] = []
    for line in frame.split(b"\n"):
        if line.startswith(b"data: "):
            data.append(line[6:])
        elif line.startswith(b"event: "):
            event = line[7:]
    return event, b"\n".join(data)
