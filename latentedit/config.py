"""Configuration of the suite: one YAML file for all services (see config/local.yaml).

Every field has a default, so an empty file (or none) works. `LATENTEDIT_REPOSITORY`
overrides the model repository path, which is how containers point at their volume.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from latentedit.observability import ObservabilityConfig

SERVICE_NAMES = ("generator", "scorer", "trainer", "editor")
@dataclass
class ServingOptions:
    host: str = "[::]"
    port: int = 0
    max_workers: int = 16
    max_concurrent_rpcs: int = 64
    max_message_bytes: int = 64 * 1024 * 1024
    grace_period_s: float = 10.0


DEFAULT_PORTS = {"generator": 50051, "scorer": 50052, "trainer": 50053, "editor": 50054}


@dataclass
class GeneratorConfig:
    # Served when a request leaves the model name empty.
    default_model: str = "dcgan-faces"
    # auto: TensorRT on CUDA when it imports, else torch on CUDA, else ONNX Runtime on CPU.
    backend: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    # fp16 applies to torch and TensorRT on CUDA only.
    cuda_fp16: bool = True
    max_batch_size: int = 256
    # Extra wait for more rows once a request is queued. Batches also form on their own while
    # the backend is busy, so 0 adds no latency to a lone caller and still batches under load.
    max_queue_delay_ms: float = 0.0
    max_queue_rows: int = 4096
    max_request_batch: int = 1024
    # How often the repository is scanned for new model versions.
    poll_interval_s: float = 5.0
    threads: int = 0  # intra-op threads for torch and ONNX Runtime; 0: their defaults
    onnx_opset: int = 17
    # Model versions kept loaded; one more unloads the least recently used (calls using it finish).
    max_loaded_models: int = 4
    # Refuse a request with more estimated work queued ahead of it than this (RESOURCE_EXHAUSTED),
    # whatever its deadline; None: only the queue's row bound and the caller's deadline refuse.
    max_queue_wait_s: float | None = None


@dataclass
class ScorerConfig:
    max_batch_size: int = 64
    max_queue_delay_ms: float = 0.0
    max_queue_rows: int = 2048
    max_request_batch: int = 1024
    max_texts: int = 256
    max_text_chars: int = 2000
    poll_interval_s: float = 5.0
    threads: int = 0  # torch intra-op threads; 0: torch's default
    # Batchers (one per heads and image size, one thread each) kept; the least recently used ends.
    max_batchers: int = 16
    max_queue_wait_s: float | None = None  # as GeneratorConfig.max_queue_wait_s


@dataclass
class TrainerConfig:
    workers: int = 1  # jobs run at once; the heavy work happens in the generator and scorer
    # Longest one downstream call of a job may take (jobs have no caller deadline).
    call_timeout_s: float = 300.0


@dataclass
class EditorConfig:
    max_frames: int = 256
    max_batch: int = 256  # latents (seeds) per edit, images per inversion
    max_invert_steps: int = 5000
    default_generator: str = "dcgan-faces"  # for Invert, which runs on the weights here
    # Longest one downstream call may take; the caller's remaining deadline, when shorter, wins.
    call_timeout_s: float = 300.0
    # Trajectories known ahead: after the first frame (alone), rows (seeds x frames) per generator
    # and scorer call, one chunk synthesized while the previous one is scored; 0: one frame per call, in sequence.
    chunk_rows: int = 16


@dataclass
class WebConfig:
    """The browser editor's gateway (web_svc): HTTP(S) + server-sent events in front of the services."""

    host: str = "0.0.0.0"
    port: int = 8080
    max_body_bytes: int = 16 * 1024 * 1024  # one JSON request (an uploaded image, a GIF's frames)
    max_streams: int = 32  # edit, inversion and job streams open at once; more answer 503
    stream_timeout_s: float = 600.0  # deadline of one relayed stream (Edit, Invert, WatchJob)


@dataclass
class SecurityConfig:
    """TLS and bearer tokens (README "Operations"); checked by `latentedit.rpc.security.resolve`.

    Security is on unless `insecure` is true. With neither certificates nor `insecure: true` the
    services refuse to start, except that LATENTEDIT_INSECURE=1 in the environment stands for
    `insecure: true` when the file says nothing about it (the test suite and benchmarks).
    Relative paths are relative to the working directory."""

    insecure: bool | None = None  # None: not said (see above)
    cert_file: str = ""  # this service's certificate chain (PEM); reloaded when the file changes
    key_file: str = ""  # its private key (PEM)
    # CA bundle that verifies the services this one calls and, with require_client_cert, the
    # clients' certificates; empty: the system's roots for outgoing calls.
    ca_file: str = ""
    require_client_cert: bool = False  # mutual TLS: a client without a certificate of ca_file is refused
    # Certificate the editor and trainer present when they call a service that requires one;
    # empty: this service's own cert_file / key_file.
    client_cert_file: str = ""
    client_key_file: str = ""
    # Accepted bearer tokens, one "NAME SCOPES TOKEN" a line; LATENTEDIT_TOKENS adds more.
    tokens_file: str = ""
    # The editor's and trainer's own token for their calls to the generator and scorer (needs
    # scopes generate and score); LATENTEDIT_SERVICE_TOKEN, when set, wins.
    service_token_file: str = ""


@dataclass
class Config:
    repository: str = "model-repo"
    services: dict[str, ServingOptions] = field(
        default_factory=lambda: {name: ServingOptions(port=port) for name, port in DEFAULT_PORTS.items()}
    )
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    editor: EditorConfig = field(default_factory=EditorConfig)
    web: WebConfig = field(default_factory=WebConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    # Where services reach each other, e.g. {"generator": "generator:50051"} in Kubernetes;
    # a service not named here is reached at localhost on its configured port.
    addresses: dict[str, str] = field(default_factory=dict)

    def address(self, service: str) -> str:
        return self.addresses.get(service) or f"localhost:{self.services[service].port}"


def _merge(instance: Any, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(instance)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    return dataclasses.replace(instance, **values)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    config = Config()
    unknown = set(raw) - {"repository", "services", "generator", "scorer", "trainer", "editor", "addresses", "security",
                          "observability", "web"}
    if unknown:
        raise ValueError(f"config: unknown section(s) {sorted(unknown)}")
    if "repository" in raw:
        config.repository = str(raw["repository"])
    for name, values in (raw.get("services") or {}).items():
        if name not in SERVICE_NAMES:
            raise ValueError(f"config.services: unknown service {name!r}; known: {', '.join(SERVICE_NAMES)}")
        config.services[name] = _merge(config.services[name], values or {}, f"config.services.{name}")
    config.generator = _merge(config.generator, raw.get("generator") or {}, "config.generator")
    config.scorer = _merge(config.scorer, raw.get("scorer") or {}, "config.scorer")
    config.trainer = _merge(config.trainer, raw.get("trainer") or {}, "config.trainer")
    config.editor = _merge(config.editor, raw.get("editor") or {}, "config.editor")
    config.web = _merge(config.web, raw.get("web") or {}, "config.web")
    config.security = _merge(config.security, raw.get("security") or {}, "config.security")
    config.observability = _merge(config.observability, raw.get("observability") or {}, "config.observability")
    for name, address in (raw.get("addresses") or {}).items():
        if name not in SERVICE_NAMES:
            raise ValueError(f"config.addresses: unknown service {name!r}; known: {', '.join(SERVICE_NAMES)}")
        config.addresses[name] = str(address)
    if os.environ.get("LATENTEDIT_REPOSITORY"):
        config.repository = os.environ["LATENTEDIT_REPOSITORY"]
    # Relative paths are relative to the working directory.
    config.repository = str(Path(config.repository).resolve())
    return config
