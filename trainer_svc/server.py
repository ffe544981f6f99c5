"""Builds and runs the trainer service process."""

from __future__ import annotations

import logging

from latentedit import observability
from latentedit.api.v1 import trainer_pb2, trainer_pb2_grpc
from latentedit.config import Config
from latentedit.repository import ModelRepository
from latentedit.rpc.remote_world import CallScope, RemoteWorld, Services
from latentedit.rpc.security import ClientSecurity
from latentedit.rpc.serving import ServiceHost
from trainer_svc import jobs
from trainer_svc.runner import JobRunner
from trainer_svc.service import TrainerServicer
from trainer_svc.store import JobStore
from trainer_svc.stores import JobStoreBackend

log = logging.getLogger(__name__)
SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


def build(config: Config) -> tuple[ServiceHost, JobStoreBackend]:
    host = ServiceHost.for_service("trainer", config)  # checks the security settings first
    # Jobs call the generator and scorer with the trainer's own credentials, never a caller's.
    services = Services(config.address("generator"), config.address("scorer"),
                        security=ClientSecurity.for_service(config.security, "trainer"), service="trainer",
                        max_message_bytes=config.services["trainer"].max_message_bytes)
    repo = ModelRepository(config.repository)
    store = JobStore.open(repo.root)  # LATENTEDIT_JOB_STORE=postgres (+ _DSN): several trainers (trainer_svc/stores.py)
    # Jobs by state, read from the store at every scrape (all replicas' jobs with PostgreSQL).
    jobs_by_state = lambda: {(state,): count for state, count in store.count_by_state().items()}  # noqa: E731
    observability.register_gauge_callback("latentedit_jobs", "Training jobs by state.", jobs_by_state, labels=("state",))
    deps = jobs.Dependencies(repo, services, config.trainer.call_timeout_s)
    runner = JobRunner(store, workers=config.trainer.workers, deps=deps)  # deps: resolves jobs claimed from a shared store
    servicer = TrainerServicer(store, runner, deps)
    host.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer, SERVICE_NAME)
    host.on_shutdown(runner.close)
    host.on_shutdown(lambda: observability.unregister_gauge_callback("latentedit_jobs", jobs_by_state))
    host.on_shutdown(store.close)
    host.start()
    # Jobs left queued by a previous run go back to the runner; running ones were marked failed.
    for job_id in store.recover():
        job = store.get(job_id)
        try:
            world = RemoteWorld(deps.services, CallScope(None, max_call_s=30.0, what="resuming a job"))
            params, body = jobs.validate(job.request, world, deps)
        except Exception as exc:  # noqa: BLE001 - e.g. a dependency is still starting
            job.state, job.error = trainer_pb2.JOB_STATE_FAILED, f"could not resume after a restart: {exc}"
            store.save(job)
            continue
        runner.submit(job_id, body, params)
    host.set_serving(True)
    return host, store
