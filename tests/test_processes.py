"""The suite as separate processes, driven through the CLI and the public API only."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from latentedit import wire
from latentedit.api.v1 import editor_pb2, generator_pb2, scorer_pb2, trainer_pb2, types_pb2
from latentedit.rpc.client import connect, wait_serving
from tests.conftest import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
FULL_APIS = {
    "latentedit.v1.GeneratorService": generator_pb2,
    "latentedit.v1.ScorerService": scorer_pb2,
    "latentedit.v1.TrainerService": trainer_pb2,
    "latentedit.v1.EditorService": editor_pb2,
}


def _write_config(tmp_path, repo_root):
    ports = {name: free_port() for name in ("generator", "scorer", "trainer", "editor")}
    config = {
        "repository": str(repo_root),
        "services": {name: {"port": port, "grace_period_s": 10} for name, port in ports.items()},
        "generator": {"poll_interval_s": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, ports


def _cli(*args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LATENTEDIT_REPOSITORY", None)
    return subprocess.Popen([sys.executable, "-m", "latentedit", *args], cwd=ROOT, env=env, **kwargs)


def _wait_serving_while_alive(process, address, name, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}: {process.stdout.read()}")
        try:
            wait_serving(connect(address), timeout_s=2, what=name)
            return
        except Exception:  # noqa: BLE001 - not up yet
            continue
    raise AssertionError(f"{name} at {address} never reported SERVING")


@pytest.fixture(scope="module")
def suite(tmp_path_factory, installed_repo):
    config, ports = _write_config(tmp_path_factory.mktemp("suite"), installed_repo.root)
    process = _cli("--config", str(config), "serve", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for name, port in ports.items():
            _wait_serving_while_alive(process, f"localhost:{port}", name)
        yield config, ports, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_four_services_with_reflection_health_and_a_generated_grid(suite, tmp_path):
    config, ports, process = suite
    for service, module in FULL_APIS.items():
        short = service.split(".")[-1].removesuffix("Service").lower()
        channel = connect(f"localhost:{ports[short]}")
        database = ProtoReflectionDescriptorDatabase(channel)
        assert service in set(database.get_services())
        described = descriptor_pool.DescriptorPool(database).FindServiceByName(service)
        expected = module.DESCRIPTOR.services_by_name[service.split(".")[-1]]
        assert [m.name for m in described.methods] == [m.name for m in expected.methods]
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    out = tmp_path / "grid.png"
    generate = _cli("--config", str(config), "generate", "--count", "9", "--seed", "5", "--out", str(out),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = generate.communicate(timeout=120)
    assert generate.returncode == 0, output
    grid = np.asarray(Image.open(out))
    assert grid.shape[0] >= 3 * 64 and grid.shape[1] >= 3 * 64
    assert grid.std() > 20  # faces, not a blank canvas

    # A bad edit (a W* edit naming no attribute) is refused precisely, and the process keeps running.
    from latentedit.api.v1 import editor_pb2_grpc

    with pytest.raises(grpc.RpcError) as info:
        list(editor_pb2_grpc.EditorServiceStub(connect(f"localhost:{ports['editor']}")).Edit(
            editor_pb2.EditRequest(seed=editor_pb2.SeedStart(count=1), wstar=editor_pb2.WStarEdit(flow="f")), timeout=5
        ))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("attribute: name the attribute to edit"), info.value.details()
    assert process.poll() is None


def test_sigterm_drains_in_flight_calls_then_exits(tmp_path, installed_repo):
    """A stream open when SIGTERM arrives is still answered, then the process exits cleanly.

    The stream is held open by this client, so it is certainly in flight; the service's health
    turning NOT_SERVING is the server's own signal that it has begun to shut down."""
    import queue

    from latentedit.api.v1 import generator_pb2_grpc
    from latentedit.rpc.client import synthesize_request

    config, ports = _write_config(tmp_path, installed_repo.root)
    process = _cli("--config", str(config), "serve", "generator", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"localhost:{ports['generator']}"
    try:
        _wait_serving_while_alive(process, address, "generator")
        channel = connect(address)
        requests: queue.Queue = queue.Queue()
        latents = np.random.default_rng(0).standard_normal((64, 100)).astype(np.float32)
        for _ in range(2):
            requests.put(synthesize_request(types_pb2.ModelRef(), latents))
        answers = generator_pb2_grpc.GeneratorServiceStub(channel).SynthesizeStream(iter(requests.get, None), timeout=120)
        assert wire.decode_images(next(answers).images).shape == (64, 64, 64, 3)  # the stream is open and served

        health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(health).status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        statuses = []
        for update in health:  # bounded by the watch's own deadline
            statuses.append(update.status)
            if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
        health.cancel()
        assert statuses[-1:] == [health_pb2.HealthCheckResponse.NOT_SERVING], statuses

        # Shutting down, and the open stream still gets its answers and ends cleanly.
        requests.put(synthesize_request(types_pb2.ModelRef(), latents))
        requests.put(None)
        rest = [wire.decode_images(a.images).shape for a in answers]
        assert rest == [(64, 64, 64, 3)] * 2
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        assert "shutting down" in output and "stopped" in output
    finally:
        if process.poll() is None:
            process.kill()


def _train(trainer, key, attribute, samples=5000):
    request = trainer_pb2.StartJobRequest(idempotency_key=key, boundary=trainer_pb2.BoundaryJobSpec(
        attribute=attribute, num_samples=samples, keep_fraction=0.1, options=trainer_pb2.TrainingOptions(artifact_name=key)))
    job = trainer.StartJob(request, timeout=120)
    final = list(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=600))[-1].job
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.error
    return final


def _edit(editor, boundary, conditions, start, end, frames, head, output, label_index=None, from_boundary=False, count=20):
    """Edit `count` seeds: (scores of head.output [frames, seeds], returned latents [frames, seeds, dim])."""
    request = editor_pb2.EditRequest(
        seed=editor_pb2.SeedStart(seed=11, count=count), num_frames=frames, score_heads=[head], omit_images=True,
        interfacegan=editor_pb2.InterFaceGANEdit(boundary=boundary, condition_boundaries=conditions,
                                                 start_distance=start, end_distance=end, from_boundary=from_boundary))
    values, latents = [], []
    for frame in editor.Edit(request, timeout=300):
        outputs = {o.name: wire.from_tensor(o.tensor, field=o.name) for h in frame.scores for o in h.outputs}
        value = outputs[output]
        values.append(value if label_index is None else value[:, label_index])
        latents.append(wire.from_tensor(frame.latents.values, field="latents"))
    return np.stack(values), np.stack(latents)


def test_interfacegan_end_to_end_through_the_public_api(suite):
    """Train a yaw boundary and edit seeds along it, all through the four services' public APIs.

    Every latent-space claim is checked on the returned latents against the boundaries as
    stored in the repository (n . z + b computed here), never on the editor's own metrics."""
    from scipy.stats import spearmanr

    from latentedit.api.v1 import editor_pb2_grpc, trainer_pb2_grpc
    from latentedit.methods.interfacegan import load_boundary
    from latentedit.repository import ModelRepository

    config, ports, _ = suite
    repo = ModelRepository(yaml.safe_load(config.read_text())["repository"])
    trainer = trainer_pb2_grpc.TrainerServiceStub(connect(f"localhost:{ports['trainer']}"))
    editor = editor_pb2_grpc.EditorServiceStub(connect(f"localhost:{ports['editor']}"))
    yaw = _train(trainer, "e2e-yaw", types_pb2.AttributeRef(head="pose", output="yaw"))
    assert yaw.metrics["validation_accuracy"] > 0.9
    stored_yaw = load_boundary(repo, "e2e-yaw")[0]
    yaw_normal, yaw_offset = stored_yaw.normal.astype(np.float64), float(stored_yaw.offset)
    assert np.linalg.norm(yaw_normal) == pytest.approx(1, abs=1e-5)

    def yaw_distance(latents):  # [frames, seeds, dim] -> [frames, seeds]
        return latents @ yaw_normal + yaw_offset

    # Each seed walks from its foot point on the boundary (yaw near 0) to +-2 along the normal:
    # beyond about 45 degrees dlib's landmarks and the 64 px faces saturate, and walks of
    # z + d n from seeds already far out fail more often (bench/interfacegan.py measures both:
    # 86% vs 92% of seeds over 8 sets of 20). 40 seeds keep the estimate's spread small.
    scores, latents = _edit(editor, "e2e-yaw", [], -2, 2, 8, "pose", "yaw", from_boundary=True, count=40)
    np.testing.assert_allclose(yaw_distance(latents), np.repeat(np.linspace(-2, 2, 8)[:, None], 40, axis=1), atol=1e-3)
    rho = np.array([spearmanr(np.arange(8), scores[:, s]).statistic for s in range(40)])
    assert (rho > 0.9).mean() >= 0.9, rho.round(2)

    # Conditional editing of smile with yaw as the condition changes yaw less (same 100 seeds).
    _train(trainer, "e2e-smile", types_pb2.AttributeRef(head="expression", output="probabilities", label="happy"))
    plain, _ = _edit(editor, "e2e-smile", [], 0, 3, 2, "pose", "yaw", count=100)
    conditioned, _ = _edit(editor, "e2e-smile", ["e2e-yaw"], 0, 3, 2, "pose", "yaw", count=100)
    np.testing.assert_allclose(plain[0], conditioned[0])  # the same start images
    plain_change, conditioned_change = np.abs(plain[1] - plain[0]).mean(), np.abs(conditioned[1] - conditioned[0]).mean()
    assert conditioned_change < plain_change, (conditioned_change, plain_change)

    # In latent space: the condition keeps every sample's distance to the yaw boundary fixed,
    # the smile distance still grows by 3 times the part of the smile normal left after
    # projecting out the yaw normal, and the smile probability grows.
    stored_smile = load_boundary(repo, "e2e-smile")[0]
    smile_normal = stored_smile.normal.astype(np.float64)
    cosine = float(smile_normal @ yaw_normal)
    happy, conditioned_latents = _edit(editor, "e2e-smile", ["e2e-yaw"], 0, 3, 4, "expression", "probabilities", label_index=3)
    yaw_drift = yaw_distance(conditioned_latents) - yaw_distance(conditioned_latents[:1])
    assert np.abs(yaw_drift).max() < 1e-3, yaw_drift
    smile_gain = (conditioned_latents[-1] - conditioned_latents[0]) @ smile_normal
    np.testing.assert_allclose(smile_gain, 3 * np.sqrt(1 - cosine**2), atol=1e-3)
    assert happy[-1].mean() - happy[0].mean() > 0.1
    # The same edit without the condition moves each latent 3 along the smile normal, which
    # drifts along the yaw normal by 3 cos(smile, yaw).
    _, plain_latents = _edit(editor, "e2e-smile", [], 0, 3, 4, "expression", "probabilities", label_index=3)
    np.testing.assert_allclose(plain_latents[0], conditioned_latents[0])  # the same seeds
    np.testing.assert_allclose((plain_latents[-1] - plain_latents[0]) @ smile_normal, 3, atol=1e-3)
    np.testing.assert_allclose(yaw_distance(plain_latents[-1:]) - yaw_distance(plain_latents[:1]), 3 * cosine, atol=1e-3)


def test_a_w_plus_edit_on_the_stylegan2_default_end_to_end(suite, tmp_path):
    """The distilled StyleGAN2 default through the four processes: a yaw boundary trained in W by
    the trainer (started from the CLI with --space w), then a per-layer edit of W+ rows 0-3 streamed
    by the editor (public API, and the CLI's --rows); the returned latents re-synthesized by the
    generator give the streamed images."""
    from latentedit.api.v1 import editor_pb2_grpc, generator_pb2_grpc
    from latentedit.repository import ModelRepository

    config, ports, _ = suite
    train = _cli("--config", str(config), "train", "boundary", "--model", "stylegan2-faces", "--space", "w", "--head", "pose",
                 "--output", "yaw", "--samples", "600", "--keep", "0.3", "--name", "e2e-sg2-yaw",
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = train.communicate(timeout=600)
    assert train.returncode == 0, output
    entry = ModelRepository(yaml.safe_load(config.read_text())["repository"]).resolve("e2e-sg2-yaw")
    assert entry.manifest["space"] == "w" and entry.manifest["generator"]["name"] == "stylegan2-faces"
    assert entry.manifest["metrics"]["validation_accuracy"] > 0.8, entry.manifest["metrics"]

    generator = generator_pb2_grpc.GeneratorServiceStub(connect(f"localhost:{ports['generator']}"))
    editor = editor_pb2_grpc.EditorServiceStub(connect(f"localhost:{ports['editor']}"))
    stylegan2 = types_pb2.ModelRef(name="stylegan2-faces")
    frames = list(editor.Edit(editor_pb2.EditRequest(
        generator=stylegan2, seed=editor_pb2.SeedStart(seed=12, count=4), num_frames=4, score_heads=["pose"],
        interfacegan=editor_pb2.InterFaceGANEdit(boundary="e2e-sg2-yaw", start_distance=-3, end_distance=3,
                                                 rows=types_pb2.RowRange(start=0, end=4))), timeout=300))
    latents = np.stack([wire.from_tensor(f.latents.values, field="w+") for f in frames])
    assert all(f.latents.space == wire.space_code("w+") for f in frames) and latents.shape == (4, 4, 10, 256)
    np.testing.assert_allclose(latents[:, :, 4:], np.broadcast_to(latents[:1, :, 4:], latents[:, :, 4:].shape), atol=1e-5)
    yaw = np.stack([[wire.from_tensor(o.tensor, field="yaw") for h in f.scores for o in h.outputs if o.name == "yaw"][0]
                    for f in frames])
    assert (yaw[-1] - yaw[0]).mean() > 5, yaw.round(1)
    again = generator.Synthesize(generator_pb2.SynthesizeRequest(model=stylegan2, latents=frames[-1].latents), timeout=60)
    streamed = wire.decode_images(frames[-1].images).astype(int)
    assert np.abs(wire.decode_images(again.images).astype(int) - streamed).max() <= 2

    out = tmp_path / "sg2-rows"
    edit = _cli("--config", str(config), "edit", "--model", "stylegan2-faces", "--boundary", "e2e-sg2-yaw", "--rows", "0:4",
                "--frames", "3", "--count", "2", "--score", "pose", "--out", str(out),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = edit.communicate(timeout=300)
    assert edit.returncode == 0, output
    assert Image.open(out.with_suffix(".png")).size[0] > 64


def test_cli_trains_an_sgf_mapping_and_writes_an_sgf_edit(suite, tmp_path):
    config, _, _ = suite
    train = _cli("--config", str(config), "train", "mapping", "--condition", "attributes", "--attribute", "pose.yaw",
                 "--attribute", "expression.probabilities.happy", "--pairs", "400", "--steps", "400", "--name", "cli-sgf",
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = train.communicate(timeout=600)
    assert train.returncode == 0, output
    assert "max_spectral_norm" in output and "mapping cli-sgf v1 written" in output
    out = tmp_path / "sgf"
    edit = _cli("--config", str(config), "edit", "--method", "sgf", "--mapping", "cli-sgf", "--set", "pose.yaw=20",
                "--score", "pose", "--count", "2", "--steps", "5", "--out", str(out),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = edit.communicate(timeout=600)
    assert edit.returncode == 0, output
    assert Image.open(out.with_suffix(".png")).size[0] > 64 and out.with_suffix(".gif").exists()
    bad = _cli("--config", str(config), "edit", "--method", "sgf", "--mapping", "cli-sgf", "--set", "pose.tilt=3",
               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = bad.communicate(timeout=120)
    assert bad.returncode == 1 and output.startswith("error: NOT_FOUND") and "Traceback" not in output


def test_dplase_end_to_end_through_the_public_api(suite):
    """A direction job, then DP-LaSE edits with and without density preservation and with subspace
    refinement, streamed frame by frame with scores, through the four services as processes."""
    from latentedit.api.v1 import editor_pb2_grpc, trainer_pb2_grpc

    _, ports, _ = suite
    trainer = trainer_pb2_grpc.TrainerServiceStub(connect(f"localhost:{ports['trainer']}"))
    editor = editor_pb2_grpc.EditorServiceStub(connect(f"localhost:{ports['editor']}"))
    spec = trainer_pb2.DirectionJobSpec(num_directions=3, layer="block2", num_channel_subspaces=3, num_samples=2,
                                        options=trainer_pb2.TrainingOptions(artifact_name="e2e-dplase", steps=15, batch_size=8))
    job = trainer.StartJob(trainer_pb2.StartJobRequest(idempotency_key="e2e-dplase", directions=spec), timeout=60)
    final = list(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=600))[-1].job
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.error
    (listed,) = [e for e in editor.ListEdits(editor_pb2.ListEditsRequest(), timeout=10).edits if e.artifact.ref.name == "e2e-dplase"]
    assert {n.direction_index for n in listed.direction_names} == {0, 1, 2}
    index = max(listed.direction_names, key=lambda n: abs(n.correlation)).direction_index
    norms = {}
    for preserving, refined in ((False, False), (True, False), (True, True)):
        request = editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=2, count=2), num_frames=4, score_heads=["pose", "quality"],
                                         dplase=editor_pb2.DPLaSEEdit(directions="e2e-dplase", direction_index=index, start_stride=-6,
                                                                      end_stride=6, density_preserving=preserving,
                                                                      subspace_refinement=refined))
        frames = list(editor.Edit(request, timeout=120))
        assert [f.index for f in frames] == [0, 1, 2, 3] and frames[-1].stop_reason == editor_pb2.STOP_REASON_COMPLETED
        assert {s.head for s in frames[0].scores} == {"pose", "quality"} and frames[0].images.raw.shape[0] == 2
        norms[preserving, refined] = [np.linalg.norm(wire.from_tensor(f.latents.values, field="z"), axis=1) for f in frames]
    (still,) = editor.Edit(editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=2, count=2), num_frames=1, dplase=editor_pb2.DPLaSEEdit(
        directions="e2e-dplase", direction_index=index, start_stride=0, end_stride=0)), timeout=60)
    start_norm = np.linalg.norm(wire.from_tensor(still.latents.values, field="z"), axis=1)
    for n in norms[True, False] + norms[True, True]:
        np.testing.assert_allclose(n, start_norm, rtol=1e-5)
    assert (norms[False, False][0] > start_norm + 0.5).all()
