"""Builds and runs the generator service process."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from generator_svc.pool import GeneratorPool
from generator_svc.service import GeneratorServicer
from latentedit.api.v1 import generator_pb2, generator_pb2_grpc
from latentedit.config import Config
from latentedit.repository import ModelRepository
from latentedit.rpc.serving import ServiceHost

log = logging.getLogger(__name__)
SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


@dataclass(frozen=True)
class GeneratorServer:
    host: ServiceHost
    pool: GeneratorPool
    servicer: GeneratorServicer


def build(config: Config) -> tuple[ServiceHost, GeneratorPool]:
    """Start listening (NOT_SERVING), load and warm every generator, then report SERVING."""
    server = start(config)
    return server.host, server.pool


def start(config: Config) -> GeneratorServer:
    """As `build`, also handing back the servicer (its stream statistics)."""
    host = ServiceHost.for_service("generator", config)  # checks the security settings first
    if config.generator.threads:
        torch.set_num_threads(config.generator.threads)
    pool = GeneratorPool(ModelRepository(config.repository), config.generator)
    servicer = GeneratorServicer(pool)
    host.add(generator_pb2_grpc.add_GeneratorServiceServicer_to_server, servicer, SERVICE_NAME)
    host.on_shutdown(servicer.close)
    host.on_shutdown(pool.close)
    host.start()
    loaded = pool.refresh()
    if not loaded:
        log.warning("no generator in %s: run `latentedit models install`; NOT_SERVING until one appears", config.repository)
    host.set_serving(bool(loaded))
    pool.start_polling(on_refresh=lambda models: host.set_serving(bool(models)))
    return GeneratorServer(host, pool, servicer)
