"""Importing the StyleGAN2 checkpoints users have, once, into safetensors in the repository.

Formats:
- rosinality/stylegan2-pytorch `.pt`: a dict with `g_ema` (a state dict) and optionally
  `latent_avg`; read with `torch.load(weights_only=True)` (tensors and plain containers only).
- NVIDIA stylegan2-ada-pytorch / stylegan3 `.pkl` (a `G_ema` of the StyleGAN2 architecture):
  these pickles carry Python source that the reference loader `exec`s. We read them with a
  restricted unpickler: an allowlist of tensor-rebuilding functions and plain containers; the
  persistent-class constructor is replaced by a function that only records the class name and
  its attribute dict (the embedded source is never compiled or run), and every other global a
  pickle names (os.system, builtins.eval, ...) is refused before it can be called.

Both are mapped onto our parameter names (`models.stylegan2`), the architecture is inferred
from tensor shapes (resolution, channels per block, z/w dims, mapping depth), every tensor is
checked against that architecture (the first mismatch is named), and the result is written as
a `generator` entry (weights.safetensors + manifest with provenance).
"""

from __future__ import annotations

import io
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from latentedit.errors import InvalidArgument
from latentedit.models.stylegan2 import ARCHITECTURE, StyleGAN2Generator, check_state, weights
from latentedit.repository import Entry, ModelRepository, file_sha256, validate_name


class CheckpointError(InvalidArgument):
    """A checkpoint that cannot be imported; the message says what and where."""


# ---- the restricted unpickler --------------------------------------------------------------


class PersistentRecord:
    """What an NVIDIA persistent object leaves behind here: its class name and attribute dict."""

    def __init__(self, class_name: str, state: dict) -> None:
        self.class_name = class_name
        self.state = state

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name})"


class PlainDict(dict):
    """Stands in for dnnlib.EasyDict: a dict, nothing more."""


def _record_persistent(meta: dict) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise CheckpointError("pickle: a persistent object of an unknown kind")
    state = meta.get("state")
    return PersistentRecord(str(meta.get("class_name", "")), dict(state) if isinstance(state, dict) else {})


def _storage_from_bytes(data: bytes):
    """torch's pickled storages are torch.save bytes; load them with weights_only (no code)."""
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointError("pickle: a storage that is not bytes")
    return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "bool"): bool,
    ("builtins", "str"): str,
    ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch", "Size"): tuple,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _record_persistent,
    ("dnnlib.util", "EasyDict"): PlainDict,
    ("dnnlib", "EasyDict"): PlainDict,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors and plain containers; refuses every other global (see module doc)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _DTYPES:
            return getattr(torch, name)
        raise CheckpointError(
            f"pickle refused: it names {module}.{name}, which is not a tensor or plain container; "
            "the NVIDIA importer only rebuilds tensors, containers and persistent-class records and never runs code "
            "from a pickle")

    def persistent_load(self, pid):
        raise CheckpointError("pickle refused: it uses persistent ids (not an NVIDIA network pickle)")


def restricted_load(path: Path) -> Any:
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f).load()
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - malformed pickles of every kind
            raise CheckpointError(f"{path.name}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


def flatten_record(record: PersistentRecord, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """A persistent module's tensors by dotted name (like a state dict) and each module's plain attributes."""
    tensors: dict[str, torch.Tensor] = {}
    attrs: dict[str, dict] = {prefix.rstrip("."): {k: v for k, v in record.state.items()
                                                    if isinstance(v, (int, float, str, bool, type(None)))}}
    for group in ("_parameters", "_buffers"):
        for key, value in (record.state.get(group) or {}).items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + key] = value
    for key, child in (record.state.get("_modules") or {}).items():
        if isinstance(child, PersistentRecord):
            sub_tensors, sub_attrs = flatten_record(child, f"{prefix}{key}.")
            tensors.update(sub_tensors)
            attrs.update(sub_attrs)
        elif child is not None:
            raise CheckpointError(f"pickle: module {prefix}{key} is not a persistent network module")
    return tensors, attrs


# ---- format readers: source tensors -> our names + architecture ----------------------------


def _count(prefix_pattern: str, keys) -> int:
    pattern = re.compile(prefix_pattern)
    return len({m.group(1) for k in keys if (m := pattern.match(k))})


def _need(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: tensor {key} is missing")
    return state[key]


def _taker(state: dict[str, torch.Tensor], src: str):
    """(our tensors, their key for each of ours, take(ours, theirs, reshape)): how a converter copies
    a checkpoint's tensor under our name, remembering where it came from for mismatch messages."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}

    def take(ours: str, theirs: str, reshape: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        tensor = _need(state, theirs, src)
        origin[ours] = theirs
        try:
            out[ours] = reshape(tensor)
        except (RuntimeError, IndexError) as exc:
            raise CheckpointError(f"{src}: tensor {theirs} has shape {list(tensor.shape)}, which does not fit {ours}") from exc

    return out, origin, take


Converted = tuple[dict, dict[str, torch.Tensor], dict[str, str]]


def from_rosinality(state: dict[str, torch.Tensor], latent_avg: torch.Tensor | None) -> Converted:
    """rosinality g_ema keys -> (our config, our tensors, the source key of each of ours)."""
    src = "rosinality g_ema"
    keys = list(state)
    n_mlp = _count(r"style\.(\d+)\.weight$", keys)
    if n_mlp == 0:
        raise CheckpointError(f"{src}: no mapping layers (style.<i>.weight); is this a StyleGAN2 generator?")
    first = _need(state, "style.1.weight", src)
    w_dim, z_dim = first.shape
    num_up = _count(r"to_rgbs\.(\d+)\.", keys)
    resolution = 4 * 2**num_up
    const = _need(state, "input.input", src)
    channels = [int(const.shape[1])]
    for i in range(num_up):
        channels.append(int(_need(state, f"convs.{2 * i}.conv.weight", src).shape[1]))
    config = {"resolution": resolution, "z_dim": int(z_dim), "w_dim": int(w_dim), "mapping_layers": n_mlp,
              "channels": channels, "has_w_avg": latent_avg is not None}
    out, origin, take = _taker(state, src)

    for j in range(1, n_mlp + 1):
        take(f"mapping.layers.{j - 1}.weight", f"style.{j}.weight")
        take(f"mapping.layers.{j - 1}.bias", f"style.{j}.bias")
    out["mapping.w_avg"] = latent_avg.reshape(-1) if latent_avg is not None else torch.zeros(int(w_dim))
    origin["mapping.w_avg"] = "latent_avg"
    take("blocks.0.const", "input.input", lambda t: t[0])

    def styled(ours: str, theirs: str, noise: str | None) -> None:
        take(f"{ours}.weight", f"{theirs}.conv.weight", lambda t: t[0])
        take(f"{ours}.affine.weight", f"{theirs}.conv.modulation.weight")
        take(f"{ours}.affine.bias", f"{theirs}.conv.modulation.bias")
        if noise is None:  # toRGB
            take(f"{ours}.bias", f"{theirs}.bias", lambda t: t.reshape(-1))
            return
        take(f"{ours}.bias", f"{theirs}.activate.bias")
        take(f"{ours}.noise_strength", f"{theirs}.noise.weight", lambda t: t.reshape(()))
        take(f"{ours}.noise", noise)

    styled("blocks.0.conv1", "conv1", "noises.noise_0")
    styled("blocks.0.torgb", "to_rgb1", None)
    for i in range(num_up):
        styled(f"blocks.{i + 1}.conv0", f"convs.{2 * i}", f"noises.noise_{2 * i + 1}")
        styled(f"blocks.{i + 1}.conv1", f"convs.{2 * i + 1}", f"noises.noise_{2 * i + 2}")
        styled(f"blocks.{i + 1}.torgb", f"to_rgbs.{i}", None)
    used = {"style.", "input.input", "conv1.", "to_rgb1.", "convs.", "to_rgbs.", "noises."}
    unknown = [k for k in keys if not k.startswith(tuple(used))]
    if unknown:
        raise CheckpointError(f"{src}: unexpected tensor {unknown[0]} (not part of a StyleGAN2 generator)")
    return config, out, origin


def from_nvidia(record: Any) -> Converted:
    """NVIDIA G_ema record -> (our config, our tensors, the source key of each of ours)."""
    src = "NVIDIA G_ema"
    if not isinstance(record, PersistentRecord):
        raise CheckpointError(f"{src}: not a network object (found {type(record).__name__})")
    state, attrs = flatten_record(record)
    keys = list(state)
    if any(k.startswith("mapping.embed.") for k in keys):
        raise CheckpointError(f"{src}: conditional generators (mapping.embed, c_dim > 0) are not supported")
    if any(re.match(r"synthesis\.L\d+_", k) for k in keys):
        raise CheckpointError(f"{src}: this is a StyleGAN3 synthesis network (layers L0_...); only the StyleGAN2 "
                              "architecture (blocks synthesis.b4 ... b1024) can be imported")
    n_fc = _count(r"mapping\.fc(\d+)\.weight$", keys)
    if n_fc == 0:
        raise CheckpointError(f"{src}: no mapping layers (mapping.fc<i>.weight)")
    block_pattern = re.compile(r"synthesis\.b(\d+)\.")
    resolutions = sorted({int(m.group(1)) for m in map(block_pattern.match, keys) if m})
    if not resolutions or resolutions[0] != 4:
        raise CheckpointError(f"{src}: no synthesis.b4 block")
    z_dim = int(_need(state, "mapping.fc0.weight", src).shape[1])
    w_dim = int(_need(state, f"mapping.fc{n_fc - 1}.weight", src).shape[0])
    for r in resolutions[1:]:
        block = attrs.get(f"synthesis.b{r}", {})
        if block.get("architecture", "skip") != "skip":
            raise CheckpointError(f"{src}: synthesis.b{r} uses the {block['architecture']!r} architecture; only 'skip' "
                                  "(the StyleGAN2 default) is supported")
    channels = [int(_need(state, "synthesis.b4.const", src).shape[0])]
    channels += [int(_need(state, f"synthesis.b{r}.conv0.weight", src).shape[0]) for r in resolutions[1:]]
    lr_mul = float(attrs.get("mapping.fc0", {}).get("bias_gain", 0.01))
    clamp = attrs.get("synthesis.b4.conv1", {}).get("conv_clamp")
    config = {"resolution": resolutions[-1], "z_dim": z_dim, "w_dim": w_dim, "mapping_layers": n_fc, "channels": channels,
              "mapping_lr_mul": lr_mul, "has_w_avg": "mapping.w_avg" in state,
              "conv_clamp": None if clamp is None else float(clamp)}
    out, origin, take = _taker(state, src)

    for i in range(n_fc):
        take(f"mapping.layers.{i}.weight", f"mapping.fc{i}.weight")
        take(f"mapping.layers.{i}.bias", f"mapping.fc{i}.bias")
    if "mapping.w_avg" in state:
        take("mapping.w_avg", "mapping.w_avg")
    else:
        out["mapping.w_avg"] = torch.zeros(w_dim)
    take("blocks.0.const", "synthesis.b4.const")
    for index, r in enumerate(resolutions):
        for layer in (["conv1"] if r == 4 else ["conv0", "conv1"]) + ["torgb"]:
            theirs, ours = f"synthesis.b{r}.{layer}", f"blocks.{index}.{layer}"
            for name in ("weight", "bias", "affine.weight", "affine.bias"):
                take(f"{ours}.{name}", f"{theirs}.{name}")
            if layer != "torgb":
                take(f"{ours}.noise", f"{theirs}.noise_const", lambda t: t[None, None])
                take(f"{ours}.noise_strength", f"{theirs}.noise_strength", lambda t: t.reshape(()))
    return config, out, origin


# ---- reading a file -------------------------------------------------------------------------


def read_checkpoint(path: Path) -> tuple[str, dict, dict[str, torch.Tensor], dict[str, str]]:
    """(format, our config, our tensors, their source keys) from a `.pt` / `.pth` (rosinality) or `.pkl` (NVIDIA)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        top = restricted_load(path)
        if not isinstance(top, dict) or "G_ema" not in top:
            found = sorted(map(str, top)) if isinstance(top, dict) else type(top).__name__
            raise CheckpointError(f"{path.name}: an NVIDIA pickle must hold a dict with G_ema; found {found}")
        return ("nvidia-pkl", *from_nvidia(top["G_ema"]))
    if suffix in (".pt", ".pth", ".ckpt"):
        try:
            top = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path.name}: refused by torch.load(weights_only=True): it holds objects other than tensors and plain "
                f"containers (for example training args); save {{'g_ema': ..., 'latent_avg': ...}} only. ({exc})".split(
                    "\n")[0]) from exc
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path.name}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
        if not isinstance(top, dict) or "g_ema" not in top:
            found = sorted(map(str, top))[:10] if isinstance(top, dict) else type(top).__name__
            raise CheckpointError(f"{path.name}: a rosinality checkpoint must hold a dict with g_ema; found {found}")
        latent_avg = top.get("latent_avg")
        return ("rosinality-pt",
                *from_rosinality(dict(top["g_ema"]), latent_avg if isinstance(latent_avg, torch.Tensor) else None))
    raise CheckpointError(f"{path.name}: unknown checkpoint format {suffix!r}; import .pt (rosinality) or .pkl (NVIDIA)")


def convert(path: Path) -> tuple[str, StyleGAN2Generator]:
    """The checkpoint as our model, its shapes validated against the inferred architecture."""
    fmt, config, tensors, origin = read_checkpoint(path)
    try:
        model = StyleGAN2Generator(**config)
    except InvalidArgument as exc:
        raise CheckpointError(f"{Path(path).name}: inferred architecture is not valid: {exc.message}") from exc
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    expected = model.state_dict()
    for key, tensor in expected.items():  # the first mismatch, named as in the file
        if key in tensors and tuple(tensors[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{Path(path).name} ({fmt}): tensor {origin.get(key, key)} has shape {list(tensors[key].shape)}; the "
                f"architecture inferred from the file ({describe(config)}) needs {list(tensor.shape)} (our {key})")
    try:
        check_state(model, tensors)
    except InvalidArgument as exc:
        raise CheckpointError(f"{Path(path).name} ({fmt}, inferred {describe(config)}): {exc.message}") from exc
    model.load_state_dict(tensors, strict=True)
    return fmt, model.eval()


def describe(config: dict) -> str:
    return (f"{config['resolution']} px, z {config['z_dim']}, w {config['w_dim']}, {config['mapping_layers']} mapping "
            f"layers, channels {config['channels']}")


def import_checkpoint(repo: ModelRepository, path: str | Path, name: str,
                      log: Callable[[str], None] = lambda _msg: None) -> Entry:
    """Convert a rosinality .pt or NVIDIA .pkl StyleGAN2 into a generator entry `name` (a new version)."""
    validate_name(name, "name")
    path = Path(path)
    log(f"reading {path} ...")
    fmt, model = convert(path)
    config = model.config()
    log(f"{fmt}: {describe(config)}, num_ws {model.num_ws}, w_avg {'present' if model.has_w_avg else 'absent'}")
    source_sha = file_sha256(path)
    repo.check_writable(name, "generator")

    def populate(folder: Path) -> None:
        save_file(weights(model), str(folder / "weights.safetensors"))

    entry = repo.write(name, {
        "kind": "generator", "architecture": ARCHITECTURE, "config": config,
        "files": {"weights": "weights.safetensors"},
        "provenance": {"source": path.name, "format": fmt, "source_sha256": source_sha,
                       "note": "imported with latentedit models import (converted to safetensors; the source file is not kept)"},
    }, populate)
    log(f"wrote {entry.name} v{entry.version} ({entry.path})")
    return entry
