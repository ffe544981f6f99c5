"""Job records in SQLite inside the model repository (`<repo>/.jobs/jobs.sqlite3`).

The embedded default backend of `trainer_svc.stores.JobStoreBackend`, for ONE trainer process
(several trainers: `trainer_svc.postgres_store`). Each record is the Job message itself
(serialised) plus the indexed columns that queries need. Writes are transactions, so a trainer
killed at any moment leaves every record intact; on start-up, jobs that were running are marked
failed with the reason, and queued jobs are handed back to the runner.
"""

from __future__ import annotations

import builtins
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from latentedit.api.v1 import trainer_pb2
from latentedit.errors import InvalidArgument, NotFound, shown
from latentedit.repository import validate_name

if TYPE_CHECKING:
    from trainer_svc.stores import JobStoreBackend

TERMINAL = {trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED}


INTERRUPTED = "interrupted: the trainer stopped while this job was running; start it again with a new idempotency key"


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def new_job(request: trainer_pb2.StartJobRequest) -> trainer_pb2.Job:
    return trainer_pb2.Job(
        id=f"job-{uuid.uuid4().hex[:12]}",
        idempotency_key=request.idempotency_key,
        display_name=request.display_name,
        state=trainer_pb2.JOB_STATE_QUEUED,
        phase="queued",
        eta_seconds=-1,
        request=request,
        created_at=now(),
    )


def same_key_check(existing: trainer_pb2.Job, request: trainer_pb2.StartJobRequest) -> trainer_pb2.Job:
    if existing.request != request:
        raise InvalidArgument(f"idempotency_key {shown(request.idempotency_key)} was used for job {existing.id} with a different spec")
    return existing


def mark_running(job: trainer_pb2.Job) -> trainer_pb2.Job:
    job.state = trainer_pb2.JOB_STATE_RUNNING
    job.phase = "starting"
    job.error = ""
    job.started_at.CopyFrom(now())
    return job


def mark_finished(job: trainer_pb2.Job, state: trainer_pb2.JobState, phase: str, error: str = "") -> trainer_pb2.Job:
    job.state = state
    job.phase = phase
    job.error = error
    job.eta_seconds = 0
    job.finished_at.CopyFrom(now())
    return job


def mark_requeued(job: trainer_pb2.Job, phase: str) -> trainer_pb2.Job:
    job.state = trainer_pb2.JOB_STATE_QUEUED
    job.phase = phase
    job.progress = 0.0
    job.eta_seconds = -1
    job.ClearField("started_at")
    return job


class JobStore:
    """SQLite backend (one trainer process; `shared` is False: no leases, nothing to requeue)."""

    shared = False
    lease_s = 0.0

    def __init__(self, repository_root: Path) -> None:
        folder = Path(repository_root) / ".jobs"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "jobs.sqlite3"
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, state INTEGER, "
            "created REAL, record BLOB)"
        )
        self._lock = threading.Lock()
        self.changed = threading.Condition()  # notified on every update (WatchJob waits on it)
        self._cancel_requested: set[str] = set()  # one process: the flags live in memory

    @staticmethod
    def open(repository_root: Path) -> JobStoreBackend:
        """The job store the environment selects (`trainer_svc.stores.open_store`: LATENTEDIT_JOB_STORE,
        LATENTEDIT_JOB_STORE_DSN); without those, this SQLite store in the repository."""
        from trainer_svc.stores import open_store

        return open_store(repository_root)

    def find_by_key(self, request: trainer_pb2.StartJobRequest) -> trainer_pb2.Job | None:
        """The job started with this request's idempotency key; a different spec is an error."""
        row = self._db.execute("SELECT record FROM jobs WHERE idempotency_key = ?", (request.idempotency_key,)).fetchone()
        if row is None:
            return None
        return same_key_check(trainer_pb2.Job.FromString(row[0]), request)

    def create(self, request: trainer_pb2.StartJobRequest) -> tuple[trainer_pb2.Job, bool]:
        """(job, created): an existing job with the same idempotency key is returned as is."""
        with self._lock:
            if request.idempotency_key:
                existing = self.find_by_key(request)
                if existing is not None:
                    return existing, False
            job = new_job(request)
            # The unique key decides, also against another connection to the file.
            inserted = self._db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING",
                (job.id, request.idempotency_key or None, job.state, time.time(), job.SerializeToString()),
            ).rowcount
            if not inserted:
                existing = self.find_by_key(request)
                if existing is None:  # pragma: no cover - a conflicting row does not disappear
                    raise RuntimeError(f"idempotency key {request.idempotency_key!r} conflicted but no job holds it")
                return existing, False
        self._notify()
        return job, True

    def get(self, job_id: str) -> trainer_pb2.Job:
        validate_name(job_id, "job id")  # the one name pattern: ids may become paths (logs, exports)
        row = self._db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job with id {job_id!r}")
        return trainer_pb2.Job.FromString(row[0])

    def save(self, job: trainer_pb2.Job, owner: str | None = None) -> bool:
        """Writes the record (one process: every owner holds its jobs; `owner` is not checked)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET state = ?, record = ? WHERE id = ?", (job.state, job.SerializeToString(), job.id))
            if job.state in TERMINAL:
                self._cancel_requested.discard(job.id)
        self._notify()
        return True

    def _transition(self, select: str, args: tuple, change) -> trainer_pb2.Job | None:
        """One write transaction (BEGIN IMMEDIATE: another connection to the file waits): the row
        `select` finds, changed by `change` (None: leave it)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(select, args).fetchone()
                job = change(trainer_pb2.Job.FromString(row[0])) if row is not None else None
                if job is not None:
                    self._db.execute("UPDATE jobs SET state = ?, record = ? WHERE id = ?", (job.state, job.SerializeToString(), job.id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if job is not None:
            self._notify()
        return job

    def claim(self, job_id: str, owner: str) -> trainer_pb2.Job | None:
        return self._transition("SELECT record FROM jobs WHERE id = ? AND state = ?", (job_id, trainer_pb2.JOB_STATE_QUEUED), mark_running)

    def claim_next(self, owner: str) -> trainer_pb2.Job | None:
        return self._transition("SELECT record FROM jobs WHERE state = ? ORDER BY created, id LIMIT 1",
                                (trainer_pb2.JOB_STATE_QUEUED,), mark_running)

    def heartbeat(self, owner: str, job_ids: builtins.list[str]) -> set[str]:
        return {job_id for job_id in job_ids if job_id in self._cancel_requested}

    def release(self, job_id: str, owner: str) -> bool:
        def back(job: trainer_pb2.Job) -> trainer_pb2.Job:
            return mark_requeued(job, "requeued")
        return self._transition("SELECT record FROM jobs WHERE id = ? AND state = ?", (job_id, trainer_pb2.JOB_STATE_RUNNING), back) is not None

    def requeue_expired(self) -> builtins.list[str]:
        return []  # one process: no other owner can have died

    def request_cancel(self, job_id: str) -> trainer_pb2.Job:
        self.get(job_id)  # NotFound, and the id checked

        def cancel(job: trainer_pb2.Job) -> trainer_pb2.Job | None:
            if job.state == trainer_pb2.JOB_STATE_QUEUED:
                return mark_finished(job, trainer_pb2.JOB_STATE_CANCELLED, "cancelled before it started")
            if job.state == trainer_pb2.JOB_STATE_RUNNING:
                self._cancel_requested.add(job.id)
            return None
        self._transition("SELECT record FROM jobs WHERE id = ?", (job_id,), cancel)
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return job_id in self._cancel_requested

    def list(self, states: builtins.list[int], limit: int, offset: int) -> builtins.list[trainer_pb2.Job]:
        query, args = "SELECT record FROM jobs", []
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
            args += states
        query += " ORDER BY created DESC, id LIMIT ? OFFSET ?"
        rows = self._db.execute(query, (*args, limit, offset)).fetchall()
        return [trainer_pb2.Job.FromString(r[0]) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {trainer_pb2.JobState.Name(state).removeprefix("JOB_STATE_"): count for state, count in rows}

    def recover(self) -> builtins.list[str]:
        """After a restart: running jobs fail with the reason; returns the queued ones to run."""
        for job in self.list([trainer_pb2.JOB_STATE_RUNNING], limit=100000, offset=0):
            job.state = trainer_pb2.JOB_STATE_FAILED
            job.error = INTERRUPTED
            job.phase = "interrupted"
            job.finished_at.CopyFrom(now())
            self.save(job)
        return [j.id for j in reversed(self.list([trainer_pb2.JOB_STATE_QUEUED], limit=100000, offset=0))]

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def close(self) -> None:
        with self._lock:
            self._db.close()
