"""Manipulation Disentanglement Score of every method on the default world (SGF paper, 4.4.1).

    .venv/bin/python bench/mds.py [--samples 100] [--train 2000]

Runs `latentedit eval mds` (in-process, same code as the services), copies the curves to
bench/mds.png and records the table in bench/RESULTS.md.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import record  # noqa: E402
from latentedit.cli import main as cli  # noqa: E402

PAPER = ("Paper (FFHQ, 48 attributes, Azure face API): GANSpace 0.531, InterFaceGAN 0.721, SGF 0.837 overall. "
         "Ours: 6 attributes (smile, yaw, mouth-open, male, pitch, age), so n_i / (M - 1) moves in steps of 0.2.")


def record_run(out: Path, command: str) -> None:
    shutil.copyfile(out.with_suffix(".png"), ROOT / "bench" / "mds.png")
    body = out.with_suffix(".md").read_text() + "\n" + PAPER + "\n\nCurves: `bench/mds.png`.\n"
    record("Manipulation Disentanglement Score", command, body)


if __name__ == "__main__":
    out = ROOT / "out" / "mds"
    args = ["--config", str(ROOT / "config" / "local.yaml"), "eval", "mds", "--out", str(out), *sys.argv[1:]]
    code = cli(args)
    if code == 0:
        record_run(out, " ".join(["python bench/mds.py", *sys.argv[1:]]))
        print("recorded in bench/RESULTS.md")
    sys.exit(code)
