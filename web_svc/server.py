"""The browser editor's gateway: serves the page and relays its JSON / server-sent-event API to the
editor, trainer, generator and scorer over gRPC (README "The web editor").

A thin adapter like the other *_svc packages: it holds no method math. Requests arrive as the
protobuf messages' JSON form (google.protobuf.json_format) and go to the services unchanged,
except that edit frames are asked for as PNG; streamed answers (Edit, Invert, WatchJob) leave as
server-sent events, one per message, as soon as the service sends it. What a browser cannot use
directly is translated on the way out: PNG bytes to data URLs, score tensors to numbers by
attribute name (labels from ListHeads), latents to nested lists (for download) and to their wire
form (to start the next edit from).

Security follows the config's `security` section like every service: with TLS the page is served
over HTTPS with the services' certificate, and the gateway reaches the services with the same
CA and client certificate as the editor and trainer. The browser user's bearer token (entered
once, kept in the tab's sessionStorage) is passed through to the editor and the trainer, so the
user's own scopes apply there; the gateway's service token (`service_token_file`) only lists the
generator's models and the scorer's heads, after the user's token was accepted by the editor.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import mimetypes
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from PIL import Image

from latentedit import wire
from latentedit.api.v1 import (
    editor_pb2,
    editor_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    scorer_pb2,
    scorer_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
    types_pb2,
)
from latentedit.config import Config
from latentedit.rpc.client import connect
from latentedit.rpc.security import ClientSecurity, is_insecure, resolve
from latentedit.rpc.serving import StopsOnSignal

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# gRPC status -> HTTP status of the JSON error answer (streams report errors as an `error` event).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
GIF_MAX_FRAMES = 256
GIF_MAX_SIDE = 1024


class GatewayError(Exception):
    """An answer for the browser: a gRPC-style code name and a readable message."""

    def __init__(self, code: str, message: str, http_status: int) -> None:
        super().__init__(message)
        self.code, self.message, self.http_status = code, message, http_status

    def json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


def bad_request(message: str) -> GatewayError:
    return GatewayError("INVALID_ARGUMENT", message, 400)


def from_rpc_error(exc: grpc.RpcError, service: str) -> GatewayError:
    code = exc.code()  # type: ignore[attr-defined]
    details = exc.details() or code.name  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"the {service} service is unavailable: {details}"
    return GatewayError(code.name, details, HTTP_STATUS.get(code, 500))


def parse(body: dict[str, Any], message: Message, what: str) -> Message:
    try:
        return json_format.ParseDict(body, message)
    except json_format.ParseError as exc:
        raise bad_request(f"{what}: {exc}") from None


def to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def png_data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_urls(batch: types_pb2.ImageBatch) -> list[str]:
    if batch.png:
        return [png_data_url(p) for p in batch.png]
    if batch.HasField("raw"):
        return [png_data_url(wire.encode_png(image)) for image in wire.decode_images(batch)]
    return []


def latents_json(latents: types_pb2.Latents) -> dict[str, Any] | None:
    if not latents.HasField("values"):
        return None
    values = wire.from_tensor(latents.values, field="latents")
    return {"space": wire.space_name(latents.space) or "unspecified", "shape": list(values.shape),
            "values": np.round(values.astype(np.float64), 6).tolist(), "wire": to_json(latents)}


class Catalog:
    """Labels of the scorer heads' vector outputs, to name score entries ('expression.probabilities.happy')."""

    def __init__(self) -> None:
        self.labels: dict[tuple[str, str], list[str]] = {}

    def update(self, heads: list[scorer_pb2.HeadInfo]) -> None:
        self.labels = {(h.name, o.name): list(o.labels) for h in heads for o in h.outputs if o.labels}

    def scores(self, heads: Any) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        """HeadOutput messages -> ({attribute: [value per image]}, {keypoint head: [[x, y] per point] per image})."""
        scalars: dict[str, list[Any]] = {}
        points: dict[str, list[Any]] = {}
        for head, outputs in wire.scores_from_proto(heads).items():
            for name, values in outputs.items():
                if name == "captions":
                    scalars[f"{head}.caption"] = [str(v) for v in values]
                    continue
                array = np.asarray(values, dtype=np.float64)
                if array.ndim == 1:
                    scalars[f"{head}.{name}"] = array.round(5).tolist()
                elif array.ndim == 3 and array.shape[-1] == 2:
                    points[head] = array.round(3).tolist()
                elif array.ndim == 2 and array.shape[1] <= 16:
                    labels = self.labels.get((head, name)) or [str(i) for i in range(array.shape[1])]
                    for j, label in enumerate(labels[: array.shape[1]]):
                        scalars[f"{head}.{name}.{label}"] = array[:, j].round(5).tolist()
                # Embeddings (identity, caption) are not for display.
        return scalars, points


class Gateway:
    """The gRPC side: channels to the four services and the relay of each API call."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.secure = not is_insecure(config.security)
        limit = config.services["editor"].max_message_bytes
        if self.secure:
            resolve(config.security)  # one line when the settings cannot work
            # Listing models and heads: the gateway's own service token, as the editor and trainer do.
            own = ClientSecurity.for_service(config.security, "web gateway")
            cert, key = ((config.security.client_cert_file, config.security.client_key_file) if config.security.client_cert_file
                         else (config.security.cert_file, config.security.key_file))
            # Editor and trainer: TLS and the client certificate only; the browser user's token rides on each call.
            relay = ClientSecurity(True, config.security.ca_file, cert, key)
        else:
            own = relay = ClientSecurity()
        self.channels = {
            "generator": connect(config.address("generator"), security=own, service="web", max_message_bytes=limit),
            "scorer": connect(config.address("scorer"), security=own, service="web", max_message_bytes=limit),
            "editor": connect(config.address("editor"), security=relay, service="web", max_message_bytes=limit),
            "trainer": connect(config.address("trainer"), security=relay, service="web", max_message_bytes=limit),
        }
        self.generator = generator_pb2_grpc.GeneratorServiceStub(self.channels["generator"])
        self.scorer = scorer_pb2_grpc.ScorerServiceStub(self.channels["scorer"])
        self.editor = editor_pb2_grpc.EditorServiceStub(self.channels["editor"])
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(self.channels["trainer"])
        self.catalog = Catalog()

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()

    def metadata(self, token: str) -> list[tuple[str, str]]:
        # A token is only ever sent over TLS; plaintext services take none.
        return [("authorization", f"Bearer {token}")] if token and self.secure else []

    def call(self, service: str, fn: Callable[..., Any], request: Message, token: str, timeout: float) -> Any:
        try:
            return fn(request, timeout=timeout, metadata=self.metadata(token))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, service) from None

    # -- unary calls -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"security": self.secure, "default_generator": self.config.generator.default_model,
                "max_frames": self.config.editor.max_frames}

    def catalog_json(self, generator: str, token: str) -> dict[str, Any]:
        # The editor answers first, with the user's token: without `edit` scope nothing is listed.
        edits = self.call("editor", self.editor.ListEdits,
                          editor_pb2.ListEditsRequest(generator=types_pb2.ModelRef(name=generator)), token, 30)
        models = self.call("generator", self.generator.ListModels, generator_pb2.ListModelsRequest(), "", 30)
        heads = self.call("scorer", self.scorer.ListHeads, scorer_pb2.ListHeadsRequest(), "", 30)
        self.catalog.update(list(heads.heads))
        return {"models": to_json(models), "heads": to_json(heads), "edits": to_json(edits)}

    def start_job(self, body: dict[str, Any], token: str) -> dict[str, Any]:
        request = parse(body, trainer_pb2.StartJobRequest(), "StartJobRequest")
        return to_json(self.call("trainer", self.trainer.StartJob, request, token, 60))

    def list_jobs(self, token: str) -> dict[str, Any]:
        return to_json(self.call("trainer", self.trainer.ListJobs, trainer_pb2.ListJobsRequest(page_size=20), token, 30))

    def cancel_job(self, job_id: str, token: str) -> dict[str, Any]:
        return to_json(self.call("trainer", self.trainer.CancelJob, trainer_pb2.CancelJobRequest(id=job_id), token, 30))

    # -- streams: each yields JSON-ready events ---------------------------------------------

    def edit(self, body: dict[str, Any], token: str) -> Iterator[tuple[str, dict[str, Any]]]:
        request = parse(body, editor_pb2.EditRequest(), "EditRequest")
        if not request.omit_images:
            request.image_encoding = types_pb2.IMAGE_ENCODING_PNG  # what an <img> shows as it arrives
        if not self.catalog.labels and request.score_heads:
            self.catalog.update(list(self.call("scorer", self.scorer.ListHeads, scorer_pb2.ListHeadsRequest(), "", 30).heads))
        stream = self.editor.Edit(request, timeout=self.config.web.stream_timeout_s, metadata=self.metadata(token))
        for frame in self._relay(stream, "editor"):
            scores, points = self.catalog.scores(frame.scores)
            yield "frame", {"index": frame.index, "stop_reason": editor_pb2.StopReason.Name(frame.stop_reason),
                            "metrics": dict(frame.metrics), "images": image_urls(frame.images), "scores": scores,
                            "points": points, "latents": latents_json(frame.latents)}

    def invert(self, body: dict[str, Any], token: str) -> Iterator[tuple[str, dict[str, Any]]]:
        request = parse(body, editor_pb2.InvertRequest(), "InvertRequest")
        stream = self.editor.Invert(request, timeout=self.config.web.stream_timeout_s, metadata=self.metadata(token))
        for progress in self._relay(stream, "editor"):
            error = (wire.from_tensor(progress.reconstruction_error, field="reconstruction_error").round(6).tolist()
                     if progress.HasField("reconstruction_error") else [])
            yield "progress", {"step": progress.step, "total_steps": progress.total_steps, "done": progress.done,
                               "reconstruction_error": error, "latents": latents_json(progress.latents),
                               "reconstructions": image_urls(progress.reconstructions)}

    def watch_job(self, job_id: str, token: str) -> Iterator[tuple[str, dict[str, Any]]]:
        stream = self.trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job_id), timeout=self.config.web.stream_timeout_s,
                                       metadata=self.metadata(token))
        for event in self._relay(stream, "trainer"):
            job = to_json(event.job)
            job.pop("request", None)  # the spec can be large (caller latents); the page has it
            yield "job", {"job": job, "message": event.message}

    @staticmethod
    def _relay(stream: Any, service: str) -> Iterator[Any]:
        """The stream's messages; the caller cancels it (GeneratorExit) when the browser goes."""
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, service) from None
        finally:
            stream.cancel()  # a no-op once the stream ended


def gif_from_frames(body: dict[str, Any]) -> bytes:
    """The trajectory the page shows (PNG data URLs) as an animated GIF."""
    frames = body.get("frames")
    if not isinstance(frames, list) or not frames:
        raise bad_request("gif: `frames` must be a non-empty list of PNG data URLs")
    if len(frames) > GIF_MAX_FRAMES:
        raise bad_request(f"gif: at most {GIF_MAX_FRAMES} frames, got {len(frames)}")
    duration = body.get("duration_ms", 120)
    if not isinstance(duration, int | float) or not 20 <= duration <= 5000:
        raise bad_request("gif: duration_ms must be a number in 20..5000")
    images = []
    for i, frame in enumerate(frames):
        if not isinstance(frame, str) or not frame.startswith("data:image/png;base64,"):
            raise bad_request(f"gif: frames[{i}] is not a PNG data URL")
        try:
            image = Image.open(io.BytesIO(base64.b64decode(frame.split(",", 1)[1], validate=True)))
            if max(image.size) > GIF_MAX_SIDE:
                raise bad_request(f"gif: frames[{i}] is {image.size[0]}x{image.size[1]}; at most {GIF_MAX_SIDE} px a side")
            images.append(image.convert("RGB"))
        except (ValueError, OSError) as exc:
            raise bad_request(f"gif: frames[{i}] is not a readable PNG ({exc})") from None
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=int(duration), loop=0)
    return out.getvalue()


class Handler(BaseHTTPRequestHandler):
    server: WebServer
    protocol_version = "HTTP/1.1"

    # -- plumbing ----------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def token(self) -> str:
        header = self.headers.get("Authorization", "")
        return header[7:].strip() if header.lower().startswith("bearer ") else ""

    def send_bytes(self, status: int, content_type: str, data: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, payload: Any, status: int = 200) -> None:
        self.send_bytes(status, "application/json", json.dumps(payload).encode())

    def body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise bad_request("Content-Length is not a number") from None
        if self.headers.get_content_type() != "application/json":
            # A cross-site form or text/plain POST cannot set this type without a CORS preflight,
            # which the gateway never grants.
            self.close_connection = True
            raise GatewayError("INVALID_ARGUMENT", "POST bodies must be JSON (Content-Type: application/json)", 415)
        limit = self.server.config.web.max_body_bytes
        if length > limit:
            self.close_connection = True
            raise GatewayError("RESOURCE_EXHAUSTED", f"request body of {length} bytes; at most {limit}", 413)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"the request body is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise bad_request("the request body must be a JSON object")
        return value

    def stream(self, events: Iterator[tuple[str, dict[str, Any]]]) -> None:
        """Server-sent events: one per service message, flushed at once; `error` or `end` last."""
        if not self.server.streams.acquire(blocking=False):
            raise GatewayError("RESOURCE_EXHAUSTED", f"{self.server.config.web.max_streams} streams are open; try again", 503)
        try:
            first = True
            try:
                for name, data in events:
                    if first:
                        self._start_events()
                        first = False
                    self._event(name, data)
                if first:
                    self._start_events()
                self._event("end", {})
            except GatewayError as exc:
                if first:
                    raise  # nothing sent yet: a plain JSON error with its HTTP status
                self._event("error", exc.json()["error"])
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError) as exc:
                log.debug("browser went away during a stream (%s); cancelling the call", exc)
            finally:
                close = getattr(events, "close", None)
                if close is not None:
                    close()  # cancels the gRPC stream when the browser left early
        finally:
            self.server.streams.release()
        self.close_connection = True

    def _start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()

    def _event(self, name: str, data: dict[str, Any]) -> None:
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    # -- routes ------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._dispatch(self._get)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(self._post)

    def _dispatch(self, route: Callable[[str, dict[str, list[str]]], None]) -> None:
        url = urlsplit(self.path)
        try:
            route(url.path, parse_qs(url.query))
        except GatewayError as exc:
            log.info("%s %s -> %s: %s", self.command, url.path, exc.code, exc.message)
            self.send_json(exc.json(), exc.http_status)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # noqa: BLE001 - the browser gets a message, the log the traceback
            log.exception("%s %s failed", self.command, url.path)
            self.send_json({"error": {"code": "INTERNAL", "message": f"the web gateway failed: {type(exc).__name__}: {exc}"}}, 500)

    def _get(self, path: str, query: dict[str, list[str]]) -> None:
        gateway = self.server.gateway
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if path == "/healthz":
            return self.send_json({"status": "SERVING"})
        if path == "/api/info":
            return self.send_json(gateway.info())
        if path == "/api/catalog":
            return self.send_json(gateway.catalog_json(query.get("generator", [""])[0], self.token()))
        if path == "/api/jobs":
            return self.send_json(gateway.list_jobs(self.token()))
        parts = path.strip("/").split("/")
        if len(parts) == 4 and parts[:2] == ["api", "jobs"] and parts[3] == "watch":
            return self.stream(gateway.watch_job(parts[2], self.token()))
        raise GatewayError("NOT_FOUND", f"no page or API at {path}", 404)

    def _post(self, path: str, query: dict[str, list[str]]) -> None:
        gateway = self.server.gateway
        body = self.body()
        if path == "/api/edit":
            return self.stream(gateway.edit(body, self.token()))
        if path == "/api/invert":
            return self.stream(gateway.invert(body, self.token()))
        if path == "/api/jobs":
            return self.send_json(gateway.start_job(body, self.token()))
        if path == "/api/gif":
            return self.send_bytes(200, "image/gif", gif_from_frames(body),
                                   {"Content-Disposition": 'attachment; filename="edit.gif"'})
        parts = path.strip("/").split("/")
        if len(parts) == 4 and parts[:2] == ["api", "jobs"] and parts[3] == "cancel":
            return self.send_json(gateway.cancel_job(parts[2], self.token()))
        raise GatewayError("NOT_FOUND", f"no API at POST {path}", 404)

    def _static(self, name: str) -> None:
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}  # no paths from the URL reach the disk
        if name not in files:
            raise GatewayError("NOT_FOUND", f"no file {name!r}", 404)
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type == "application/javascript":
            content_type += "; charset=utf-8"
        self.send_bytes(200, content_type, files[name].read_bytes())


class WebServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, config: Config, gateway: Gateway, tls: ssl.SSLContext | None) -> None:
        self.config, self.gateway, self.tls = config, gateway, tls
        self.streams = threading.BoundedSemaphore(config.web.max_streams)
        host = config.web.host.strip("[]")
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, config.web.port), Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            return super().finish_request(request, client_address)
        try:  # the TLS handshake runs on the connection's own thread, never the accept loop
            request.settimeout(30)
            wrapped = self.tls.wrap_socket(request, server_side=True)
            wrapped.settimeout(None)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", client_address, exc)
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()


class WebHost(StopsOnSignal):
    """The gateway process: listening once built; `wait` until SIGTERM, then stop."""

    def __init__(self, config: Config) -> None:
        self.gateway = Gateway(config)
        tls = None
        if self.gateway.secure:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(config.security.cert_file, config.security.key_file)
        self.server = WebServer(config, self.gateway, tls)
        self.port = self.server.server_address[1]
        self.scheme = "https" if tls else "http"
        self._thread = threading.Thread(target=self.server.serve_forever, name="web", daemon=True)
        self._thread.start()
        self._stop_requested = threading.Event()
        log.info("web editor at %s://localhost:%d/ (%s)", self.scheme, self.port,
                 "TLS, the user's token passed to the editor and trainer" if tls else "plaintext, no tokens")

    def stop(self) -> None:
        started = time.monotonic()
        self.server.shutdown()
        self.server.server_close()
        self.gateway.close()
        log.info("web gateway stopped in %.1f s", time.monotonic() - started)


def build(config: Config) -> tuple[WebHost, Gateway]:
    host = WebHost(config)
    return host, host.gateway
