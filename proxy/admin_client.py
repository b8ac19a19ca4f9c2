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
import signal
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


    def send(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """``method`` on ``<url><path>`` with a JSON ``body``; the JSON answer.

        Raises:
            AdminError: as ``get``, or an answer that is not JSON (exit code 2).
        """
        if not self._admin_key:
            raise AdminError("an admin key is needed: --admin-key or SHEPHERD_ADMIN_KEY", exit_code=2)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self._admin_key}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                raw = bytes(response.read())
        except urllib.error.HTTPError as exc:
            raise AdminError(f"{exc.code}: {_error_message(exc.read())}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(f"cannot reach {self.url}: {reason}", exit_code=2) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise AdminError("the gateway's answer is not JSON", exit_code=2) from None


def _error_message(body: bytes) -> str:
    """The error's message and code, then one line per entry of ``errors`` (``{"path",
    "message"}``: ``POST /admin/reload``'s config errors) when the answer has them."""
    try:
        answer = json.loads(body)
        error = answer["error"]
        lines = [f"{error['message']} ({error.get('code')})"]
        lines += [f"  {e['path']}: {e['message']}" for e in answer.get("errors") or ()]
        return "\n".join(lines)
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


# --- shepherd keys ----------------------------------------------------------------------------


def add_keys_parser(commands: Any) -> None:
    """Add ``shepherd keys create|list|update|revoke`` to the CLI's subparsers."""
    parser = commands.add_parser("keys", help="virtual keys of a running gateway (/admin/keys)")
    actions = parser.add_subparsers(dest="keys_command", required=True)
    listing = actions.add_parser("list", help="every key: source, limits, what is left now")
    add_connection_arguments(listing)
    listing.add_argument("--revoked", action="store_true", help="also list revoked runtime keys")
    listing.add_argument("--json", action="store_true", help="print the JSON answer")
    create = actions.add_parser("create", help="create a runtime key; prints its secret once")
    create.add_argument("name")
    _add_limit_arguments(create)
    update = actions.add_parser("update", help="change a runtime key's models, limits or budget")
    update.add_argument("name")
    _add_limit_arguments(update)
    revoke = actions.add_parser("revoke", help="revoke a runtime key (its next request gets 401)")
    revoke.add_argument("name")
    add_connection_arguments(revoke)


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument("--models", help="comma-separated model patterns (default: *)")
    for name, text in (("rpm", "requests per minute"), ("burst", "requests at once"),
                       ("tpm", "tokens per minute"), ("max-concurrent", "requests in flight"),
                       ("priority", "admission priority (higher first)"),
                       ("max-websockets", "WebSockets open at once, per process"),
                       ("budget-tokens", "tokens per budget period")):
        parser.add_argument(f"--{name}", type=int, help=text)
    parser.add_argument("--budget-usd", type=float, help="USD per budget period")
    parser.add_argument("--budget-period", help="budget period (1d, 12h, seconds; default 1d)")
    parser.add_argument("--json", action="store_true", help="print the JSON answer")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help='any other field as JSON, e.g. --set \'per_model={"gpt-4o": {"rpm": 60}}\'')


def limit_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The body fields the limit options set (options not given are left out).

    Raises:
        AdminError: a ``--set`` that is not ``FIELD=JSON``.
    """
    body: dict[str, Any] = {}
    if args.models:
        body["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    for field in ("rpm", "burst", "tpm", "max_concurrent", "priority", "max_websockets"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    budget = {k: v for k, v in (("tokens", args.budget_tokens), ("usd", args.budget_usd),
                                ("period", args.budget_period)) if v is not None}
    if budget:
        body["budget"] = budget
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            raise AdminError(f"--set {item}: expected FIELD=JSON", exit_code=2)
        try:
            body[field.strip()] = json.loads(value)
        except ValueError:
            raise AdminError(f"--set {field}: the value is not JSON", exit_code=2) from None
    return body


def run_keys(args: argparse.Namespace) -> int:
    """``shepherd keys …``: call the API and print the answer; returns the exit code."""
    client = AdminClient(args.url, args.admin_key)
    name = urllib.parse.quote(getattr(args, "name", ""), safe="")
    try:
        if args.keys_command == "list":
            body = client.send("GET", "/admin/keys" + ("?include_revoked=true" if args.revoked else ""))
        elif args.keys_command == "create":
            body = client.send("POST", "/admin/keys", {"name": args.name, **limit_fields(args)})
        elif args.keys_command == "update":
            body = client.send("PATCH", f"/admin/keys/{name}", limit_fields(args))
        else:
            body = client.send("DELETE", f"/admin/keys/{name}")
    except AdminError as exc:
        print(f"shepherd keys {args.keys_command}: {exc}", file=sys.stderr)
        return exc.exit_code
    if getattr(args, "json", False):
        print(json.dumps(body, indent=2))
    elif args.keys_command == "list":
        print(format_keys(body.get("data") or []))
    else:
        print(format_key(body))
    return 0


#: Columns of ``shepherd keys list`` (``/admin/keys`` field, heading).
KEY_TABLE = (("name", "NAME"), ("source", "SOURCE"), ("models", "MODELS"), ("rpm", "RPM"),
             ("requests_left", "REQ LEFT"), ("tpm", "TPM"), ("tokens_left", "TOK LEFT"),
             ("max_concurrent", "MAX CONC"), ("concurrent_left", "CONC LEFT"),
             ("budget_tokens_left", "BUDGET TOK LEFT"), ("budget_usd_left", "BUDGET $ LEFT"),
             ("revoked_at", "REVOKED"))


def format_keys(keys: Sequence[Mapping[str, Any]]) -> str:
    """``/admin/keys``'s key objects as a table (``-``: no limit, or unknown)."""
    if not keys:
        return "(no keys)"
    rows = [[_key_cell(k.get(field)) for field, _ in KEY_TABLE] for k in keys]
    return format_table([heading for _, heading in KEY_TABLE], rows)


def format_key(key: Mapping[str, Any]) -> str:
    """One key object, one ``field: value`` per line; the secret (only in ``create``'s
    answer) last, with a note that it is shown once."""
    lines = [f"{field}: {_key_cell(value)}" for field, value in key.items()
             if field not in ("key", "object") and value is not None]
    if key.get("key"):
        lines += ["", f"key: {key['key']}", "(the key is shown only now: store it safely)"]
    return "\n".join(lines)


def _key_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# --- shepherd reload ----------------------------------------------------------------------------


def add_reload_parser(commands: Any) -> None:
    """Add ``shepherd reload`` to the CLI's subparsers."""
    parser = commands.add_parser(
        "reload", help="re-read the config file of a running gateway (POST /admin/reload, or SIGHUP)")
    add_connection_arguments(parser)
    parser.add_argument("--pid", type=int,
                        help="send SIGHUP to this process instead (no admin key; prints no report)")
    parser.add_argument("--json", action="store_true", help="print the JSON answer")


def run_reload(args: argparse.Namespace) -> int:
    """``shepherd reload``: print what changed (or every config error); returns the exit code
    (0 reloaded, 1 refused: invalid config or no admin key, 2 unreachable)."""
    if args.pid is not None:
        try:
            os.kill(args.pid, signal.SIGHUP)
        except OSError as exc:
            print(f"shepherd reload: cannot signal {args.pid}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"sent SIGHUP to {args.pid}; the gateway logs what changed")
        return 0
    try:
        report = AdminClient(args.url, args.admin_key).send("POST", "/admin/reload")
    except AdminError as exc:
        print(f"shepherd reload: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(report, indent=2) if args.json else format_reload(report))
    return 0


def format_reload(report: Mapping[str, Any]) -> str:
    """``POST /admin/reload``'s answer as a few lines: one per kind of change."""
    lines = [f"reloaded in {report.get('duration_ms')} ms" if report.get("changed")
             else f"nothing changed ({report.get('duration_ms')} ms)"]
    for kind in ("keys", "upstreams", "models"):
        changes = report.get(kind) or {}
        parts = [f"{what} {', '.join(changes[what])}" for what in ("added", "removed", "changed")
                 if changes.get(what)]
        if parts:
            lines.append(f"{kind}: {'; '.join(parts)}")
    if report.get("other"):
        lines.append(f"also changed: {', '.join(report['other'])}")
    if report.get("restart_required"):
        lines.append(f"need a restart (old values kept): {', '.join(report['restart_required'])}")
    return "\n".join(lines)
