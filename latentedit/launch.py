"""Starts services by name: each in this process, or all of them as child processes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from latentedit.api.v1 import editor_pb2_grpc, trainer_pb2_grpc
from latentedit.config import SERVICE_NAMES, Config
from latentedit.serving import ServiceHost

log = logging.getLogger(__name__)

# Services whose issue has not landed yet: contract, health and reflection, methods UNIMPLEMENTED.
_PLACEHOLDERS: dict[str, tuple[Any, str]] = {
    "trainer": (trainer_pb2_grpc, "TrainerService"),
    "editor": (editor_pb2_grpc, "EditorService"),
}


def build_service(name: str, config: Config) -> ServiceHost:
    """Start one service listening in this process; it reports SERVING once warm."""
    if name == "generator":
        from generator_svc.server import build

        return build(config)[0]
    if name == "scorer":
        from scorer_svc.server import build as build_scorer

        return build_scorer(config)[0]
    if name not in _PLACEHOLDERS:
        raise ValueError(f"unknown service {name!r}; known: {', '.join(SERVICE_NAMES)}")
    module, service = _PLACEHOLDERS[name]
    host = ServiceHost(config.services[name])
    servicer = getattr(module, f"{service}Servicer")()
    host.add(getattr(module, f"add_{service}Servicer_to_server"), servicer, f"latentedit.v1.{service}")
    host.start()
    host.set_serving(True)
    return host


def serve_one(name: str, config: Config) -> None:
    host = build_service(name, config)
    host.install_signal_handlers()
    log.info("%s service on port %d", name, host.port)
    host.wait()


def serve_all(config_path: Path | None, names: list[str]) -> int:
    """Run each service as its own process (as in Kubernetes); forward SIGTERM; exit when one dies."""
    children: dict[str, subprocess.Popen] = {}
    base = [sys.executable, "-m", "latentedit"] + (["--config", str(config_path)] if config_path else [])
    for name in names:
        args = [*base, "serve", name]
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
            if not stopping:
                log.error("%s service exited with code %s; stopping the others", name, code)
                exit_code = code or 1
                stop()
        time.sleep(0.2)
    return exit_code
