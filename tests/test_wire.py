"""The tensor and image codec: round trips and every class of malformed payload."""

import grpc
import numpy as np
import pytest

from latentedit import wire
from latentedit.api.v1 import types_pb2
from latentedit.errors import InvalidArgument


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.uint8, np.int32, np.int64, np.bool_])
def test_round_trip_keeps_dtype_shape_and_values(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    back = wire.from_tensor(wire.to_tensor(array), field="x")
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_big_endian_input_is_sent_little_endian():
    array = np.arange(5, dtype=">f4")
    tensor = wire.to_tensor(array)
    assert tensor.raw_data == np.arange(5, dtype="<f4").tobytes()


def test_unsupported_dtype_is_refused():
    with pytest.raises(InvalidArgument, match="no wire encoding"):
        wire.to_tensor(np.zeros(3, dtype=np.complex64))


def test_byte_count_must_match_shape():
    tensor = types_pb2.Tensor(dtype=types_pb2.DATA_TYPE_FP32, shape=[2, 3], raw_data=b"\0" * 20)
    with pytest.raises(InvalidArgument, match="20 bytes.*needs 24"):
        wire.from_tensor(tensor, field="latents")


def test_unset_dtype_is_named():
    tensor = types_pb2.Tensor(shape=[1], raw_data=b"\0" * 4)
    with pytest.raises(InvalidArgument, match="latents: dtype DATA_TYPE_UNSPECIFIED"):
        wire.from_tensor(tensor, field="latents")


def test_shape_and_dtype_constraints():
    tensor = wire.to_tensor(np.zeros((4, 99), np.float32))
    with pytest.raises(InvalidArgument, match=r"shape \[4, 99\] does not match the expected \[N, 100\]"):
        wire.from_tensor(tensor, field="latents", shape=[None, 100])
    with pytest.raises(InvalidArgument, match="not allowed here"):
        wire.from_tensor(tensor, field="latents", dtypes=[types_pb2.DATA_TYPE_UINT8])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad):
    array = np.zeros((3, 4), np.float32)
    array[1, 2] = bad
    with pytest.raises(InvalidArgument, match="1 value\\(s\\) are NaN or infinite"):
        wire.from_tensor(wire.to_tensor(array), field="latents")


def test_images_round_trip_raw_and_png():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    for encoding in (types_pb2.IMAGE_ENCODING_RAW_UINT8, types_pb2.IMAGE_ENCODING_PNG):
        np.testing.assert_array_equal(wire.decode_images(wire.encode_images(images, encoding)), images)


def test_corrupt_png_is_invalid_argument():
    batch = types_pb2.ImageBatch(encoding=types_pb2.IMAGE_ENCODING_PNG, png=[b"\x89PNG\r\n\x1a\nnot really"])
    with pytest.raises(InvalidArgument, match=r"images.png\[0\]: corrupt"):
        wire.decode_images(batch)


def test_raw_images_need_three_channels_and_a_batch():
    with pytest.raises(InvalidArgument, match="4 channels, expected 3"):
        wire.decode_images(wire.encode_images(np.zeros((1, 4, 4, 4), np.uint8), types_pb2.IMAGE_ENCODING_RAW_UINT8))
    with pytest.raises(InvalidArgument, match="empty"):
        wire.decode_images(wire.encode_images(np.zeros((0, 4, 4, 3), np.uint8), types_pb2.IMAGE_ENCODING_RAW_UINT8))


def test_float_images_map_to_full_uint8_range():
    floats = np.array([-1.0, 0.0, 1.0], np.float32).reshape(1, 1, 1, 3)
    np.testing.assert_array_equal(wire.float_to_uint8_images(floats.transpose(0, 3, 1, 2)).ravel(), [0, 128, 255])


def _png_bytes(width, height):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_png_decompression_bombs_are_refused_from_the_header():
    """A small PNG that declares a huge image is refused before decoding (no memory blow-up),
    per image and per batch, with RESOURCE_EXHAUSTED naming the limit."""
    from latentedit.errors import ResourceExhausted

    huge = _png_bytes(4097, 4096)  # one row over the per-image limit; a few KiB compressed
    assert len(huge) < 200_000
    with pytest.raises(ResourceExhausted, match=r"images.png\[0\]: 4097x4096 is larger than the limit of 16777216"):
        wire.decode_images(types_pb2.ImageBatch(encoding=types_pb2.IMAGE_ENCODING_PNG, png=[huge]))
    big = _png_bytes(4096, 4096)  # at the per-image limit, but five of them exceed the batch's pixels
    with pytest.raises(ResourceExhausted, match=r"images.png\[4\]: the batch's images hold more than 67108864"):
        wire.decode_images(types_pb2.ImageBatch(encoding=types_pb2.IMAGE_ENCODING_PNG, png=[big] * 5))
    small = wire.decode_images(types_pb2.ImageBatch(encoding=types_pb2.IMAGE_ENCODING_PNG, png=[_png_bytes(8, 6)] * 3))
    assert small.shape == (3, 6, 8, 3)


def test_float64_values_must_be_finite_as_float32():
    """1e300 is finite in float64 and infinite in float32, which everything downstream uses."""
    for value in (1e300, -1e39, 3.5e38):
        with pytest.raises(InvalidArgument, match="as float32"):
            wire.from_tensor(wire.to_tensor(np.full((2, 3), value)), field="x")
    assert wire.from_tensor(wire.to_tensor(np.full((2, 3), 3.0e38)), field="x").dtype == np.float64


def test_latents_beyond_the_range_limit_are_refused():
    from latentedit.latents import LatentSpaceSpec
    from latentedit.limits import LIMITS

    class Spec:
        def space(self, name):
            return LatentSpaceSpec("z", 4)

    ok = types_pb2.Latents(space=types_pb2.LATENT_SPACE_Z, values=wire.to_tensor(np.full((1, 4), LIMITS.latent_abs, np.float32)))
    assert wire.latents_from_proto(ok, Spec()).values.shape == (1, 4)
    big = types_pb2.Latents(space=types_pb2.LATENT_SPACE_Z, values=wire.to_tensor(np.full((1, 4), 1e30, np.float32)))
    with pytest.raises(InvalidArgument, match="latent_abs"):
        wire.latents_from_proto(big, Spec())


def test_check_finite_fields_names_the_field_at_any_depth():
    from latentedit.api.v1 import editor_pb2, trainer_pb2

    request = trainer_pb2.StartJobRequest(boundary=trainer_pb2.BoundaryJobSpec(threshold=float("nan")))
    with pytest.raises(InvalidArgument, match=r"^boundary\.threshold must be a finite number"):
        wire.check_finite_fields(request)
    request = editor_pb2.EditRequest(sgf=editor_pb2.SGFEdit(attributes=editor_pb2.AttributeTarget(values=[
        editor_pb2.AttributeValue(value=1.0), editor_pb2.AttributeValue(value=float("-inf"))])))
    with pytest.raises(InvalidArgument, match=r"sgf\.attributes\.values\[1\]\.value must be a finite number; got -inf"):
        wire.check_finite_fields(request)
    wire.check_finite_fields(trainer_pb2.StartJobRequest(boundary=trainer_pb2.BoundaryJobSpec(threshold=0.5, svm_c=2.0)))


def test_raw_images_without_pixels_or_over_the_pixel_limit():
    from latentedit.errors import ResourceExhausted

    for shape in ((1, 0, 4, 3), (2, 4, 0, 3)):
        with pytest.raises(InvalidArgument, match="has no pixels"):
            wire.decode_images(types_pb2.ImageBatch(raw=wire.to_tensor(np.zeros(shape, np.uint8))))
    with pytest.raises(ResourceExhausted, match="larger than the limit"):
        wire.decode_images(types_pb2.ImageBatch(raw=wire.to_tensor(np.zeros((1, 1, wire.MAX_IMAGE_PIXELS + 1, 3), np.uint8))))


@pytest.mark.parametrize("text", ["x" * (1 << 20), "\u00e9" * (1 << 19), "\U0001f600" * (1 << 18)])
def test_error_messages_are_capped_centrally(text):
    """Every error's message fits gRPC's metadata limit, whatever it repeats (the status would
    otherwise become RESOURCE_EXHAUSTED on the client)."""
    from latentedit.errors import MAX_MESSAGE_BYTES, NotFound, RemoteError, shown

    for error in (NotFound(f"no head named {text!r}"), RemoteError(grpc.StatusCode.NOT_FOUND, text)):
        assert len(error.message.encode()) <= MAX_MESSAGE_BYTES and str(error) == error.message
        assert error.message.endswith("characters in all]")
    assert len(shown(text)) < 120 and shown("short") == "'short'"
    assert NotFound("fine").message == "fine"
