"""The torch port of dlib's face descriptor against dlib itself, its gradients, its cache and its parser."""

import shutil

import numpy as np
import pytest
import torch

from latentedit.errors import FailedPrecondition
from latentedit.models.face_descriptor import (
    CACHE_FOLDER,
    FACE_BOX,
    FACE_SIZE,
    DlibFormatError,
    chip_transforms,
    extract_chips,
    load_face_descriptor,
    load_network,
    parse_dlib_resnet,
)
from latentedit.scoring.base import Batch

# The acceptance threshold; the port reaches >= 0.99999 on these faces (measured:
# min 0.999995, Euclidean distance <= 0.004 where dlib's same-person threshold is 0.6).
MIN_COSINE = 0.999
MAX_DISTANCE = 0.02


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def descriptor(installed_repo):
    return load_face_descriptor(installed_repo)


@pytest.fixture(scope="module")
def dat(installed_repo):
    return installed_repo.resolve("dlib-face-descriptor").file("weights")


def dlib_reference(installed_repo, descriptor, faces):
    """dlib's own compute_face_descriptor on the 160 px faces, with dlib's 68 landmarks."""
    import dlib

    recognizer = dlib.face_recognition_model_v1(str(installed_repo.resolve("dlib-face-descriptor").file("weights")))
    rect = dlib.rectangle(*FACE_BOX)
    shapes = [descriptor.predictor(np.ascontiguousarray(f), rect) for f in faces]
    reference = np.array([np.array(recognizer.compute_face_descriptor(np.ascontiguousarray(f), s)) for f, s in zip(faces, shapes)])
    points = np.array([[(p.x, p.y) for p in s.parts()] for s in shapes], np.float64)
    return reference, points, shapes


def test_port_matches_dlib_on_64_default_faces(installed_repo, descriptor, face_latents_and_images):
    _, images, _ = face_latents_and_images
    images = images[:64]
    faces = Batch(images).resized(FACE_SIZE)
    reference, points, _ = dlib_reference(installed_repo, descriptor, faces)
    with torch.no_grad():
        # The public path: 64 px images in [0, 1], landmarks found inside.
        ported = descriptor(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    cosine = (ported * reference).sum(1) / np.linalg.norm(ported, axis=1) / np.linalg.norm(reference, axis=1)
    distance = np.linalg.norm(ported - reference, axis=1)
    assert cosine.min() > MIN_COSINE, np.sort(cosine)[:5]
    assert distance.max() < MAX_DISTANCE, np.sort(distance)[-5:]
    # The comparison is not vacuous: different faces are far apart on dlib's scale.
    assert np.median(np.linalg.norm(reference[:32] - reference[32:], axis=1)) > 0.45


def test_chips_are_dlibs_chips(installed_repo, descriptor, face_latents_and_images):
    """The differentiable alignment reproduces dlib.get_face_chip (150 px, padding 0.25) to the uint8 level."""
    import dlib

    faces = Batch(face_latents_and_images[1][:4]).resized(FACE_SIZE)
    _, points, shapes = dlib_reference(installed_repo, descriptor, faces)
    chips = extract_chips(torch.from_numpy(faces).permute(0, 3, 1, 2).double(), chip_transforms(points))
    for chip, face, shape in zip(chips, faces, shapes):
        expected = dlib.get_face_chip(np.ascontiguousarray(face), shape, 150, 0.25).astype(np.float64)
        got = chip.permute(1, 2, 0).numpy()
        assert (got == expected).mean() > 0.99 and np.abs(got - expected).max() <= 1
    # dlib's 5-point landmarks (the age-gender entry ships that predictor) align the same way.
    five = dlib.shape_predictor(str(installed_repo.resolve("age-gender").file("landmarks5")))
    rect = dlib.rectangle(*FACE_BOX)
    shapes5 = [five(np.ascontiguousarray(f), rect) for f in faces]
    points5 = np.array([[(p.x, p.y) for p in s.parts()] for s in shapes5], np.float64)
    chips5 = extract_chips(torch.from_numpy(faces).permute(0, 3, 1, 2).double(), chip_transforms(points5))
    for chip, face, shape in zip(chips5, faces, shapes5):
        expected = dlib.get_face_chip(np.ascontiguousarray(face), shape, 150, 0.25).astype(np.float64)
        got = chip.permute(1, 2, 0).numpy()
        assert (got == expected).mean() > 0.99 and np.abs(got - expected).max() <= 1


def test_gradients_reach_the_pixels(descriptor, face_latents_and_images):
    images = torch.from_numpy(face_latents_and_images[1][200:202]).permute(0, 3, 1, 2).double() / 255
    net = descriptor.network.double()
    try:
        frame = descriptor.face_frame(images)
        points = descriptor.landmarks(frame)
        exact = type(descriptor)(net, descriptor.predictor, quantize=False)
        x = images.clone().requires_grad_(True)
        out = exact(x, points)
        (out[0] - out[1]).square().sum().backward()
        grad = x.grad
        assert grad is not None and torch.isfinite(grad).all() and (grad.flatten(1).abs().sum(1) > 0).all()
        # The gradient is the real one: a directional finite difference agrees with it.
        direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

        def loss(t):
            with torch.no_grad():
                out = exact(t, points)
            return float((out[0] - out[1]).square().sum())

        eps = 1e-6
        numeric = (loss(images + eps * direction) - loss(images - eps * direction)) / (2 * eps)
        analytic = float((grad * direction).sum())
        assert abs(numeric - analytic) <= 1e-3 * abs(analytic) + 1e-6, (numeric, analytic)
        # The default (quantised like dlib) path passes gradients straight through.
        y = images.clone().requires_grad_(True)
        descriptor(y).sum().backward()
        assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    finally:
        net.float()


def test_conversion_is_cached_and_keyed_by_the_file(dat, tmp_path, installed_repo, descriptor):
    cache = tmp_path / "cache"
    first = load_network(dat, cache)
    assert first.converted_from_dat and len(list(cache.glob("*.safetensors"))) == 1
    second = load_network(dat, cache)
    assert not second.converted_from_dat
    chips = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        assert torch.equal(first(chips), second(chips))
    # A different .dat (one weight changed) is a new key: converted again, never the old cache.
    data = bytearray(dat.read_bytes())
    data[len(data) // 2] ^= 0x01
    changed = tmp_path / "changed.dat"
    changed.write_bytes(bytes(data))
    third = load_network(changed, cache)
    assert third.converted_from_dat and len(list(cache.glob("*.safetensors"))) == 2
    # A damaged cache file is converted again and replaced.
    for path in cache.glob("*.safetensors"):
        path.write_bytes(b"not safetensors")
    fourth = load_network(dat, cache)
    assert fourth.converted_from_dat
    with torch.no_grad():
        assert torch.equal(fourth(chips), first(chips))
    assert not load_network(dat, cache).converted_from_dat
    # The repository's loader caches inside the repository.
    assert list((installed_repo.root / ".cache" / CACHE_FOLDER).glob("*.safetensors"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d[: len(d) // 2], "the file ends inside"),
        (lambda d: d[:-3], "the file ends inside"),
        (lambda d: d + b"\x00", "1 unexpected bytes after the network"),
        (lambda d: d.replace(b"\x07affine_", b"\x07affinX_", 1), "found 'affinX_', expected 'affine_' or 'affine_2'"),
        (lambda d: d.replace(b"loss_metric_2", b"loss_metric_9", 1), "found 'loss_metric_9'"),
    ],
    ids=["half", "last-bytes", "trailing", "wrong-layer", "wrong-loss"],
)
def test_a_damaged_dat_fails_with_a_precise_message(dat, tmp_path, damage, message):
    data = damage(dat.read_bytes())
    path = tmp_path / "broken.dat"
    path.write_bytes(data)
    with pytest.raises(DlibFormatError) as error:
        load_network(path, tmp_path / "cache")
    text = str(error.value)
    assert message in text and str(path) in text and "at byte" in text, text
    assert isinstance(error.value, FailedPrecondition)
    assert not list((tmp_path / "cache").glob("*.safetensors"))


def test_another_dlib_file_is_refused(installed_repo, tmp_path):
    other = installed_repo.resolve("dlib-landmarks68").file("weights")
    head = tmp_path / "other.dat"
    shutil.copyfile(other, head)
    with pytest.raises(DlibFormatError, match="while reading the loss layer"):
        parse_dlib_resnet(head.read_bytes()[:1 << 16], str(head))
