"""ONNX Runtime backend: one session per phase graph, all sharing the weights in memory.

``weights.bin`` is memory-mapped once; every weight is handed to every session that names it with
``SessionOptions.add_initializer``, which makes the session use that buffer instead of reading
its own copy. Weight pre-packing is turned off because pre-packed weights are private to each
session, and on the CPU all sessions allocate activations from one arena registered with the
environment.

ONNX Runtime's CPU graph optimisation (``ORT_ENABLE_ALL``) writes new tensors of its own: blocked
(NCHWc) copies of convolution weights, folded constants. Done at load, each session makes its own
(all phases cost 1.29 x one phase on the tiny model). So on the CPU ``load`` optimises the phase
graphs once per machine instead (``optimize_for_cpu``), pools the optimised graphs' tensors by
content into one file, and runs the optimised graphs with optimisation off: the blocked weights are
then shared like any other. The optimised graphs hold layouts for this CPU (ONNX Runtime says so
when it writes them), so they live in a cache keyed by the onnxruntime version and the CPU's
feature flags, never in the portable artefacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from .backend import Backend
from .contract import WEIGHTS
from .keys import sha256_file, sha256_json

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def resolve_providers(providers: list[str] | None) -> list[str]:
    """ONNX Runtime provider names for short or full names; the default is CUDA when present, else CPU.

    Raises ValueError for a provider that this onnxruntime build does not have.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        return [PROVIDERS["cuda"], PROVIDERS["cpu"]] if PROVIDERS["cuda"] in available else [PROVIDERS["cpu"]]
    resolved = [PROVIDERS.get(p, p) for p in providers]
    missing = [p for p in resolved if p not in available]
    if missing:
        hint = (" (the CUDA provider comes with onnxruntime-gpu: pip install \"atedm-compile[gpu]\")"
                if PROVIDERS["cuda"] in missing else "")
        raise ValueError(f"execution providers {missing} are not in this onnxruntime build; "
                         f"available: {available}{hint}")
    return resolved


class SharedWeights:
    """The tensors of ``weights.bin`` as ONNX Runtime values over one read-only memory map."""

    def __init__(self, path: Path, index: dict[str, dict]):
        import onnxruntime as ort

        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.arrays: dict[str, np.ndarray] = {}
        for entry in index.values():
            raw = self._map[entry["offset"]:entry["offset"] + entry["length"]]
            self.arrays[entry["name"]] = raw.view(_NUMPY_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in self.arrays.items()}


_SHARED_ARENA = False


def _register_shared_arena() -> None:
    """One CPU arena for every session of this process (``session.use_env_allocators``): phases run
    one at a time, so their activations can live in the same memory."""
    global _SHARED_ARENA
    if _SHARED_ARENA:
        return
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
    _SHARED_ARENA = True


class OrtEngine:
    """One phase graph in an ONNX Runtime session. ``infer`` takes and returns named torch tensors.

    With CUDA the inputs and output are bound to torch's GPU buffers (IO binding, no host copies).
    """

    def __init__(self, path: Path, shared: SharedWeights | None = None, providers: list[str] | None = None,
                 threads: int = 0, optimized: bool = False):
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        # The session reads the shared buffers in place: they must live as long as it does.
        self.shared = shared
        self.providers = resolve_providers(providers)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if optimized:  # optimised offline by optimize_for_cpu: optimising again would copy weights
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
        # Spinning worker threads keep the cores busy between calls and starve the rest of the
        # pipeline (text encoders, VAE, scheduler) running in PyTorch on the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.providers[0] == PROVIDERS["cpu"]:
            _register_shared_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
        if shared is not None:
            graph = onnx.load(str(self.path), load_external_data=False)
            for tensor in graph.graph.initializer:
                if tensor.name in shared.values:
                    options.add_initializer(tensor.name, shared.values[tensor.name])
        self.session = ort.InferenceSession(str(self.path), options, providers=self.providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = {o.name: o for o in self.session.get_outputs()}
        self.on_cuda = self.session.get_providers()[0] in (PROVIDERS["cuda"], PROVIDERS["tensorrt"])

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [name for name in self.inputs if name not in feed]
        if missing:
            raise ValueError(f"{self.path.name}: inputs {missing} are missing; the graph takes {self.inputs}")
        if self.on_cuda:
            return self._infer_bound(feed)
        arrays = {name: feed[name].detach().cpu().contiguous().numpy() for name in self.inputs}
        results = self.session.run(list(self.outputs), arrays)
        return {name: torch.from_numpy(value) for name, value in zip(self.outputs, results)}

    def _infer_bound(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        device = torch.device("cuda", torch.cuda.current_device())
        kept = []  # the bound tensors must outlive the run
        for name in self.inputs:
            tensor = feed[name].to(device).contiguous()
            kept.append(tensor)
            binding.bind_input(name, "cuda", device.index, _numpy_dtype(tensor.dtype), list(tensor.shape),
                               tensor.data_ptr())
        results = {}
        for name, meta in self.outputs.items():
            dtype = torch.float16 if "float16" in meta.type else torch.float32
            results[name] = torch.empty(meta.shape, dtype=dtype, device=device)
            binding.bind_output(name, "cuda", device.index, _numpy_dtype(dtype), list(meta.shape),
                                results[name].data_ptr())
        self.session.run_with_iobinding(binding)
        return results


def _numpy_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]


CPU_CACHE = "onnxruntime-cpu"
_INDEX = "index.json"


def cpu_signature() -> str:
    """What ONNX Runtime's CPU optimisations depend on: its version, the machine and the CPU's
    feature flags (the NCHWc block size follows the vector width)."""
    import onnxruntime as ort

    flags = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    text = f"{ort.__version__}|{platform.machine()}|{' '.join(sorted(flags.split(':')[-1].split()))}"
    return hashlib.sha256(text.encode()).hexdigest()


def optimize_for_cpu(directory: Path, manifest, cache: Path | None = None, log=None,
                     verify: bool = True) -> tuple[dict[str, Path], SharedWeights]:
    """The phase graphs of a build, optimised by ONNX Runtime for this CPU, and their pooled weights.

    Made once per (phase graphs, weights, onnxruntime version, CPU) under ``cache`` (default:
    ``DIR/onnxruntime-cpu``, or ``~/.cache/atedm-compile`` where DIR is read-only) and reused; built
    in a temporary folder and renamed, so an interrupted run leaves nothing half-written. With
    ``verify``, a cached file whose sha256 no longer matches the one recorded makes it optimise
    again. Returns (phase name -> optimised graph, the shared weights those graphs name).
    """
    import json

    import onnx
    import onnxruntime as ort

    from ..files import folder_atomically, remove_leftovers
    from .onnx import MIN_SHARED_BYTES, WeightStore, share_weights

    directory = Path(directory)
    key = sha256_json({"graphs": {p.name: p.onnx.sha256 for p in manifest.phases},
                       "weights": manifest.weights.sha256 if manifest.weights else None,
                       "cpu": cpu_signature()})[:20]
    roots = [Path(cache)] if cache is not None else [
        directory / CPU_CACHE,
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atedm-compile" / CPU_CACHE]
    for root in roots:
        target = root / key
        removed = remove_leftovers(root)  # what interrupted loads left: a full copy of the weights each
        if log and removed:
            log(f"removed {len(removed)} unfinished optimised graphs left in {root} by interrupted loads")
        if (target / _INDEX).is_file():
            if not verify or _intact(target):
                break
            if log:
                log(f"{target} is altered or incomplete: optimising again")
            shutil.rmtree(target, ignore_errors=True)
        with contextlib.ExitStack() as stack:
            try:
                root.mkdir(parents=True, exist_ok=True)
                # Another process that made the same folder first: its copy is kept.
                tmp = stack.enter_context(folder_atomically(target, keep_existing=True))
            except OSError:
                continue  # read-only: try the next place
            if log:
                log(f"optimising {len(manifest.phases)} phase graphs for this CPU (once): {target}")
            store = WeightStore(tmp / WEIGHTS)
            for phase in manifest.phases:
                options = ort.SessionOptions()
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                options.optimized_model_filepath = str(tmp / f"{phase.name}.raw.onnx")
                options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                 f"{phase.name}.raw.bin")
                options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                                 str(MIN_SHARED_BYTES))
                options.log_severity_level = 3  # the "hardware specific" warning is why this is a cache
                ort.InferenceSession(str(directory / phase.onnx.file), options, providers=[PROVIDERS["cpu"]])
                model = onnx.load(str(tmp / f"{phase.name}.raw.onnx"), load_external_data=True)
                onnx.save(share_weights(model, store), str(tmp / f"{phase.name}.onnx"))
                for raw in (f"{phase.name}.raw.onnx", f"{phase.name}.raw.bin"):
                    (tmp / raw).unlink(missing_ok=True)
            files = [WEIGHTS] + [f"{phase.name}.onnx" for phase in manifest.phases]
            (tmp / _INDEX).write_text(json.dumps({"tensors": store.index,
                                                  "sha256": {f: sha256_file(tmp / f) for f in files}}))
        for stale in root.iterdir():  # caches of earlier graphs or other machines' flags
            if stale.name != target.name and not stale.name.startswith("."):
                shutil.rmtree(stale, ignore_errors=True)
        break
    else:
        raise OSError(f"nowhere to write the optimised graphs: {[str(r) for r in roots]} are not writable")
    index = json.loads((target / _INDEX).read_text())
    return ({p.name: target / f"{p.name}.onnx" for p in manifest.phases},
            SharedWeights(target / WEIGHTS, index["tensors"]))


def _intact(target: Path) -> bool:
    """Whether every file of a CPU cache folder still has the sha256 recorded when it was made."""
    import json

    try:
        recorded = json.loads((target / _INDEX).read_text())["sha256"]
        return all(sha256_file(target / name) == digest for name, digest in recorded.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


class OnnxRuntimeBackend(Backend):
    """The phase graphs themselves in ONNX Runtime sessions (``OrtEngine``), on the CPU or, with
    onnxruntime-gpu, CUDA; the sessions share the weights in memory."""

    name = "onnxruntime"
    title = "ONNX Runtime"
    extra = "onnx"
    modules = ("onnx", "onnxruntime")
    packages = ("onnxruntime", "onnxruntime-gpu")

    def check_options(self, providers: list[str] | None = None) -> None:
        resolve_providers(providers)

    def load(self, directory: Path, manifest, *, providers: list[str] | None = None, cuda_graphs: bool = False,
             cpu_cache: bool = True, verify: bool = True, log=None) -> dict[str, OrtEngine]:
        if cpu_cache and resolve_providers(providers)[0] == PROVIDERS["cpu"]:
            paths, shared = optimize_for_cpu(directory, manifest, log=log, verify=verify)
            return {name: OrtEngine(path, shared, providers, optimized=True) for name, path in paths.items()}
        shared = SharedWeights(directory / WEIGHTS, manifest.weights_index) if manifest.weights else None
        return {p.name: OrtEngine(directory / p.onnx.file, shared, providers) for p in manifest.phases}
