"""Per-request limits: the one table of how much one request may ask for.

Every job spec, edit and inversion is checked against these at its start (StartJob, Edit,
Invert), so a request over a limit fails at once with INVALID_ARGUMENT naming the limit,
instead of running for hours or exhausting memory. Limits that operators tune per
deployment live in `latentedit.config` (EditorConfig: frames, batch, inversion steps;
ScorerConfig and GeneratorConfig: request batches, texts); the README's "Limits" table
lists both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from latentedit.errors import InvalidArgument


@dataclass(frozen=True)
class RequestLimits:
    name_chars: int = 64
    """Names that reach the file system (models, artifacts, job ids): 1..64 characters of
    [a-z0-9._-], starting with a letter or digit (one pattern: `repository.validate_name`)."""

    text_chars: int = 2000
    """Free text a request carries: SGF caption targets, custom-boundary attribute names, job
    display names."""

    idempotency_key_chars: int = 200
    """StartJob idempotency keys."""

    job_samples: int = 500_000
    """Samples one job draws (boundary and correlation jobs stream them; PCA also obeys
    `pca_feature_values`)."""

    mapping_pairs: int = 100_000
    """(z, c) pairs of an SGF mapping job (all are held in memory while F trains)."""

    custom_latents: int = 100_000
    """Caller-labelled latents of one custom-boundary job."""

    pca_feature_values: int = 1 << 28
    """num_samples x feature size at the PCA layer (the feature matrix is held and decomposed)."""

    mapping_depth: int = 16
    """Layers of an SGF mapping F (2..16)."""

    mapping_width: int = 1024
    """Hidden width of an SGF mapping F (8..1024)."""

    training_steps: int = 100_000
    """Optimiser steps of one training job (SGF mappings, DP-LaSE directions)."""

    directions: int = 512
    """Directions one job learns (DP-LaSE num_directions, PCA num_components); also at most the
    latent size."""

    naming_samples: int = 1024
    """Start points per direction a DP-LaSE job uses to name it."""

    job_batch: int = 1024
    """TrainingOptions.batch_size: rows per downstream call of a job."""

    list_items: int = 64
    """Names in one list field: correlation boundaries, condition boundaries, mapping
    attributes, SGF attribute targets."""

    edit_distance: float = 1000.0
    """|start/end distance| of InterFaceGAN and GANSpace edits, |start/end stride| of DP-LaSE
    walks and a DP-LaSE job's max_stride (latent units; a N(0, I_100) sample has norm about 10)."""

    weight_max: float = 1.0e6
    """Loss weights of a job (DP-LaSE similarity, orthogonality, density, sparsity) and the SVM's C
    of a boundary job."""

    latent_abs: float = 1.0e4
    """|value| of any latent a caller sends (finite float32 values beyond this overflow inside
    the networks)."""

    image_pixels: int = 4096 * 4096
    """Pixels of one image (PNG checked from its header before decoding; raw too):
    RESOURCE_EXHAUSTED."""

    batch_pixels: int = 64 * 1024 * 1024
    """Pixels of one image batch: RESOURCE_EXHAUSTED."""

    page_size: int = 500
    """Jobs per ListJobs page."""

    page_token_digits: int = 12
    """ListJobs page tokens are offsets this service issued: at most 12 digits."""


LIMITS = RequestLimits()


def describe() -> list[tuple[str, object, str]]:
    """(name, value, what it bounds) of every limit: the README table's rows."""
    docs = _docstrings()
    return [(f.name, getattr(LIMITS, f.name), docs.get(f.name, "")) for f in fields(RequestLimits)]


def check_range(value: float, field: str, low: float, high: float, limit: str = "") -> None:
    """INVALID_ARGUMENT unless low <= value <= high (NaN never is), naming the field and the limit."""
    if not low <= value <= high:
        where = f" (limit {limit}, latentedit/limits.py)" if limit else ""
        raise InvalidArgument(f"{field} {value:g} must be in {low:g}..{high:g}{where}")


def check_text(value: str, field: str, limit: int | None = None) -> str:
    """INVALID_ARGUMENT if `value` is longer than `limit` characters (default: text_chars)."""
    limit = LIMITS.text_chars if limit is None else limit
    if len(value) > limit:
        raise InvalidArgument(f"{field}: {len(value)} characters, over the limit of {limit}")
    return value


def check_items(count: int, field: str, limit: int, limit_name: str) -> None:
    """INVALID_ARGUMENT if a list field names more than `limit` items."""
    if count > limit:
        raise InvalidArgument(f"{field}: {count} items, over the limit {limit_name} = {limit} (latentedit/limits.py)")


def _docstrings() -> dict[str, str]:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(RequestLimits))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for field_node, doc_node in zip(body, body[1:]):
        if isinstance(field_node, ast.AnnAssign) and isinstance(field_node.target, ast.Name) \
                and isinstance(doc_node, ast.Expr) and isinstance(doc_node.value, ast.Constant):
            docs[field_node.target.id] = " ".join(str(doc_node.value.value).split())
    return docs
