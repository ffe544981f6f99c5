"""Scorer throughput: images/s per head and for all heads, through gRPC vs in-process.

    .venv/bin/python bench/scorer.py [--batch 64] [--seconds 2]

The same 64 px DCGAN faces go through `Scorer.score` in this process and through one
`latentedit serve scorer` process (raw uint8 images); a head's figure includes the heads it
depends on (the caption needs pose, expression and age/gender). Ratio = gRPC / in-process.
"""

from __future__ import annotations

import argparse
import os
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    os.chdir(ROOT)
    repository = load_config(ROOT / "config" / "local.yaml").repository
    repo = ModelRepository(repository)
    generator = load_generator(repo.resolve("dcgan-faces"))
    z = sample_latents(generator.spec.latent_spaces[0], args.batch, seed=1)
    with torch.no_grad():
        images = wire.float_to_uint8_images(generator(torch.from_numpy(z)).numpy())

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
