"""The contract: stubs match the protos, and the protos pass buf lint."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_protos():
    result = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_protos_pass_buf_lint():
    buf = Path(sys.executable).parent / "buf"
    assert buf.exists(), "buf-bin is part of requirements.lock; run scripts/setup.sh"
    result = subprocess.run([str(buf), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rpc_of_the_design_is_in_the_contract():
    from latentedit.api.v1 import editor_pb2, generator_pb2, scorer_pb2, trainer_pb2

    expected = {
        (generator_pb2, "GeneratorService"): {"ListModels", "Sample", "Synthesize", "SynthesizeStream"},
        (scorer_pb2, "ScorerService"): {"ListHeads", "Score", "EmbedText"},
        (trainer_pb2, "TrainerService"): {"StartJob", "GetJob", "ListJobs", "CancelJob", "WatchJob"},
        (editor_pb2, "EditorService"): {"ListEdits", "Edit", "Invert"},
    }
    for (module, service), methods in expected.items():
        assert {m.name for m in module.DESCRIPTOR.services_by_name[service].methods} == methods
    edit_methods = {f.name for f in editor_pb2.EditRequest.DESCRIPTOR.oneofs_by_name["method"].fields}
    # The four papers' methods are in the contract, and every method field is one the registry serves or plans.
    from latentedit.methods.registry import METHODS, PLANNED

    assert {"interfacegan", "wstar", "dplase", "sgf"} <= edit_methods
    assert edit_methods == set(METHODS) | set(PLANNED)
    job_kinds = {f.name for f in trainer_pb2.StartJobRequest.DESCRIPTOR.oneofs_by_name["spec"].fields}
    from latentedit.methods.registry import PLANNED_JOBS

    assert job_kinds == {kind for m in METHODS.values() for kind in m.jobs} | set(PLANNED_JOBS)
    sgf_targets = {f.name for f in editor_pb2.SGFEdit.DESCRIPTOR.oneofs_by_name["target"].fields}
    assert sgf_targets == {"attributes", "keypoints", "caption"}
