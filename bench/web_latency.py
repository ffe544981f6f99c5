"""First frame on screen after a slider move in the web editor (issue 15), in Debian's chromium.

Starts `latentedit serve` (four services + the web gateway, plaintext on loopback) on a hard-linked
copy of the model repository, trains a yaw boundary through the gateway's job API, then moves the
page's yaw slider `--moves` times (alternately to -3 and +3, 10 frames each, scored with pose). The
page measures from the slider's change event to the first frame decoded and painted
(`requestAnimationFrame` after `img.decode()`), and to the stream's end. For comparison the same
edit straight through the editor's gRPC API (first frame received, PNG, pose scores). Also shows
the browser test's own measurement (out/web/first_frame.json, security on) when present.

    python bench/web_latency.py [--moves 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, free_port, record  # noqa: E402


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _stats(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ms (min {min(values):.0f}, max {max(values):.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moves", type=int, default=10)
    parser.add_argument("--repository", default=str(ROOT / "model-repo"))
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, types_pb2
    from latentedit.install import link_or_copy
    from latentedit.rpc.client import connect, wait_serving

    work = Path(tempfile.mkdtemp(prefix="web-latency-"))
    repo = work / "repo"
    shutil.copytree(args.repository, repo, ignore=shutil.ignore_patterns(".cache", ".jobs"), copy_function=link_or_copy)
    ports = {n: free_port() for n in ("generator", "scorer", "trainer", "editor")}
    web = free_port()
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({"repository": str(repo), "services": {n: {"port": p} for n, p in ports.items()},
                                      "web": {"host": "127.0.0.1", "port": web}, "security": {"insecure": True}}))
    env = {k: v for k, v in os.environ.items() if k != "LATENTEDIT_REPOSITORY"}
    process = subprocess.Popen([sys.executable, "-m", "latentedit", "--config", str(config), "serve"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{web}"
    try:
        for name, port in ports.items():
            wait_serving(connect(f"localhost:{port}"), timeout_s=300, what=name)
        job = _post(base + "/api/jobs", {"idempotency_key": "bench-yaw", "boundary": {
            "attribute": {"head": "pose", "output": "yaw"}, "num_samples": 600, "keep_fraction": 0.2,
            "options": {"artifact_name": "yaw"}}})
        with urllib.request.urlopen(f"{base}/api/jobs/{job['id']}/watch", timeout=600) as stream:
            stream.read()

        editor = editor_pb2_grpc.EditorServiceStub(connect(f"localhost:{ports['editor']}"))
        grpc_first, grpc_total = [], []
        for i in range(args.moves + 1):
            request = editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=20, count=1), num_frames=10, score_heads=["pose"],
                                             image_encoding=types_pb2.IMAGE_ENCODING_PNG,
                                             interfacegan=editor_pb2.InterFaceGANEdit(boundary="yaw", end_distance=-3 if i % 2 else 3))
            start = time.perf_counter()
            first = None
            for _frame in editor.Edit(request, timeout=120):
                first = first or (time.perf_counter() - start) * 1000
            if i:  # the first is a warm-up
                grpc_first.append(first)
                grpc_total.append((time.perf_counter() - start) * 1000)

        chromium = os.environ.get("LATENTEDIT_CHROMIUM", "/usr/bin/chromium")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(base + "/")
            page.locator("input[data-artifact=yaw]").wait_for()
            page.fill("#seed", "20")
            page.dispatch_event("#seed", "change")
            page.wait_for_function("window.latentedit.metrics.edits.some(e => e.what === 'seed 20' && e.total_ms)")
            for i in range(args.moves):
                before = page.evaluate("window.latentedit.metrics.edits.length")
                page.locator("input[data-artifact=yaw]").evaluate(
                    "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change')); }",
                    -3 if i % 2 == 0 else 3)
                page.wait_for_function("(n) => window.latentedit.metrics.edits.length > n && window.latentedit.metrics.edits.at(-1).total_ms",
                                       arg=before, timeout=120_000)
            edits = page.evaluate("window.latentedit.metrics.edits")[-args.moves:]
            browser.close()
    finally:
        process.terminate()
        process.wait(60)
        shutil.rmtree(work, ignore_errors=True)

    first = [e["first_frame_ms"] for e in edits]
    total = [e["total_ms"] for e in edits]
    frames = {e["frames"] for e in edits}
    load = os.getloadavg()
    lines = [
        f"{args.moves} slider moves on the yaw boundary (600 samples), seed 20, alternately to -3 and +3, "
        f"{'/'.join(map(str, sorted(frames)))} frames each, scored with pose, each move starting from the page's current "
        f"latents (gRPC: from the seed); plaintext on loopback; "
        f"load average at the end {load[0]:.1f} (the machine is shared: figures are upper bounds).",
        "",
        "| path | first frame | whole edit (10 frames) |",
        "|---|---|---|",
        f"| browser: slider change -> first frame painted (gateway + SSE + decode) | {_stats(first)} | {_stats(total)} |",
        f"| gRPC: Edit call -> first frame received (PNG, pose scores) | {_stats(grpc_first)} | {_stats(grpc_total)} |",
    ]
    measured = ROOT / "out" / "web" / "first_frame.json"
    if measured.exists():
        m = json.loads(measured.read_text())
        lines += ["", f"The browser test (`tests/test_web.py`, security on: HTTPS to the page, mutual TLS and tokens "
                      f"behind it, the suite under test load): first frame {m['first_frame_ms']:.0f} ms, "
                      f"{m['frames']} frames in {m['total_ms']:.0f} ms (one move; not asserted)."]
    record("Web editor: first frame on screen", "python bench/web_latency.py", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
