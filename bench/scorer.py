"""Scorer throughput: images/s per head and for all heads, through gRPC vs in-process.

    .venv/bin/python bench/scorer.py [--batch 64] [--seconds 2]
    .venv/bin/python bench/scorer.py --identity [--identity-batches 1 16 64] [--reps 5] [--threads 2]

The same 64 px DCGAN faces go through `Scorer.score` in this process and through one
`latentedit serve scorer` process (raw uint8 images); a head's figure includes the heads it
depends on (the caption needs pose, expression and age/gender). Ratio = gRPC / in-process.

--identity: the identity head before (dlib's compute_face_descriptor, as the head called it
until the torch port) and after (the torch port, one batch), in this process, on the same
faces and the same keypoints68 landmarks (computed once, outside the timing): per batch size
one warm-up call of each, then `--reps` repetitions alternating the order (A B, B A, ...);
img/s as median with min-max over repetitions and the per-repetition ratio. Torch is pinned
to `--threads` intra-op threads (as the scorer service pins config scorer.threads) and also
measured on 1 thread; dlib's Python build here has no BLAS and runs its network on one thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import rate, record, served  # noqa: E402
from latentedit import wire  # noqa: E402
from latentedit.api.v1 import scorer_pb2, scorer_pb2_grpc  # noqa: E402
from latentedit.config import load_config  # noqa: E402
from latentedit.models.generator import sample_latents  # noqa: E402
from latentedit.models.registry import load_generator  # noqa: E402
from latentedit.repository import ModelRepository  # noqa: E402
from latentedit.rpc.client import connect, score_request  # noqa: E402
from latentedit.scoring.scorer import Scorer  # noqa: E402


def identity_before_after(repo: ModelRepository, images: np.ndarray, batches: list[int], reps: int, threads: int) -> str:
    """The identity head's img/s with dlib (before) and the torch port (after); a Markdown table."""
    import dlib

    from latentedit.scoring.base import FACE_BOX, FACE_SIZE, Batch, HeadResult
    from latentedit.scoring.heads import IdentityHead, landmarks68, network_for_entry

    predictor = dlib.shape_predictor(str(repo.resolve("dlib-landmarks68").file("weights")))
    entry = repo.resolve("dlib-face-descriptor")
    recognizer = dlib.face_recognition_model_v1(str(entry.file("weights")))
    head = IdentityHead(repo.resolve("identity"), {"descriptor": network_for_entry(entry)})
    rect = dlib.rectangle(*FACE_BOX)

    def dlib_head(batch: Batch, points: np.ndarray) -> np.ndarray:
        # The head's code before the port (commit 137d907), unchanged.
        faces = batch.resized(FACE_SIZE)
        shapes = [
            dlib.full_object_detections([dlib.full_object_detection(rect, [dlib.point(int(round(x)), int(round(y))) for x, y in face])])
            for face in points
        ]
        descriptors = recognizer.compute_face_descriptor([np.ascontiguousarray(f) for f in faces], shapes)
        return np.array([np.array(d[0]) for d in descriptors], np.float32)

    rows = []
    for size in batches:
        chosen = images[np.arange(size) % len(images)]
        batch = Batch(chosen)
        faces = batch.resized(FACE_SIZE)
        started = time.perf_counter()
        points = landmarks68(predictor, faces)
        landmark_rate = size / (time.perf_counter() - started)
        inputs = {"keypoints68": HeadResult({"points": batch.to_caller_pixels(points, FACE_SIZE)})}
        square = points  # the 160 px frame: what the old head fed dlib after to_square * FACE_SIZE

        def run_dlib() -> np.ndarray:
            return dlib_head(batch, square)

        def run_torch(n: int):
            def call() -> np.ndarray:
                torch.set_num_threads(n)
                return head.compute(batch, inputs).outputs["embedding"]
            return call

        variants = {"dlib": run_dlib, "torch, 1 thread": run_torch(1), f"torch, {threads} threads": run_torch(threads)}
        timings: dict[str, list[float]] = {name: [] for name in variants}
        outputs = {name: fn() for name, fn in variants.items()}  # warm-up (and the agreement check)
        order = list(variants)
        for rep in range(reps):
            for name in order if rep % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                variants[name]()
                timings[name].append(size / (time.perf_counter() - started))
        reference = outputs["dlib"]
        for name in variants:
            value = np.array(timings[name])
            ratio = value / np.array(timings["dlib"])
            distance = float(np.linalg.norm(outputs[name] - reference, axis=1).max())
            rows.append(f"| {size} | {name} | {np.median(value):.1f} ({value.min():.1f}-{value.max():.1f}) | "
                        f"{np.median(ratio):.1f}x ({ratio.min():.1f}-{ratio.max():.1f}) | {distance:.4f} | {landmark_rate:.0f} |")
            print(rows[-1], flush=True)
    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    return "\n".join([
        f"Identity head alone (its keypoints68 input computed beforehand), 64 px DCGAN faces (seed 1), {reps} interleaved "
        "repetitions after one warm-up per variant; img/s median (min-max); ratio = torch / dlib per repetition. "
        f"dlib's build here has no BLAS and runs on one thread, so the 1-thread torch row compares like with like. "
        f"Load average at the end of the run: {load:.1f} on {os.cpu_count()} cores; where the load exceeds the cores, "
        "several torch threads wait on each other and the multi-thread row says more about the neighbours than the port.",
        "",
        "| batch | variant | img/s | vs dlib | max distance to dlib | keypoints68 img/s (for scale) |",
        "|---|---|---|---|---|---|",
        *rows,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--identity", action="store_true", help="only the identity head, dlib vs the torch port")
    parser.add_argument("--identity-batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0: config scorer.threads, else 2")
    args = parser.parse_args()
    os.chdir(ROOT)
    config = load_config(ROOT / "config" / "local.yaml")
    repository = config.repository
    repo = ModelRepository(repository)
    generator = load_generator(repo.resolve("dcgan-faces"))
    z = sample_latents(generator.spec.latent_spaces[0], args.batch, seed=1)
    with torch.no_grad():
        images = wire.float_to_uint8_images(generator(torch.from_numpy(z)).numpy())
    if args.identity:
        threads = args.threads or config.scorer.threads or 2
        torch.set_num_threads(threads)
        table = identity_before_after(repo, images, args.identity_batches, args.reps, threads)
        if not args.no_record:
            record("Identity head: dlib vs the torch port", " ".join(["python bench/scorer.py", *sys.argv[1:]]), table)
            print("recorded in bench/RESULTS.md")
        return

    scorer = Scorer(repo)
    heads = scorer.refresh()
    rows = []
    with served(["scorer"], repository) as addresses:
        stub = scorer_pb2_grpc.ScorerServiceStub(connect(addresses["scorer"]))
        for head in [*heads, "all heads"]:
            chosen = heads if head == "all heads" else [head]
            local = rate(lambda: (scorer.score(images, chosen), len(images))[1], args.seconds, min_calls=1)
            request = score_request(images, chosen)
            remote = rate(lambda: (stub.Score(request, timeout=600), len(images))[1], args.seconds, min_calls=1)
            rows.append((head, local, remote))
            print(f"{head:12s} in-process {local:8.1f} img/s   gRPC {remote:8.1f} img/s   ratio {remote / local:.2f}", flush=True)
        text = ["a smiling young woman facing left, mouth open"] * 64
        local = rate(lambda: (scorer.text_embedder().embed(text), 64)[1], args.seconds)
        embed_request = scorer_pb2.EmbedTextRequest(texts=text)
        remote = rate(lambda: (stub.EmbedText(embed_request, timeout=60), 64)[1], args.seconds)
        rows.append(("EmbedText (sentences/s)", local, remote))
        print(f"EmbedText    in-process {local:8.1f} /s      gRPC {remote:8.1f} /s      ratio {remote / local:.2f}")
    table = [f"Batch of {args.batch} 64 px faces per call; raw uint8 over gRPC.", "",
             "| head | in-process img/s | gRPC img/s | gRPC / in-process |", "|---|---|---|---|"]
    table += [f"| {h} | {l:.1f} | {r:.1f} | {r / l:.2f} |" for h, l, r in rows]
    if not args.no_record:
        record("Scorer throughput", " ".join(["python bench/scorer.py", *sys.argv[1:]]), "\n".join(table))
        print("recorded in bench/RESULTS.md")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
