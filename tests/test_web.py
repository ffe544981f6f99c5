"""The web editor in a real browser: Debian's chromium driven by Playwright, against the main command
(`latentedit serve`: four services and the web gateway, each its own process) with security on
(mutual TLS between the processes, HTTPS to the page, bearer tokens).

One service set-up and one browser serve the whole file. The page is used as a person would: the
token typed once, a yaw boundary trained from the page's train panel, a slider moved, a caption
typed, an image uploaded. Screenshots go to out/web/ (test artifacts; README links the ones copied
to docs/web/), with the first-frame time of the slider edit (out/web/first_frame.json)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from latentedit.api.v1 import trainer_pb2, trainer_pb2_grpc
from latentedit.rpc.client import connect, wait_serving
from latentedit.rpc.security import make_certs
from tests.conftest import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "web"
# A seed whose head-pose (yaw) score moves monotonically along the boundary the test trains: the
# pose estimate on 64 px DCGAN faces is noisy, so not every seed's 10-frame trajectory is monotone
# (8 of 50 seed-direction pairs were; seed 20 is monotone toward both ends, steps of 2 degrees or more).
TEST_SEED = 20
SLIDER_TO = -3.0
EDIT_ONLY_TOKEN = "edit-only-token-0123456789abcdef"
SHIPPED_CAPTION_MAPPING = "default-sgf-caption"  # scripts/train_defaults.py; used instead of training one when installed


def _browser_path() -> str | None:
    for path in (os.environ.get("LATENTEDIT_CHROMIUM", ""), "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if path and os.access(path, os.X_OK):
            return path
    return None


@pytest.fixture(scope="module")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api")
    path = _browser_path()
    if path is None:
        message = "Debian's chromium is not installed: bash scripts/setup_browser.sh"
        if os.environ.get("LATENTEDIT_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"], headless=True)
        yield browser
        browser.close()


def _https_get(url: str, context: ssl.SSLContext) -> bytes:
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return response.read()


@pytest.fixture(scope="module")
def suite(tmp_path_factory, installed_repo):
    """`latentedit serve` with security on: yields (page URL, certs dir, admin token, process)."""
    from latentedit.install import link_or_copy

    base = tmp_path_factory.mktemp("web")
    repo = base / "repo"
    shutil.copytree(installed_repo.root, repo, ignore=shutil.ignore_patterns(".cache", ".jobs"), copy_function=link_or_copy)
    certs = base / "certs"
    paths = make_certs(certs)
    with open(paths["tokens.txt"], "a") as f:
        f.write(f"viewer edit {EDIT_ONLY_TOKEN}\n")  # may edit, may not train
    ports = {name: free_port() for name in ("generator", "scorer", "trainer", "editor")}
    web_port = free_port()
    config = {
        "repository": str(repo),
        "services": {name: {"port": port, "grace_period_s": 5} for name, port in ports.items()},
        "generator": {"poll_interval_s": 1},
        "trainer": {"workers": 2},  # the caption mapping trains beside the page's jobs
        "web": {"host": "127.0.0.1", "port": web_port},
        "security": {"cert_file": str(certs / "server.crt"), "key_file": str(certs / "server.key"),
                     "ca_file": str(certs / "ca.crt"), "require_client_cert": True,
                     "client_cert_file": str(certs / "client.crt"), "client_key_file": str(certs / "client.key"),
                     "tokens_file": str(certs / "tokens.txt"), "service_token_file": str(certs / "service.token")},
    }
    config_path = base / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("LATENTEDIT_REPOSITORY", "LATENTEDIT_INSECURE", "LATENTEDIT_TOKEN", "LATENTEDIT_SERVICE_TOKEN"):
        env.pop(name, None)
    log_path = base / "serve.log"
    log_file = open(log_path, "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "latentedit", "--config", str(config_path), "serve"], cwd=ROOT, env=env,
                               stdout=log_file, stderr=subprocess.STDOUT)
    admin = paths["admin.token"].read_text().strip()
    tls = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    try:
        deadline = time.monotonic() + 240
        for name, port in ports.items():
            channel = connect(f"localhost:{port}", ca_file=str(certs / "ca.crt"), cert_file=str(certs / "client.crt"),
                              key_file=str(certs / "client.key"))
            while True:
                assert process.poll() is None, f"serve exited: {log_path.read_text()[-3000:]}"
                try:
                    wait_serving(channel, timeout_s=3, what=name)
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    assert time.monotonic() < deadline, f"{name} never reported SERVING: {log_path.read_text()[-3000:]}"
            channel.close()
        url = f"https://localhost:{web_port}/"
        while True:
            try:
                assert json.loads(_https_get(url + "healthz", tls))["status"] == "SERVING"
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, f"no web gateway: {log_path.read_text()[-3000:]}"
                time.sleep(0.3)
        yield {"url": url, "certs": certs, "admin": admin, "process": process, "ports": ports, "log": log_path, "repo": repo}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        log_file.close()


@pytest.fixture(scope="module")
def caption_mapping(suite):
    """A caption mapping: the shipped default when the repository has one, else a small one trained
    through the trainer while the page tests run (it only has to stream: SGF's caption quality is
    tests/test_sgf_service.py's business). Yields (thread to join, result with the job, mapping name)."""
    from latentedit.artifacts import MAPPING_KIND
    from latentedit.repository import ModelRepository

    shipped = [e.name for e in ModelRepository(suite["repo"]).entries(MAPPING_KIND) if e.name == SHIPPED_CAPTION_MAPPING]
    if shipped:
        done = threading.Thread(target=lambda: None)
        done.start()
        yield done, {"job": None}, shipped[0]
        return
    certs = suite["certs"]
    channel = connect(f"localhost:{suite['ports']['trainer']}", token=suite["admin"], ca_file=str(certs / "ca.crt"),
                      cert_file=str(certs / "client.crt"), key_file=str(certs / "client.key"))
    trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
    spec = trainer_pb2.MappingJobSpec(condition=trainer_pb2.CONDITION_KIND_CAPTION, num_pairs=100, depth=3, hidden_dim=32,
                                      options=trainer_pb2.TrainingOptions(artifact_name="caption-small", steps=100, batch_size=50))
    job = trainer.StartJob(trainer_pb2.StartJobRequest(idempotency_key="web-caption", mapping=spec), timeout=60)
    result: dict = {}

    def watch():
        try:
            result["job"] = list(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=600))[-1].job
        except Exception as exc:  # noqa: BLE001 - reported by the test that joins
            result["error"] = exc

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    yield thread, result, "caption-small"
    channel.close()


def _open(chromium, suite, token: str | None = "admin"):
    """A fresh tab session on the page; with `token`, typed once into the token box."""
    context = chromium.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(suite["url"])
    if token:
        page.locator("#token-box").wait_for(state="visible")
        page.fill("#token", suite["admin"] if token == "admin" else token)
        page.click("#token-save")
    return context, page, errors


def _move(page, selector: str, value: float) -> None:
    """What a person's drag does to a range input: input events, then change on release."""
    page.locator(selector).evaluate(
        "(e, v) => { e.value = v; e.dispatchEvent(new Event('input', {bubbles: true})); e.dispatchEvent(new Event('change', {bubbles: true})); }",
        value)


def _wait_for_edit(page, before: int) -> None:
    """Until the edit after the first `before` has ended (its stream closed, with or without an error)."""
    page.wait_for_function("(n) => window.latentedit.metrics.edits.length > n && window.latentedit.metrics.edits.at(-1).total_ms",
                           arg=before, timeout=120_000)


def _strip_scores(page) -> list[dict]:
    return page.eval_on_selector_all("#strip .thumb", "ts => ts.map(t => JSON.parse(t.dataset.scores))")


def _shot(page, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def yaw_page(chromium, suite, caption_mapping):
    """One tab that trained the yaw boundary from the page's train panel (shared by the tests below)."""
    context, page, errors = _open(chromium, suite)
    page.locator("body[data-catalog=loaded]").wait_for()
    page.click("#train-panel summary")
    page.select_option("#train-kind", "boundary")
    page.fill("#train-name", "yaw")
    page.select_option("#train-attribute", "pose.yaw")
    page.fill("#train-samples", "600")
    page.fill("#train-keep", "0.2")
    page.click("#train-start")
    # Progress while it runs (phase, percent), then the new slider appears without a reload.
    page.wait_for_function("document.getElementById('train-progress').value > 0", timeout=120_000)
    page.locator("#train-state[data-state=succeeded]").wait_for(timeout=180_000)
    page.locator("input[data-artifact=yaw]").wait_for()
    yield context, page, errors
    context.close()


def test_the_token_is_asked_once_and_kept_in_session_storage(chromium, suite, caption_mapping):
    context, page, errors = _open(chromium, suite, token=None)
    # No token: a readable message and the token box, not a blank page.
    page.locator("#error").wait_for(state="visible")
    assert "enter your bearer token" in page.inner_text("#error-text")
    page.fill("#token", "not-a-valid-token-0000000000")
    page.click("#token-save")
    page.locator("#error-text").filter(has_text="UNAUTHENTICATED").wait_for()
    page.fill("#token", suite["admin"])
    page.click("#token-save")
    page.locator("body[data-catalog=loaded]").wait_for()
    assert page.is_hidden("#error")
    assert page.evaluate("sessionStorage.getItem('latentedit.token')") == suite["admin"]
    assert page.evaluate("localStorage.length") == 0 and context.cookies() == []
    # The same tab after a reload: no prompt, the catalog loads with the kept token.
    page.reload()
    page.locator("body[data-catalog=loaded]").wait_for()
    assert page.inner_text("#token-state") in ("token accepted", "token kept for this tab")
    assert page.is_hidden("#error")
    _shot(page, "token")
    context.close()
    # Another tab session starts without it.
    context, page, _ = _open(chromium, suite, token=None)
    page.locator("#error-text").filter(has_text="enter your bearer token").wait_for()
    context.close()
    assert not errors


def test_a_yaw_slider_streams_frames_with_live_scores(yaw_page):
    context, page, errors = yaw_page
    page.fill("#seed", str(TEST_SEED))
    page.dispatch_event("#seed", "change")
    page.wait_for_function("(seed) => window.latentedit.metrics.edits.some(e => e.what === 'seed ' + seed && e.total_ms)",
                           arg=TEST_SEED)
    page.fill("#frames", "10")
    before = len(page.evaluate("window.latentedit.metrics.edits"))
    _move(page, "input[data-artifact=yaw]", SLIDER_TO)
    _wait_for_edit(page, before)
    timing = page.evaluate("window.latentedit.metrics.edits.at(-1)")
    scores = _strip_scores(page)
    assert timing["frames"] >= 8 and len(scores) == timing["frames"], (timing, scores)
    yaw = np.array([s["pose.yaw"] for s in scores])
    steps = np.diff(yaw)
    assert (steps < 0).all(), f"yaw along the boundary toward {SLIDER_TO}: {yaw.round(1)}"  # the slider went negative
    # The score beside the image is the last frame's.
    assert float(page.inner_text("#scores tr[data-attribute='pose.yaw'] td.value")) == pytest.approx(yaw[-1], abs=1e-3)
    assert "completed" in page.inner_text("#frame-info")
    assert page.locator("#frame").get_attribute("src").startswith("data:image/png;base64,")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "first_frame.json").write_text(json.dumps({"first_frame_ms": timing["first_frame_ms"], "total_ms": timing["total_ms"],
                                                      "frames": timing["frames"], "seed": TEST_SEED, "yaw": yaw.round(2).tolist()}))
    _shot(page, "yaw-slider")

    # Downloads: the trajectory as a GIF (every frame) and its latents.
    with page.expect_download() as download:
        page.click("#download-gif")
    gif = Image.open(download.value.path())
    assert gif.format == "GIF" and gif.n_frames == len(scores)
    with page.expect_download() as download:
        page.click("#download-latents")
    latents = json.loads(Path(download.value.path()).read_text())
    assert len(latents["frames"]) == len(scores) and np.array(latents["frames"][0]["values"]).shape == (1, 100)
    assert not errors


def test_a_caption_streams_an_sgf_edit(yaw_page, caption_mapping):
    context, page, errors = yaw_page
    thread, result, mapping = caption_mapping
    thread.join(600)
    assert "error" not in result, result.get("error")
    assert result["job"] is None or result["job"].state == trainer_pb2.JOB_STATE_SUCCEEDED, result["job"].error
    page.select_option("#generator", "dcgan-faces")
    page.dispatch_event("#generator", "change")  # the catalog again: lists a mapping trained meanwhile
    page.locator("body[data-catalog=loaded]").wait_for()
    page.wait_for_function("window.latentedit.metrics.edits.at(-1).total_ms")  # the new catalog's preview of the seed
    page.locator(f"#sgf-mapping option[value='{mapping}']").wait_for(state="attached")
    page.select_option("#sgf-mapping", mapping)
    page.fill("#sgf-caption", "a smiling young woman facing left")
    page.fill("#sgf-steps", "6")
    before = len(page.evaluate("window.latentedit.metrics.edits"))
    page.click("#sgf-run")
    _wait_for_edit(page, before)
    timing = page.evaluate("window.latentedit.metrics.edits.at(-1)")
    assert timing["what"] == f"SGF {mapping}" and timing["frames"] >= 1, timing
    assert page.is_hidden("#error"), page.inner_text("#error-text")
    info = page.inner_text("#frame-info")
    assert "target reached" in info or "step limit" in info, info
    # The caption head's sentence for the frame is shown beside it.
    assert page.inner_text("#scores tr[data-attribute='caption.caption'] td.value").startswith("a ")
    _shot(page, "sgf-caption")
    assert not errors


def test_dragged_keypoints_are_the_sgf_target(yaw_page):
    """A keypoint mapping's targets: the frame's own points drawn on the image, one dragged 40 px to
    the right; the SGF edit starts that far from its target (undragged points would be 0 away)."""
    context, page, errors = yaw_page
    if not page.locator("#sgf-mapping option[value=default-sgf-keypoints]").count():
        pytest.skip("needs the shipped default-sgf-keypoints mapping (latentedit models install)")
    page.select_option("#sgf-mapping", "default-sgf-keypoints")
    targets = page.locator("#overlay circle:not(.source)")
    targets.first.wait_for()
    assert targets.count() == 5  # keypoints5
    before_drag = page.evaluate("window.latentedit.state.keypoints.target.map(p => p.slice())")
    page.locator("#viewer").scroll_into_view_if_needed()  # the SGF panel's controls may have scrolled it away
    box = targets.first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 40, y, steps=5)
    page.mouse.up()
    after_drag = page.evaluate("window.latentedit.state.keypoints.target")
    assert after_drag[0][0] == pytest.approx(before_drag[0][0] + 40 * 64 / 320, abs=0.5)  # 320 px on screen = 64 px image
    assert after_drag[1:] == before_drag[1:]
    page.fill("#sgf-steps", "4")
    before = len(page.evaluate("window.latentedit.metrics.edits"))
    page.click("#sgf-run")
    _wait_for_edit(page, before)
    assert page.is_hidden("#error"), page.inner_text("#error-text")
    metrics = page.evaluate("window.latentedit.state.frames.map(f => f.metrics)")
    assert metrics and metrics[0]["distance_to_target"] > 0.1, metrics
    _shot(page, "sgf-keypoints")
    assert not errors


def test_bad_input_shows_the_service_message_and_the_page_goes_on(yaw_page, chromium, suite):
    context, page, errors = yaw_page
    page.fill("#frames", "999")
    _move(page, "input[data-artifact=yaw]", 1.0)
    page.locator("#error").wait_for(state="visible")
    assert page.inner_text("#error-text") == "INVALID_ARGUMENT: num_frames 999 must be in 1..256"
    _shot(page, "bad-input")
    page.fill("#frames", "8")
    _move(page, "input[data-artifact=yaw]", 2.0)
    page.wait_for_function("document.querySelectorAll('#strip .thumb').length === 8")
    assert page.is_hidden("#error")
    assert not errors

    # The user's own scopes apply behind the gateway: an edit-only token may edit, not train.
    viewer, viewer_page, viewer_errors = _open(chromium, suite, token=EDIT_ONLY_TOKEN)
    viewer_page.locator("body[data-catalog=loaded]").wait_for()
    viewer_page.click("#train-panel summary")
    viewer_page.click("#train-start")
    viewer_page.locator("#error-text").filter(has_text="PERMISSION_DENIED").wait_for()
    assert "train" in viewer_page.inner_text("#error-text")
    viewer.close()
    assert not viewer_errors


def test_holding_yaw_fixed_keeps_the_edit_off_the_yaw_normal(yaw_page):
    """Conditional editing from the page: with the trained yaw boundary ticked under "hold fixed", a
    smile edit moves along the smile normal with yaw's projected out, so every frame keeps its
    distance to the yaw boundary (the editor reports it per frame)."""
    context, page, errors = yaw_page
    if not page.locator("input[data-artifact=default-smile]").count():
        pytest.skip("needs the shipped default-smile boundary (latentedit models install)")
    page.fill("#frames", "6")
    page.check("#conditions input[value=yaw]")
    before = len(page.evaluate("window.latentedit.metrics.edits"))
    _move(page, "input[data-artifact=default-smile]", 3.0)
    _wait_for_edit(page, before)
    assert page.is_hidden("#error"), page.inner_text("#error-text")
    metrics = page.evaluate("window.latentedit.state.frames.map(f => f.metrics)")
    assert len(metrics) == 6 and all("condition_distance/yaw" in m for m in metrics), metrics
    held = [m["condition_distance/yaw"] for m in metrics]
    moved = [m["distance"] for m in metrics]
    assert max(held) - min(held) < 0.01 * (max(moved) - min(moved)), (held, moved)
    page.uncheck("#conditions input[value=yaw]")
    assert not errors


def test_a_job_started_from_the_page_can_be_cancelled(yaw_page):
    context, page, errors = yaw_page
    page.select_option("#train-kind", "boundary")
    page.fill("#train-name", "big-yaw")
    page.fill("#train-samples", "200000")
    page.click("#train-start")
    page.locator("#train-state").filter(has_text="running").wait_for(timeout=60_000)
    page.click("#train-cancel")
    page.locator("#train-state[data-state=cancelled]").wait_for(timeout=60_000)
    assert "cancelled" in page.inner_text("#train-state")
    assert not errors


def test_an_uploaded_image_is_inverted_with_progress(yaw_page, tmp_path):
    context, page, errors = yaw_page
    # A face the generator made (the shown frame), uploaded as a file.
    import base64

    data = page.locator("#frame").get_attribute("src").split(",", 1)[1]
    face = tmp_path / "face.png"
    face.write_bytes(base64.b64decode(data))
    page.click("#invert-panel summary")
    page.set_input_files("#invert-file", str(face))
    page.fill("#invert-steps", "40")
    page.click("#invert-run")
    page.locator("#invert-state").filter(has_text="done").wait_for(timeout=120_000)
    assert page.evaluate("document.getElementById('invert-progress').value") == 1
    assert "step 40 of 40" in page.inner_text("#invert-state")
    # Edits now start from the inverted latents.
    assert page.evaluate("window.latentedit.state.current.wire.space") == "LATENT_SPACE_Z"
    _shot(page, "invert")
    assert not errors
