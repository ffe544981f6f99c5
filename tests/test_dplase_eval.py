"""`latentedit eval dplase`: the measures against known answers, a tiny run's structure and the
properties a broken walk or metric would fail, and bad command lines rejected before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentedit.cli import build_parser, dplase_settings
from latentedit.cli import main as cli
from latentedit.evaluation import (
    FEATURE_NETWORKS,
    DPLaSEEvalSettings,
    dplase_markdown,
    frechet_distance,
    ms_ssim,
    ms_ssim_scales,
    run_dplase_table,
)
from latentedit.methods.dplase import DPLaSE
from latentedit.methods.ganspace import first_layer_matrix, sefa_directions
from latentedit.world import LocalWorld


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    shift = np.array([1.0, -2.0, 0.5])
    a = rng.standard_normal((40_000, 3))
    b = shift + 2.0 * rng.standard_normal((40_000, 3))
    # N(0, I) vs N(m, 4 I) in 3-d: |m|^2 + 3 (1 + 4 - 2 * sqrt(1 * 4)) = |m|^2 + 3.
    assert frechet_distance(a, b) == pytest.approx((shift**2).sum() + 3, rel=0.03)
    assert abs(frechet_distance(a, a)) < 1e-6


def _direct_ssim(x: np.ndarray, y: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Single-scale SSIM window by window with explicit weighted statistics (no convolution)."""
    taps = np.arange(window) - (window - 1) / 2
    g = np.exp(-(taps**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for channel in range(x.shape[2]):
        for i in range(x.shape[0] - window + 1):
            for j in range(x.shape[1] - window + 1):
                px = x[i:i + window, j:j + window, channel].astype(np.float64)
                py = y[i:i + window, j:j + window, channel].astype(np.float64)
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * px * px).sum() - mx**2, (w * py * py).sum() - my**2
                cov = (w * px * py).sum() - mx * my
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ms_ssim_against_a_direct_computation_and_its_scale_count():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 41, x.shape), 0, 255).astype(np.uint8)
    single = ms_ssim(x, y, scales=1)
    assert single == pytest.approx([_direct_ssim(x[k], y[k]) for k in range(2)], abs=1e-9)
    assert ms_ssim(x, x, scales=1) == pytest.approx([1.0, 1.0])
    assert (ms_ssim_scales(64, 64), ms_ssim_scales(256, 256), ms_ssim_scales(16, 16)) == (3, 5, 1)
    faces = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    noisy = [np.clip(faces.astype(int) + rng.normal(0, s, faces.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    means = [float(ms_ssim(faces, n).mean()) for n in noisy]
    assert means[0] > means[1] > means[2] and ms_ssim(faces, faces) == pytest.approx(np.ones(3))


def test_sefa_finds_the_planted_directions_and_reads_dcgans_first_layer(installed_repo):
    rng = np.random.default_rng(2)
    u, _ = np.linalg.qr(rng.standard_normal((40, 6)))
    v, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    weight = u @ np.diag([9.0, 5.0, 1.0, 0.5, 0.2, 0.1]) @ v.T
    directions, share = sefa_directions(weight, 2)
    assert np.abs(directions @ v[:, :2]) == pytest.approx(np.eye(2), abs=1e-5)
    assert share[0] == pytest.approx(81 / (81 + 25 + 1 + 0.25 + 0.04 + 0.01), rel=1e-5)

    world = LocalWorld(installed_repo)
    model = world.generator_module(world.generator())
    matrix = first_layer_matrix(model)
    z = torch.randn(3, matrix.shape[1])
    with torch.no_grad():
        expected = model.main[0](z[:, :, None, None]).reshape(3, -1)
    assert matrix @ z.numpy().T == pytest.approx(expected.numpy().T, abs=1e-4)


def test_a_tiny_table_has_its_structure_and_its_walks_behave(installed_repo):
    world = LocalWorld(installed_repo)
    # Tiny but for the strides: at 60 the linear walk reaches |z| ~ 61 and is far off the floor's noise.
    settings = DPLaSEEvalSettings(samples=64, quality_samples=1, strides=(0.0, 60.0), num_directions=1, steps=1,
                                  curve_samples=1, pca_samples=8)
    table = run_dplase_table(world, world.generator(), settings, log=lambda _m: None)

    assert len(table.cells) == 2 * 2 * 2 and table.layer == "block3" and len(table.direction_names) == 1
    for name in ("random", "DP-LaSE"):
        linear, kept = table.cell(name, False, 0.0), table.cell(name, True, 0.0)
        assert (linear.frechet, linear.accepted, linear.mean_norm) == (kept.frechet, kept.accepted, kept.mean_norm)
        # Eq. 2 keeps |z|; the linear walk along a unit direction independent of z0 adds eps^2 to |z|^2.
        assert table.cell(name, True, 60.0).mean_norm == pytest.approx(kept.mean_norm, rel=1e-4)
    assert table.cell("random", False, 60.0).mean_norm == pytest.approx(np.sqrt(100 + 60**2), rel=0.02)
    floor = table.cell("random", False, 0.0).frechet
    # Norm-preserving walks along random directions are draws from N(0, I) again: only noise
    # separates them from the floor. A linear walk to |z| ~ 61 leaves the prior's shell.
    assert table.cell("random", True, 60.0).frechet < 1.5 * floor
    assert table.cell("random", False, 60.0).frechet > 2 * floor
    assert all(0 <= c.accepted <= 1 and 0 <= c.detected <= 1 for c in table.cells)

    assert [(c.method, c.density_preserving) for c in table.curves] == [
        (m, p) for m in ("DP-LaSE", "GANSpace PCA", "SeFa") for p in (False, True)]
    for curve in table.curves:
        assert curve.ms_ssim_distance[0] == pytest.approx(0, abs=1e-9) and curve.identity_distance[0] == 0
        assert curve.ms_ssim_distance[1] > 0.1 and curve.identity_distance[1] > 0
    text = dplase_markdown(table)
    assert "| random | linear (w/o DP) |" in text and "| SeFa | norm-preserving (w/ DP) |" in text


def test_the_command_line_defaults_are_the_settings_defaults():
    args = build_parser().parse_args(["eval", "dplase"])
    assert dplase_settings(args) == DPLaSEEvalSettings()
    features = next(a for a in build_parser()._subparsers._group_actions[0].choices["eval"]  # type: ignore[union-attr]
                    ._subparsers._group_actions[0].choices["dplase"]._actions if a.dest == "features")
    assert features.choices == list(FEATURE_NETWORKS)


@pytest.mark.parametrize("arguments, message", [
    (["--samples", "4"], "samples 4 must be >= 8"),
    (["--quality-samples", "0"], "quality_samples 0 must be in 1..samples"),
    (["--strides", "2", "4"], "must be distinct and include 0"),
    (["--strides", "0", "nan"], "must be finite"),
    (["--directions", "101"], "num_directions 101 must be in 1..100"),
    (["--layer", "image"], "layer 'image': G1/G2 must split at an intermediate layer"),
    (["--steps", "0"], "steps 0 must be in 1..1000000"),
    (["--model", "nope"], "no generator named 'nope'"),
])
def test_bad_command_lines_fail_in_one_line_before_any_work(installed_repo, tmp_path, monkeypatch, capsys, arguments,
                                                            message):
    def no_work(*_args, **_kwargs):
        raise AssertionError("work started before the inputs were checked")

    for name in ("sample", "synthesize", "score", "heads"):
        monkeypatch.setattr(LocalWorld, name, no_work)
    monkeypatch.setattr(DPLaSE, "train", no_work)
    config = tmp_path / "config.yaml"
    config.write_text(f"repository: {installed_repo.root}\n")
    out = tmp_path / "results" / "dplase"
    code = cli(["--config", str(config), "eval", "dplase", "--out", str(out), *arguments])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.parent.exists()
