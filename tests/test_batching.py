"""Dynamic batcher: concurrent requests share a batch; the queue is bounded."""

import threading
import time

import numpy as np
import pytest

from latentedit.batching import DynamicBatcher
from latentedit.errors import DeadlineExceeded, ResourceExhausted


def test_concurrent_requests_are_batched_and_answered_with_their_own_rows():
    calls = []

    def double(rows):
        calls.append(len(rows))
        return {"y": rows * 2}

    batcher = DynamicBatcher(double, max_batch_size=64, max_queue_delay_s=0.2, max_queue_rows=1000)
    results = {}

    def call(i):
        results[i] = batcher.run(np.full((4, 1), i, np.float32), timeout_s=10)["y"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    for i in range(8):
        np.testing.assert_array_equal(results[i], np.full((4, 1), 2 * i))
    assert sum(calls) == 32
    assert max(calls) > 4, f"no two requests shared a batch: {calls}"


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


def test_full_queue_is_refused_not_grown():
    gate = threading.Event()
    batcher = DynamicBatcher(lambda r: (gate.wait(5), {"y": r})[1], max_batch_size=4, max_queue_delay_s=0, max_queue_rows=8)
    first = batcher.submit(np.zeros((4, 1)))  # taken by the worker, blocked on the gate
    time.sleep(0.1)
    batcher.submit(np.zeros((8, 1)))
    with pytest.raises(ResourceExhausted, match="queue full"):
        batcher.submit(np.zeros((1, 1)))
    gate.set()
    first.result(5)
    batcher.close()


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
    gate = threading.Event()
    seen = []

    def record(rows):
        gate.wait(5)
        seen.append(rows[:, 0].tolist())
        return {"y": rows}

    batcher = DynamicBatcher(record, max_batch_size=1, max_queue_delay_s=0, max_queue_rows=100)
    blocker = batcher.submit(np.zeros((1, 1)))  # occupies the worker
    time.sleep(0.1)
    callbacks = []
    caller_error = []

    def call():
        try:
            batcher.run(np.ones((1, 1)), timeout_s=5, on_abandon=callbacks.append)
        except Exception as exc:  # noqa: BLE001
            caller_error.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.1)
    callbacks[0]()  # the RPC ended: gRPC runs the registered callback
    caller.join(5)
    gate.set()
    blocker.result(5)
    batcher.close()
    assert seen == [[0.0]], "the abandoned request must not reach the backend"
    assert type(caller_error[0]).__name__ == "Cancelled"
