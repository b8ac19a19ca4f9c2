"""What the usage ledger costs per request: gateway CPU µs per non-stream request with the
ledger off, on SQLite, and (with ``--postgres URL``) on PostgreSQL.

    .venv/bin/python scripts/ledger_cost.py [--rounds 3] [--duration 8] [--connections 32]
        [--postgres postgresql://user@127.0.0.1:5432/db]

Starts ``scripts/mock_fast.py`` and, per mode and round (modes alternate so drift on a
shared machine hits each alike), a gateway process (``python -m proxy serve``, access log
off unless ``--access-log``, so the ledger's share is not diluted by it); drives it with ``wrk`` (POST chat
completions, 16 tokens) for a warm-up and then ``--duration`` seconds, and reads the
gateway's ``utime + stime`` from ``/proc/<pid>/stat`` (all its threads, so aiosqlite's writer
thread counts) around the measured run. Prints per-round figures and the medians as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-ledger-cost-0123456789"
BODY = '{"model":"mock-gpt","messages":[{"role":"user","content":"hello there"}],"max_tokens":16}'
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime (fields 14, 15)


def wrk(port: int, seconds: float, connections: int, script: Path) -> int:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script),
                          f"http://127.0.0.1:{port}/v1/chat/completions"],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+) requests in", out)
    if match is None or "Non-2xx" in out:
        raise RuntimeError(f"wrk: {out}")
    return int(match.group(1))


def run_mode(mode: str, ledger: dict[str, object], mock_port: int, tmp: Path, args: argparse.Namespace
             ) -> dict[str, float]:
    port = free_port()
    config = {"server": {"host": "127.0.0.1", "port": port, "access_log": args.access_log},
              "upstreams": {"mock": {"base_url": f"http://127.0.0.1:{mock_port}/v1", "models": ["*"],
                                     "health_check": {"enabled": False}}},
              "keys": {"bench": {"key": KEY, "models": ["*"]}}, "ledger": ledger}
    path = tmp / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)], cwd=tmp,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        wrk(port, 3, args.connections, tmp / "post.lua")  # warm-up
        before = cpu_s(proc.pid)
        requests = wrk(port, args.duration, args.connections, tmp / "post.lua")
        time.sleep(1.5)  # let the flusher write what the run left buffered (counted too)
        spent = cpu_s(proc.pid) - before
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return {"requests": requests, "rps": requests / args.duration,
            "cpu_us_per_request": spent / requests * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--postgres", help="also measure ledger.url: this PostgreSQL URL")
    parser.add_argument("--access-log", action="store_true", help="keep server.access_log on (the default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shepherd-ledger-cost-") as name:
        tmp = Path(name)
        (tmp / "post.lua").write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = '{BODY}'\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {KEY}"\n')
        mock_port = free_port()
        mock = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "mock_fast.py"),
                                 "--port", str(mock_port), "--tokens", "16"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        modes: dict[str, dict[str, object]] = {"off": {"enabled": False},
                                               "sqlite": {"url": f"sqlite:///{tmp / 'usage.db'}"}}
        if args.postgres:
            modes["postgresql"] = {"url": args.postgres}
        results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        try:
            wait_port(mock_port)
            for round_no in range(args.rounds):
                for mode, ledger in modes.items():
                    result = run_mode(mode, ledger, mock_port, tmp, args)
                    results[mode].append(result)
                    print(f"round {round_no + 1} {mode:10s} {result['rps']:8.0f} req/s "
                          f"{result['cpu_us_per_request']:7.1f} us CPU/request", flush=True)
        finally:
            mock.terminate()
            mock.wait(timeout=10)
    medians = {mode: statistics.median(r["cpu_us_per_request"] for r in runs)
               for mode, runs in results.items()}
    summary = {"cpu_us_per_request_median": {m: round(v, 1) for m, v in medians.items()},
               "overhead_percent": {m: round((v / medians["off"] - 1) * 100, 1)
                                    for m, v in medians.items() if m != "off"},
               "rounds": results}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
