"""The command line's side of ``/admin/*``: calls a running gateway's admin API and prints
what it answers (``shepherd usage``; the other admin commands can share ``AdminClient``).

Standard library only (``urllib``): the CLI needs no event loop and no extra dependency.
The gateway is ``--url`` (default ``$SHEPHERD_URL``, else ``http://127.0.0.1:8080``) and the
admin key ``--admin-key`` (default ``$SHEPHERD_ADMIN_KEY``); the key is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT_S = 30.0


class AdminError(Exception):
    """The admin API refused or could not be reached; ``str()`` is the message to print and
    ``exit_code`` the process's (1: refused, 2: unreachable or unusable answer)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class AdminClient:
    """``GET``s on ``url``'s admin API with ``admin_key`` as ``Authorization: Bearer``."""

    def __init__(self, url: str, admin_key: str | None) -> None:
        self.url = url.rstrip("/")
        self._admin_key = admin_key

    def __repr__(self) -> str:
        return f"<AdminClient {self.url} key={'***' if self._admin_key else None}>"

    def get(self, path: str, params: Mapping[str, str], accept: str = "application/json") -> bytes:
        """The body of ``GET <url><path>?<params>``.

        Raises:
            AdminError: no admin key, a refusal (the gateway's error message), or the
                gateway could not be reached within ``TIMEOUT_S``.
        """
        if not self._admin_key:
            raise AdminError("an admin key is needed: --admin-key or SHEPHERD_ADMIN_KEY", exit_code=2)
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v})
        request = urllib.request.Request(f"{self.url}{path}" + (f"?{query}" if query else ""), headers={
            "Authorization": f"Bearer {self._admin_key}", "Accept": accept})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            raise AdminError(f"{exc.code}: {_error_message(exc.read())}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(f"cannot reach {self.url}: {reason}", exit_code=2) from None


def _error_message(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return f"{error['message']} ({error.get('code')})"
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:200]


def add_usage_parser(commands: Any) -> None:
    """Add ``shepherd usage`` to the CLI's subparsers."""
    parser = commands.add_parser("usage", help="usage from the ledger of a running gateway (/admin/usage)")
    add_connection_arguments(parser)
    parser.add_argument("--key", help="only this key name")
    parser.add_argument("--model", help="only this model")
    parser.add_argument("--since", help="from this time (ISO 8601 or Unix seconds)")
    parser.add_argument("--until", help="until this time, excluded (ISO 8601 or Unix seconds)")
    parser.add_argument("--group-by", choices=("key", "model", "day"), help="sum per key, model or UTC day")
    parser.add_argument("--limit", type=int, default=100, help="rows to show (1..1000, default 100)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the JSON answer")
    output.add_argument("--csv", action="store_true", help="print CSV (Accept: text/csv)")


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--url`` and ``--admin-key``, with their environment defaults."""
    parser.add_argument("--url", default=os.environ.get("SHEPHERD_URL", DEFAULT_URL),
                        help=f"the gateway (default: $SHEPHERD_URL or {DEFAULT_URL})")
    parser.add_argument("--admin-key", default=os.environ.get("SHEPHERD_ADMIN_KEY"),
                        help="an admin.keys key (default: $SHEPHERD_ADMIN_KEY)")


def run_usage(args: argparse.Namespace) -> int:
    """``shepherd usage``: print the answer as a table, JSON or CSV; returns the exit code."""
    client = AdminClient(args.url, args.admin_key)
    params = {"key": args.key, "model": args.model, "since": args.since, "until": args.until,
              "group_by": args.group_by, "limit": str(args.limit)}
    try:
        if args.csv:
            sys.stdout.write(client.get("/admin/usage", params, accept="text/csv").decode())
            return 0
        raw = client.get("/admin/usage", params)
        if args.json:
            sys.stdout.write(raw.decode() + "\n")
            return 0
        body = json.loads(raw)
    except AdminError as exc:
        print(f"shepherd usage: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError:
        print("shepherd usage: the gateway's answer is not JSON", file=sys.stderr)
        return 2
    print(format_usage(body))
    return 0


#: Columns of the row table (``/admin/usage`` field, heading).
ROW_TABLE = (("time", "TIME"), ("key", "KEY"), ("model", "MODEL"), ("endpoint", "ENDPOINT"),
             ("transport", "VIA"), ("status", "STATUS"), ("prompt_tokens", "PROMPT"),
             ("completion_tokens", "COMPLETION"), ("cost_usd", "COST $"), ("latency_ms", "LATENCY ms"),
             ("ttft_ms", "TTFT ms"))
GROUP_TABLE = (("requests", "REQUESTS"), ("errors", "ERRORS"), ("prompt_tokens", "PROMPT"),
               ("completion_tokens", "COMPLETION"), ("total_tokens", "TOTAL"), ("cost_usd", "COST $"),
               ("avg_latency_ms", "AVG LATENCY ms"), ("avg_ttft_ms", "AVG TTFT ms"))


def format_usage(body: Mapping[str, Any]) -> str:
    """``/admin/usage``'s JSON as an aligned text table (numbers right-aligned); rows show
    a note when more pages exist."""
    group_by = body.get("group_by")
    columns = (((group_by, group_by.upper()), *GROUP_TABLE) if isinstance(group_by, str) else ROW_TABLE)
    records = body.get("data") or []
    table = format_table([heading for _, heading in columns],
                         [[_cell(name, record.get(name)) for name, _ in columns] for record in records])
    if body.get("has_more"):
        table += f"\n(more rows: --limit, or /admin/usage?cursor={body.get('next_cursor')})"
    return table if records else "(no usage)"


def _cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name == "cost_usd":
        return f"{value:.6f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    if name == "time":
        return str(value).replace("T", " ")[:19]
    return str(value)


def format_table(headings: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table: columns two spaces apart, numeric columns right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headings)]
    numeric = [bool(rows) and all(_numeric(r[i]) for r in rows) for i in range(len(headings))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w)
                         for c, w, n in zip(cells, widths, numeric, strict=True))

    return "\n".join([line(headings), *(line(r) for r in rows)]).rstrip()


def _numeric(text: str) -> bool:
    return text == "-" or text.replace(".", "", 1).lstrip("-").isdigit()
