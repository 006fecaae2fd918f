"""TensorRT backend: one engine per phase graph, built with polygraphy, cached by content.

UNTESTED: TensorRT cannot be installed where this was written (no NVIDIA index, no GPU). The code
follows the TensorRT 10 Python API and polygraphy 0.53; ``tests/test_export_tensorrt.py`` runs it
where both and a CUDA GPU are present and skips otherwise.

Facts it is written for (PAPER.md section 5): engines are per static shape profile; TensorRT 11
has no fp16 builder flag, so an fp16 build parses the fp16 ONNX as a strongly typed network.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from ..files import write_atomically
from .backend import Backend
from .contract import TensorSpec
from .extras import UnavailableError, require_extra
from .keys import sha256_file, sha256_json
from .stages import BuildStage

DEFAULT_OPTIMIZATION_LEVEL = 3
TIMING_CACHE = "timing.cache"


def require_tensorrt():
    """Import TensorRT, or raise an UnavailableError (MissingExtraError) that says what is missing."""
    require_extra(TensorRTBackend.extra, "the tensorrt backend (with a CUDA GPU)", TensorRTBackend.modules)
    import tensorrt

    if not torch.cuda.is_available():
        raise UnavailableError("the tensorrt backend needs a CUDA GPU; torch sees none")
    return tensorrt


def tensorrt_missing_reason() -> str | None:
    """Why the TensorRT path cannot run here, or None when it can."""
    return TensorRTBackend().missing()


def engine_key(onnx_sha256: str, inputs: dict[str, TensorSpec], precision: str,
               optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL) -> str:
    """Cache key of an engine: ONNX content, shapes, precision, TensorRT version, GPU compute capability."""
    trt = require_tensorrt()
    major, minor = torch.cuda.get_device_capability()
    return sha256_json({
        "onnx": onnx_sha256,
        "inputs": {name: spec.to_dict() for name, spec in inputs.items()},
        "precision": precision,
        "tensorrt": trt.__version__,
        "compute_capability": f"{major}.{minor}",
        "optimization_level": optimization_level,
    })


def build_engine(onnx_path: Path, engine_path: Path, inputs: dict[str, TensorSpec], precision: str,
                 timing_cache: Path, optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL) -> Path:
    """Build one engine with a static profile at ``inputs``' shapes; written under a temporary
    name and renamed, so an interrupted build leaves no engine behind."""
    require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    profile = Profile()
    for name, spec in inputs.items():
        profile.add(name, min=spec.shape, opt=spec.shape, max=spec.shape)
    # An fp16 graph is built strongly typed: the ONNX dtypes decide, including the float32 softmax.
    network = network_from_onnx_path(str(onnx_path), strongly_typed=precision == "fp16")
    config = CreateConfig(profiles=[profile], builder_optimization_level=optimization_level,
                          load_timing_cache=str(timing_cache) if Path(timing_cache).exists() else None)
    engine = engine_from_network(network, config=config, save_timing_cache=str(timing_cache))
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(engine_path, lambda tmp: save_engine(engine, path=tmp))
    return engine_path


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32}


class TensorRTEngine:
    """One phase engine. ``infer`` takes and returns named torch tensors on the GPU.

    Inputs and outputs are bound to static torch buffers by name. ``device_memory``: a shared
    activation buffer (phases run one at a time, so they can share one). ``cuda_graph``: capture
    the launch once and replay it on later calls.
    """

    def __init__(self, path: Path, device_memory: torch.Tensor | None = None, cuda_graph: bool = False):
        trt = require_tensorrt()
        self.path = Path(path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{self.path}: TensorRT could not deserialize this engine (built by another version?)")
        if device_memory is None:
            self.context = self.engine.create_execution_context()
        else:
            self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if hasattr(self.context, "set_device_memory"):  # TensorRT >= 10.1
                self.context.set_device_memory(device_memory.data_ptr(), device_memory.numel())
            else:
                self.context.device_memory = device_memory.data_ptr()
        self.stream = torch.cuda.Stream()
        self.buffers: dict[str, torch.Tensor] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]
            self.buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())
            (self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(name)
        self.cuda_graph = cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None

    @staticmethod
    def activation_bytes(path: Path) -> int:
        trt = require_tensorrt()
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(path).read_bytes())
        return getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name in self.inputs:
            self.buffers[name].copy_(feed[name].reshape(self.buffers[name].shape))
        self.stream.wait_stream(torch.cuda.current_stream())
        if self.cuda_graph and self._graph is None:
            self._launch()  # TensorRT initialises lazily on the first launch; that must not be captured
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph, stream=self.stream):
                self._launch()
        if self._graph is not None:
            with torch.cuda.stream(self.stream):
                self._graph.replay()
        else:
            self._launch()
        torch.cuda.current_stream().wait_stream(self.stream)
        return {name: self.buffers[name].clone() for name in self.outputs}

    def _launch(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.path.name}: TensorRT execution failed")


def load_engines(paths: dict[str, Path], cuda_graphs: bool = False) -> dict[str, TensorRTEngine]:
    """The engines of all phases, sharing one activation buffer sized for the largest."""
    size = max(TensorRTEngine.activation_bytes(path) for path in paths.values())
    shared = torch.empty(size, dtype=torch.uint8, device="cuda")
    return {name: TensorRTEngine(path, shared, cuda_graphs) for name, path in paths.items()}


def compare_with_onnxruntime(onnx_path: Path, engine_path: Path, inputs: dict[str, TensorSpec], precision: str,
                             atol: float | None = None, rtol: float | None = None) -> bool:
    """Run the ONNX graph in ONNX Runtime and the engine in TensorRT on the same random inputs
    with polygraphy's comparator; True when every output agrees within the tolerances (fp16
    defaults: atol 5e-2, rtol 1e-2; fp32: 1e-3, 1e-3)."""
    require_tensorrt()
    import numpy as np
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator, CompareFunc, DataLoader

    loose = precision == "fp16"
    atol = atol if atol is not None else (5e-2 if loose else 1e-3)
    rtol = rtol if rtol is not None else (1e-2 if loose else 1e-3)
    metadata = TensorMetadata()
    for name, spec in inputs.items():
        metadata.add(name, np.dtype(spec.dtype), spec.shape)
    loader = DataLoader(input_metadata=metadata, val_range={"timestep": (0.0, 999.0), "": (-1.0, 1.0)})
    runners = [
        OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])),
        TrtRunner(EngineFromBytes(Path(engine_path).read_bytes())),
    ]
    results = Comparator.run(runners, data_loader=loader)
    return bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol)))


class TensorRTBackend(Backend):
    """One TensorRT engine per phase graph, built after the graph is checked (a lint issue is
    then an error: TensorRT would fail on it), run on a CUDA GPU."""

    name = "tensorrt"
    title = "TensorRT"
    extra = "tensorrt"
    modules = ("tensorrt", "polygraphy")
    packages = ("tensorrt", "polygraphy")
    device = "cuda"
    strict_lint = True

    def require(self) -> None:
        require_tensorrt()

    def phase_stages(self, plan, entry) -> list[BuildStage]:
        return [BuildStage(f"engine: {entry.name}", partial(self._engine_built, plan, entry),
                           partial(self._build_engine, plan, entry))]

    @staticmethod
    def _key_and_file(plan, entry) -> tuple[str, str]:
        key = engine_key(entry.onnx.sha256, entry.inputs, plan.config.precision, plan.config.optimization_level)
        return key, f"engines/{entry.name}-{key[:16]}.plan"

    def _engine_built(self, plan, entry) -> str | None:
        key, file = self._key_and_file(plan, entry)
        path = plan.directory / file
        if entry.engine_key == key and path.is_file() and entry.engine and sha256_file(path) == entry.engine.sha256:
            return f"{entry.engine.file} is up to date"
        return None

    def _build_engine(self, plan, entry) -> None:
        key, file = self._key_and_file(plan, entry)
        build_engine(plan.directory / entry.onnx.file, plan.directory / file, entry.inputs, plan.config.precision,
                     plan.directory / TIMING_CACHE, plan.config.optimization_level)
        plan.record_engine(entry, file, key)

    def artefacts(self, entry) -> list:
        return [entry.engine]

    def load(self, directory: Path, manifest, *, providers=None, cuda_graphs: bool = False, cpu_cache: bool = True,
             verify: bool = True, log=None) -> dict[str, TensorRTEngine]:
        if any(p.engine is None for p in manifest.phases):
            raise ValueError(f"{directory} was built for {manifest.backend!r}: it has no TensorRT engines; "
                             f"rebuild with --backend {self.name}")
        return load_engines({p.name: directory / p.engine.file for p in manifest.phases}, cuda_graphs)

    def compare(self, directory: Path, entry, precision: str) -> bool:
        return compare_with_onnxruntime(directory / entry.onnx.file, directory / entry.engine.file, entry.inputs,
                                        precision)
