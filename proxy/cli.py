"""The ``shepherd`` command: ``serve``, ``check-config``, ``hash-key``, ``usage``, ``keys``,
``reload``."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from proxy import __version__, admin_client
from proxy.auth import hash_key
from proxy.config import MEMORY_WORKERS_MESSAGE, ConfigError, Settings, load_settings_file


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shepherd", description="OpenAI-compatible LLM gateway")
    parser.add_argument("--version", action="version", version=f"shepherd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="path to the YAML config")
    serve.add_argument("--host", help="listen address (default: server.host)")
    serve.add_argument("--port", type=int, help="listen port (default: server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers)")
    check = commands.add_parser("check-config", help="validate a config file, print every error")
    check.add_argument("path")
    hashing = commands.add_parser("hash-key", help="print the SHA-256 hex of KEY for key_sha256")
    hashing.add_argument("key")
    admin_client.add_usage_parser(commands)
    admin_client.add_keys_parser(commands)
    admin_client.add_reload_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (1 for an invalid config)."""
    args = _parser().parse_args(argv)
    if args.command == "hash-key":
        print(hash_key(args.key))
        return 0
    if args.command == "usage":
        return admin_client.run_usage(args)
    if args.command == "keys":
        return admin_client.run_keys(args)
    if args.command == "reload":
        return admin_client.run_reload(args)
    path = args.path if args.command == "check-config" else args.config
    try:
        settings = load_settings_file(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.command == "check-config":
        print(f"{path}: OK ({len(settings.upstreams)} upstreams, {len(settings.keys)} keys)")
        return 0
    return _serve(settings, args)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})  # held, not fatal, until the gateway handles it
    from proxy.app import serve

    workers = args.workers if args.workers is not None else settings.server.workers
    if workers > 1 and settings.state.backend == "memory":
        print(f"shepherd: {MEMORY_WORKERS_MESSAGE}", file=sys.stderr)
        return 2
    try:
        return serve(settings, args.host, args.port, workers, config_path=args.config)
    except ValueError as exc:
        print(f"shepherd: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, the address is not ours, no permission
        host = args.host or settings.server.host
        port = args.port if args.port is not None else settings.server.port
        print(f"shepherd: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
