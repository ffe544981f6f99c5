"""Time to first edit from a fresh clone (issue 13 part 4).

    .venv/bin/python bench/time_to_first_edit.py [--keep] [--port-offset 1000]

1. `git clone` of this repository's committed HEAD into a temporary folder;
2. there, the README's set-up, `bash scripts/setup.sh` (a fresh .venv from the lock, the default
   models and the shipped trained defaults installed into the clone's model-repo);
3. from set-up done: `latentedit serve` (the clone's config/local.yaml with every port moved by
   --port-offset, so that services already running on this machine are not disturbed), `wait`,
   and then the first edit of each method through the command line, timed one after the other:
   InterFaceGAN (shipped default-yaw), SGF (shipped default-sgf-attributes, pose.yaw = 25),
   DP-LaSE (shipped default-dplase), GANSpace (nothing ships for it: `train pca`, then edit).
   W* answers UNIMPLEMENTED and is not timed.
Records bench/RESULTS.md "Time to first edit (fresh clone)".
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import record  # noqa: E402


def run(command: list[str], cwd: Path, log: Path, timeout: float = 3600) -> tuple[float, int]:
    began = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
    return time.perf_counter() - began, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the clone (printed) instead of deleting it")
    parser.add_argument("--port-offset", type=int, default=1000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="latentedit-fresh-"))
    clone = folder / "latentedit"
    log = folder / "log.txt"
    rows: list[tuple[str, float, int]] = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    serve = None
    try:
        rows.append(("git clone", *run(["git", "clone", "--quiet", str(ROOT), str(clone)], folder, log)))
        rows.append(("bash scripts/setup.sh (fresh .venv, models, shipped defaults)", *run(["bash", "scripts/setup.sh"], clone, log)))
        config = clone / "config" / "bench-fresh.yaml"
        text = (clone / "config" / "local.yaml").read_text()
        config.write_text(re.sub(r"port: (\d+)", lambda m: f"port: {int(m.group(1)) + args.port_offset}", text))
        le = [str(clone / ".venv" / "bin" / "python"), "-m", "latentedit", "--config", str(config)]
        ready = time.perf_counter()
        serve_log = open(folder / "serve.log", "w")
        serve = subprocess.Popen([*le, "serve"], cwd=clone, stdout=serve_log, stderr=subprocess.STDOUT, start_new_session=True)
        rows.append(("serve + wait (all four SERVING)", *run([*le, "wait", "--timeout", "600"], clone, log)))
        edits = [
            ("first edit: InterFaceGAN (default-yaw)", [*le, "edit", "--boundary", "default-yaw", "--count", "4", "--score", "pose",
                                                        "--out", "out/ttfe-ifg"]),
            ("first edit: SGF (default-sgf-attributes, pose.yaw=25)", [*le, "edit", "--method", "sgf", "--mapping",
                                                                        "default-sgf-attributes", "--set", "pose.yaw=25", "--count", "4",
                                                                        "--score", "pose", "--out", "out/ttfe-sgf"]),
            ("first edit: DP-LaSE (default-dplase)", [*le, "edit", "--method", "dplase", "--param", "directions=default-dplase",
                                                       "--param", "direction_index=0", "--count", "4", "--out", "out/ttfe-dplase"]),
            ("GANSpace: train pca (nothing ships for it)", [*le, "train", "pca", "--param", "layer=block1", "--param",
                                                            "num_components=10", "--name", "pca", "--key", "ttfe-pca"]),
            ("first edit: GANSpace (pca)", [*le, "edit", "--method", "ganspace", "--param", "directions=pca", "--param", "component=0",
                                            "--count", "4", "--out", "out/ttfe-pca"]),
        ]
        for name, command in edits:
            rows.append((name, *run(command, clone, log)))
        since_ready = time.perf_counter() - ready
    finally:
        if serve is not None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=60)
        tail = log.read_text()[-3000:] if log.exists() else ""
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    lines = [
        f"A fresh clone of commit {commit} in a temporary folder; each step timed on its own, in order, on the shared 2-core "
        f"machine (other sessions' jobs running: load average {os.getloadavg()[0]:.0f}). The set-up installs packages from this "
        "machine's local wheel indexes (no network). Services on ports +{0}.".format(args.port_offset),
        "",
        "| step | seconds | exit code |",
        "|---|---|---|",
        *[f"| {name} | {seconds:.0f} | {code} |" for name, seconds, code in rows],
        "",
        f"From set-up done to the last first edit: {since_ready:.0f} s.",
        "",
        "InterFaceGAN, SGF and DP-LaSE edit from the shipped defaults (nothing trained); GANSpace has no shipped directions "
        "and trains a PCA job first; W* answers UNIMPLEMENTED. Not timed here: the test command (`bash scripts/test.sh`, the "
        "whole suite, ~11 min on 2 idle cores) and the demo as one command (`bash scripts/demo.sh` = this set-up + serve + "
        "the InterFaceGAN and SGF edits).",
    ]
    body = "\n".join(lines)
    print(body)
    if any(code for _, _, code in rows):
        print(tail)
    record("Time to first edit (fresh clone)", "python bench/time_to_first_edit.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
