"""Builds and runs the scorer service process."""

from __future__ import annotations

import logging

import numpy as np
import torch

from latentedit.api.v1 import scorer_pb2, scorer_pb2_grpc
from latentedit.config import Config
from latentedit.repository import ModelRepository
from latentedit.rpc.serving import PeriodicTask, ServiceHost
from latentedit.scoring.scorer import Scorer
from scorer_svc.service import ScorerServicer

log = logging.getLogger(__name__)
SERVICE_NAME = scorer_pb2.DESCRIPTOR.services_by_name["ScorerService"].full_name


def build(config: Config) -> tuple[ServiceHost, Scorer]:
    """Start listening (NOT_SERVING), load every head, warm each one up, then report SERVING."""
    host = ServiceHost.for_service("scorer", config)  # checks the security settings first
    if config.scorer.threads:
        torch.set_num_threads(config.scorer.threads)
    scorer = Scorer(ModelRepository(config.repository))
    servicer = ScorerServicer(scorer, config.scorer)
    host.add(scorer_pb2_grpc.add_ScorerServiceServicer_to_server, servicer, SERVICE_NAME)
    host.on_shutdown(servicer.close)
    host.start()

    warmed: set[tuple[str, int]] = set()

    def refresh() -> None:
        names = scorer.refresh()
        heads = scorer.heads
        new = [n for n in names if (n, heads[n].entry.version) not in warmed]
        if new:
            # One small batch through every new head (and the text model) before taking traffic.
            # Each head on its own: a dropped-in head that cannot score is unloaded, not served,
            # and neither stops the others nor (at start-up) the service.
            for name in new:
                try:
                    scorer.score(np.full((2, 64, 64, 3), 128, np.uint8), [name])
                except Exception as exc:  # noqa: BLE001 - reported through the scorer's failures
                    scorer.reject(name, f"warm-up failed: {exc}")
                    continue
                warmed.add((name, heads[name].entry.version))
            scorer.text_embedder().embed(["warm up"])
            names = sorted(scorer.heads)
        if not names:
            log.warning("no scorer heads in %s: run `latentedit models install`", config.repository)
        host.set_serving(bool(names))

    refresh()
    poller = PeriodicTask("head-poll", config.scorer.poll_interval_s, refresh)
    host.on_shutdown(poller.stop)
    return host, scorer
