"""Metrics, traces and structured logs for the services (the production issue, #12).

The contract the serving layer wires (latentedit/rpc/serving.py and rpc/client.py call these):

- `ObservabilityConfig`: the `observability:` section of the YAML config.
- `start(service, config)`: once per process, before serving (metrics HTTP port, tracer
  provider, JSON logs).
- `server_interceptors(service)`: gRPC server interceptors for every RPC of that service.
- `client_interceptors(service)`: interceptors for the channels a service (or client) opens,
  so a trace continues across editor -> generator -> scorer.

Being filled in during this session: until then the functions add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ObservabilityConfig:
    metrics_port: int = 0  # 0: no metrics endpoint
    otlp_endpoint: str = ""  # empty: traces are not exported
    json_logs: bool = False


def start(service: str, config: ObservabilityConfig) -> None:
    del service, config


def server_interceptors(service: str) -> list[Any]:
    del service
    return []


def client_interceptors(service: str) -> list[Any]:
    del service
    return []
