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


def test_buf_breaking_accepts_the_contract_and_refuses_a_removed_field(tmp_path):
    """The CI check against the released image passes today and would catch a client-breaking change."""
    import shutil

    buf = Path(sys.executable).parent / "buf"
    released = ROOT / "protos" / "released" / "v1.binpb"
    result = subprocess.run([str(buf), "breaking", "--against", str(released)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # A copy of the module with one released field deleted must be refused, naming it.
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos" / "latentedit", tmp_path / "protos" / "latentedit")
    editor_proto = tmp_path / "protos" / "latentedit" / "v1" / "editor.proto"
    text = editor_proto.read_text()
    lines = [line for line in text.splitlines() if not line.strip().startswith("int32 num_frames")]
    assert len(lines) == len(text.splitlines()) - 1, "editor.proto no longer has one num_frames field; update this test"
    editor_proto.write_text("\n".join(lines) + "\n")
    broken = subprocess.run([str(buf), "breaking", "--against", str(released)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert broken.returncode != 0
    assert "num_frames" in broken.stdout + broken.stderr
