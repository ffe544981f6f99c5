"""ScorerService: a thin adapter from the v1 messages to `latentedit.scoring.Scorer`.

Score batches calls per (heads, image size): one batcher (and worker thread) each. At most
`max_batchers` of them live (config `scorer.max_batchers`, default MAX_BATCHERS); a new
(heads, size) unloads the least recently used, which finishes what it has queued and ends.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from latentedit import wire
from latentedit.api.v1 import scorer_pb2, scorer_pb2_grpc, types_pb2
from latentedit.batching import BatcherStats, DynamicBatcher, result_within
from latentedit.config import ScorerConfig
from latentedit.errors import InvalidArgument, ResourceExhausted
from latentedit.rpc.serving import deadline_seconds
from latentedit.scoring.base import HeadResult, check_images
from latentedit.scoring.scorer import Scorer

HEAD_KINDS = {
    "attribute": scorer_pb2.HEAD_KIND_ATTRIBUTE,
    "keypoints": scorer_pb2.HEAD_KIND_KEYPOINTS,
    "identity": scorer_pb2.HEAD_KIND_IDENTITY,
    "quality": scorer_pb2.HEAD_KIND_QUALITY,
    "caption": scorer_pb2.HEAD_KIND_CAPTION,
}
_CAPTIONS = "__captions__"
# Default bound on live batchers when the config does not set max_batchers.
MAX_BATCHERS = 16


def _flatten(results: dict[str, HeadResult]) -> dict[str, np.ndarray]:
    """Head results as one dict of batch-first arrays, so the batcher can split them by rows."""
    flat = {f"{head}/{name}": value for head, result in results.items() for name, value in result.outputs.items()}
    for head, result in results.items():
        if result.captions:
            flat[f"{head}/{_CAPTIONS}"] = np.array(result.captions, dtype=object)
    return flat


def _image_count(batch: types_pb2.ImageBatch) -> int:
    if batch.encoding == types_pb2.IMAGE_ENCODING_PNG:
        return len(batch.png)
    return int(batch.raw.shape[0]) if batch.raw.shape else 0


class ScorerServicer(scorer_pb2_grpc.ScorerServiceServicer):
    def __init__(self, scorer: Scorer, config: ScorerConfig, max_batchers: int | None = None) -> None:
        """`max_batchers`: the LRU bound (default: config `max_batchers`, else MAX_BATCHERS)."""
        self.scorer = scorer
        self.config = config
        if max_batchers is None:
            max_batchers = config.max_batchers
        self.max_batchers = max(1, max_batchers)
        self._batchers: OrderedDict[tuple, DynamicBatcher] = OrderedDict()  # least recently used first
        self._retired = BatcherStats()  # what unloaded batchers had done
        self._lock = threading.Lock()

    def ListHeads(self, request, context):
        heads = []
        for name, head in sorted(self.scorer.heads.items()):
            heads.append(
                scorer_pb2.HeadInfo(
                    name=name,
                    kind=HEAD_KINDS.get(head.kind, scorer_pb2.HEAD_KIND_UNSPECIFIED),
                    outputs=[
                        scorer_pb2.OutputSchema(
                            name=o.name, shape=list(o.shape), dtype=types_pb2.DATA_TYPE_FP32,
                            min=o.min, max=o.max, labels=list(o.labels), description=o.description,
                        )
                        for o in head.outputs
                    ],
                    model=types_pb2.ModelRef(name=head.entry.name, version=head.entry.version),
                    differentiable=head.differentiable,
                    input_size=head.input_size,
                    description=head.description,
                )
            )
        return scorer_pb2.ListHeadsResponse(heads=heads, text_embedding_dim=self.scorer.text_embedder().dim)

    def Score(self, request, context):
        names = self.scorer.check_heads(list(request.heads))
        # Counted before decoding: an over-limit batch is refused without decoding its images.
        count = _image_count(request.images)
        if count > self.config.max_request_batch:
            raise ResourceExhausted(f"images: batch of {count} is larger than the limit {self.config.max_request_batch}; split it")
        images = wire.decode_images(request.images)
        check_images(images)
        timeout_s = deadline_seconds(context)
        future = self._submit((tuple(names), images.shape[1:]), names, images, timeout_s)
        context.add_callback(future.cancel)  # the caller gone: its queued rows are dropped
        flat = result_within(future, timeout_s)
        response = scorer_pb2.ScoreResponse()
        for head in names:
            output = types_pb2.HeadOutput(head=head)
            for spec in self.scorer.heads[head].outputs:
                output.outputs.append(types_pb2.NamedTensor(name=spec.name, tensor=wire.to_tensor(flat[f"{head}/{spec.name}"].astype(np.float32))))
            if f"{head}/{_CAPTIONS}" in flat:
                output.captions.extend(str(c) for c in flat[f"{head}/{_CAPTIONS}"])
            response.heads.append(output)
        return response

    def EmbedText(self, request, context):
        texts = list(request.texts)
        if not texts:
            raise InvalidArgument(f"texts: empty; send 1 to {self.config.max_texts} texts")
        if len(texts) > self.config.max_texts:
            raise ResourceExhausted(f"texts: {len(texts)} texts, more than the limit {self.config.max_texts}; split them")
        embedder = self.scorer.text_embedder()
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument(f"texts[{i}]: empty text; give a sentence such as 'a smiling face'")
            if len(text) > self.config.max_text_chars:
                raise InvalidArgument(f"texts[{i}]: {len(text)} characters, more than the limit {self.config.max_text_chars}")
            tokens = embedder.token_count(text)
            if tokens > embedder.max_tokens:
                raise InvalidArgument(f"texts[{i}]: {tokens} tokens, more than the model's {embedder.max_tokens}; shorten it")
        return scorer_pb2.EmbedTextResponse(embeddings=wire.to_tensor(embedder.embed(texts)))

    def _submit(self, key: tuple, names: list[str], images: np.ndarray, timeout_s: float):
        """Queue `images` in the batcher of `key` (made, and the LRU one unloaded, if new)."""
        evicted: list[DynamicBatcher] = []
        with self._lock:  # lookup and submit in one step: an unloaded batcher is never handed work
            batcher = self._batchers.get(key)
            if batcher is None:
                batcher = DynamicBatcher.from_config(lambda rows: _flatten(self.scorer.score(rows, names)), self.config,
                                                     f"score-{'-'.join(names)[:40]}", "scorer")
                self._batchers[key] = batcher
                while len(self._batchers) > self.max_batchers:
                    evicted.append(self._batchers.popitem(last=False)[1])
                    _add_stats(self._retired, evicted[-1].stats)
            else:
                self._batchers.move_to_end(key)
            future = batcher.submit(images, timeout_s)
        for old in evicted:
            old.close(wait=False)  # computes what it has queued, then its thread ends
            if old.idle:
                old.join(5)
        return future

    def batcher_count(self) -> int:
        """Live (heads, image size) batchers: at most max_batchers."""
        with self._lock:
            return len(self._batchers)

    def queued_rows(self) -> int:
        """Images waiting in the live batchers' queues."""
        with self._lock:
            batchers = list(self._batchers.values())
        return sum(b.queued_rows for b in batchers)

    def batcher_stats(self) -> BatcherStats:
        """Batches and rows run so far, over every (heads, image size) batcher."""
        with self._lock:
            batchers = list(self._batchers.values())
            total = BatcherStats()
            _add_stats(total, self._retired)
        for batcher in batchers:
            _add_stats(total, batcher.stats)
        return total

    def close(self) -> None:
        with self._lock:
            batchers = list(self._batchers.values())
            self._batchers.clear()
        for batcher in batchers:
            batcher.close()


def _add_stats(total: BatcherStats, stats: BatcherStats) -> None:
    total.batches += stats.batches
    total.rows += stats.rows
    total.largest_batch = max(total.largest_batch, stats.largest_batch)
    total.dropped_rows += stats.dropped_rows
    total.expired_rows += stats.expired_rows
    total.refused_requests += stats.refused_requests
