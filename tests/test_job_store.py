"""The trainer's job store on both backends (trainer_svc/stores.py), and several trainers on one
PostgreSQL store.

PostgreSQL is a real server: the tests initdb a throwaway cluster into a temporary folder and
start it with pg_ctl on a free loopback port (as the `latentedit-pg` user when run as root:
postgres refuses root), one database per test, and stop it at the end. `scripts/setup_postgres.sh`
provides the binaries (Debian's `postgresql`), the user and psycopg. Without server binaries the
PostgreSQL cases are skipped, unless LATENTEDIT_REQUIRE_POSTGRES=1 (CI) makes that a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from latentedit.api.v1 import trainer_pb2, types_pb2
from latentedit.errors import InvalidArgument, NotFound
from tests.corpus import stop_processes
from trainer_svc.store import JobStore, mark_finished
from trainer_svc.stores import JobStoreBackend, open_store

ROOT = Path(__file__).resolve().parent.parent
PG_USER = os.environ.get("LATENTEDIT_PG_USER", "latentedit-pg")
QUEUED, RUNNING = trainer_pb2.JOB_STATE_QUEUED, trainer_pb2.JOB_STATE_RUNNING
SUCCEEDED, FAILED, CANCELLED = trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.05) -> object:
    """Polls `condition` until it is truthy (returned), failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        pause.wait(poll_s)


# ---- a throwaway PostgreSQL server ---------------------------------------------------------------


def _pg_bin() -> Path | None:
    candidates = [os.environ.get("LATENTEDIT_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    which = shutil.which("initdb")
    candidates += [str(Path(which).parent)] if which else []
    for candidate in candidates:
        if candidate and all((Path(candidate) / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    return None


def _free_port() -> int:
    from tests.conftest import free_port  # one allocator: ports are never handed out twice

    return free_port()


class PostgresServer:
    """initdb + pg_ctl start on 127.0.0.1:<free port> (TCP only), trust authentication."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="latentedit-pg-"))  # not under /tmp/pytest-of-root (0700)
        self.data = self.dir / "data"
        self.port = _free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(PG_USER)
            except KeyError:
                raise RuntimeError(f"running as root needs the user {PG_USER}: run scripts/setup_postgres.sh") from None
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "latentedit", "-E", "UTF8", "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-t", "60", "-o", options, "start")
        self.dsn = f"host=127.0.0.1 port={self.port} user=latentedit"

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.prefix, str(self.bin / tool), *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HOME": str(self.dir)}, cwd=self.dir)
        if done.returncode != 0:
            log = self.dir / "server.log"
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout[-1500:]} {done.stderr[-1500:]} "
                               f"{log.read_text()[-1500:] if log.exists() else ''}")

    def database(self) -> str:
        """A new empty database; its DSN."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"{self.dsn} dbname=postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"{self.dsn} dbname={name}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = _pg_bin()
    if bin_dir is None:
        if os.environ.get("LATENTEDIT_REQUIRE_POSTGRES") == "1":
            pytest.fail("no PostgreSQL server binaries: run scripts/setup_postgres.sh")
        pytest.skip("no PostgreSQL server binaries (scripts/setup_postgres.sh installs them)")
    pytest.importorskip("psycopg")
    server = PostgresServer(bin_dir)
    try:
        yield server
    finally:
        server.stop()


# ---- the suite on both backends ------------------------------------------------------------------

Factory = Callable[..., JobStoreBackend]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path) -> Iterator[tuple[str, Factory]]:
    """(name, factory): factory() opens another store instance on the same records."""
    opened: list[JobStoreBackend] = []
    if request.param == "sqlite":
        def factory(**_: object) -> JobStoreBackend:
            opened.append(JobStore(tmp_path))
            return opened[-1]
    else:
        server = request.getfixturevalue("postgres")
        dsn = server.database()

        def factory(lease_s: float = 30.0, max_attempts: int = 3) -> JobStoreBackend:
            from trainer_svc.postgres_store import PostgresJobStore

            opened.append(PostgresJobStore(dsn, lease_s=lease_s, max_attempts=max_attempts))
            return opened[-1]
    try:
        yield request.param, factory
    finally:
        for store in opened:
            store.close()


@pytest.fixture
def store(backend) -> JobStoreBackend:
    return backend[1]()


def request_(key: str = "", name: str = "b", samples: int = 1000) -> trainer_pb2.StartJobRequest:
    return trainer_pb2.StartJobRequest(idempotency_key=key, display_name=name, boundary=trainer_pb2.BoundaryJobSpec(
        attribute=types_pb2.AttributeRef(head="pose", output="yaw"), num_samples=samples,
        options=trainer_pb2.TrainingOptions(artifact_name=name)))


def test_create_get_and_idempotency_keys(store):
    first, created = store.create(request_())
    second, created_again = store.create(request_())
    assert created and created_again and first.id != second.id  # no key: two jobs
    assert first.state == QUEUED and first.phase == "queued" and first.eta_seconds == -1
    assert store.get(first.id) == first
    keyed, created = store.create(request_("key-1"))
    again, created_again = store.create(request_("key-1"))
    assert created and not created_again and again == keyed
    assert store.find_by_key(request_("key-1")) == keyed
    assert store.find_by_key(request_("other")) is None
    with pytest.raises(InvalidArgument, match="key-1.*different spec"):
        store.create(request_("key-1", samples=2000))
    with pytest.raises(InvalidArgument):
        store.find_by_key(request_("key-1", name="renamed"))
    with pytest.raises(NotFound):
        store.get("job-000000000000")
    with pytest.raises(InvalidArgument):
        store.get("../jobs")


def test_list_pages_newest_first_with_a_state_filter(store):
    ids = [store.create(request_(name=f"j{i}"))[0].id for i in range(7)]
    running = store.claim(ids[1], "owner-a")
    assert running is not None
    store.save(mark_finished(store.claim(ids[2], "owner-a"), SUCCEEDED, "done"), owner="owner-a")
    pages, offset = [], 0
    while True:
        page = store.list([], limit=3, offset=offset)
        pages.append([job.id for job in page])
        if len(page) < 3:
            break
        offset += 3
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [job_id for page in pages for job_id in page] == list(reversed(ids))  # newest first, each once
    assert [j.id for j in store.list([QUEUED], limit=10, offset=0)] == [i for i in reversed(ids) if i not in ids[1:3]]
    assert [j.id for j in store.list([RUNNING, SUCCEEDED], limit=10, offset=0)] == [ids[2], ids[1]]
    assert [j.id for j in store.list([QUEUED], limit=2, offset=4)] == [ids[0]]
    assert store.list([FAILED], limit=10, offset=0) == []
    # What the trainer's latentedit_jobs gauge reads.
    assert store.count_by_state() == {"QUEUED": 5, "RUNNING": 1, "SUCCEEDED": 1}


def test_claims_move_queued_jobs_to_running_once_oldest_first(store):
    a, b, c = (store.create(request_(name=n))[0] for n in "abc")
    claimed = store.claim(b.id, "owner-a")
    assert claimed.state == RUNNING and claimed.phase == "starting" and claimed.HasField("started_at")
    assert store.get(b.id).state == RUNNING
    assert store.claim(b.id, "owner-b") is None  # running already
    assert store.claim_next("owner-b").id == a.id  # the oldest queued
    assert store.claim_next("owner-b").id == c.id
    assert store.claim_next("owner-b") is None


def test_progress_metrics_and_finish(backend, store):
    job = store.claim(store.create(request_())[0].id, "owner-a")
    job.phase, job.progress, job.eta_seconds = "sampling", 0.25, 12.5
    job.metrics["accuracy"] = 0.75
    assert store.save(job, owner="owner-a")
    seen = store.get(job.id)
    assert (seen.state, seen.phase, seen.progress, seen.eta_seconds, dict(seen.metrics)) == (RUNNING, "sampling", 0.25, 12.5, {"accuracy": 0.75})
    if store.shared:
        assert not store.save(job, owner="owner-b")  # only the owner's saves land
    job.artifact.ref.name = "b"
    assert store.save(mark_finished(job, SUCCEEDED, "done"), owner="owner-a")
    done = store.get(job.id)
    assert done.state == SUCCEEDED and done.phase == "done" and done.artifact.ref.name == "b" and done.HasField("finished_at")
    assert store.claim(job.id, "owner-b") is None
    if store.shared:
        assert not store.save(done, owner="owner-a")  # finished: nobody holds it any more


def test_cancel_flags(store):
    queued = store.create(request_(name="q"))[0]
    cancelled = store.request_cancel(queued.id)
    assert cancelled.state == CANCELLED and cancelled.phase == "cancelled before it started"
    assert store.get(queued.id).state == CANCELLED
    assert store.claim(queued.id, "owner-a") is None and store.claim_next("owner-a") is None
    running = store.claim(store.create(request_(name="r"))[0].id, "owner-a")
    assert not store.cancel_requested(running.id)
    assert store.heartbeat("owner-a", [running.id]) == set()
    assert store.request_cancel(running.id).state == RUNNING  # its owner stops it
    assert store.cancel_requested(running.id)
    assert store.heartbeat("owner-a", [running.id]) == {running.id}
    store.save(mark_finished(store.get(running.id), CANCELLED, "cancelled"), owner="owner-a")
    assert not store.cancel_requested(running.id)
    assert store.request_cancel(running.id).state == CANCELLED  # finished: unchanged
    with pytest.raises(NotFound):
        store.request_cancel("job-000000000000")


def test_restart_semantics(backend, store):
    name, factory = backend
    running = store.claim(store.create(request_(name="r"))[0].id, "owner-a")
    queued = [store.create(request_(name=f"q{i}"))[0].id for i in range(2)]
    restarted = factory()
    if name == "sqlite":
        # One process: whatever was running was interrupted; the queued jobs run, oldest first.
        assert restarted.recover() == queued
        failed = restarted.get(running.id)
        assert failed.state == FAILED and failed.phase == "interrupted" and "interrupted" in failed.error
    else:
        # Several trainers: a (re)starting trainer leaves another live trainer's job alone, and the
        # queued jobs are claimed by the runners' loops.
        assert restarted.recover() == []
        assert restarted.get(running.id).state == RUNNING
        assert restarted.heartbeat("owner-a", [running.id]) == set()  # still owner-a's
        assert [j.id for j in restarted.list([QUEUED], limit=10, offset=0)] == list(reversed(queued))


def test_release_puts_a_job_back_in_the_queue(store):
    job = store.claim(store.create(request_())[0].id, "owner-a")
    if store.shared:
        assert not store.release(job.id, "owner-b")  # not owner-b's job (SQLite: one process, one owner)
    assert store.release(job.id, "owner-a")
    back = store.get(job.id)
    assert back.state == QUEUED and back.phase.startswith("requeued") and not back.HasField("started_at")
    assert store.claim_next("owner-b").id == job.id


def test_concurrent_start_with_one_idempotency_key_from_two_stores_makes_one_job(backend):
    _, factory = backend
    stores = [factory(), factory()]
    barrier = threading.Barrier(8)
    results: list[tuple[str, bool]] = []
    errors: list[BaseException] = []

    def start(store: JobStoreBackend) -> None:
        try:
            barrier.wait(timeout=30)
            job, created = store.create(request_("one-key"))
            results.append((job.id, created))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(stores[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len({job_id for job_id, _ in results}) == 1 and sum(created for _, created in results) == 1, results
    assert len(stores[0].list([], limit=100, offset=0)) == 1


def test_claims_from_two_store_instances_never_overlap(backend):
    """Many claimers on two instances: every job is claimed exactly once. (Dropping the row lock
    from the PostgreSQL claim, PostgresJobStore.CLAIM_LOCK = "", makes this fail.)"""
    _, factory = backend
    stores = [factory(), factory()]
    ids = [stores[0].create(request_(name=f"j{i}"))[0].id for i in range(60)]
    claimers = 12
    barrier = threading.Barrier(claimers)
    claims: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def claim_all(index: int) -> None:
        store, owner = stores[index % 2], f"owner-{index}"
        try:
            barrier.wait(timeout=30)
            while (job := store.claim_next(owner)) is not None:
                claims.append((job.id, owner))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(claimers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    twice = {job_id: n for job_id, n in Counter(job_id for job_id, _ in claims).items() if n > 1}
    assert not twice, f"claimed more than once: {twice}"
    assert sorted(job_id for job_id, _ in claims) == sorted(ids)
    assert all(job.state == RUNNING for job in stores[1].list([], limit=100, offset=0))


# ---- leases (PostgreSQL: several trainers) -------------------------------------------------------


@pytest.fixture
def pg_factory(postgres) -> Iterator[Factory]:
    from trainer_svc.postgres_store import PostgresJobStore

    dsn = postgres.database()
    opened: list[PostgresJobStore] = []

    def factory(lease_s: float = 30.0, max_attempts: int = 3) -> PostgresJobStore:
        opened.append(PostgresJobStore(dsn, lease_s=lease_s, max_attempts=max_attempts))
        return opened[-1]
    yield factory
    for store in opened:
        store.close()


def test_a_dead_owners_job_is_requeued_after_its_lease_and_failed_after_the_last_attempt(pg_factory):
    dead, live = pg_factory(lease_s=0.5, max_attempts=2), pg_factory(lease_s=0.5, max_attempts=2)
    job = dead.create(request_())[0]
    assert dead.claim(job.id, "dead-owner") is not None
    # A live owner's heartbeats keep the lease well past its length.
    renew_until = time.monotonic() + 1.5
    while time.monotonic() < renew_until:
        assert dead.heartbeat("dead-owner", [job.id]) == set()
        assert live.requeue_expired() == []
        threading.Event().wait(0.1)
    assert live.get(job.id).state == RUNNING
    # The owner goes silent: after the lease another trainer requeues the job.
    assert wait_for(lambda: live.requeue_expired(), 10, "the lease to expire") == [job.id]
    requeued = live.get(job.id)
    assert requeued.state == QUEUED and "dead-owner stopped heartbeating" in requeued.phase
    assert dead.heartbeat("dead-owner", [job.id]) == {job.id}  # the old owner learns it lost the job
    assert not dead.save(requeued, owner="dead-owner")
    # Attempt 2 of 2 dies too: FAILED with the reason, not requeued for ever.
    assert live.claim_next("live-owner").id == job.id
    assert wait_for(lambda: dead.requeue_expired(), 10, "the second lease to expire") == [job.id]
    failed = live.get(job.id)
    assert failed.state == FAILED and "lease expired" in failed.error and "2 times" in failed.error, failed.error


def test_a_dead_owners_cancelled_job_is_cancelled_not_requeued(pg_factory):
    store = pg_factory(lease_s=0.3)
    job = store.claim(store.create(request_())[0].id, "dead-owner")
    store.request_cancel(job.id)
    assert wait_for(lambda: store.requeue_expired(), 10, "the lease to expire") == [job.id]
    assert store.get(job.id).state == CANCELLED


def test_open_store_reads_the_environment(tmp_path, postgres):
    assert isinstance(open_store(tmp_path, {}), JobStore)
    assert isinstance(open_store(tmp_path, {"LATENTEDIT_JOB_STORE": "sqlite"}), JobStore)
    with pytest.raises(ValueError, match="LATENTEDIT_JOB_STORE_DSN"):
        open_store(tmp_path, {"LATENTEDIT_JOB_STORE": "postgres"})
    with pytest.raises(ValueError, match="sqlite or postgres"):
        open_store(tmp_path, {"LATENTEDIT_JOB_STORE": "mysql"})
    with pytest.raises(RuntimeError, match=r"job store: PostgreSQL at latentedit@127.0.0.1:\d+/t_nowhere") as refused:
        open_store(tmp_path, {"LATENTEDIT_JOB_STORE": "postgres", "LATENTEDIT_JOB_STORE_DSN": f"{postgres.dsn} password=hunter2 dbname=t_nowhere"})
    assert "hunter2" not in str(refused.value)
    store = open_store(tmp_path, {"LATENTEDIT_JOB_STORE": "postgres", "LATENTEDIT_JOB_STORE_DSN": postgres.database(),
                                  "LATENTEDIT_JOB_LEASE_S": "7.5", "LATENTEDIT_JOB_MAX_ATTEMPTS": "5"})
    try:
        assert store.shared and store.lease_s == 7.5 and store.max_attempts == 5
    finally:
        store.close()


# ---- runners sharing a PostgreSQL store (in-process) ---------------------------------------------


class Body:
    """A job body that reports progress and runs until `release` is set (or it is cancelled)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.runs: Counter[str] = Counter()
        self.owners: dict[str, str] = {}
        self.started = threading.Condition()

    def __call__(self, ctx, params) -> trainer_pb2.ArtifactRef:
        with self.started:
            self.runs[ctx.job_id] += 1
            self.owners[ctx.job_id] = ctx.owner
            self.started.notify_all()
        ctx.report("working", 0.5)
        ctx.check()
        while not self.release.wait(0.02):
            ctx.check()
        return trainer_pb2.ArtifactRef(ref=types_pb2.ModelRef(name=params, version=1))


def _runner(store, body: Body, workers: int = 1):
    from trainer_svc.runner import JobRunner

    class Runner(JobRunner):
        def _resolve(self, job):  # what the trainer does with jobs.validate
            return job.display_name, body

    return Runner(store, workers=workers, deps=object())  # deps: only tells the runner it may claim


def test_runners_on_one_store_run_every_queued_job_once_and_share_the_work(pg_factory):
    body = Body()
    stores = [pg_factory(lease_s=0.6), pg_factory(lease_s=0.6)]
    ids = [stores[0].create(request_(name=f"j{i}"))[0].id for i in range(4)]
    runners = [_runner(store, body) for store in stores]
    try:
        with body.started:  # one worker each: two jobs run at once, one per runner
            assert body.started.wait_for(lambda: len(body.runs) == 2, timeout=30)
        assert len(set(body.owners.values())) == 2
        body.release.set()
        wait_for(lambda: all(stores[1].get(i).state == SUCCEEDED for i in ids), 60, "every job to succeed")
        assert body.runs == Counter({i: 1 for i in ids})
        assert stores[1].get(ids[0]).artifact.ref.name == "j0"
    finally:
        body.release.set()
        for runner in runners:
            runner.close()


def test_cancel_through_another_trainer_stops_the_job_at_its_owners_next_heartbeat(pg_factory):
    body = Body()
    here, there = pg_factory(lease_s=0.6), pg_factory(lease_s=0.6)
    job = here.create(request_())[0]
    from trainer_svc.runner import JobRunner

    runner = _runner(here, body)
    other = JobRunner(there, workers=1)  # no deps: it never claims, so the job runs `here`
    try:
        with body.started:
            assert body.started.wait_for(lambda: body.runs[job.id] == 1, timeout=30)
        assert other.cancel(job.id).state == RUNNING  # not running there: flagged for its owner
        final = wait_for(lambda: (j := there.get(job.id)).state in (CANCELLED, FAILED, SUCCEEDED) and j, 30, "the cancel")
        assert final.state == CANCELLED and final.phase == "cancelled" and final.error == "", final  # by its owner, not a lease
    finally:
        body.release.set()
        runner.close()
        other.close()


def test_a_trainer_shutting_down_hands_its_running_job_to_another(pg_factory):
    body = Body()
    first, second = pg_factory(lease_s=0.6), pg_factory(lease_s=0.6)
    job = first.create(request_())[0]
    leaving = _runner(first, body)
    with body.started:
        assert body.started.wait_for(lambda: body.runs[job.id] == 1, timeout=30)
    leaving.close()  # SIGTERM: the job goes back to the queue, not FAILED
    assert first.get(job.id).state == QUEUED
    staying = _runner(second, body)
    try:
        with body.started:
            assert body.started.wait_for(lambda: body.runs[job.id] == 2, timeout=30)
        body.release.set()
        done = wait_for(lambda: (j := second.get(job.id)).state == SUCCEEDED and j, 30, "the job to finish")
        assert body.owners[job.id] == staying.owner and done.artifact.ref.name == "b"
    finally:
        body.release.set()
        staying.close()


def test_jobs_submitted_here_and_waiting_for_a_worker_survive_heartbeats(pg_factory):
    """A job StartJob submitted to a busy runner is not this trainer's yet: heartbeats must not
    treat it as lost (and cancel it) before a worker claims it."""
    from trainer_svc.runner import JobRunner

    body, store = Body(), pg_factory(lease_s=30)
    runner = JobRunner(store, workers=1)
    try:
        first, second = (store.create(request_(name=n))[0] for n in ("first", "second"))
        runner.submit(first.id, body, "first")
        runner.submit(second.id, body, "second")
        with body.started:
            assert body.started.wait_for(lambda: body.runs[first.id] == 1, timeout=30)
        runner.tick()  # heartbeats with `second` waiting for the worker
        runner.tick()
        body.release.set()
        wait_for(lambda: all(store.get(j.id).state in (SUCCEEDED, CANCELLED, FAILED) for j in (first, second)), 30, "both jobs")
        assert [store.get(j.id).state for j in (first, second)] == [SUCCEEDED, SUCCEEDED]
    finally:
        body.release.set()
        runner.close()


def test_a_claimed_job_that_cannot_be_resolved_is_requeued_while_a_dependency_is_down_and_failed_when_invalid(pg_factory):
    from latentedit.errors import Unavailable
    from trainer_svc.runner import JobRunner

    body, store = Body(), pg_factory(lease_s=0.6)
    body.release.set()
    attempts: Counter[str] = Counter()

    class Runner(JobRunner):
        def _resolve(self, job):
            attempts[job.display_name] += 1
            if job.display_name == "bad":
                raise InvalidArgument("no head 'nose'")
            if attempts[job.display_name] == 1:
                raise Unavailable("generator at localhost:1 is unavailable")
            return job.display_name, body

    bad, flaky = store.create(request_(name="bad"))[0], store.create(request_(name="flaky"))[0]
    runner = Runner(store, workers=1, deps=object())
    try:
        done = wait_for(lambda: (j := store.get(flaky.id)).state == SUCCEEDED and j, 30, "the flaky job")
        failed = store.get(bad.id)
        assert failed.state == FAILED and "could not resume the job: no head 'nose'" in failed.error
        assert attempts == Counter({"bad": 1, "flaky": 2}) and done.artifact.ref.name == "flaky"
    finally:
        runner.close()


# ---- two trainer processes on one PostgreSQL store ---------------------------------------------


class Services:
    """generator, scorer and two trainers (`latentedit --config <cfg> serve NAME`), insecure."""

    def __init__(self, repository: Path, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.processes: dict[str, subprocess.Popen] = {}
        self.ports = {name: _free_port() for name in ("generator", "scorer", "trainer-a", "trainer-b")}
        for name in ("generator", "scorer", "trainer-a", "trainer-b"):
            trainer_port = self.ports[name] if name.startswith("trainer") else _free_port()
            config = {"repository": str(repository), "security": {"insecure": True},
                      "services": {"generator": {"port": self.ports["generator"], "grace_period_s": 2},
                                   "scorer": {"port": self.ports["scorer"], "grace_period_s": 2},
                                   "trainer": {"port": trainer_port, "grace_period_s": 2}},
                      "generator": {"poll_interval_s": 0.5}, "scorer": {"poll_interval_s": 0.5}}
            (workdir / f"{name}.yaml").write_text(yaml.safe_dump(config))

    def start(self, name: str) -> None:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "latentedit", "--config", str(self.workdir / f"{name}.yaml"), "serve", name.split("-")[0]],
            cwd=os.environ.get("LATENTEDIT_CODE_ROOT") or ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def wait_serving(self, name: str, timeout_s: float = 300) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from latentedit.rpc.client import connect

        stub = health_pb2_grpc.HealthStub(connect(f"localhost:{self.ports[name]}"))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited: {self.log(name)}")
            try:  # blocks until the channel connects or its deadline passes
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2, wait_for_ready=True).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        raise RuntimeError(f"{name} never SERVING: {self.log(name)}")

    def trainer(self, name: str):
        from latentedit.api.v1 import trainer_pb2_grpc
        from latentedit.rpc.client import connect

        return trainer_pb2_grpc.TrainerServiceStub(connect(f"localhost:{self.ports[name]}"))

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        stop_processes(self.processes.values())


def _owner(dsn: str, job_id: str) -> tuple[str | None, int]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        owner, attempts = conn.execute("SELECT owner, attempts FROM latentedit_jobs WHERE id = %s", (job_id,)).fetchone()
    return owner, attempts


def _owner_pid(dsn: str, job_id: str) -> int | None:
    """The pid in the owner id (hostname-pid-random) of the trainer holding the job."""
    owner, _ = _owner(dsn, job_id)
    return int(owner.split("-")[-2]) if owner else None


def test_two_trainers_one_killed_mid_job_the_other_requeues_and_finishes_it(installed_repo, postgres, tmp_path):
    from latentedit.install import link_or_copy

    repo = tmp_path / "repo"
    shutil.copytree(installed_repo.root, repo, ignore=shutil.ignore_patterns(".cache", ".jobs"), copy_function=link_or_copy)
    dsn = postgres.database()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LATENTEDIT_JOB_STORE": "postgres", "LATENTEDIT_JOB_STORE_DSN": dsn,
           "LATENTEDIT_JOB_LEASE_S": "2", "LATENTEDIT_INSECURE": "1"}
    env.pop("LATENTEDIT_REPOSITORY", None)
    services = Services(repo, tmp_path, env)
    try:
        for name in ("generator", "scorer", "trainer-a", "trainer-b"):
            services.start(name)
        for name in ("generator", "scorer", "trainer-a", "trainer-b"):
            services.wait_serving(name)
        pids = {services.processes[n].pid: n for n in ("trainer-a", "trainer-b")}
        stub = services.trainer("trainer-a")
        job = stub.StartJob(trainer_pb2.StartJobRequest(idempotency_key="failover", boundary=trainer_pb2.BoundaryJobSpec(
            attribute=types_pb2.AttributeRef(head="pose", output="yaw"), num_samples=600, keep_fraction=0.2,
            options=trainer_pb2.TrainingOptions(artifact_name="failover"))), timeout=120)
        # Either trainer may have claimed it (trainer-a got the call, trainer-b polls the queue).
        for event in stub.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=300):
            if event.job.state == RUNNING and event.job.progress > 0:
                break
            assert event.job.state in (QUEUED, RUNNING), event.job
        owner, attempts = _owner(dsn, job.id)
        victim = pids[_owner_pid(dsn, job.id)]
        survivor = next(n for n in pids.values() if n != victim)
        assert attempts == 1
        services.processes[victim].send_signal(signal.SIGKILL)
        services.processes[victim].wait(30)
        # The survivor requeues the job once the victim's lease (2 s) expired, claims and finishes it.
        survivor_pid = services.processes[survivor].pid
        wait_for(lambda: _owner_pid(dsn, job.id) == survivor_pid, 60, f"{survivor} to claim the job again")
        final = None
        for event in services.trainer(survivor).WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=300):
            final = event.job
        assert final is not None and final.state == SUCCEEDED, (trainer_pb2.JobState.Name(final.state), final.error,
                                                                services.log(survivor))
        owner, attempts = _owner(dsn, job.id)
        assert pids[_owner_pid(dsn, job.id)] == survivor and attempts == 2
        assert final.artifact.ref.name == "failover"
        assert len(list(services.trainer(survivor).ListJobs(trainer_pb2.ListJobsRequest(), timeout=30).jobs)) == 1
    finally:
        services.stop()
