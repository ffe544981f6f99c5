"""Dynamic batching: requests from concurrent callers run together as one batch.

A worker thread takes the first waiting request, then keeps collecting until the batch holds
`max_batch_size` rows or `max_queue_delay` has passed since that first request, runs the
batch once and hands every caller its own rows. The queue is bounded in rows: a request that
would overflow it is refused at once (ResourceExhausted) instead of growing latency unbounded.
A request cancelled while it waits leaves the queue at once: it is never computed and holds no
room that a live request could use.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import numpy as np

from latentedit.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

BatchFn = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass(eq=False)  # identity: a cancelled request is removed from the queue by identity
class _Pending:
    rows: np.ndarray
    future: Future = field(default_factory=Future)


@dataclass
class BatcherStats:
    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    # Rows of requests cancelled (caller gone, deadline passed) before the backend saw them.
    dropped_rows: int = 0


class DynamicBatcher:
    def __init__(
        self,
        run_batch: BatchFn,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_rows: int,
        name: str = "batcher",
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_rows = max_queue_rows
        self.stats = BatcherStats()
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    @property
    def queued_rows(self) -> int:
        """Rows waiting for the worker (not counting the batch it is running)."""
        with self._cond:
            return self._queued_rows

    def submit(self, rows: np.ndarray) -> Future:
        """Queue `rows` (first axis = batch); the future resolves to this request's outputs."""
        with self._cond:
            if self._closed:
                raise Unavailable("the model is being unloaded or the service is shutting down; retry")
            if self._queued_rows + len(rows) > self.max_queue_rows:
                raise ResourceExhausted(
                    f"queue full: {self._queued_rows} rows waiting, limit {self.max_queue_rows}; retry with backoff"
                )
            pending = _Pending(rows)
            self._queue.append(pending)
            self._queued_rows += len(rows)
            self._cond.notify()
        pending.future.add_done_callback(lambda future: self._forget(pending) if future.cancelled() else None)
        return pending.future

    def run(
        self,
        rows: np.ndarray,
        timeout_s: float | None = None,
        on_abandon: Callable[[Callable[[], object]], object] | None = None,
    ) -> dict[str, np.ndarray]:
        """Submit and wait; raises DeadlineExceeded when `timeout_s` passes first.

        `on_abandon` registers a callback for when the caller goes away (gRPC's
        `context.add_callback`): a request still queued then is dropped, not computed.
        """
        future = self.submit(rows)
        if on_abandon is not None:
            on_abandon(future.cancel)
        return result_within(future, timeout_s)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=5)

    def _forget(self, pending: _Pending) -> None:
        """Drop a cancelled request that is still queued (the worker skips one it already took)."""
        with self._cond:
            try:
                self._queue.remove(pending)
            except ValueError:
                return
            self._queued_rows -= len(pending.rows)
            self.stats.dropped_rows += len(pending.rows)

    def _take_batch(self) -> list[_Pending]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return []
            deadline = time.monotonic() + self.max_queue_delay_s
            while self._queued_rows < self.max_batch_size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[_Pending] = []
            rows = 0
            while self._queue:
                nxt = self._queue[0]
                # A request larger than max_batch_size runs alone rather than being split.
                if batch and rows + len(nxt.rows) > self.max_batch_size:
                    break
                self._queue.popleft()
                self._queued_rows -= len(nxt.rows)
                if nxt.future.set_running_or_notify_cancel():
                    batch.append(nxt)
                    rows += len(nxt.rows)
                else:
                    self.stats.dropped_rows += len(nxt.rows)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                if self._closed:
                    return
                continue
            try:
                inputs = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
                outputs = self._run_batch(inputs)
            except BaseException as exc:  # noqa: BLE001 - every waiter must hear about it
                for pending in batch:
                    pending.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.rows += len(inputs)
            self.stats.largest_batch = max(self.stats.largest_batch, len(inputs))
            start = 0
            for pending in batch:
                stop = start + len(pending.rows)
                pending.future.set_result({k: v[start:stop] for k, v in outputs.items()})
                start = stop


def result_within(future: Future, timeout_s: float | None) -> dict[str, np.ndarray]:
    """A submitted request's outputs; DeadlineExceeded (and the request dropped) when `timeout_s` passes first."""
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout as exc:
        future.cancel()  # leaves the queue if the worker has not taken it yet
        raise DeadlineExceeded(f"no result within the deadline ({timeout_s:.3f} s left when queued)") from exc
    except CancelledError as exc:
        raise Cancelled("the caller cancelled the request") from exc
