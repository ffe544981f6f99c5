"""The bad-input corpus (tests/corpus.py) against the four services as separate processes.

Every case asserts its precise status code and that a valid call to the same service succeeds
right after it; every call carries a deadline, so a hang fails as DEADLINE_EXCEEDED. The suite
and its artifacts (boundaries, PCA and DP-LaSE directions, three SGF mappings, all trained
through the trainer) are set up once for the module.
"""

from __future__ import annotations

import collections
import shutil

import grpc
import pytest

from latentedit.install import link_or_copy
from tests import corpus

pytestmark = pytest.mark.slow
CASES = corpus.build_corpus()


def test_the_corpus_covers_every_rpc_of_the_four_services():
    """Generated from the descriptors: at least 150 cases, every RPC, and each kind of bad input."""
    assert len(CASES) >= 150, len(CASES)
    rpcs = {case.rpc for case in CASES}
    for service, descriptor in corpus.SERVICES.items():
        for method in descriptor.methods:
            assert f"{service}.{method.name}" in rpcs, f"no case for {service}.{method.name}"
    labels = " ".join(case.id for case in CASES)
    for kind in ("dtype", "raw_data one byte short", "NaN", "Inf", "empty batch", "over the limit", "unknown enum",
                 "unknown", "corrupt PNG", "decompression bomb", "1MiB", "missing oneof", "1 ms deadline",
                 "client cancel"):
        assert kind in labels, f"no case of kind {kind!r}"
    codes = collections.Counter(case.expected for case in CASES)
    assert codes[grpc.StatusCode.INTERNAL] == codes[grpc.StatusCode.UNKNOWN] == 0
    assert all(case.timeout <= corpus.CALL_TIMEOUT_S for case in CASES)  # every call has a deadline


@pytest.fixture(scope="module")
def suite(installed_repo, tmp_path_factory):
    """The four services as processes on a private copy of the repository, with the artifacts the cases edit with."""
    work = tmp_path_factory.mktemp("corpus")
    repo = work / "repo"
    shutil.copytree(installed_repo.root, repo, ignore=shutil.ignore_patterns(".cache", ".jobs"), copy_function=link_or_copy)
    processes = corpus.ProcessSuite(repo, work)
    try:
        processes.start()
        corpus.prepare_artifacts(processes)
        yield processes
    finally:
        processes.stop()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_its_precise_status_and_the_service_keeps_serving(suite, case):
    outcome, after = corpus.run_case(suite, case)
    assert suite.alive(case.service), f"{case.service} died: {suite.log_tail(case.service)}"
    assert not corpus.hung(case, outcome), f"{case.rpc} hung until its {case.timeout:.0f} s deadline"
    assert outcome.code == case.expected, (
        f"{case.rpc}: expected {case.expected.name}, got {outcome.code.name}: {outcome.details[:300]}")
    assert after.code == grpc.StatusCode.OK, (
        f"{case.service} failed a valid call after the case: {after.code.name}: {after.details[:300]}")
