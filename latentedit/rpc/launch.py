"""Starts services by name: each in this process, or all of them as child processes."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from latentedit.config import SERVICE_NAMES, Config
from latentedit.rpc.serving import ServiceHost

log = logging.getLogger(__name__)

# Each service's module has build(config) -> (host, ...), listening and reporting health.
SERVICE_MODULES = {
    "generator": "generator_svc.server",
    "scorer": "scorer_svc.server",
    "trainer": "trainer_svc.server",
    "editor": "editor_svc.server",
}
# Not a gRPC service: the browser editor's HTTP gateway (web_svc), started with the four by default.
WEB = "web"
ALL_NAMES = (*SERVICE_NAMES, WEB)


def build_service(name: str, config: Config) -> ServiceHost:
    """Start one service listening in this process; it reports SERVING once warm."""
    if name not in SERVICE_MODULES:
        raise ValueError(f"unknown service {name!r}; known: {', '.join(SERVICE_NAMES)}")
    return importlib.import_module(SERVICE_MODULES[name]).build(config)[0]


def serve_one(name: str, config: Config) -> None:
    if name == WEB:
        web = importlib.import_module("web_svc.server").build(config)[0]
        web.install_signal_handlers()
        web.wait()
        return
    host = build_service(name, config)
    host.install_signal_handlers()
    log.info("%s service on port %d", name, host.port)
    host.wait()


def serve_all(config_path: Path | None, names: list[str]) -> int:
    """Run each service as its own process (as in Kubernetes); forward SIGTERM; exit when one dies.

    All four services (what `latentedit serve` asks for by default) come with the web gateway; a
    gateway that stops (say, its port is taken) is logged and the gRPC services go on."""
    if set(SERVICE_NAMES) <= set(names) and WEB not in names:
        names = [*names, WEB]
    children: dict[str, subprocess.Popen] = {}
    base = [sys.executable, "-m", "latentedit"] + (["--config", str(config_path)] if config_path else [])
    for name in names:
        # The gateway runs as `python -m web_svc` (the same as `latentedit serve web`).
        args = ([sys.executable, "-m", "web_svc"] + (["--config", str(config_path)] if config_path else [])
                if name == WEB else [*base, "serve", name])
        children[name] = subprocess.Popen(args, env=os.environ.copy())
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    exit_code = 0
    while children:
        for name, child in list(children.items()):
            code = child.poll()
            if code is None:
                continue
            del children[name]
            if name == WEB and not stopping:
                # The page is an add-on to the API: the four services keep serving without it.
                log.error("the web gateway exited with code %s (is config web.port in use?); the gRPC services keep serving",
                          code)
                continue
            if not stopping:
                log.error("%s service exited with code %s; stopping the others", name, code)
                exit_code = code or 1
                stop()
        time.sleep(0.2)
    return exit_code
