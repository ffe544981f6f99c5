"""Dynamic batching: requests from concurrent callers run together as one batch.

A worker thread takes the first waiting request, then keeps collecting until the batch holds
`max_batch_size` rows or `max_queue_delay` has passed since that first request, runs the
batch once and hands every caller its own rows.

Admission looks at the queued work and the caller's deadline, so an overloaded service says so
at once instead of computing for callers that have given up:
- the queue is bounded in rows: a request that would overflow it is refused at once
  (ResourceExhausted) instead of growing latency unbounded;
- a request whose deadline is shorter than the estimated time to compute the work already ahead
  of it (rows queued and running, at the rows/s measured on recent batches) is refused at once
  (ResourceExhausted), not queued to time out; before the first batch there is no estimate and
  only the row bound applies;
- a request cancelled while it waits (caller gone) leaves the queue at once, and one whose
  deadline passes before the worker reaches it is dropped (DeadlineExceeded) when the worker
  takes it: neither is computed or holds room that a live request could use.
Every batcher reports to the Prometheus metrics labelled by its `kind` (see observability.py).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import numpy as np

from latentedit import observability as obs
from latentedit.config import GeneratorConfig, ScorerConfig
from latentedit.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

BatchFn = Callable[[np.ndarray], dict[str, np.ndarray]]
# Weight of the newest batch in the rows/s estimate used for admission.
RATE_SMOOTHING = 0.3


@dataclass(eq=False)  # identity: a cancelled request is removed from the queue by identity
class _Pending:
    rows: np.ndarray
    deadline: float | None = None  # the batcher's clock() by which the caller needs its answer
    future: Future = field(default_factory=Future)


@dataclass
class BatcherStats:
    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    # Rows of requests cancelled (caller gone, deadline passed) before the backend saw them.
    dropped_rows: int = 0
    # Of those, rows whose deadline had passed when the worker reached them.
    expired_rows: int = 0
    # Requests refused at admission: the queue was full, or the work ahead outlasted their deadline.
    refused_requests: int = 0


# Live batchers (their worker threads run), for the queue-depth and batcher-count gauges.
_LIVE: weakref.WeakSet[DynamicBatcher] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _live_by_kind() -> dict[str, list[DynamicBatcher]]:
    with _LIVE_LOCK:
        live = list(_LIVE)
    kinds: dict[str, list[DynamicBatcher]] = {}
    for batcher in live:
        kinds.setdefault(batcher.kind, []).append(batcher)
    return kinds


obs.register_gauge_callback(
    "latentedit_batcher_queue_rows",
    "Rows waiting in the batchers' queues (not counting the batches being computed), by batcher kind.",
    lambda: {(kind,): float(sum(b.queued_rows for b in batchers)) for kind, batchers in _live_by_kind().items()},
    labels=("batcher",),
)
obs.register_gauge_callback(
    "latentedit_batchers",
    "Batchers alive (one worker thread each), by batcher kind.",
    lambda: {(kind,): float(len(batchers)) for kind, batchers in _live_by_kind().items()},
    labels=("batcher",),
)


class DynamicBatcher:
    @classmethod
    def from_config(cls, run_batch: BatchFn, config: GeneratorConfig | ScorerConfig, name: str, kind: str) -> DynamicBatcher:
        """A batcher with a service's batching settings (size, delay, row bound, queue-wait bound)."""
        return cls(run_batch, max_batch_size=config.max_batch_size, max_queue_delay_s=config.max_queue_delay_ms / 1000.0,
                   max_queue_rows=config.max_queue_rows, name=name, kind=kind, max_queue_wait_s=config.max_queue_wait_s)

    def __init__(
        self,
        run_batch: BatchFn,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_rows: int,
        name: str = "batcher",
        kind: str = "batcher",
        clock: Callable[[], float] = time.monotonic,
        max_queue_wait_s: float | None = None,
    ) -> None:
        """`name` names the worker thread; `kind` labels its metrics (a few values: "generator", "scorer");
        `clock` (seconds) measures deadlines and batch times; `max_queue_wait_s` (None: no bound but
        the caller's deadline) refuses any request with more estimated work ahead of it than that."""
        self._clock = clock
        self.max_queue_wait_s = max_queue_wait_s
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_rows = max_queue_rows
        self.kind = kind
        self.stats = BatcherStats()
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._running_rows = 0  # rows of the batch being computed
        self._rows_per_s: float | None = None  # measured on recent batches; None before the first
        self._cond = threading.Condition()
        self._closed = False
        self._metrics = obs.batcher_metrics(kind)
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._worker.start()

    @property
    def queued_rows(self) -> int:
        """Rows waiting for the worker (not counting the batch it is running)."""
        with self._cond:
            return self._queued_rows

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch running."""
        with self._cond:
            return not self._queue and self._running_rows == 0

    def expected_wait_s(self) -> float | None:
        """Estimated seconds to compute the work now queued and running; None before any batch ran."""
        with self._cond:
            return self._expected_wait_locked()

    def _expected_wait_locked(self) -> float | None:
        if self._rows_per_s is None:
            return None
        return (self._queued_rows + self._running_rows) / self._rows_per_s

    def submit(self, rows: np.ndarray, timeout_s: float | None = None) -> Future:
        """Queue `rows` (first axis = batch); the future resolves to this request's outputs.

        `timeout_s`: the seconds the caller will wait (its remaining deadline). The request is
        refused at once when the work ahead of it is estimated to take longer, and dropped
        unrun (DeadlineExceeded) if the worker reaches it only after that time.
        """
        with self._cond:
            if self._closed:
                raise Unavailable("the model is being unloaded or the service is shutting down; retry")
            if self._queued_rows + len(rows) > self.max_queue_rows:
                self._refuse("queue_full")
                raise ResourceExhausted(
                    f"queue full: {self._queued_rows} rows waiting, limit {self.max_queue_rows}; retry with backoff"
                )
            if timeout_s is not None and timeout_s <= 0:
                self._refuse("deadline")
                raise DeadlineExceeded("the deadline had passed before the request was queued")
            wait = self._expected_wait_locked()
            if wait is not None:
                ahead = f"busy: {self._queued_rows + self._running_rows} rows are ahead of this request, about {wait:.1f} s of work"
                if timeout_s is not None and wait > timeout_s:
                    self._refuse("deadline")
                    raise ResourceExhausted(f"{ahead}, longer than the {timeout_s:.1f} s left before its deadline; retry with backoff")
                if self.max_queue_wait_s is not None and wait > self.max_queue_wait_s:
                    self._refuse("queue_wait")
                    raise ResourceExhausted(f"{ahead}, more than the queue's limit of {self.max_queue_wait_s:g} s; retry with backoff")
            deadline = None if timeout_s is None else self._clock() + timeout_s
            pending = _Pending(rows, deadline)
            self._queue.append(pending)
            self._queued_rows += len(rows)
            self._cond.notify()
        pending.future.add_done_callback(lambda future: self._forget(pending) if future.cancelled() else None)
        return pending.future

    def _refuse(self, reason: str) -> None:
        self.stats.refused_requests += 1
        self._metrics.refused(reason)

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
        future = self.submit(rows, timeout_s)
        if on_abandon is not None:
            on_abandon(future.cancel)
        return result_within(future, timeout_s)

    def close(self, wait: bool = True) -> None:
        """Refuse new requests; the worker computes what is already queued, then ends.

        `wait`: block (up to 5 s) until it has ended. Without waiting, an idle batcher's worker
        ends at once and a busy one's as soon as its queue is empty (LRU eviction uses this, so
        the calls in flight on an evicted batcher are answered)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait:
            self.join(5)

    def join(self, timeout_s: float) -> bool:
        """Wait for a closed batcher's worker to end; False if `timeout_s` passed first."""
        self._worker.join(timeout_s)
        return not self._worker.is_alive()

    def _forget(self, pending: _Pending) -> None:
        """Drop a cancelled request that is still queued (the worker skips one it already took)."""
        with self._cond:
            try:
                self._queue.remove(pending)
            except ValueError:
                return
            self._queued_rows -= len(pending.rows)
            self.stats.dropped_rows += len(pending.rows)
        self._metrics.dropped("cancelled", len(pending.rows))

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
            now = self._clock()
            while self._queue:
                nxt = self._queue[0]
                # A request larger than max_batch_size runs alone rather than being split.
                if batch and rows + len(nxt.rows) > self.max_batch_size:
                    break
                self._queue.popleft()
                self._queued_rows -= len(nxt.rows)
                if not nxt.future.set_running_or_notify_cancel():
                    self.stats.dropped_rows += len(nxt.rows)
                    self._metrics.dropped("cancelled", len(nxt.rows))
                elif nxt.deadline is not None and nxt.deadline <= now:
                    # Its caller has stopped waiting (or is about to): computing it helps nobody.
                    nxt.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
                    self.stats.dropped_rows += len(nxt.rows)
                    self.stats.expired_rows += len(nxt.rows)
                    self._metrics.dropped("expired", len(nxt.rows))
                else:
                    batch.append(nxt)
                    rows += len(nxt.rows)
            self._running_rows = rows
            return batch

    def _batch_done(self, rows: int, seconds: float) -> None:
        with self._cond:
            self._running_rows = 0
            if rows and seconds > 0:
                rate = rows / seconds
                old = self._rows_per_s
                self._rows_per_s = rate if old is None else (1 - RATE_SMOOTHING) * old + RATE_SMOOTHING * rate

    def _loop(self) -> None:
        try:
            while True:
                batch = self._take_batch()
                if not batch:
                    if self._closed:
                        return
                    continue
                self._run(batch)
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def _run(self, batch: list[_Pending]) -> None:
        started = self._clock()
        try:
            inputs = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
            outputs = self._run_batch(inputs)
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about it
            self._batch_done(0, 0.0)
            for pending in batch:
                pending.future.set_exception(exc)
            return
        seconds = self._clock() - started
        self._batch_done(len(inputs), seconds)
        self._metrics.batch(len(inputs), seconds)
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
