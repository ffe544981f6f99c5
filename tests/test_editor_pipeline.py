"""The pipelined editor (issue 16): frames of a trajectory known ahead are rendered in chunks, one
synthesized while the previous one is scored. These tests check behaviour, never speed:
- the frames are those of the plain per-frame loop, in order, bit for bit (in-process and through
  the services);
- a cancelled edit stops the generator's and the scorer's work within one chunk (their batchers'
  row counts against the frames the editor had sent);
- concurrent edits whose rows share the generator's and scorer's batches get their own frames.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import numpy as np
import pytest

from latentedit import wire
from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, scorer_pb2_grpc
from latentedit.errors import NotFound
from latentedit.latents import move
from latentedit.methods.base import COMPLETED, FrameRequest, path_frames
from latentedit.rpc.serving import ServiceHost, channel_options
from tests.conftest import make_config

WAIT_S = 60.0
BOUNDARY = "pipeline-axis0"
CHUNK_ROWS = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ---- in-process: path_frames against the plain loop ---------------------------------------------


def _assert_same_frames(expected, got, what):
    assert [f.index for f in got] == [f.index for f in expected], f"{what}: frames out of order or missing"
    for a, b in zip(expected, got):
        assert np.array_equal(a.latents.values, b.latents.values), f"{what}: frame {a.index} has other latents"
        assert (a.images is None) == (b.images is None) and (a.images is None or np.array_equal(a.images, b.images)), (
            f"{what}: frame {a.index} has other images")
        assert a.scores.keys() == b.scores.keys()
        for head in a.scores:
            for output in a.scores[head]:
                assert np.array_equal(a.scores[head][output], b.scores[head][output]), (
                    f"{what}: frame {a.index} {head}.{output} differs from the plain loop's")
        assert a.metrics == b.metrics and a.stop == b.stop, f"{what}: frame {a.index} metrics / stop differ"


def test_pipelined_frames_are_the_plain_loops_in_order(installed_repo):
    from latentedit.world import LocalWorld

    world = LocalWorld(installed_repo)
    generator = world.generator()
    start = world.sample(generator, 3, 11)
    direction = np.zeros(generator.space().size, np.float32)
    direction[0] = 1
    distances = np.linspace(-2, 2, 9)

    def path():
        for d in distances:
            yield move(start, direction, d), {"distance": float(d)}

    plain = list(path_frames(world, generator, path(), FrameRequest(("pose",), chunk_rows=0), len(distances)))
    assert [f.stop for f in plain] == [""] * 8 + [COMPLETED]
    # 3 seeds: chunks of 1, 2 and 3 frames after the first (uneven last chunks included).
    for chunk_rows, images in ((3, True), (6, False), (1000, True)):
        frames = FrameRequest(("pose",), images=images, chunk_rows=chunk_rows)
        got = list(path_frames(world, generator, path(), frames, len(distances)))
        expected = plain if images else [type(f)(f.index, f.latents, None, f.scores, f.metrics, f.stop) for f in plain]
        _assert_same_frames(expected, got, f"chunk_rows {chunk_rows}, images {images}")


# ---- through the services --------------------------------------------------------------------------


class Suite:
    """Generator, scorer (a servicer of its own, to read its batchers) and two editors in this
    process: one pipelined (chunk_rows CHUNK_ROWS), one with the plain per-frame loop."""

    def __init__(self, repo, scorer, **generator_settings) -> None:
        from editor_svc.server import build as build_editor
        from generator_svc.server import build as build_generator
        from latentedit.methods.interfacegan import Boundary, boundary_artifact
        from latentedit.world import LocalWorld
        from scorer_svc.server import SERVICE_NAME
        from scorer_svc.service import ScorerServicer

        config = make_config(repo, **generator_settings)
        config.scorer.max_queue_delay_ms = generator_settings.get("max_queue_delay_ms", 0.0)
        self.hosts: list[ServiceHost] = []
        generator_host, self.pool = build_generator(config)
        self.hosts.append(generator_host)
        config.services["generator"].port = generator_host.port
        scorer_host = ServiceHost(config.services["scorer"])
        self.scorer = ScorerServicer(scorer, config.scorer)
        scorer_host.add(scorer_pb2_grpc.add_ScorerServiceServicer_to_server, self.scorer, SERVICE_NAME)
        scorer_host.on_shutdown(self.scorer.close)
        scorer_host.start()
        scorer_host.set_serving(True)
        self.hosts.append(scorer_host)
        config.services["scorer"].port = scorer_host.port
        self.editors = {}
        self.editor_hosts = {}
        for chunk_rows in (CHUNK_ROWS, 0):
            config.editor = dataclasses.replace(config.editor, chunk_rows=chunk_rows)  # each editor its own
            host, _ = build_editor(config)
            self.hosts.append(host)
            self.editor_hosts[chunk_rows] = host
            channel = grpc.insecure_channel(f"localhost:{host.port}", options=channel_options())
            self.editors[chunk_rows] = editor_pb2_grpc.EditorServiceStub(channel)
        normal = np.zeros(100, np.float32)
        normal[0] = 1
        generator = LocalWorld(repo).generator("dcgan-faces")
        try:
            repo.resolve(BOUNDARY)
        except NotFound:  # the first suite of the session writes it
            boundary_artifact(BOUNDARY, Boundary(normal, 0.0), generator, "z", {"head": "", "output": "axis0"}).save(repo, {})

    def generator_rows(self) -> int:
        return sum(b.stats.rows for b in self.pool.get("dcgan-faces")._batchers.values())

    def generator_largest_batch(self) -> int:
        return max((b.stats.largest_batch for b in self.pool.get("dcgan-faces")._batchers.values()), default=0)

    def stop(self) -> None:
        for host in reversed(self.hosts):
            host.stop(0)


@pytest.fixture(scope="module")
def suite(installed_repo, scorer_server):
    suite = Suite(installed_repo, scorer_server[1])
    yield suite
    suite.stop()


def _request(count=4, frames=9, seed=3, heads=("pose",), omit_images=False, start=-2.0, end=2.0):
    return editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=seed, count=count), num_frames=frames, score_heads=list(heads),
                                  omit_images=omit_images, interfacegan=editor_pb2.InterFaceGANEdit(
                                      boundary=BOUNDARY, start_distance=start, end_distance=end))


def _same_messages(expected, got, what):
    assert [f.index for f in got] == list(range(len(expected))), f"{what}: frames {[f.index for f in got]} out of order"
    for a, b in zip(expected, got):
        assert a.latents == b.latents, f"{what}: frame {a.index} has other latents"
        assert a.images == b.images, f"{what}: frame {a.index} has other images"
        assert a.scores == b.scores, f"{what}: frame {a.index} has other scores"
        assert a.metrics == b.metrics and a.stop_reason == b.stop_reason, f"{what}: frame {a.index} metrics / stop differ"


def test_the_pipelined_editor_streams_the_sequential_editors_frames(suite):
    for count in (1, 4, 7):  # 16, 4 and 2 frames per chunk
        request = _request(count=count, frames=11)
        sequential = list(suite.editors[0].Edit(request, timeout=WAIT_S))
        pipelined = list(suite.editors[CHUNK_ROWS].Edit(request, timeout=WAIT_S))
        assert len(sequential) == 11 and sequential[-1].stop_reason == editor_pb2.STOP_REASON_COMPLETED
        _same_messages(sequential, pipelined, f"{count} seeds")


def _stream_sent() -> float:
    """Frames the editor's Edit handlers have yielded so far (its stream counter)."""
    from latentedit.observability import STREAM_MESSAGES

    return STREAM_MESSAGES.labels("editor", "latentedit.v1.EditorService/Edit", "sent")._value.get()


def test_cancelling_an_edit_stops_generator_and_scorer_work_within_one_chunk(suite):
    editor_host = suite.editor_hosts[CHUNK_ROWS]
    count, frames = 4, 256  # 4 frames a chunk; the whole edit would be 1024 rows
    frames_per_chunk = CHUNK_ROWS // count
    # The warm-up makes the scorer's batcher for (pose, 64 px) exist before the counts are taken.
    list(suite.editors[CHUNK_ROWS].Edit(_request(count=count, frames=2), timeout=WAIT_S))
    generator_before, scorer_before = suite.generator_rows(), suite.scorer.batcher_stats().rows
    sent_before = _stream_sent()
    # identity (a dlib network per face) scores far slower than the generator synthesizes: an
    # editor that synthesized ahead without bound would be many chunks ahead when cancelled.
    call = suite.editors[CHUNK_ROWS].Edit(_request(count=count, frames=frames, heads=("identity",), omit_images=True),
                                          timeout=120)
    received = [next(call) for _ in range(3 * frames_per_chunk)]
    assert [f.index for f in received] == list(range(3 * frames_per_chunk))
    call.cancel()
    for host in (editor_host, suite.hosts[0], suite.hosts[1]):
        assert host.calls.wait_idle(WAIT_S), "a service still had calls in its handlers after the edit was cancelled"
    # The batchers run in order: a call that was on its way when the handlers went idle is
    # counted once this 2-row edit is done.
    list(suite.editors[CHUNK_ROWS].Edit(_request(count=1, frames=2), timeout=WAIT_S))
    sent = _stream_sent() - sent_before - 2
    synthesized = suite.generator_rows() - generator_before - 2
    scored = suite.scorer.batcher_stats().rows - scorer_before - 2
    assert sent < frames, "the edit was not cancelled mid-trajectory"
    # Once the editor stopped taking frames, at most two chunks were in flight beyond the one it was
    # sending: one at the generator, one at the scorer. The first frame is a chunk of its own, so
    # chunk k >= 0 after it holds frames 1 + k*fpc .. (k+1)*fpc; the one being sent ends at `current_end`.
    current_end = 0 if sent == 0 else (int(sent - 1) // frames_per_chunk + 1) * frames_per_chunk
    bound = count * (current_end + 1 + 2 * frames_per_chunk)
    assert synthesized <= bound, f"the generator synthesized {synthesized} rows; the editor had sent {sent:.0f} frames " \
                                 f"({count} rows each), so at most {bound} rows were due (two chunks ahead)"
    assert scored <= bound, f"the scorer scored {scored} rows; at most {bound} were due (two chunks ahead)"
    # And nothing more comes: a new edit adds exactly its own rows.
    settled_g, settled_s = suite.generator_rows(), suite.scorer.batcher_stats().rows
    list(suite.editors[CHUNK_ROWS].Edit(_request(count=1, frames=2), timeout=WAIT_S))
    assert suite.generator_rows() - settled_g == 2 and suite.scorer.batcher_stats().rows - settled_s == 2, (
        "the generator or scorer got rows beyond the new edit's: the cancelled edit goes on")


@pytest.fixture(scope="module")
def batching_suite(installed_repo, scorer_server):
    # Batches wait up to 0.5 s for 64 rows (4 edits x 16), so concurrent edits' calls share them.
    suite = Suite(installed_repo, scorer_server[1], max_batch_size=64, max_queue_delay_ms=500.0)
    yield suite
    suite.stop()


def test_concurrent_edits_sharing_batches_get_their_own_frames(suite, batching_suite):
    requests = [_request(count=4, frames=9, seed=seed, start=-1.0 - seed / 4, end=1.0 + seed / 4) for seed in range(4)]
    # Alone, through the plain loop of the suite without a queue delay (nothing to share a batch with).
    alone = [list(suite.editors[0].Edit(r, timeout=WAIT_S)) for r in requests]
    suite = batching_suite
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(requests))

    def run(i):
        try:
            barrier.wait()
            results[i] = list(suite.editors[CHUNK_ROWS].Edit(requests[i], timeout=WAIT_S))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for i in range(len(requests)):
        _same_messages(alone[i], results[i], f"edit {i} of {len(requests)} at once")
    # The batchers merged the edits' calls: a batch larger than any one call (at most 16 rows).
    assert suite.generator_largest_batch() > CHUNK_ROWS, "no generator batch held two edits' rows"
    assert suite.scorer.batcher_stats().largest_batch > CHUNK_ROWS, "no scorer batch held two edits' rows"
    # Scores of different seeds differ: a frame of another edit would have been noticed.
    yaw = [wire.scores_from_proto(results[i][0].scores)["pose"]["yaw"] for i in range(len(requests))]
    assert len({y.tobytes() for y in yaw}) == len(requests)


# ---- closed-loop methods: the editor computes the next frame while it sends this one ---------------


def test_closed_loop_frames_are_computed_one_ahead_in_order_and_stop_with_the_caller():
    from editor_svc.service import computed_ahead

    computed: list[int] = []
    closed = threading.Event()
    handed: list[int] = []

    def steps(count, fail_at=None):
        try:
            for i in range(count):
                if i == fail_at:
                    raise ValueError(f"step {i} failed")
                computed.append(i)
                yield i
        finally:
            closed.set()

    assert list(computed_ahead(steps(6))) == list(range(6))
    computed.clear()
    closed.clear()
    # An error reaches the caller after the frames before it, in order.
    with pytest.raises(ValueError, match="step 3 failed"):
        for frame in computed_ahead(steps(6, fail_at=3)):
            handed.append(frame)
    assert handed == [0, 1, 2]
    # A caller that takes 3 frames and goes: at most one more was computed, and the method's
    # generator is closed (its finally ran).
    computed.clear()
    closed.clear()
    fourth = threading.Event()

    def watched():
        for i in steps(100):
            if i == 3:
                fourth.set()
            yield i

    frames = computed_ahead(watched())
    taken = [next(frames) for _ in range(3)]
    assert fourth.wait(WAIT_S), "the frame after the one being sent was not computed ahead"
    # One ahead, not more: given time, the worker still stops at the fourth frame (a worker that
    # ran further ahead would have computed the fifth by now).
    time.sleep(0.5)
    assert taken == [0, 1, 2] and len(computed) == 4, f"{len(computed)} frames computed for a caller that took 3"
    frames.close()
    assert closed.wait(WAIT_S), "the method's generator was not closed after the caller went"
