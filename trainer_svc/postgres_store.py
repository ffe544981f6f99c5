"""Job records in PostgreSQL, for several trainer replicas (`LATENTEDIT_JOB_STORE=postgres`).

One table, `latentedit_jobs`: the Job message (serialised) plus the columns the queries and the
coordination need (state, creation time, idempotency key with a unique index, owner, heartbeat,
attempts, cancel flag). Every change is one transaction; times for leases are the server's
(`now()`), so the trainers' clocks do not matter.

- Claiming: `SELECT ... FOR UPDATE SKIP LOCKED` on a queued row, then QUEUED -> RUNNING with the
  claimer as owner, in the same transaction: two trainers never run one job.
- Heartbeats: the owner renews `heartbeat_at` of its running jobs (every lease / 3); the answer
  tells it which of them to stop (cancel requested through any replica, or ownership lost).
- Lease expiry: any live trainer requeues a running job whose owner was silent for longer than
  `lease_s`; after `max_attempts` claims it is FAILED with the reason instead.
- Saves from a job's owner only land while it still owns the job (a trainer that was paused past
  its lease cannot overwrite the run that replaced it).
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from latentedit.api.v1 import trainer_pb2
from latentedit.errors import NotFound
from latentedit.repository import validate_name
from trainer_svc.store import TERMINAL, mark_finished, mark_requeued, mark_running, new_job, same_key_check

QUEUED, RUNNING = trainer_pb2.JOB_STATE_QUEUED, trainer_pb2.JOB_STATE_RUNNING
TABLE = "latentedit_jobs"
SCHEMA = [
    f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, idempotency_key text, state integer NOT NULL, "
    "created double precision NOT NULL, record bytea NOT NULL, owner text, heartbeat_at timestamptz, "
    "attempts integer NOT NULL DEFAULT 0, cancel_requested boolean NOT NULL DEFAULT false)",
    f"CREATE UNIQUE INDEX IF NOT EXISTS {TABLE}_idempotency_key ON {TABLE} (idempotency_key)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_state_created ON {TABLE} (state, created)",
]
SCHEMA_LOCK = 0x6C617465  # advisory lock: two trainers starting at once create the schema once
MAX_IDLE_CONNECTIONS = 8


def describe(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<a DSN that does not parse>"
    return f"{parts.get('user', '')}@{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


class PostgresJobStore:
    shared = True
    # The row lock of a claim. Tests replace it with "" to show that the overlap test can fail.
    CLAIM_LOCK = "FOR UPDATE SKIP LOCKED"

    def __init__(self, dsn: str, lease_s: float = 30.0, max_attempts: int = 3, connect_timeout_s: int = 10) -> None:
        if lease_s <= 0 or max_attempts < 1:
            raise ValueError(f"job store lease_s {lease_s} must be > 0 and max_attempts {max_attempts} >= 1")
        self.dsn = dsn
        self.lease_s = float(lease_s)
        self.max_attempts = int(max_attempts)
        self.connect_timeout_s = connect_timeout_s
        self.changed = threading.Condition()  # notified on changes made through this instance
        self._idle: builtins.list[psycopg.Connection] = []
        self._pool_lock = threading.Lock()
        self._closed = False
        try:
            with self._tx() as db:
                db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                for statement in SCHEMA:
                    db.execute(statement)
        except psycopg.Error as exc:
            raise RuntimeError(f"job store: PostgreSQL at {describe(dsn)} (LATENTEDIT_JOB_STORE_DSN): {str(exc).strip()}") from None

    # -- connections -------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection]:
        """A connection inside one transaction (committed on success, rolled back on an error)."""
        with self._pool_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s)
        try:
            with conn.transaction():
                yield conn
        finally:
            reusable = not conn.closed and not conn.broken and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            with self._pool_lock:
                if reusable and not self._closed and len(self._idle) < MAX_IDLE_CONNECTIONS:
                    self._idle.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    # -- records -----------------------------------------------------------------------------

    def find_by_key(self, request: trainer_pb2.StartJobRequest) -> trainer_pb2.Job | None:
        with self._tx() as db:
            row = db.execute(f"SELECT record FROM {TABLE} WHERE idempotency_key = %s", (request.idempotency_key,)).fetchone()
        return None if row is None else same_key_check(trainer_pb2.Job.FromString(row[0]), request)

    def create(self, request: trainer_pb2.StartJobRequest) -> tuple[trainer_pb2.Job, bool]:
        job = new_job(request)
        created = job.created_at.seconds + job.created_at.nanos / 1e9
        with self._tx() as db:
            # The unique index decides between concurrent StartJobs with one key (any replica):
            # the loser's insert does nothing and it returns the winner's job.
            row = db.execute(
                f"INSERT INTO {TABLE} (id, idempotency_key, state, created, record) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                (job.id, request.idempotency_key or None, job.state, created, job.SerializeToString())).fetchone()
        if row is None:
            existing = self.find_by_key(request)
            if existing is None:  # pragma: no cover - the conflicting row cannot disappear
                raise RuntimeError(f"idempotency key {request.idempotency_key!r} conflicted but no job holds it")
            return existing, False
        self._notify()
        return job, True

    def get(self, job_id: str) -> trainer_pb2.Job:
        validate_name(job_id, "job id")
        with self._tx() as db:
            row = db.execute(f"SELECT record FROM {TABLE} WHERE id = %s", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job with id {job_id!r}")
        return trainer_pb2.Job.FromString(row[0])

    def save(self, job: trainer_pb2.Job, owner: str | None = None) -> bool:
        query, args = f"UPDATE {TABLE} SET state = %s, record = %s WHERE id = %s", [job.state, job.SerializeToString(), job.id]
        if owner is not None:
            query += " AND owner = %s AND state = %s"
            args += [owner, RUNNING]
        with self._tx() as db:
            saved = db.execute(query, args).rowcount == 1
        if saved:
            self._notify()
        return saved

    def list(self, states: builtins.list[int], limit: int, offset: int) -> builtins.list[trainer_pb2.Job]:
        query, args = f"SELECT record FROM {TABLE}", []
        if states:
            query += " WHERE state = ANY(%s)"
            args.append(list(states))
        query += " ORDER BY created DESC, id LIMIT %s OFFSET %s"
        with self._tx() as db:
            rows = db.execute(query, (*args, limit, offset)).fetchall()
        return [trainer_pb2.Job.FromString(r[0]) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        with self._tx() as db:
            rows = db.execute(f"SELECT state, COUNT(*) FROM {TABLE} GROUP BY state").fetchall()
        return {trainer_pb2.JobState.Name(state).removeprefix("JOB_STATE_"): count for state, count in rows}

    # -- coordination ------------------------------------------------------------------------

    def _claim(self, where: str, args: tuple, owner: str) -> trainer_pb2.Job | None:
        with self._tx() as db:
            row = db.execute(f"SELECT record FROM {TABLE} WHERE {where} ORDER BY created, id LIMIT 1 {self.CLAIM_LOCK}", args).fetchone()
            if row is None:
                return None
            job = mark_running(trainer_pb2.Job.FromString(row[0]))
            db.execute(f"UPDATE {TABLE} SET state = %s, record = %s, owner = %s, heartbeat_at = now(), "
                       "attempts = attempts + 1, cancel_requested = false WHERE id = %s",
                       (job.state, job.SerializeToString(), owner, job.id))
        self._notify()
        return job

    def claim(self, job_id: str, owner: str) -> trainer_pb2.Job | None:
        return self._claim("id = %s AND state = %s", (job_id, QUEUED), owner)

    def claim_next(self, owner: str) -> trainer_pb2.Job | None:
        return self._claim("state = %s", (QUEUED,), owner)

    def heartbeat(self, owner: str, job_ids: builtins.list[str]) -> set[str]:
        if not job_ids:
            return set()
        with self._tx() as db:
            rows = db.execute(f"UPDATE {TABLE} SET heartbeat_at = now() WHERE owner = %s AND state = %s AND id = ANY(%s) "
                              "RETURNING id, cancel_requested", (owner, RUNNING, list(job_ids))).fetchall()
        held = {job_id: cancel for job_id, cancel in rows}
        return {job_id for job_id in job_ids if job_id not in held or held[job_id]}

    def _change_locked(self, where: str, args: tuple, change: Callable[[Any, trainer_pb2.Job, tuple], str | None]) -> builtins.list[str]:
        """Rows matching `where`, locked (skipping those another trainer holds); `change` updates
        each one through `db` and returns its id, or None to leave it."""
        changed: builtins.list[str] = []
        with self._tx() as db:
            rows = db.execute(f"SELECT id, record, owner, attempts, cancel_requested FROM {TABLE} WHERE {where} "
                              "ORDER BY created, id FOR UPDATE SKIP LOCKED", args).fetchall()
            for row in rows:
                job_id = change(db, trainer_pb2.Job.FromString(row[1]), row)
                if job_id is not None:
                    changed.append(job_id)
        if changed:
            self._notify()
        return changed

    def _write(self, db: Any, job: trainer_pb2.Job, extra: str = "", args: tuple = ()) -> str:
        db.execute(f"UPDATE {TABLE} SET state = %s, record = %s{extra} WHERE id = %s", (job.state, job.SerializeToString(), *args, job.id))
        return job.id

    def release(self, job_id: str, owner: str) -> bool:
        def back(db: Any, job: trainer_pb2.Job, row: tuple) -> str:
            # A shutdown is not a failed attempt: the count the claim added is given back.
            return self._write(db, mark_requeued(job, "requeued: its trainer shut down"),
                               ", owner = NULL, heartbeat_at = NULL, attempts = greatest(attempts - 1, 0)")
        return bool(self._change_locked("id = %s AND owner = %s AND state = %s", (job_id, owner, RUNNING), back))

    def requeue_expired(self) -> builtins.list[str]:
        def expire(db: Any, job: trainer_pb2.Job, row: tuple) -> str:
            _, _, owner, attempts, cancel = row
            silent = f"its trainer {owner} stopped heartbeating for more than {self.lease_s:g} s"
            if cancel:
                mark_finished(job, trainer_pb2.JOB_STATE_CANCELLED, "cancelled", f"cancelled; {silent}")
            elif attempts >= self.max_attempts:
                mark_finished(job, trainer_pb2.JOB_STATE_FAILED, "failed",
                              f"lease expired: {silent}, and the job has started {attempts} times (limit {self.max_attempts})")
            else:
                mark_requeued(job, f"requeued: {silent}")
                job.error = ""
            return self._write(db, job, ", owner = NULL, heartbeat_at = NULL")
        return self._change_locked("state = %s AND heartbeat_at < now() - make_interval(secs => %s)", (RUNNING, self.lease_s), expire)

    def request_cancel(self, job_id: str) -> trainer_pb2.Job:
        validate_name(job_id, "job id")
        with self._tx() as db:
            row = db.execute(f"SELECT record FROM {TABLE} WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job with id {job_id!r}")
            job = trainer_pb2.Job.FromString(row[0])
            if job.state == QUEUED:
                self._write(db, mark_finished(job, trainer_pb2.JOB_STATE_CANCELLED, "cancelled before it started"))
            elif job.state == RUNNING:
                db.execute(f"UPDATE {TABLE} SET cancel_requested = true WHERE id = %s", (job_id,))
        self._notify()
        return job

    def cancel_requested(self, job_id: str) -> bool:
        with self._tx() as db:
            row = db.execute(f"SELECT cancel_requested, state FROM {TABLE} WHERE id = %s", (job_id,)).fetchone()
        return bool(row and row[0] and row[1] not in TERMINAL)

    def recover(self) -> builtins.list[str]:
        """A (re)starting trainer leaves other trainers' running jobs alone: only expired leases
        are requeued. Queued jobs are claimed by the runner's loop, not handed over here."""
        self.requeue_expired()
        return []

    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
