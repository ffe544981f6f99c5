"""Command-line help and listings that need no running service."""

from __future__ import annotations

import pytest

from latentedit.cli import main


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
