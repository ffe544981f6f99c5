"""Helpers shared by the benchmark scripts: timing loops, machine description, RESULTS.md."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ROOT = RESULTS.parent.parent


_HANDED_OUT_PORTS: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, and never one this process handed out before: the kernel may
    return a just-closed port again, and two services given the same port both bind it (gRPC sets
    SO_REUSEPORT) and split each other's calls (UNIMPLEMENTED: Method not found)."""
    while True:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT_PORTS:
            _HANDED_OUT_PORTS.add(port)
            return port


@contextlib.contextmanager
def served(names: list[str], repository: str, sections: dict[str, Any] | None = None) -> Iterator[dict[str, str]]:
    """Run `latentedit serve NAMES` on free ports as a separate process; yields {name: address}
    once every service reports SERVING, and stops them afterwards. `sections` adds config
    sections (e.g. {"generator": {"device": "cuda"}})."""
    from latentedit.rpc.client import connect, wait_serving

    ports = {name: free_port() for name in names}
    config = Path(tempfile.mkdtemp()) / "bench.yaml"
    config.write_text(yaml.safe_dump({"repository": repository, "services": {n: {"port": p} for n, p in ports.items()},
                                      "security": {"insecure": True}, **(sections or {})}))  # loopback benchmarks: plaintext
    process = subprocess.Popen([sys.executable, "-m", "latentedit", "--config", str(config), "serve", *names], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        addresses = {name: f"localhost:{port}" for name, port in ports.items()}
        for name, address in addresses.items():
            wait_serving(connect(address), timeout_s=300, what=name)
        yield addresses
    finally:
        process.terminate()
        process.wait(60)


def rate(fn: Callable[[], int], min_seconds: float, min_calls: int = 3) -> float:
    """Items per second of `fn` (which returns how many items it processed), after one warm-up call."""
    fn()
    items, calls, start = 0, 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        items += fn()
        calls += 1
    return items / (time.perf_counter() - start)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}){gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def record(section: str, command: str, body: str) -> None:
    """Replace (or append) `section` in bench/RESULTS.md with the command, machine, date and body."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"<!-- {section}:start -->\n## {section}\n\n"
        f"- command: `{command}`\n- machine: {machine()}\n- date: {stamp}\n\n{body.rstrip()}\n<!-- {section}:end -->\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEach section is rewritten by the script named in it.\n\n"
    pattern = re.compile(rf"<!-- {re.escape(section)}:start -->.*?<!-- {re.escape(section)}:end -->\n", re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    RESULTS.write_text(text)
