"""Execution backends for generators, behind one interface.

- torch: any layer to any later layer; CPU, or CUDA (fp16 by default there).
- ONNX Runtime: the latent -> image graph, exported once per model version (dynamic batch
  axis) and cached in the repository's `.cache/onnx`.
- TensorRT: built from that ONNX export with an optimisation profile over the batch size;
  engines are cached under a key of ONNX hash, TensorRT version, GPU and profile.

Feature-layer requests need the staged torch graph; the exported backends only serve the
whole latent -> image path, and the service routes other requests to torch.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from latentedit.api.v1 import types_pb2
from latentedit.models.generator import IMAGE_LAYER, INPUT_LAYER, StagedGenerator
from latentedit.repository import ModelRepository, atomic_write_bytes

log = logging.getLogger(__name__)

BACKEND_NAMES = {
    types_pb2.BACKEND_TORCH: "torch",
    types_pb2.BACKEND_ONNXRUNTIME: "onnxruntime",
    types_pb2.BACKEND_TENSORRT: "tensorrt",
}
BACKENDS_BY_NAME = {name: kind for kind, name in BACKEND_NAMES.items()}


class GeneratorBackend(ABC):
    kind: int

    @property
    def name(self) -> str:
        return BACKEND_NAMES[self.kind]

    def supports(self, from_layer: str, to_layers: Sequence[str]) -> bool:
        return from_layer == INPUT_LAYER and tuple(to_layers) == (IMAGE_LAYER,)

    @abstractmethod
    def run(self, x: np.ndarray, from_layer: str, to_layers: Sequence[str]) -> dict[str, np.ndarray]:
        """Features at `from_layer` (float32, batch first) -> float32 features at `to_layers`."""


def cuda_available() -> bool:
    return torch.cuda.is_available()


class TorchBackend(GeneratorBackend):
    kind = types_pb2.BACKEND_TORCH

    def __init__(self, model: StagedGenerator, device: str = "cpu", fp16: bool = False) -> None:
        self.device = torch.device(device)
        self.dtype = torch.float16 if (fp16 and self.device.type == "cuda") else torch.float32
        self.model = model.to(self.device, self.dtype).eval()

    def supports(self, from_layer: str, to_layers: Sequence[str]) -> bool:
        return True

    def run(self, x: np.ndarray, from_layer: str, to_layers: Sequence[str]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            inputs = torch.from_numpy(x).to(self.device, self.dtype, non_blocking=True)
            outputs = self.model.run(inputs, from_layer, to_layers)
            return {name: t.float().cpu().numpy() for name, t in outputs.items()}


def export_onnx(model: StagedGenerator, opset: int) -> bytes:
    """The input-layer -> image graph as ONNX bytes, with a dynamic batch axis (Z latents for the
    DCGAN; W+ latents for style generators, whose Z and W requests are mapped and broadcast to
    W+ before the graph, so one export serves all three spaces)."""
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()  # never move the serving copy
    example = torch.zeros(2, *model.spec.layers[0].shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=["latent"],
            output_names=["image"],
            dynamic_axes={"latent": {0: "batch"}, "image": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return buffer.getvalue()


def cached_onnx_export(model: StagedGenerator, repo: ModelRepository, weights_sha: str, opset: int) -> Path:
    """Export once per (weights, opset, torch version); later calls reuse the cached file."""
    key = hashlib.sha256(f"{weights_sha}-{opset}-{torch.__version__}".encode()).hexdigest()[:24]
    path = repo.cache_path("onnx", key, ".onnx")
    if not path.exists():
        log.info("exporting ONNX graph to %s", path)
        atomic_write_bytes(path, export_onnx(model, opset))
    return path


class OnnxRuntimeBackend(GeneratorBackend):
    kind = types_pb2.BACKEND_ONNXRUNTIME

    def __init__(self, onnx_path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray, from_layer: str, to_layers: Sequence[str]) -> dict[str, np.ndarray]:
        (image,) = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return {IMAGE_LAYER: image}


def tensorrt_available() -> bool:
    if not cuda_available():
        return False
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


class TensorRTBackend(GeneratorBackend):
    """TensorRT engine over the ONNX export; input/output buffers are torch CUDA tensors."""

    kind = types_pb2.BACKEND_TENSORRT

    def __init__(self, onnx_path: Path, repo: ModelRepository, input_shape: int | Sequence[int], max_batch: int,
                 fp16: bool) -> None:
        """`input_shape`: the per-sample input-layer shape ((dim,) for Z generators, (num_ws, w_dim) for
        W+ ones; an int means (dim,))."""
        import tensorrt as trt

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.input_shape = (input_shape,) if isinstance(input_shape, int) else tuple(int(d) for d in input_shape)
        self.max_batch = max_batch
        onnx_bytes = onnx_path.read_bytes()
        profile = (1, min(64, max_batch), max_batch)
        # FP16 builder flag exists up to TensorRT 10; TensorRT 11 builds strongly typed networks
        # whose precision comes from the ONNX graph, so fp16 there needs an fp16 export.
        use_fp16_flag = fp16 and hasattr(trt.BuilderFlag, "FP16")
        gpu = torch.cuda.get_device_name().replace(" ", "_")
        key = hashlib.sha256(
            f"{hashlib.sha256(onnx_bytes).hexdigest()}-{trt.__version__}-{gpu}-{profile}-fp16={use_fp16_flag}".encode()
        ).hexdigest()[:24]
        engine_path = repo.cache_path("tensorrt", key, ".engine")
        runtime = trt.Runtime(self.logger)
        if not engine_path.exists():
            log.info("building TensorRT engine %s (profile %s)", engine_path, profile)
            atomic_write_bytes(engine_path, self._build(onnx_bytes, profile, use_fp16_flag))
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load the cached engine {engine_path}")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = "latent", "image"

    def _build(self, onnx_bytes: bytes, profile: tuple[int, int, int], fp16: bool) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse the ONNX export: {errors}")
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        opt = builder.create_optimization_profile()
        opt.set_shape("latent", *((batch, *self.input_shape) for batch in profile))
        config.add_optimization_profile(opt)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT engine build failed")
        return bytes(serialized)

    def run(self, x: np.ndarray, from_layer: str, to_layers: Sequence[str]) -> dict[str, np.ndarray]:
        outputs = []
        for start in range(0, len(x), self.max_batch):
            chunk = torch.from_numpy(np.ascontiguousarray(x[start : start + self.max_batch], dtype=np.float32)).cuda()
            self.context.set_input_shape(self.input_name, tuple(chunk.shape))
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), device="cuda", dtype=torch.float32)
            self.context.set_tensor_address(self.input_name, chunk.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            stream = torch.cuda.current_stream()
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            stream.synchronize()
            outputs.append(out.cpu().numpy())
        return {IMAGE_LAYER: np.concatenate(outputs)}
