"""Shared fixtures: a model repository with the default generator, and in-process servers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from latentedit.config import Config, GeneratorConfig
from latentedit.install import install_defaults, link_or_copy
from latentedit.repository import ModelRepository
from latentedit.rpc.serving import channel_options

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_torch_thread():
    """Toy-sized torch work: extra threads only contend (10-30x slower beside a busy process).
    Modules of such tests use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def plaintext_unless_configured():
    """Configs the tests build without a `security` section serve plaintext without tokens, in
    this process and in the services they start as processes (LATENTEDIT_INSECURE: see
    latentedit.config.SecurityConfig); tests/test_security.py configures security itself."""
    os.environ.setdefault("LATENTEDIT_INSECURE", "1")


@pytest.fixture(scope="session")
def installed_repo(tmp_path_factory) -> ModelRepository:
    """A repository with the default models, installed once per test session."""
    repo = ModelRepository(tmp_path_factory.mktemp("model-repo"))
    install_defaults(repo, log=lambda _msg: None)
    return repo


def private_copy(installed_repo: ModelRepository, target: Path, keep_cache: bool = False) -> ModelRepository:
    """A copy of the installed repository at `target` that its user may change (no job state;
    the export cache only with `keep_cache`). Hard links: tests only add versions, never change
    existing files, and the dlib and MiniLM files would otherwise be copied (about 240 MB) each time."""
    ignored = (".jobs",) if keep_cache else (".cache", ".jobs")
    shutil.copytree(installed_repo.root, target, ignore=shutil.ignore_patterns(*ignored), copy_function=link_or_copy)
    return ModelRepository(target)


@pytest.fixture
def fresh_repo(installed_repo, tmp_path) -> ModelRepository:
    """A private copy of the installed repository that a test may change."""
    return private_copy(installed_repo, tmp_path / "repo")


# One allocator for tests and benchmarks: it never hands out a port twice (see its docstring).
from bench.common import free_port  # noqa: E402, F401


def make_config(repo: ModelRepository, **generator_overrides) -> Config:
    config = Config(repository=str(repo.root))
    for options in config.services.values():
        options.port = 0  # let the OS choose
        options.grace_period_s = 2.0
    config.generator = GeneratorConfig(poll_interval_s=0.5, **generator_overrides)
    return config


@pytest.fixture(scope="module")
def generator_server(installed_repo) -> Iterator[tuple[str, object]]:
    """A generator service in this process on a free port: yields (address, pool)."""
    from generator_svc.server import build

    host, pool = build(make_config(installed_repo))
    yield f"localhost:{host.port}", pool
    host.stop(0)


@pytest.fixture(scope="module")
def generator_channel(generator_server) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(generator_server[0], options=channel_options())
    yield channel
    channel.close()


@pytest.fixture(scope="session")
def face_latents_and_images(installed_repo):
    """256 default-generator faces (uint8 NHWC) and their latents, made in-process once."""
    from latentedit.models.generator import sample_latents
    from latentedit.models.registry import load_generator
    from latentedit.wire import float_to_uint8_images

    generator = load_generator(installed_repo.resolve("dcgan-faces"))
    z = sample_latents(generator.spec.latent_spaces[0], 256, seed=7)
    with torch.no_grad():
        images = float_to_uint8_images(generator(torch.from_numpy(z)).numpy())
    return z, images, generator


@pytest.fixture(scope="module")
def scorer_server(installed_repo):
    """A scorer service in this process on a free port: yields (address, scorer)."""
    from scorer_svc.server import build

    host, scorer = build(make_config(installed_repo))
    yield f"localhost:{host.port}", scorer
    host.stop(0)


def start_services(repo, names=("generator", "scorer", "trainer", "editor"), **overrides):
    """Start services in this process on free ports, wired to each other: returns (config, hosts)."""
    from latentedit.rpc.launch import build_service

    config = make_config(repo)
    for key, value in overrides.items():
        section, field = key.split("__")
        setattr(getattr(config, section), field, value)
    hosts = {}
    for name in names:
        hosts[name] = build_service(name, config)
        config.services[name].port = hosts[name].port
    return config, hosts


@pytest.fixture(scope="module")
def suite_in_process(installed_repo):
    """All four services in this process: yields (config, hosts, channels by service name)."""
    config, hosts = start_services(installed_repo)
    channels = {name: grpc.insecure_channel(f"localhost:{host.port}", options=channel_options()) for name, host in hosts.items()}
    yield config, hosts, channels
    for channel in channels.values():
        channel.close()
    for host in reversed(list(hosts.values())):
        host.stop(0)
