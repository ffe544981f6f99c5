"""The job store interface and its selection.

Two backends implement `JobStoreBackend`:

- SQLite (`trainer_svc.store.JobStore`, the default): embedded in the model repository, for ONE
  trainer process. A restart marks the jobs that were running FAILED ("interrupted") and runs
  the queued ones.
- PostgreSQL (`trainer_svc.postgres_store.PostgresJobStore`): for several trainer replicas.
  Queued jobs are claimed atomically (`SELECT ... FOR UPDATE SKIP LOCKED`), each running job
  carries its owner (the trainer instance id) and a heartbeat, and a job whose owner stopped
  heartbeating for longer than the lease is requeued by any live trainer (or FAILED with the
  reason once it used up its attempts). A restarting trainer never touches other trainers' jobs.

Selection, by environment (the Helm chart renders these names):

    LATENTEDIT_JOB_STORE          sqlite (default) | postgres
    LATENTEDIT_JOB_STORE_DSN      libpq DSN or URI, required with postgres
    LATENTEDIT_JOB_LEASE_S        seconds without a heartbeat before a running job is requeued (30)
    LATENTEDIT_JOB_MAX_ATTEMPTS   runs a job may start before a lost lease fails it (3)
"""

from __future__ import annotations

import builtins
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from latentedit.api.v1 import trainer_pb2

STORE_ENV, DSN_ENV = "LATENTEDIT_JOB_STORE", "LATENTEDIT_JOB_STORE_DSN"
LEASE_ENV, ATTEMPTS_ENV = "LATENTEDIT_JOB_LEASE_S", "LATENTEDIT_JOB_MAX_ATTEMPTS"
DEFAULT_LEASE_S, DEFAULT_MAX_ATTEMPTS = 30.0, 3


class JobStoreBackend(Protocol):
    """What the trainer's service and runner need from a job store."""

    shared: bool  # several trainer processes may use it at once (claims, heartbeats, leases)
    lease_s: float  # a running job whose owner was silent this long is requeued (shared stores)
    changed: threading.Condition  # notified on every update made through this instance

    def find_by_key(self, request: trainer_pb2.StartJobRequest) -> trainer_pb2.Job | None:
        """The job started with this request's idempotency key; a different spec is InvalidArgument."""

    def create(self, request: trainer_pb2.StartJobRequest) -> tuple[trainer_pb2.Job, bool]:
        """(job, created): a QUEUED job, or the existing one with the same idempotency key."""

    def get(self, job_id: str) -> trainer_pb2.Job:
        """The job; NotFound if there is none."""

    def save(self, job: trainer_pb2.Job, owner: str | None = None) -> bool:
        """Writes the record. With `owner`, only while that owner holds the job (False otherwise)."""

    def list(self, states: builtins.list[int], limit: int, offset: int) -> builtins.list[trainer_pb2.Job]:
        """Newest first (created, then id), filtered by state when `states` is not empty."""

    def count_by_state(self) -> dict[str, int]:
        """Jobs per state name ("QUEUED", "RUNNING", ...), for the trainer's jobs-by-state gauge."""

    def claim(self, job_id: str, owner: str) -> trainer_pb2.Job | None:
        """QUEUED -> RUNNING for `owner`, atomically; None if the job is not queued (any more)."""

    def claim_next(self, owner: str) -> trainer_pb2.Job | None:
        """Claims the oldest queued job, or None."""

    def heartbeat(self, owner: str, job_ids: builtins.list[str]) -> set[str]:
        """Renews the owner's leases; returns those of `job_ids` it should stop (cancel requested, lost)."""

    def release(self, job_id: str, owner: str) -> bool:
        """RUNNING -> QUEUED for another trainer (the owner is shutting down)."""

    def requeue_expired(self) -> builtins.list[str]:
        """Running jobs whose owner's lease expired: QUEUED again, or FAILED after the last attempt."""

    def request_cancel(self, job_id: str) -> trainer_pb2.Job:
        """A queued job becomes CANCELLED at once; a running one is flagged for its owner."""

    def cancel_requested(self, job_id: str) -> bool:
        """Whether cancellation of this (running) job was requested."""

    def recover(self) -> builtins.list[str]:
        """At start-up: the queued jobs this process should run (SQLite also fails the running ones)."""

    def close(self) -> None:
        """Releases the connections."""


def instance_id() -> str:
    """This trainer's owner id: hostname-pid-random (the pod name is the hostname in Kubernetes)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def open_store(repository_root: Path, environ: Mapping[str, str] | None = None) -> JobStoreBackend:
    """The job store the environment selects (see the module docstring)."""
    env = os.environ if environ is None else environ
    kind = (env.get(STORE_ENV) or "sqlite").strip().lower()
    if kind == "sqlite":
        from trainer_svc.store import JobStore

        return JobStore(repository_root)
    if kind in ("postgres", "postgresql"):
        dsn = env.get(DSN_ENV, "").strip()
        if not dsn:
            raise ValueError(f"{STORE_ENV}=postgres needs {DSN_ENV} (a libpq DSN, e.g. postgresql://user@host/db)")
        from trainer_svc.postgres_store import PostgresJobStore

        return PostgresJobStore(dsn, lease_s=float(env.get(LEASE_ENV) or DEFAULT_LEASE_S),
                                max_attempts=int(env.get(ATTEMPTS_ENV) or DEFAULT_MAX_ATTEMPTS))
    raise ValueError(f"{STORE_ENV}={kind!r}: expected sqlite or postgres")
