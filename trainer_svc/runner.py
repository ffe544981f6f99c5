"""Runs jobs on worker threads, reporting progress into the store; cancellation is cooperative."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from latentedit.api.v1 import trainer_pb2
from latentedit.errors import Cancelled, LatentEditError, cap_message
from trainer_svc.store import JobStore, now

log = logging.getLogger(__name__)


class JobCancelled(Cancelled):
    def __init__(self) -> None:
        super().__init__("the job was cancelled")


@dataclass
class JobContext:
    """What a job body sees (the methods' `Progress`): progress reporting and the cancellation check."""

    store: JobStore
    job_id: str
    cancel: threading.Event
    messages: dict[str, str]
    started: float = field(default_factory=time.monotonic)
    _on_cancel: list[Callable[[], None]] = field(default_factory=list)

    def check(self) -> None:
        """Call between units of work: raises JobCancelled once CancelJob was called."""
        if self.cancel.is_set():
            raise JobCancelled()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the job is cancelled (e.g. to cancel the downstream call in flight)."""
        self._on_cancel.append(callback)

    def request_cancel(self) -> None:
        self.cancel.set()
        for callback in list(self._on_cancel):
            callback()

    def report(self, phase: str, progress: float, metrics: dict[str, float] | None = None, message: str = "") -> None:
        job = self.store.get(self.job_id)
        job.phase = phase
        job.progress = max(0.0, min(1.0, progress))
        elapsed = time.monotonic() - self.started
        job.eta_seconds = elapsed * (1 - job.progress) / job.progress if job.progress > 0.01 else -1
        for key, value in (metrics or {}).items():
            job.metrics[key] = float(value)
        self.messages[self.job_id] = message or phase
        self.store.save(job)


# A job body: (context, validated parameters) -> ArtifactRef.
JobBody = Callable[[JobContext, Any], trainer_pb2.ArtifactRef]


class JobRunner:
    def __init__(self, store: JobStore, workers: int = 1) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
        self._contexts: dict[str, JobContext] = {}
        self.messages: dict[str, str] = {}
        self._shutting_down = False
        self._starting = threading.Lock()  # a job starts (QUEUED -> RUNNING) or the runner shuts down, not both

    def submit(self, job_id: str, body: JobBody, params: Any) -> None:
        self._contexts[job_id] = JobContext(self.store, job_id, threading.Event(), self.messages)
        self._pool.submit(self._run, job_id, body, params)

    def cancel(self, job_id: str) -> trainer_pb2.Job:
        job = self.store.get(job_id)
        if job.state in (trainer_pb2.JOB_STATE_QUEUED, trainer_pb2.JOB_STATE_RUNNING):
            context = self._contexts.get(job_id)
            if context is not None:
                context.request_cancel()
            if job.state == trainer_pb2.JOB_STATE_QUEUED:
                self._finish(job, trainer_pb2.JOB_STATE_CANCELLED, "cancelled before it started")
        return self.store.get(job_id)

    def _run(self, job_id: str, body: JobBody, params: Any) -> None:
        with self._starting:
            job = self.store.get(job_id)
            if job.state != trainer_pb2.JOB_STATE_QUEUED or self._shutting_down:
                # Cancelled while queued; or the trainer is stopping, and a queued job stays queued
                # for the next start to run (a worker freed by an interrupted job must not start it).
                self._contexts.pop(job_id, None)
                return
            context = self._contexts[job_id]
            job.state = trainer_pb2.JOB_STATE_RUNNING
            job.phase = "starting"
            job.started_at.CopyFrom(now())
            self.store.save(job)
        context.started = time.monotonic()
        try:
            artifact = body(context, params)
        except Cancelled:
            if self._shutting_down:
                self._finish(self.store.get(job_id), trainer_pb2.JOB_STATE_FAILED, "interrupted",
                             "interrupted: the trainer shut down while this job was running; start it again with a new idempotency key")
            else:
                self._finish(self.store.get(job_id), trainer_pb2.JOB_STATE_CANCELLED, "cancelled")
        except LatentEditError as exc:
            self._finish(self.store.get(job_id), trainer_pb2.JOB_STATE_FAILED, "failed", exc.message)
        except Exception as exc:  # noqa: BLE001 - a job's bug fails the job, never the service
            log.exception("job %s failed", job_id)
            self._finish(self.store.get(job_id), trainer_pb2.JOB_STATE_FAILED, "failed", cap_message(f"{type(exc).__name__}: {exc}"))
        else:
            job = self.store.get(job_id)
            job.artifact.CopyFrom(artifact)
            job.progress = 1.0
            self._finish(job, trainer_pb2.JOB_STATE_SUCCEEDED, "done")
        finally:
            self._contexts.pop(job_id, None)

    def _finish(self, job: trainer_pb2.Job, state: int, phase: str, error: str = "") -> None:
        job.state = state
        job.phase = phase
        job.error = error
        job.eta_seconds = 0
        job.finished_at.CopyFrom(now())
        self.messages[job.id] = error or phase
        self.store.save(job)

    def close(self) -> None:
        """Interrupt the running jobs; queued ones stay QUEUED in the store (the next start runs them)."""
        with self._starting:
            self._shutting_down = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        for context in list(self._contexts.values()):
            context.request_cancel()
        self._pool.shutdown(wait=True)
