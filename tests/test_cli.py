"""The command line without services: help, listings, failing fast, checking inputs first, progress."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from latentedit.cli import build_parser, main
from tests.conftest import ROOT, free_port


def test_generic_job_help_lists_every_spec_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "directions", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in ("num_directions", "layer", "max_stride", "learn_density", "num_channel_subspaces", "options.steps",
                  "sparsity_weight"):
        assert field in text
    # Set by their own flags (--model, --seed, --name), so not offered as --param.
    assert "options.artifact_name" not in text and "generator.name" not in text


def test_edit_help_lists_each_methods_fields(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    out = capsys.readouterr().out
    assert "--param fields of DPLaSEEdit: directions, direction_index, start_stride, end_stride" in out
    assert "--param fields of GANSpaceEdit: directions, component" in out


def test_methods_columns_line_up_whatever_the_title_length(capsys):
    assert main(["methods"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "edits with:" in line]
    assert len(lines) >= 4
    assert len({line.index("edits with:") for line in lines}) == 1
    assert len({line.index("trained by jobs:") for line in lines}) == 1
    dplase = next(line for line in lines if line.startswith("dplase"))
    assert "DP-LaSE density-preserving directions  edits with" in dplase


# ---- the command line tells the truth quickly (issue 13) -------------------------------------

def _config_without_services(tmp_path) -> tuple[Path, dict[str, int]]:
    """A config whose four service ports have nothing listening."""
    ports = {name: free_port() for name in ("generator", "scorer", "trainer", "editor")}
    config = tmp_path / "config.yaml"
    config.write_text(f"repository: {tmp_path / 'no-repo'}\nservices:\n"
                      + "".join(f"  {name}: {{port: {port}}}\n" for name, port in ports.items()))
    return config, ports


@pytest.mark.parametrize("service, command", [
    ("generator", ["generate", "--count", "2"]),
    ("editor", ["edit", "--boundary", "yaw"]),
    ("editor", ["edit", "--method", "sgf", "--mapping", "m", "--caption", "a smiling woman"]),
    ("trainer", ["train", "boundary", "--head", "pose", "--output", "yaw"]),
    ("trainer", ["train", "mapping", "--condition", "attributes", "--attribute", "pose.yaw"]),
    ("trainer", ["train", "pca", "--param", "num_components=4"]),
])
def test_no_service_fails_within_seconds_naming_the_address_and_how_to_start_it(tmp_path, capsys, service, command):
    config, ports = _config_without_services(tmp_path)
    build_parser()  # imports done first: timed is the command, not this process's first torch import
    started = time.monotonic()
    # --wait is the bound for a service that is starting up; nothing listening must not use it.
    code = main(["--config", str(config), *command, "--wait", "120", *(["--out", str(tmp_path / "out")]
                                                                    if command[0] in ("generate", "edit") else [])])
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 1 and took < 10, (took, err)
    assert err.count("\n") == 1 and err.startswith(f"error: nothing is listening at localhost:{ports[service]} "), err
    assert f"start it: latentedit --config {config} serve {service} " in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_service_starting_up_is_waited_for_saying_so(tmp_path):
    """Listening but NOT_SERVING (models loading) is not 'nothing listening': wait, tell, then go on."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from latentedit.errors import Unavailable
    from latentedit.rpc.client import NotListening, await_serving, connect

    server = grpc.server(ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        told: list[str] = []
        threading.Timer(1.0, lambda: servicer.set("", health_pb2.HealthCheckResponse.SERVING)).start()
        # Shorter than the start-up: a wrong "nothing listening" would fire at 0.1 s.
        await_serving(connect(f"localhost:{port}"), f"localhost:{port}", "the scorer service", timeout_s=30,
                      unreachable_after_s=0.1, on_wait=told.append)
        assert len(told) == 1 and told[0].startswith(f"the scorer service at localhost:{port} is up but not SERVING yet (NOT_SERVING")
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(Unavailable, match=r"answers but did not report SERVING within 1 s \(last: NOT_SERVING\)") as caught:
            await_serving(connect(f"localhost:{port}"), f"localhost:{port}", "the scorer service", timeout_s=1,
                          unreachable_after_s=0.1)
        assert not isinstance(caught.value, NotListening)
    finally:
        server.stop(0)


@pytest.mark.parametrize("command, message", [
    (["edit", "--frames", "0"], "argument --frames: 0 must be at least 1"),
    (["edit", "--start", "nan"], "argument --start: 'nan' is not a finite number"),
    (["edit", "--method", "interfacegan"], "--boundary is required with --method interfacegan"),
    (["edit", "--method", "sgf", "--mapping", "m"], "give exactly one SGF target"),
    (["edit", "--method", "sgf", "--mapping", "m", "--set", "pose.yaw=inf"], "the value must be a finite number"),
    (["edit", "--method", "sgf", "--mapping", "m", "--set", "yaw=3"], "must look like head.output"),
    (["edit", "--method", "ganspace", "--param", "nope=1"], "--param: "),
    (["train", "mapping", "--condition", "keypoints", "--pairs", "-5"], "argument --pairs: -5 must be in 1..100000 (or 0: the default)"),
    (["train", "mapping", "--condition", "keypoints", "--hidden", "4"], "argument --hidden: 4 must be in 8..1024"),
    (["train", "boundary", "--head", "pose", "--output", "yaw", "--keep", "0.7"], "argument --keep: 0.7 must be in (0, 0.5]"),
    (["train", "boundary", "--head", "pose", "--output", "yaw", "--samples", "1"], "argument --samples: 1 must be in 2..500000"),
    (["generate", "--count", "0"], "argument --count: 0 must be in 1..100000"),
    (["eval", "mds", "--samples", "0"], "argument --samples: 0 must be in 1..100000"),
    (["eval", "mds", "--train", "10"], "argument --train: 10 must be in 100..100000"),
    (["eval", "mds", "--attributes", "smile", "wings"], "attributes: unknown or none ['wings']"),
])
def test_inputs_are_checked_before_any_service_or_model(tmp_path, capsys, monkeypatch, command, message):
    """The bad argument is what the error names, although no service runs and no model exists:
    checked first, in one line, exit code 1, nothing written."""
    from latentedit.world import LocalWorld

    def no_models(*_args, **_kwargs):
        raise AssertionError("models loaded before the arguments were checked")

    monkeypatch.setattr(LocalWorld, "__init__", no_models)
    config, _ = _config_without_services(tmp_path)
    out = tmp_path / "results" / "x"
    outs = ["--out", str(out)] if command[0] in ("generate", "edit", "eval") else []
    code = main(["--config", str(config), *command, *outs])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert "nothing is listening" not in err and not out.parent.exists()


def test_argparse_errors_exit_1_in_one_line(capsys):
    for argv in (["nope"], ["edit", "--bogus"], ["train"], ["train", "mapping"], ["generate", "--count", "x"]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: latentedit") and err.count("\n") == 1 and "--help" in err, err
    # --help is not an error.
    with pytest.raises(SystemExit) as done:
        main(["generate", "--help"])
    assert done.value.code == 0


def test_progress_line_shows_phase_counts_elapsed_and_eta():
    from latentedit.api.v1 import trainer_pb2
    from latentedit.cli import progress_line

    job = trainer_pb2.Job(state=trainer_pb2.JOB_STATE_RUNNING, phase="building (z, c) pairs", progress=0.42, eta_seconds=90)
    line = progress_line(job, "840/2000 pairs", 65)
    assert line.startswith("[" + "#" * 12 + "." * 18 + "]  42.0% running: building (z, c) pairs, 840/2000 pairs")
    assert line.endswith("; 1m05s elapsed, ETA ~1m30s")
    job.metrics["train_loss"] = 0.01234
    job.eta_seconds = -1
    assert progress_line(job, "", 5).endswith("pairs, loss 0.0123; 5s elapsed")  # no ETA when unknown


def test_mapping_estimate_follows_the_settings():
    from latentedit.cli import PAIR_SECONDS, STEP_SECONDS_AT_256x6, estimate_mapping_seconds, mapping_estimate_line

    pairs_s, steps_s = estimate_mapping_seconds("keypoints", 1000, 400, 256, 6)
    assert pairs_s == pytest.approx(1000 * PAIR_SECONDS["keypoints"]) and steps_s == pytest.approx(400 * STEP_SECONDS_AT_256x6)
    # Half the width: a quarter of the work per step; twice the depth: twice.
    assert estimate_mapping_seconds("keypoints", 1000, 400, 128, 12)[1] == pytest.approx(steps_s / 2)
    assert estimate_mapping_seconds("caption", 1000, 400, 256, 6)[0] == pytest.approx(1000 * PAIR_SECONDS["caption"])
    line = mapping_estimate_line("keypoints", 1000, 400, 256, 6)
    assert line.startswith(f"expected time: ~{int((pairs_s + steps_s) // 60)}m") and "1000 pairs" in line and "400 steps of a 6x256 F" in line


def test_loading_the_text_model_draws_no_progress_bar(installed_repo, capfd, caplog):
    """Service logs are JSON lines: transformers' tqdm bar must not land between them."""
    from latentedit.models.text import TextEmbedder

    with caplog.at_level(logging.INFO, logger="latentedit.models.text"):
        TextEmbedder(installed_repo.resolve("minilm").path)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err and "%|" not in err, err
    assert any(r.getMessage().startswith("text model loaded from") for r in caplog.records)


def test_commands_that_need_no_method_do_not_load_torch(tmp_path):
    """`generate` (or `wait`, `models`) builds only its own parser: no method registry, so no
    torch and scikit-learn import (seconds) before it can say that nothing is listening."""
    config, ports = _config_without_services(tmp_path)
    script = ("import sys; from latentedit.cli import main; "
              f"code = main(['--config', {str(config)!r}, 'generate', '--out', {str(tmp_path / 'f.png')!r}]); "
              "print(code, 'torch' in sys.modules, 'sklearn' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.stdout.split() == ["1", "False", "False"], done.stdout + done.stderr
    assert f"nothing is listening at localhost:{ports['generator']}" in done.stderr


def test_serve_knows_the_web_gateway_and_refuses_unknown_services(capsys):
    """`serve web` is a service name like the four; an unknown one is refused before anything starts."""
    assert main(["serve", "generator", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown service(s) ['nope']") and err.endswith("known: generator, scorer, trainer, editor, web"), err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "web" in capsys.readouterr().out


def test_start_and_end_reach_every_methods_walk_or_are_refused(capsys):
    """--start / --end fill W*'s and DP-LaSE's own distance / stride fields (they were silently
    ignored, leaving a W* edit at distance 0 all along); --param wins; SGF refuses them."""
    import argparse

    from latentedit.api.v1 import editor_pb2
    from latentedit.cli import _walk_range

    wstar = editor_pb2.WStarEdit()
    _walk_range(argparse.Namespace(param=[], start=-2.0, end=1.5, method="wstar"), wstar)
    assert (wstar.start_distance, wstar.end_distance) == (-2.0, 1.5)
    dplase = editor_pb2.DPLaSEEdit()
    _walk_range(argparse.Namespace(param=["end_stride=4"], start=None, end=2.0, method="dplase"), dplase)
    assert (dplase.start_stride, dplase.end_stride) == (-3.0, 0.0)  # the default start; end left to --param
    assert main(["edit", "--method", "sgf", "--mapping", "m", "--caption", "a smiling face", "--start", "1"]) == 1
    err = capsys.readouterr().err
    assert "--start does not apply to --method sgf" in err, err


def test_eval_wstar_measures_a_trained_flow_and_refuses_an_unknown_one(fresh_repo, tmp_path, capsys):
    """`eval wstar --flow NAME`: Table 1 rows for both spaces and the Fig. 5 scatter from a flow in
    the repository; an unknown flow is one NOT_FOUND line before any sampling."""
    import torch

    from latentedit.attributes import Attribute
    from latentedit.methods.base import JobBasics, QuietProgress
    from latentedit.methods.wstar import FlowOptions, FlowSpec, WStar
    from latentedit.world import LocalWorld

    torch.set_num_threads(1)
    world = LocalWorld(fresh_repo)
    generator = world.generator()
    spec = FlowSpec(JobBasics(generator, "cli-flow", 0, 64), "z", (Attribute("pose", "yaw", None),), 128,
                    FlowOptions(couplings=2, hidden=16, steps=10), fresh_repo)
    WStar().train(world, spec, QuietProgress()).save(fresh_repo, {"test": "cli"})
    config = tmp_path / "config.yaml"
    config.write_text(f"repository: {fresh_repo.root}\nsecurity:\n  insecure: true\n")
    base = ["--config", str(config), "eval", "wstar", "--samples", "120", "--identity-seeds", "0"]
    assert main([*base, "--flow", "no-such-flow", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-such-flow" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.md").exists()
    assert main([*base, "--flow", "cli-flow", "--out", str(tmp_path / "t1")]) == 0
    table = (tmp_path / "t1.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| original", "| proxy (cli-flow)"))]
    assert len(rows) == 2, table
    for row in rows:
        values = [float(v) for v in row.strip("|").split("|")[1:]]
        assert len(values) == 10 and all(np.isfinite(values)) and 0.5 <= values[2] <= 1.0, row  # avg accuracy
    assert "pose.yaw" in table
    assert (tmp_path / "t1.png").read_bytes().startswith(b"\x89PNG")


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`latentedit models list | grep -q NAME` closes the pipe early: the command stops without an
    error line (demo.sh printed "error: [Errno 32] Broken pipe" and, with pipefail, took an installed
    artifact for a missing one)."""
    config = tmp_path / "config.yaml"
    repo = tmp_path / "repo"
    for i in range(4000):  # far more than a pipe buffer holds
        (repo / f"model-{i:04d}" / "1").mkdir(parents=True)
        (repo / f"model-{i:04d}" / "1" / "manifest.json").write_text('{"kind": "boundary"}')
    config.write_text(f"repository: {repo}\nsecurity:\n  insecure: true\n")
    reader = subprocess.run(
        f"{sys.executable} -m latentedit --config {config} models list | head -c 10 >/dev/null; exit ${{PIPESTATUS[0]}}",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert "Broken pipe" not in reader.stderr and "Traceback" not in reader.stderr, reader.stderr
    listed = subprocess.run([sys.executable, "-m", "latentedit", "--config", str(config), "models", "list"],
                            capture_output=True, text=True, timeout=120)
    assert listed.stdout.count("\n") == 4000, listed.stdout[-300:]  # so the pipe above really filled up
