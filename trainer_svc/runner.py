"""Runs jobs on worker threads, reporting progress into the store; cancellation is cooperative.

A job runs once this runner has claimed it in the store (QUEUED -> RUNNING, atomically). With a
shared store (PostgreSQL, several trainers) two coordinator threads run every min(lease / 3, 2 s):
one heartbeats the jobs this trainer holds (and stops those cancelled through another replica,
or no longer its own) and requeues jobs whose owner's lease expired; the other claims queued
jobs for idle workers (resolving each through `deps`, as a restart does). On shutdown a shared store gets the
running jobs back as QUEUED for another trainer; SQLite marks them FAILED ("interrupted").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from latentedit.api.v1 import trainer_pb2
from latentedit.errors import Cancelled, LatentEditError, cap_message
from trainer_svc.store import mark_finished
from trainer_svc.stores import JobStoreBackend, instance_id

if TYPE_CHECKING:
    from trainer_svc.jobs import Dependencies

log = logging.getLogger(__name__)


class JobCancelled(Cancelled):
    def __init__(self, message: str = "the job was cancelled") -> None:
        super().__init__(message)


class JobLost(JobCancelled):
    """This trainer no longer owns the job (its lease expired and another trainer took it)."""

    def __init__(self) -> None:
        super().__init__("this trainer no longer owns the job")


@dataclass
class JobContext:
    """What a job body sees (the methods' `Progress`): progress reporting and the cancellation check."""

    store: JobStoreBackend
    job_id: str
    cancel: threading.Event
    messages: dict[str, str]
    owner: str | None = None
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
        if not self.store.save(job, owner=self.owner):
            raise JobLost()


def _transient(exc: BaseException) -> bool:
    """A failure that may pass (a dependency down, slow or overloaded), not a bad job."""
    code = getattr(exc, "code", None)
    code = code() if callable(code) else code
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)


# A job body: (context, validated parameters) -> ArtifactRef.
JobBody = Callable[[JobContext, Any], trainer_pb2.ArtifactRef]


class JobRunner:
    def __init__(self, store: JobStoreBackend, workers: int = 1, deps: Dependencies | None = None,
                 owner: str | None = None) -> None:
        self.store = store
        self.workers = workers
        self.deps = deps  # resolves jobs claimed from a shared store (None: only submitted jobs run)
        self.owner = owner or instance_id()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
        self._contexts: dict[str, JobContext] = {}  # submitted here and not done (queued locally or running)
        self._claimed: set[str] = set()  # jobs this runner holds in the store (heartbeated)
        self.messages: dict[str, str] = {}
        self._shutting_down = False
        self._starting = threading.Lock()  # a job starts (QUEUED -> RUNNING) or the runner shuts down, not both
        self._wake = threading.Event()  # set to make the claims thread act now (a worker freed, shutdown)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        if store.shared:
            # Heartbeats on a thread of their own: resolving a claimed job (calls to the generator
            # and scorer) must not delay them past the lease.
            for name, step in (("job-heartbeat", self.beat), ("job-claims", self.claim_queued)):
                thread = threading.Thread(target=self._coordinate, args=(step,), name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _context(self, job_id: str) -> JobContext:
        context = JobContext(self.store, job_id, threading.Event(), self.messages, owner=self.owner if self.store.shared else None)
        self._contexts[job_id] = context
        return context

    def submit(self, job_id: str, body: JobBody, params: Any) -> None:
        """Runs a queued job here unless another trainer claims it first."""
        self._context(job_id)
        self._pool.submit(self._run, job_id, body, params, False)

    def cancel(self, job_id: str) -> trainer_pb2.Job:
        """A queued job is CANCELLED at once (atomically: no trainer starts it afterwards); a
        running one is stopped by its owner: here at once, elsewhere at its next heartbeat."""
        job = self.store.request_cancel(job_id)
        if job.state == trainer_pb2.JOB_STATE_CANCELLED:
            self.messages.setdefault(job_id, job.phase)
        context = self._contexts.get(job_id)
        if context is not None:
            context.request_cancel()
        return self.store.get(job_id)

    def _run(self, job_id: str, body: JobBody, params: Any, claimed: bool) -> None:
        try:
            with self._starting:
                if self._shutting_down:
                    # A queued job stays queued for the next start (or another trainer) to run; a
                    # job claimed by the claims thread goes back to the queue.
                    if claimed:
                        self.store.release(job_id, self.owner)
                    return
                if not claimed and self.store.claim(job_id, self.owner) is None:
                    return  # cancelled while queued, or another trainer runs it
                self._claimed.add(job_id)
            context = self._contexts[job_id]
            if self.store.cancel_requested(job_id):
                context.request_cancel()
            self._execute(context, body, params)
        finally:
            self._claimed.discard(job_id)
            self._contexts.pop(job_id, None)
            self._wake.set()  # a worker is free: the claims thread may claim a queued job

    def _execute(self, context: JobContext, body: JobBody, params: Any) -> None:
        job_id = context.job_id
        context.started = time.monotonic()
        try:
            artifact = body(context, params)
        except Cancelled as exc:
            if isinstance(exc, JobLost):
                log.warning("job %s: %s; stopped here", job_id, exc.message)
            elif self._shutting_down:
                if not (self.store.shared and self.store.release(job_id, self.owner)):
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

    def _finish(self, job: trainer_pb2.Job, state: trainer_pb2.JobState, phase: str, error: str = "") -> None:
        mark_finished(job, state, phase, error)
        self.messages[job.id] = error or phase
        if not self.store.save(job, owner=self.owner if self.store.shared else None):
            log.warning("job %s: not recorded as %s; another trainer owns it now", job.id, phase)

    # -- shared stores -----------------------------------------------------------------------

    def _coordinate(self, step: Callable[[], None]) -> None:
        interval = max(0.05, min(self.store.lease_s / 3, 2.0))  # heartbeats well inside the lease; claims within 2 s
        while not self._shutting_down:
            try:
                step()
            except Exception:  # noqa: BLE001 - e.g. the database restarting; try again next round
                log.exception("job store coordination failed; retrying in %.1f s", interval)
            if step == self.claim_queued:
                self._wake.wait(interval)  # a freed worker wakes it early
                self._wake.clear()
            else:
                self._stopping.wait(interval)

    def tick(self) -> None:
        """One round of heartbeats, lease expiry and claims (what the two coordinator threads do)."""
        self.beat()
        self.claim_queued()

    def beat(self) -> None:
        """Heartbeats for the jobs claimed here (stopping those cancelled or lost), then lease expiry."""
        # Only jobs claimed here: one submitted here and waiting for a worker is not ours yet.
        for job_id in self.store.heartbeat(self.owner, sorted(self._claimed.copy())):
            context = self._contexts.get(job_id)
            if context is not None:
                context.request_cancel()
        self.store.requeue_expired()

    def claim_queued(self) -> None:
        """Claims queued jobs while a worker is free, and hands them to the workers."""
        while self.deps is not None and not self._shutting_down and len(self._contexts) < self.workers:
            with self._starting:
                if self._shutting_down:
                    return
                job = self.store.claim_next(self.owner)
                if job is None:
                    return
                self._claimed.add(job.id)
                self._context(job.id)
            try:
                params, body = self._resolve(job)
            except Exception as exc:  # noqa: BLE001 - e.g. an artifact it needs was removed
                self._contexts.pop(job.id, None)
                self._claimed.discard(job.id)
                if _transient(exc):
                    # A dependency starting or overloaded: back to the queue, try again next round.
                    log.warning("job %s: could not resume yet (%s); requeued", job.id, exc)
                    self.store.release(job.id, self.owner)
                    return
                self._finish(job, trainer_pb2.JOB_STATE_FAILED, "failed", cap_message(f"could not resume the job: {exc}"))
                continue
            self.messages[job.id] = "starting"
            self._pool.submit(self._run, job.id, body, params, True)

    def _resolve(self, job: trainer_pb2.Job) -> tuple[Any, JobBody]:
        from latentedit.rpc.remote_world import CallScope, RemoteWorld
        from trainer_svc import jobs  # it imports this module

        assert self.deps is not None
        world = RemoteWorld(self.deps.services, CallScope(None, max_call_s=30.0, what=f"resuming job {job.id}"))
        return jobs.validate(job.request, world, self.deps)

    def close(self) -> None:
        """Interrupt the running jobs; queued ones stay QUEUED in the store (the next start runs them)."""
        with self._starting:
            self._shutting_down = True
        self._wake.set()
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for context in list(self._contexts.values()):
            context.request_cancel()
        self._pool.shutdown(wait=True)
        # Jobs the claims thread claimed whose run never started (cancelled futures) go back to the queue.
        for job_id in sorted(self._claimed):
            if self.store.shared:
                self.store.release(job_id, self.owner)
        self._claimed.clear()
        self._contexts.clear()
