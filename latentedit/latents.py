"""Latent spaces as data, and latent batches that always carry their space.

Z is a generator's input prior; W the output of a style mapping network (no known density);
W+ one w per synthesis layer, shape [num_ws, w_dim]. Every method and service handles a
`Latents` batch through its `LatentSpaceSpec`, so nothing assumes Z's [N, dim] shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from latentedit.errors import InvalidArgument


@dataclass(frozen=True)
class LatentSpaceSpec:
    space: str  # "z", "w" or "w+"
    dim: int
    num_ws: int = 1
    prior: str = ""  # "normal" for N(0, I); empty when unknown

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape: (dim,) or, for W+, (num_ws, dim)."""
        return (self.num_ws, self.dim) if self.space == "w+" else (self.dim,)

    @property
    def size(self) -> int:
        return self.num_ws * self.dim if self.space == "w+" else self.dim

    def describe(self) -> str:
        return f"{self.space} [N, {', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class RowRange:
    """W+ rows [start, end) a per-layer edit touches; end 0 means through the last row."""

    start: int = 0
    end: int = 0

    def mask(self, space: LatentSpaceSpec) -> np.ndarray:
        """[num_ws, 1] float mask of the rows, checked against the space."""
        if space.space != "w+":
            raise InvalidArgument(f"rows: per-layer edits need W+ latents; these are {space.space}")
        end = self.end or space.num_ws
        if not 0 <= self.start < end <= space.num_ws:
            raise InvalidArgument(f"rows [{self.start}, {self.end}) must lie in 0..{space.num_ws} (end 0: the last row)")
        mask = np.zeros((space.num_ws, 1), np.float32)
        mask[self.start : end] = 1.0
        return mask


@dataclass(frozen=True)
class Latents:
    """A batch of latent codes and the space they live in: values [N, *space.shape], float32."""

    space: LatentSpaceSpec
    values: np.ndarray

    def __post_init__(self) -> None:
        # Cast first: a float64 of 1e300 is finite, its float32 is not.
        with np.errstate(over="ignore"):
            values = np.asarray(self.values).astype(np.float32, copy=False)
        if values.ndim != 1 + len(self.space.shape) or tuple(values.shape[1:]) != self.space.shape:
            raise InvalidArgument(
                f"latents: shape {list(values.shape)} does not match space {self.space.describe()}")
        if not np.isfinite(values).all():
            raise InvalidArgument("latents: values must be finite (no NaN or Inf)")
        object.__setattr__(self, "values", values)

    def __len__(self) -> int:
        return len(self.values)

    def flat(self) -> np.ndarray:
        """[N, size]: W+ rows concatenated, the form linear methods fit hyperplanes in."""
        return self.values.reshape(len(self.values), -1)

    def replace(self, values: np.ndarray) -> Latents:
        """The same space with new values (of the same per-sample shape, or flat)."""
        return Latents(self.space, np.asarray(values, np.float32).reshape(len(values), *self.space.shape))

    def take(self, index) -> Latents:
        return Latents(self.space, self.values[index])


def move(start: Latents, direction: np.ndarray, amounts: float | np.ndarray, rows: RowRange | None = None) -> Latents:
    """start + amount_i * direction for each sample i (amounts [N] or a scalar).

    `direction` is either one latent's full shape (flat size) or, in W+, one w ([dim]) that is
    broadcast over the rows in `rows` (all rows when None): per-layer edits.
    """
    n = len(start)
    amounts = np.broadcast_to(np.asarray(amounts, np.float32), (n,))
    direction = np.asarray(direction, np.float32).reshape(-1)
    space = start.space
    if direction.size == space.size:
        step = direction.reshape(space.shape)
        if rows is not None:
            step = step * rows.mask(space)
    elif space.space == "w+" and direction.size == space.dim:
        mask = rows.mask(space) if rows is not None else np.ones((space.num_ws, 1), np.float32)
        step = mask * direction[None, :]
    else:
        raise InvalidArgument(f"a direction of {direction.size} values does not fit latents in {space.describe()}")
    return start.replace(start.values + amounts.reshape(n, *([1] * len(space.shape))) * step[None])
