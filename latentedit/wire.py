"""Conversions between numpy arrays / images and the v1 wire messages.

Tensors follow KServe v2: dtype, shape and raw little-endian bytes. Every decode validates
what a remote caller could get wrong and raises `InvalidArgument` naming the field.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from PIL import Image, UnidentifiedImageError

from latentedit.api.v1 import trainer_pb2, types_pb2
from latentedit.errors import InvalidArgument, ResourceExhausted
from latentedit.limits import LIMITS

if TYPE_CHECKING:
    from latentedit.models.generator import GeneratorSpec

DataType = types_pb2.DataType

NUMPY_DTYPES: dict[int, np.dtype] = {
    types_pb2.DATA_TYPE_FP32: np.dtype("<f4"),
    types_pb2.DATA_TYPE_FP16: np.dtype("<f2"),
    types_pb2.DATA_TYPE_FP64: np.dtype("<f8"),
    types_pb2.DATA_TYPE_UINT8: np.dtype("u1"),
    types_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
    types_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
    types_pb2.DATA_TYPE_BOOL: np.dtype("?"),
}
# Keyed by (kind, itemsize) so that any byte order of a supported type encodes.
_WIRE_CODES = {(dt.kind, dt.itemsize): code for code, dt in NUMPY_DTYPES.items()}


def dtype_name(code: int) -> str:
    try:
        return types_pb2.DataType.Name(code)
    except ValueError:
        return f"<unknown dtype {code}>"


def to_tensor(array: np.ndarray) -> types_pb2.Tensor:
    """Encode an array as a Tensor (little-endian, C order)."""
    array = np.asarray(array)
    code = _WIRE_CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise InvalidArgument(f"dtype {array.dtype} has no wire encoding; allowed: {_allowed_names(NUMPY_DTYPES)}")
    little = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[code])
    return types_pb2.Tensor(dtype=code, shape=list(little.shape), raw_data=little.tobytes())


def from_tensor(
    tensor: types_pb2.Tensor,
    *,
    field: str,
    dtypes: Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    allow_nonfinite: bool = False,
) -> np.ndarray:
    """Decode a Tensor, checking dtype, shape and (for floats) finiteness.

    `shape` entries that are None match any size. Returns a writable native-endian array.
    """
    if tensor.dtype not in NUMPY_DTYPES:
        raise InvalidArgument(f"{field}: dtype {dtype_name(tensor.dtype)} is not set or unknown; allowed: {_allowed_names(dtypes or NUMPY_DTYPES)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        raise InvalidArgument(f"{field}: dtype {dtype_name(tensor.dtype)} not allowed here; allowed: {_allowed_names(dtypes)}")
    dims = list(tensor.shape)
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"{field}: shape {dims} has a negative dimension")
    dtype = NUMPY_DTYPES[tensor.dtype]
    expected_bytes = math.prod(dims) * dtype.itemsize
    if len(tensor.raw_data) != expected_bytes:
        raise InvalidArgument(
            f"{field}: raw_data has {len(tensor.raw_data)} bytes, but shape {dims} of {dtype_name(tensor.dtype)} needs {expected_bytes}"
        )
    if shape is not None:
        if len(dims) != len(shape) or any(want is not None and want != got for want, got in zip(shape, dims)):
            want_text = "[" + ", ".join("N" if w is None else str(w) for w in shape) + "]"
            raise InvalidArgument(f"{field}: shape {dims} does not match the expected {want_text}")
    array = np.frombuffer(tensor.raw_data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="), copy=True)
    if not allow_nonfinite and array.dtype.kind == "f" and array.size:
        # Everything downstream computes in float32: a float64 of 1e300 is finite, its float32
        # is not. So the check is on the values as float32 (for FP32 and FP16, the values).
        with np.errstate(over="ignore"):
            as_float32 = array if array.itemsize <= 4 else array.astype(np.float32)
        finite = np.isfinite(as_float32)
        if not finite.all():
            bad = int(np.size(array) - np.count_nonzero(finite))
            raise InvalidArgument(f"{field}: {bad} value(s) are NaN or infinite (as float32); all values must be "
                                  f"finite and within +-{float(np.finfo(np.float32).max):.3g}")
    return array


def _is_repeated(descriptor: FieldDescriptor) -> bool:
    flag = getattr(descriptor, "is_repeated", None)  # protobuf >= 5.28; `label` before (removed later)
    return bool(flag) if flag is not None else descriptor.label == FieldDescriptor.LABEL_REPEATED


def check_finite_fields(message: Message, prefix: str = "") -> None:
    """INVALID_ARGUMENT naming the first float or double field of `message` (at any depth, in
    repeated fields and maps too) that holds NaN or an infinity. Run on a request before any of
    its options are used, so that no NaN can slip past a range check (NaN compares false)."""
    for descriptor, value in message.ListFields():
        path = f"{prefix}{descriptor.name}"
        repeated = _is_repeated(descriptor)
        if descriptor.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            for index, number in enumerate(value if repeated else [value]):
                if not math.isfinite(number):
                    where = f"{path}[{index}]" if repeated else path
                    raise InvalidArgument(f"{where} must be a finite number; got {number}")
        elif descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            if descriptor.message_type.GetOptions().map_entry:
                items = value.items()
                value_field = descriptor.message_type.fields_by_name["value"]
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    for key, item in items:
                        check_finite_fields(item, f"{path}[{key!r}].")
                elif value_field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
                    for key, number in items:
                        if not math.isfinite(number):
                            raise InvalidArgument(f"{path}[{key!r}] must be a finite number; got {number}")
            elif repeated:
                for index, item in enumerate(value):
                    check_finite_fields(item, f"{path}[{index}].")
            else:
                check_finite_fields(value, f"{path}.")


def _allowed_names(codes) -> str:
    return ", ".join(dtype_name(c) for c in codes)


# ---- images ---------------------------------------------------------------------------------


def float_to_uint8_images(images: np.ndarray) -> np.ndarray:
    """Generator output NCHW in [-1, 1] -> uint8 NHWC."""
    scaled = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(scaled.transpose(0, 2, 3, 1))


def encode_images(images: np.ndarray, encoding: int) -> types_pb2.ImageBatch:
    """uint8 NHWC -> ImageBatch in the requested encoding (UNSPECIFIED means raw)."""
    if encoding == types_pb2.IMAGE_ENCODING_PNG:
        return types_pb2.ImageBatch(encoding=encoding, png=[encode_png(img) for img in images])
    if encoding in (types_pb2.IMAGE_ENCODING_RAW_UINT8, types_pb2.IMAGE_ENCODING_UNSPECIFIED):
        return types_pb2.ImageBatch(encoding=types_pb2.IMAGE_ENCODING_RAW_UINT8, raw=to_tensor(images))
    raise InvalidArgument(f"image_encoding {encoding} is unknown; allowed: IMAGE_ENCODING_RAW_UINT8, IMAGE_ENCODING_PNG")


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    mode = "L" if image.shape[-1] == 1 else "RGB"
    Image.fromarray(image[..., 0] if mode == "L" else image, mode=mode).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# Decoded-size limits for image batches (the message limit bounds only the compressed bytes).
MAX_IMAGE_PIXELS = LIMITS.image_pixels
MAX_DECODED_PIXELS = LIMITS.batch_pixels


def decode_images(batch: types_pb2.ImageBatch, *, field: str = "images", channels: int = 3) -> np.ndarray:
    """ImageBatch -> uint8 NHWC with `channels` channels; all images must share one size."""
    if batch.encoding == types_pb2.IMAGE_ENCODING_PNG:
        if not batch.png:
            raise InvalidArgument(f"{field}: PNG encoding selected but no images given")
        budget = [MAX_DECODED_PIXELS]  # the whole batch's pixels, checked from the headers before decoding
        decoded = [_decode_png(data, f"{field}.png[{i}]", channels, budget) for i, data in enumerate(batch.png)]
        sizes = {img.shape for img in decoded}
        if len(sizes) > 1:
            raise InvalidArgument(f"{field}: images differ in size {sorted(sizes)}; one batch must share one size")
        return np.stack(decoded)
    if batch.encoding in (types_pb2.IMAGE_ENCODING_RAW_UINT8, types_pb2.IMAGE_ENCODING_UNSPECIFIED):
        images = from_tensor(batch.raw, field=f"{field}.raw", dtypes=[types_pb2.DATA_TYPE_UINT8])
        if images.ndim != 4:
            raise InvalidArgument(f"{field}.raw: shape {list(images.shape)} must be [N, H, W, C]")
        if images.shape[-1] != channels:
            raise InvalidArgument(f"{field}.raw: {images.shape[-1]} channels, expected {channels} (RGB, NHWC)")
        if images.shape[0] == 0:
            raise InvalidArgument(f"{field}: the batch is empty")
        if min(images.shape[1:3]) < 1:
            raise InvalidArgument(f"{field}: size {images.shape[2]}x{images.shape[1]} has no pixels")
        if images.shape[1] * images.shape[2] > MAX_IMAGE_PIXELS:
            raise ResourceExhausted(f"{field}.raw: {images.shape[2]}x{images.shape[1]} is larger than the limit of "
                                    f"{MAX_IMAGE_PIXELS} pixels per image")
        return images
    raise InvalidArgument(f"{field}.encoding {batch.encoding} is unknown; allowed: IMAGE_ENCODING_RAW_UINT8, IMAGE_ENCODING_PNG")


def _decode_png(data: bytes, field: str, channels: int, budget: list[int]) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                raise InvalidArgument(f"{field}: not a PNG file (found {img.format})")
            # A few KiB of PNG can declare gigapixels: refuse from the header, before decoding.
            pixels = img.width * img.height
            if pixels > MAX_IMAGE_PIXELS:
                raise ResourceExhausted(f"{field}: {img.width}x{img.height} is larger than the limit of "
                                        f"{MAX_IMAGE_PIXELS} pixels per image")
            budget[0] -= pixels
            if budget[0] < 0:
                raise ResourceExhausted(f"{field}: the batch's images hold more than {MAX_DECODED_PIXELS} pixels "
                                        "in all; split the request")
            img.load()
            bands = len(img.getbands())
            if bands not in (1, 3, 4) or (channels == 3 and bands == 1):
                raise InvalidArgument(f"{field}: image has {bands} channel(s) ({img.mode}), expected {channels}")
            return np.asarray(img.convert("RGB" if channels == 3 else "L")).reshape(img.height, img.width, channels)
    except Image.DecompressionBombError as exc:  # PIL's own guard, at open, for headers over ~179 M pixels
        raise ResourceExhausted(f"{field}: the PNG header declares more than the limit of {MAX_IMAGE_PIXELS} pixels "
                                f"per image ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidArgument(f"{field}: corrupt or unreadable PNG ({exc})") from exc


def image_grid(images: np.ndarray, columns: int, padding: int = 2) -> np.ndarray:
    """uint8 NHWC -> one uint8 HWC grid image with white padding."""
    count, height, width, chans = images.shape
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, chans), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[top : top + height, left : left + width] = img
    return grid


# ---- latents, generator descriptions, scores -----------------------------------------------

# The one mapping between the wire's LatentSpace enum and the core's space names.
SPACE_CODES = {"z": types_pb2.LATENT_SPACE_Z, "w": types_pb2.LATENT_SPACE_W, "w+": types_pb2.LATENT_SPACE_W_PLUS}
SPACES_BY_CODE = {code: name for name, code in SPACE_CODES.items()}
FLOAT_DTYPES = [types_pb2.DATA_TYPE_FP32, types_pb2.DATA_TYPE_FP16, types_pb2.DATA_TYPE_FP64]
# Repository artifact kinds and SGF condition kinds <-> their wire enums.
ARTIFACT_KINDS = {
    "boundary": trainer_pb2.ARTIFACT_KIND_BOUNDARY,
    "flow": trainer_pb2.ARTIFACT_KIND_FLOW,
    "directions": trainer_pb2.ARTIFACT_KIND_DIRECTIONS,
    "mapping": trainer_pb2.ARTIFACT_KIND_MAPPING,
    "correlation-report": trainer_pb2.ARTIFACT_KIND_CORRELATION_REPORT,
    "pca-directions": trainer_pb2.ARTIFACT_KIND_PCA_DIRECTIONS,
}
CONDITION_KINDS = {"attributes": trainer_pb2.CONDITION_KIND_ATTRIBUTES, "keypoints": trainer_pb2.CONDITION_KIND_KEYPOINTS,
                   "caption": trainer_pb2.CONDITION_KIND_CAPTION}


def space_name(code: int, field: str = "space") -> str | None:
    """LatentSpace enum -> "z" / "w" / "w+"; None for UNSPECIFIED (the generator's first space)."""
    if code == types_pb2.LATENT_SPACE_UNSPECIFIED:
        return None
    if code not in SPACES_BY_CODE:
        raise InvalidArgument(f"{field}: {code} is not a LatentSpace; allowed: {', '.join(types_pb2.LatentSpace.keys()[1:])}")
    return SPACES_BY_CODE[code]


def space_code(name: str) -> int:
    return SPACE_CODES[name]


def latents_to_proto(latents) -> types_pb2.Latents:
    return types_pb2.Latents(space=SPACE_CODES[latents.space.space], values=to_tensor(latents.values))


def latents_from_proto(message: types_pb2.Latents, spec, field: str = "latents"):
    """A Latents message -> core Latents in one of `spec`'s (a GeneratorSpec) spaces, shape-checked."""
    from latentedit.latents import Latents

    try:
        space = spec.space(space_name(message.space, f"{field}.space"))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{field}.space: {exc.message}") from exc
    values = from_tensor(message.values, field=f"{field}.values ({space.space} latents)", dtypes=FLOAT_DTYPES,
                         shape=[None, *space.shape])
    check_latent_range(values, f"{field}.values")
    return Latents(space, values)


def check_latent_range(values: np.ndarray, field: str) -> None:
    """INVALID_ARGUMENT if a latent value is beyond +-LIMITS.latent_abs (finite float32 values
    far beyond the prior's range overflow inside the networks: squares, norms, activations)."""
    if values.size and float(np.abs(values).max()) > LIMITS.latent_abs:
        raise InvalidArgument(f"{field}: values up to {float(np.abs(values).max()):.3g}; latents must lie within "
                              f"+-{LIMITS.latent_abs:g} (limit latent_abs, latentedit/limits.py)")


def spec_from_model_info(info) -> GeneratorSpec:
    """generator_pb2.ModelInfo -> GeneratorSpec (what methods need to know about a remote generator)."""
    from latentedit.latents import LatentSpaceSpec
    from latentedit.models.generator import GeneratorSpec, LayerSpec

    spaces = tuple(LatentSpaceSpec(SPACES_BY_CODE[s.space], s.dim, s.num_ws or 1, s.prior) for s in info.latent_spaces)
    layers = tuple(LayerSpec(l.name, tuple(int(d) for d in l.shape), l.description) for l in info.layers)
    return GeneratorSpec(info.architecture, spaces, info.resolution, info.channels, layers, info.supports_truncation)


def scores_to_proto(scores: dict[str, dict[str, np.ndarray]]) -> list[types_pb2.HeadOutput]:
    """{head: {output: array}} -> HeadOutput messages (captions from the output "captions")."""
    messages = []
    for head, outputs in scores.items():
        message = types_pb2.HeadOutput(head=head)
        for name, value in outputs.items():
            if name == "captions":
                message.captions.extend(str(c) for c in value)
            else:
                message.outputs.append(types_pb2.NamedTensor(name=name, tensor=to_tensor(np.asarray(value, np.float32))))
        messages.append(message)
    return messages


def scores_from_proto(heads) -> dict[str, dict[str, np.ndarray]]:
    """HeadOutput messages -> {head: {output: array}} (captions under the output "captions")."""
    results: dict[str, dict[str, np.ndarray]] = {}
    for head in heads:
        results[head.head] = {o.name: from_tensor(o.tensor, field=f"{head.head}.{o.name}") for o in head.outputs}
        if head.captions:
            results[head.head]["captions"] = np.array(list(head.captions), dtype=object)
    return results
