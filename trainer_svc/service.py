"""TrainerService: a thin adapter from the v1 messages to the job store and runner."""

from __future__ import annotations

from latentedit.api.v1 import trainer_pb2, trainer_pb2_grpc
from latentedit.errors import InvalidArgument, shown
from latentedit.limits import LIMITS, check_text
from latentedit.rpc.remote_world import CallScope, RemoteWorld
from trainer_svc import jobs
from trainer_svc.runner import JobRunner
from trainer_svc.store import TERMINAL
from trainer_svc.stores import JobStoreBackend

MAX_PAGE = LIMITS.page_size


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, store: JobStoreBackend, runner: JobRunner, deps: jobs.Dependencies) -> None:
        self.store = store
        self.runner = runner
        self.deps = deps

    def StartJob(self, request, context):
        check_text(request.idempotency_key, "idempotency_key", LIMITS.idempotency_key_chars)
        check_text(request.display_name, "display_name")
        if request.idempotency_key:
            # A retry finds its job before validating (and calling other services) again.
            existing = self.store.find_by_key(request)
            if existing is not None:
                return existing
        world = RemoteWorld(self.deps.services, CallScope.for_rpc(context, self.deps.call_timeout_s, "validating the job"))
        params, body = jobs.validate(request, world, self.deps)
        job, created = self.store.create(request)
        if created:
            self.runner.submit(job.id, body, params)
        return job

    def GetJob(self, request, context):
        return self.store.get(request.id)

    def ListJobs(self, request, context):
        size = request.page_size or 50
        if not 1 <= size <= MAX_PAGE:
            raise InvalidArgument(f"page_size {size} must be in 1..{MAX_PAGE}")
        token = request.page_token
        # Tokens are offsets this service wrote: plain ASCII digits, bounded (int() would also take
        # '-5', ' 5', '1_0' and 10**100, which SQLite cannot hold).
        if token and not (token.isascii() and token.isdigit() and len(token) <= LIMITS.page_token_digits):
            raise InvalidArgument(f"page_token {shown(token)} is not one this service issued")
        offset = int(token or 0)
        for state in request.states:
            if state not in trainer_pb2.JobState.values():
                raise InvalidArgument(f"states: {state} is not a JobState")
        found = self.store.list(list(request.states), limit=size + 1, offset=offset)
        token = str(offset + size) if len(found) > size else ""
        return trainer_pb2.ListJobsResponse(jobs=found[:size], next_page_token=token)

    def CancelJob(self, request, context):
        return self.runner.cancel(request.id)

    def WatchJob(self, request, context):
        job = self.store.get(request.id)
        last = None
        while context.is_active():
            job = self.store.get(request.id)
            snapshot = job.SerializeToString()
            if snapshot != last:
                last = snapshot
                yield trainer_pb2.JobEvent(job=job, message=self.runner.messages.get(job.id, job.phase))
            if job.state in TERMINAL:
                return
            with self.store.changed:
                self.store.changed.wait(timeout=1.0)
