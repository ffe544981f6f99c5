"""Generator throughput: images/s through gRPC vs in-process, per backend, encoding and batch.

    .venv/bin/python bench/generator.py [--seconds 1.5] [--batches 1 64 256]
    .venv/bin/python bench/generator.py --model stylegan2-faces --space w+ --batches 1 64

Both sides take latents of `--space` (Z by default; W and W+ for StyleGAN2) and map them to
the model's input the same way (`LoadedGenerator.to_input`, as the service does).

Both sides do the same work per call (run the backend, convert to uint8, encode raw or PNG
into the response message); the gRPC side adds the transport, (de)serialisation and the
service's batcher. The server is one `latentedit serve generator` process; the in-process
side is this one process; both use the same thread settings. The ratio column is
gRPC / in-process images/s, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import rate, record, served  # noqa: E402
from generator_svc.backends import BACKEND_NAMES  # noqa: E402
from generator_svc.pool import GeneratorPool  # noqa: E402
from latentedit import wire  # noqa: E402
from latentedit.api.v1 import generator_pb2_grpc, types_pb2  # noqa: E402
from latentedit.config import GeneratorConfig, load_config  # noqa: E402
from latentedit.latents import Latents  # noqa: E402
from latentedit.models.generator import IMAGE_LAYER, INPUT_LAYER  # noqa: E402
from latentedit.repository import ModelRepository  # noqa: E402
from latentedit.rpc.client import connect, synthesize_request  # noqa: E402

ENCODINGS = {"raw": types_pb2.IMAGE_ENCODING_RAW_UINT8, "png": types_pb2.IMAGE_ENCODING_PNG}


def measure(args: argparse.Namespace, device: str, fp16: bool, backends: list[int]) -> list[tuple]:
    repository = load_config(ROOT / "config" / "local.yaml").repository
    pool = GeneratorPool(ModelRepository(repository), GeneratorConfig(device=device, cuda_fp16=fp16))
    loaded = pool.get(args.model)
    space = loaded.spec.space(args.space)
    model_ref = types_pb2.ModelRef(name=args.model)
    rows = []
    sections = {"generator": {"device": device, "cuda_fp16": fp16, "max_queue_rows": 100000}}
    with served(["generator"], repository, sections) as addresses:
        stub = generator_pb2_grpc.GeneratorServiceStub(connect(addresses["generator"]))
        for kind in backends:
            backend = loaded.backends[kind]
            for enc_name, encoding in ENCODINGS.items():
                for batch in args.batches:
                    latents = Latents(space, loaded.sample(space, batch, seed=batch))
                    request = synthesize_request(model_ref, latents.values, encoding, kind, space.space)

                    def in_process() -> int:
                        floats = backend.run(loaded.to_input(latents), INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER]
                        wire.encode_images(wire.float_to_uint8_images(floats), encoding)
                        return batch

                    def through_grpc() -> int:
                        response = stub.Synthesize(request, timeout=120)
                        assert response.backend == kind
                        return batch

                    # Interleaved rounds (each side warmed by rate's first call): load from other
                    # work hits both sides alike, and the per-round ratios show the spread.
                    local_rates, remote_rates = [], []
                    for _ in range(args.rounds):
                        local_rates.append(rate(in_process, args.seconds))
                        remote_rates.append(rate(through_grpc, args.seconds))
                    ratios = [r / loc for loc, r in zip(local_rates, remote_rates)]
                    label = BACKEND_NAMES[kind] + (f" ({device}{' fp16' if fp16 and device == 'cuda' else ''})")
                    local, remote, ratio = median(local_rates), median(remote_rates), median(ratios)
                    rows.append((label, enc_name, batch, local, remote, ratio, min(ratios), max(ratios)))
                    print(f"{label:28s} {enc_name:4s} batch {batch:4d}: in-process {local:9.1f} img/s, "
                          f"gRPC {remote:9.1f} img/s, ratio {ratio:.2f} ({min(ratios):.2f}-{max(ratios):.2f})", flush=True)
        rows_concurrent = concurrent_callers(stub, args.seconds, model_ref, Latents(space, loaded.sample(space, 1, seed=0)))
    pool.close()
    return rows, rows_concurrent


def concurrent_callers(stub, seconds: float, model_ref, latents: Latents) -> list[tuple[int, float]]:
    """Batch-1 callers in parallel threads: the service batches their rows together."""
    import threading
    import time

    request = synthesize_request(model_ref, latents.values, backend=types_pb2.BACKEND_ONNXRUNTIME, space=latents.space.space)
    results = []
    for callers in (1, 4, 16):
        counts = [0] * callers
        stop = time.perf_counter() + seconds

        def loop(i: int) -> None:
            while time.perf_counter() < stop:
                stub.Synthesize(request, timeout=60)
                counts[i] += 1

        start = time.perf_counter()
        threads = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results.append((callers, sum(counts) / (time.perf_counter() - start)))
        print(f"{callers:3d} concurrent batch-1 callers (onnxruntime, raw): {results[-1][1]:8.1f} img/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.5, help="minimum timing window per cell")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved in-process / gRPC rounds per cell")
    parser.add_argument("--model", default="", help="generator name (default: the repository's default, dcgan-faces)")
    parser.add_argument("--space", default="z", help="latent space the latents are sent in: z, w or w+")
    parser.add_argument("--no-record", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    os.chdir(ROOT)
    rows, concurrent = measure(args, "cpu", False, [types_pb2.BACKEND_TORCH, types_pb2.BACKEND_ONNXRUNTIME])
    if torch.cuda.is_available():
        rows += measure(args, "cuda", False, [types_pb2.BACKEND_TORCH])[0]
        rows += measure(args, "cuda", True, [types_pb2.BACKEND_TORCH])[0]
    table = [f"{args.rounds} interleaved rounds of at least {args.seconds} s per side and cell; img/s are medians, the "
             "ratio is the median (min-max) of the per-round gRPC / in-process ratios.", "",
             "| backend | encoding | batch | in-process img/s | gRPC img/s | gRPC / in-process |", "|---|---|---|---|---|---|"]
    table += [f"| {b} | {e} | {n} | {loc:.1f} | {r:.1f} | {ratio:.2f} ({lo:.2f}-{hi:.2f}) |"
              for b, e, n, loc, r, ratio, lo, hi in rows]
    table += ["", "Concurrent batch-1 callers through gRPC (onnxruntime, raw); the service's batcher merges their rows:", "",
              "| callers | img/s | vs 1 caller |", "|---|---|---|"]
    table += [f"| {n} | {r:.1f} | {r / concurrent[0][1]:.2f} |" for n, r in concurrent]
    if not torch.cuda.is_available():
        table.append("\nNo GPU on this machine: the CUDA rows (torch fp32/fp16) are added when the script runs on one.")
    if not args.no_record:
        section = "Generator throughput" if not args.model else f"Generator throughput: {args.model}, {args.space.upper()} latents"
        record(section, " ".join(["python bench/generator.py", *sys.argv[1:]]), "\n".join(table))
        print("recorded in bench/RESULTS.md")


if __name__ == "__main__":
    main()
