"""Job kinds: each StartJobRequest spec is validated and trained by the method that owns it.

Validation runs at StartJob (bad specs fail fast, through a World scoped to that call);
the body runs on a worker through a World scoped to the job (cancelled with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict

from latentedit import wire
from latentedit.api.v1 import trainer_pb2, types_pb2
from latentedit.errors import InvalidArgument
from latentedit.methods import registry
from latentedit.methods.base import Method
from latentedit.repository import ModelRepository
from latentedit.rpc.remote_world import CallScope, RemoteWorld, Services
from latentedit.world import World
from trainer_svc.runner import JobContext


@dataclass
class Dependencies:
    repo: ModelRepository
    services: Services
    call_timeout_s: float = 300.0

    def job_world(self, ctx: JobContext) -> RemoteWorld:
        scope = CallScope(None, lambda: not ctx.cancel.is_set(), self.call_timeout_s, f"job {ctx.job_id}")
        ctx.on_cancel(scope.cancel)
        return RemoteWorld(self.services, scope, self.repo)


@dataclass(frozen=True)
class JobParams:
    method: Method
    spec: Any
    spec_dict: dict
    deps: Dependencies


def validate(request: trainer_pb2.StartJobRequest, world: World, deps: Dependencies) -> tuple[JobParams, Any]:
    kind = request.WhichOneof("spec")
    if kind is None:
        raise InvalidArgument("spec: set one job spec (boundary, custom_boundary, correlation, flow, directions, mapping, pca)")
    method = registry.for_job(kind)
    message = getattr(request, kind)
    wire.check_finite_fields(message, f"{kind}.")  # NaN passes every range check: refuse it first
    spec = method.job_spec(kind, message, world, deps.repo)
    # The artifact's name must not hold another kind (a boundary named like the generator would
    # shadow it): refused now, not when the job ends.
    deps.repo.check_writable(spec.basics.name, method.job_artifact_kind(kind))
    return JobParams(method, spec, MessageToDict(message), deps), run


def run(ctx: JobContext, p: JobParams) -> trainer_pb2.ArtifactRef:
    trained = p.method.train(p.deps.job_world(ctx), p.spec, ctx)
    # Custom-label latents can be large; the manifest keeps the rest of the spec.
    spec = {k: v for k, v in p.spec_dict.items() if k not in ("latents", "labels")}
    entry = trained.save(p.deps.repo, {"job_id": ctx.job_id, "spec": spec})
    return trainer_pb2.ArtifactRef(ref=types_pb2.ModelRef(name=entry.name, version=entry.version),
                                   kind=wire.ARTIFACT_KINDS.get(trained.kind, trainer_pb2.ARTIFACT_KIND_UNSPECIFIED))
