"""InterFaceGAN (Shen et al., CVPR 2020): linear boundaries in latent space and edits along them.

The protocol of the paper's section 3 / 4.1: score many samples, keep the top and bottom few
percent as positives and negatives, split 70/30, fit a linear SVM, and use its unit normal n
as the edit direction: z' = z + alpha n. Conditional editing (section 2.2) moves along n with
the normals of the condition attributes projected out. Everything here is numpy / sklearn:
the trainer and the editor call the same functions.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from sklearn.svm import LinearSVC

from latentedit.errors import InvalidArgument


@dataclass(frozen=True)
class Boundary:
    """A hyperplane n . z + offset = 0 with unit normal n pointing to the positive side."""

    normal: np.ndarray  # [dim], unit length
    offset: float

    def distance(self, latents: np.ndarray) -> np.ndarray:
        """Signed distance of each latent [N, dim] to the hyperplane."""
        return latents.reshape(len(latents), -1) @ self.normal + self.offset


@dataclass(frozen=True)
class BoundaryFit:
    boundary: Boundary
    train_accuracy: float
    validation_accuracy: float
    num_train: int
    num_validation: int


class ExtremeKeeper:
    """Streams (score, latent) pairs and keeps only the k highest and k lowest scores.

    Memory stays O(k) however many samples pass through, which is what lets a boundary job
    score 500,000 samples.
    """

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise InvalidArgument("keep must be at least 1")
        self.keep = keep
        self._high: list[tuple[float, int, np.ndarray]] = []  # min-heap of the highest
        self._low: list[tuple[float, int, np.ndarray]] = []  # min-heap of -score: the lowest
        self._count = 0

    def add(self, scores: np.ndarray, latents: np.ndarray) -> None:
        for score, latent in zip(scores.tolist(), latents):
            self._count += 1
            item_high = (score, self._count, latent)
            item_low = (-score, self._count, latent)
            if len(self._high) < self.keep:
                heapq.heappush(self._high, item_high)
            elif score > self._high[0][0]:
                heapq.heapreplace(self._high, item_high)
            if len(self._low) < self.keep:
                heapq.heappush(self._low, item_low)
            elif -score > self._low[0][0]:
                heapq.heapreplace(self._low, item_low)

    def dataset(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(latents, labels 1/0, scores) of the kept positives then negatives."""
        high = sorted(self._high, key=lambda t: -t[0])
        low = sorted(self._low, key=lambda t: t[0])
        latents = np.stack([t[2] for t in high] + [t[2] for t in low])
        labels = np.array([1] * len(high) + [0] * len(low), np.int64)
        scores = np.array([t[0] for t in high] + [-t[0] for t in low], np.float64)
        return latents, labels, scores


def fit_boundary(
    latents: np.ndarray, labels: np.ndarray, validation_fraction: float = 0.3, svm_c: float = 1.0, seed: int = 0
) -> BoundaryFit:
    """Linear SVM on a shuffled train / validation split; returns the unit-normal boundary."""
    x = latents.reshape(len(latents), -1).astype(np.float64)
    y = np.asarray(labels).astype(np.int64)
    if len(x) != len(y):
        raise InvalidArgument(f"labels: {len(y)} labels for {len(x)} latents; give one label per latent")
    classes = set(np.unique(y).tolist())
    if classes != {0, 1}:
        raise InvalidArgument(f"labels must contain both classes 0 and 1; found {sorted(classes)}")
    if not 0.0 <= validation_fraction < 1.0:
        raise InvalidArgument(f"validation_fraction {validation_fraction} must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(len(x))
    num_val = int(round(len(x) * validation_fraction))
    val_idx, train_idx = order[:num_val], order[num_val:]
    if len(np.unique(y[train_idx])) < 2:
        raise InvalidArgument("the training split holds one class only; give more samples of each class")
    svm = LinearSVC(C=svm_c, dual="auto", max_iter=20000, random_state=seed)
    svm.fit(x[train_idx], y[train_idx])
    w, b = svm.coef_.reshape(-1), float(svm.intercept_[0])
    norm = float(np.linalg.norm(w))
    boundary = Boundary(normal=(w / norm).astype(np.float32), offset=b / norm)
    train_acc = float(svm.score(x[train_idx], y[train_idx]))
    val_acc = float(svm.score(x[val_idx], y[val_idx])) if num_val else float("nan")
    return BoundaryFit(boundary, train_acc, val_acc, len(train_idx), num_val)


def accuracy(boundary: Boundary, latents: np.ndarray, labels: np.ndarray) -> float:
    """Share of latents on the side of the boundary their label says."""
    predicted = boundary.distance(latents) > 0
    return float(np.mean(predicted == (np.asarray(labels) > 0)))


def conditioned_direction(primary: np.ndarray, conditions: list[np.ndarray]) -> np.ndarray:
    """The primary normal with the span of the condition normals projected out, unit length.

    n' = n - C (C^T C)^-1 C^T n, solved in one least-squares step (not repeated subtraction,
    which is wrong for non-orthogonal conditions).
    """
    n = primary.reshape(-1).astype(np.float64)
    if not conditions:
        return (n / np.linalg.norm(n)).astype(np.float32)
    c = np.stack([cond.reshape(-1) for cond in conditions], axis=1).astype(np.float64)
    coefficients, *_ = np.linalg.lstsq(c, n, rcond=None)
    projected = n - c @ coefficients
    norm = np.linalg.norm(projected)
    if norm < 1e-6:
        raise InvalidArgument("the edit direction lies in the span of the condition boundaries: nothing is left to edit")
    return (projected / norm).astype(np.float32)


def trajectory(
    start: np.ndarray,
    direction: np.ndarray,
    distances: np.ndarray,
    boundary: Boundary | None = None,
) -> np.ndarray:
    """Latents [F, N, dim] along `direction`: z + d n, or, given `boundary`, its foot point + d n."""
    z = start.reshape(len(start), -1).astype(np.float32)
    if boundary is not None:
        z = z - np.outer(boundary.distance(z), boundary.normal).astype(np.float32)
    return np.stack([z + np.float32(d) * direction[None, :] for d in distances]).reshape(len(distances), *start.shape)


def cosine_matrix(normals: list[np.ndarray]) -> np.ndarray:
    stacked = np.stack([n.reshape(-1) / np.linalg.norm(n) for n in normals])
    return stacked @ stacked.T


def correlation_matrix(scores: np.ndarray) -> np.ndarray:
    """Pearson correlation of attribute scores [N, A]."""
    return np.corrcoef(scores, rowvar=False)
