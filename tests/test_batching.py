"""Dynamic batcher: concurrent requests share a batch; the queue is bounded."""

import threading

import numpy as np
import pytest

from latentedit.batching import DynamicBatcher
from latentedit.errors import DeadlineExceeded, ResourceExhausted


def test_concurrent_requests_are_batched_and_answered_with_their_own_rows():
    calls = []

    def double(rows):
        calls.append(len(rows))
        return {"y": rows * 2}

    # The batch runs as soon as it holds all 8 callers' 32 rows; the long delay only bounds a
    # caller that never arrives, so batching does not depend on how fast the threads start.
    batcher = DynamicBatcher(double, max_batch_size=32, max_queue_delay_s=30, max_queue_rows=1000)
    results, errors = {}, []

    def call(i):
        try:
            results[i] = batcher.run(np.full((4, 1), i, np.float32), timeout_s=60)["y"]
        except Exception as exc:  # noqa: BLE001 - asserted in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    batcher.close()
    assert not errors and not any(t.is_alive() for t in threads), errors
    for i in range(8):
        np.testing.assert_array_equal(results[i], np.full((4, 1), 2 * i))
    assert calls == [32], f"the 8 callers' rows did not run as one batch: {calls}"


def test_batches_never_exceed_the_limit_except_single_large_requests():
    calls = []
    gate = threading.Event()

    def record(rows):
        gate.wait(5)
        calls.append(len(rows))
        return {"y": rows}

    batcher = DynamicBatcher(record, max_batch_size=10, max_queue_delay_s=0.05, max_queue_rows=1000)
    futures = [batcher.submit(np.zeros((n, 1))) for n in (3, 3, 3, 3, 25)]
    gate.set()
    for f in futures:
        f.result(5)
    batcher.close()
    assert sum(calls) == 37 and 25 in calls
    assert all(c <= 10 for c in calls if c != 25)


def _held_backend():
    """A batch function that signals when it is entered and runs only once released."""
    entered, release = threading.Event(), threading.Event()

    def run(rows):
        entered.set()
        if not release.wait(30):  # reaches the waiters through their futures
            raise TimeoutError("the test never released the batch")
        return {"y": rows}

    return run, entered, release


def test_full_queue_is_refused_not_grown():
    run, entered, release = _held_backend()
    batcher = DynamicBatcher(run, max_batch_size=4, max_queue_delay_s=0, max_queue_rows=8)
    first = batcher.submit(np.zeros((4, 1)))
    assert entered.wait(10), "the worker never took the first batch"
    waiting = batcher.submit(np.zeros((8, 1)))  # fills the queue exactly
    with pytest.raises(ResourceExhausted, match="queue full: 8 rows waiting, limit 8"):
        batcher.submit(np.zeros((1, 1)))
    release.set()
    assert len(first.result(10)["y"]) == 4 and len(waiting.result(10)["y"]) == 8
    batcher.close()


def test_a_cancelled_request_frees_its_queue_room_at_once():
    run, entered, release = _held_backend()
    seen = []

    def record(rows):
        seen.append(len(rows))
        return run(rows)

    batcher = DynamicBatcher(record, max_batch_size=8, max_queue_delay_s=0, max_queue_rows=8)
    first = batcher.submit(np.zeros((1, 1)))
    assert entered.wait(10), "the worker never took the first batch"
    abandoned = batcher.submit(np.zeros((8, 1)))
    assert batcher.queued_rows == 8
    abandoned.cancel()
    assert batcher.queued_rows == 0, "a cancelled request still holds queue room"
    assert batcher.stats.dropped_rows == 8
    replacement = batcher.submit(np.zeros((5, 1)))  # refused if the dead request still held the room
    release.set()
    assert len(first.result(10)["y"]) == 1 and len(replacement.result(10)["y"]) == 5
    batcher.close()
    assert seen == [1, 5], f"the cancelled request reached the backend: batches {seen}"


def test_errors_reach_every_caller_in_the_batch():
    def fail(rows):
        raise ValueError("backend broke")

    batcher = DynamicBatcher(fail, max_batch_size=8, max_queue_delay_s=0.05, max_queue_rows=100)
    futures = [batcher.submit(np.zeros((2, 1))) for _ in range(3)]
    for f in futures:
        with pytest.raises(ValueError, match="backend broke"):
            f.result(5)
    batcher.close()


def test_deadline_is_reported():
    gate = threading.Event()
    batcher = DynamicBatcher(lambda r: (gate.wait(5), {"y": r})[1], max_batch_size=4, max_queue_delay_s=0, max_queue_rows=100)
    with pytest.raises(DeadlineExceeded):
        batcher.run(np.zeros((1, 1)), timeout_s=0.1)
    gate.set()
    batcher.close()


def test_an_abandoned_request_is_dropped_before_it_runs():
    run, entered, release = _held_backend()
    seen = []

    def record(rows):
        seen.append(rows[:, 0].tolist())
        return run(rows)

    batcher = DynamicBatcher(record, max_batch_size=1, max_queue_delay_s=0, max_queue_rows=100)
    blocker = batcher.submit(np.zeros((1, 1)))  # occupies the worker
    assert entered.wait(10), "the worker never took the first batch"
    callbacks = []
    registered = threading.Event()
    caller_error = []

    def on_abandon(callback):  # what gRPC's context.add_callback does: keep it for the RPC's end
        callbacks.append(callback)
        registered.set()

    def call():
        try:
            batcher.run(np.ones((1, 1)), timeout_s=30, on_abandon=on_abandon)
        except Exception as exc:  # noqa: BLE001 - asserted in the main thread
            caller_error.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert registered.wait(10), "run() never registered its abandon callback"
    callbacks[0]()  # the RPC ended: gRPC runs the registered callback
    caller.join(10)
    release.set()
    blocker.result(10)
    batcher.close()
    assert not caller.is_alive(), "the abandoned caller was not released"
    assert seen == [[0.0]], "the abandoned request must not reach the backend"
    assert [type(e).__name__ for e in caller_error] == ["Cancelled"]


class FakeClock:
    """A clock the test moves: deadlines and batch times without waiting on wall-clock time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def _timed_backend(clock: FakeClock, rows_per_s: float):
    """Computes `y = rows` taking len(rows) / rows_per_s seconds of the fake clock; held until released."""
    run, entered, release = _held_backend()
    seen = []

    def compute(rows):
        seen.append(len(rows))
        out = run(rows)
        clock.advance(len(rows) / rows_per_s)
        return out

    return compute, entered, release, seen


def test_a_request_whose_deadline_passes_while_queued_is_dropped_unrun():
    clock = FakeClock()
    compute, entered, release, seen = _timed_backend(clock, rows_per_s=1000)
    batcher = DynamicBatcher(compute, max_batch_size=64, max_queue_delay_s=0, max_queue_rows=100, clock=clock)
    first = batcher.submit(np.zeros((1, 1)), timeout_s=60)
    assert entered.wait(10), "the worker never took the first batch"
    # Nobody waits on these futures (as in a SynthesizeStream's read-ahead): only the worker can drop them.
    short = batcher.submit(np.ones((5, 1)), timeout_s=2)
    long = batcher.submit(np.full((3, 1), 2.0), timeout_s=60)
    clock.advance(3)  # the short deadline passes while both wait behind the running batch
    release.set()
    with pytest.raises(DeadlineExceeded, match="deadline passed while the request was queued"):
        short.result(10)
    assert len(long.result(10)["y"]) == 3 and len(first.result(10)["y"]) == 1
    batcher.close()
    assert seen == [1, 3], f"the expired request's 5 rows reached the backend: batches {seen}"
    assert batcher.stats.expired_rows == 5 and batcher.stats.dropped_rows == 5


def test_admission_refuses_at_once_when_the_work_ahead_outlasts_the_deadline():
    clock = FakeClock()
    compute, entered, release, seen = _timed_backend(clock, rows_per_s=10)
    batcher = DynamicBatcher(compute, max_batch_size=10, max_queue_delay_s=0, max_queue_rows=1000, clock=clock)
    # Before any batch has run there is no estimate: only the row bound applies.
    assert batcher.expected_wait_s() is None
    warm = batcher.submit(np.zeros((10, 1)), timeout_s=0.5)
    release.set()
    warm.result(10)
    assert batcher.expected_wait_s() == 0  # measured: 10 rows/s, nothing queued
    release.clear()
    entered.clear()
    running = batcher.submit(np.zeros((10, 1)), timeout_s=60)
    assert entered.wait(10), "the worker never took the batch"
    queued = [batcher.submit(np.zeros((10, 1)), timeout_s=60) for _ in range(2)]
    # 30 rows ahead (10 running, 20 queued) at 10 rows/s: about 3 s of work.
    assert batcher.expected_wait_s() == pytest.approx(3.0)
    with pytest.raises(ResourceExhausted, match=r"30 rows are ahead of this request, about 3\.0 s of work, longer than the 2\.0 s"):
        batcher.submit(np.zeros((1, 1)), timeout_s=2)
    with pytest.raises(DeadlineExceeded, match="deadline had passed before the request was queued"):
        batcher.submit(np.zeros((1, 1)), timeout_s=0)
    patient = batcher.submit(np.zeros((1, 1)), timeout_s=10)  # 3 s of work ahead fits in 10 s: admitted
    assert batcher.stats.refused_requests == 2
    release.set()
    for future in (running, *queued, patient):
        future.result(10)
    batcher.close()
    assert seen == [10, 10, 10, 10, 1], f"a refused request reached the backend: batches {seen}"


def test_queue_full_refusals_are_counted():
    run, entered, release = _held_backend()
    batcher = DynamicBatcher(run, max_batch_size=4, max_queue_delay_s=0, max_queue_rows=4)
    first = batcher.submit(np.zeros((4, 1)))
    assert entered.wait(10), "the worker never took the first batch"
    queued = batcher.submit(np.zeros((4, 1)))
    for _ in range(3):
        with pytest.raises(ResourceExhausted, match="queue full"):
            batcher.submit(np.zeros((1, 1)), timeout_s=60)
    assert batcher.stats.refused_requests == 3
    release.set()
    first.result(10)
    queued.result(10)
    batcher.close()


def test_a_queue_wait_bound_refuses_whatever_the_deadline():
    clock = FakeClock()
    compute, entered, release, seen = _timed_backend(clock, rows_per_s=10)
    batcher = DynamicBatcher(compute, max_batch_size=10, max_queue_delay_s=0, max_queue_rows=1000, clock=clock,
                             max_queue_wait_s=2.2)
    release.set()
    batcher.submit(np.zeros((10, 1))).result(10)  # measures 10 rows/s
    release.clear()
    entered.clear()
    running = batcher.submit(np.zeros((10, 1)))
    assert entered.wait(10), "the worker never took the batch"
    queued = batcher.submit(np.zeros((10, 1)), timeout_s=600)  # 1 s of work ahead: within 2.2 s
    admitted = batcher.submit(np.zeros((5, 1)))  # 2 s ahead, no deadline: admitted
    with pytest.raises(ResourceExhausted, match=r"25 rows are ahead of this request, about 2\.5 s of work, more than the queue's limit of 2\.2 s"):
        batcher.submit(np.zeros((1, 1)))
    assert batcher.stats.refused_requests == 1
    with pytest.raises(ResourceExhausted, match=r"more than the queue's limit of 2\.2 s"):
        batcher.submit(np.zeros((1, 1)), timeout_s=600)  # a long deadline does not lift the bound
    release.set()
    for future in (running, queued, admitted):
        future.result(10)
    batcher.close()
    assert seen == [10, 10, 10, 5], seen
