"""The export contract as data: the build directory's file names and format version, what each
phase graph takes and returns, which graphs a schedule's build holds, and the error for a build
directory that cannot be used as it is."""

from __future__ import annotations

from dataclasses import dataclass

from ..models import unet_input_shapes


FORMAT = "atedm-compile/export"
FORMAT_VERSION = 2  # 2: seal, vae_factor, config_sha256 for every model, phase metadata in the graphs
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
PRECISIONS = ("fp32", "fp16")
OUTPUT_NAME = "latent"
# The deep features a full-step graph of a build with cached steps also returns, and a
# cached-step graph takes (``caching.FEATURES_NAME``).
FEATURES_NAME = "deep_features"
CACHED_SUFFIX = ".cached"
# ONNX metadata_props of each phase graph: which phase it is and the settings it was made from.
PHASE_KEY = "atedm.phase"
EXPORT_KEY = "atedm.export_key"


class ManifestError(ValueError):
    """A build directory that cannot be used as it is: wrong format version, a missing or altered
    artefact, an incomplete build."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # numpy name: float32, float16

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_dict(data: dict) -> TensorSpec:
        return TensorSpec(tuple(data["shape"]), data["dtype"])


def io_specs(unet_config: dict, batch: int, latent_height: int, latent_width: int,
             precision: str) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """Static input and output specs of one phase graph.

    The timestep stays a float32 scalar in fp16 graphs: the U-Net's sinusoidal embedding runs in
    float32 and casts to the sample dtype itself. SD 1.5 / 2.1 U-Nets have no ``text_embeds`` /
    ``time_ids``.
    """
    dtype = "float16" if precision == "fp16" else "float32"
    shapes = unet_input_shapes(unet_config, batch, latent_height, latent_width)
    inputs = {name: TensorSpec(shape, "float32" if name == "timestep" else dtype) for name, shape in shapes.items()}
    outputs = {OUTPUT_NAME: TensorSpec((batch, unet_config["out_channels"], latent_height, latent_width), dtype)}
    return inputs, outputs


def step_io_specs(unet_config: dict, batch: int, latent_height: int, latent_width: int, precision: str,
                  role: str | None, branch: int | None) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """``io_specs`` of a graph in a build with cached steps: a ``full`` graph also returns the deep
    features at ``branch`` (``caching.features_shape``), a ``cached`` one takes them as its last
    input. ``role`` None: a build without cached steps (``io_specs`` as it is)."""
    inputs, outputs = io_specs(unet_config, batch, latent_height, latent_width, precision)
    if role is None:
        return inputs, outputs
    from ..caching import features_shape

    features = TensorSpec(features_shape(unet_config, branch, batch, latent_height, latent_width),
                          outputs[OUTPUT_NAME].dtype)
    if role == "full":
        return inputs, {**outputs, FEATURES_NAME: features}
    return {**inputs, FEATURES_NAME: features}, outputs


def used_inputs(model, specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
    """``specs`` without the inputs the ONNX graph ``model`` does not take: the exporter leaves
    out an input no layer reads (a cached step cut below every cross-attention block reads no
    ``encoder_hidden_states``), and the manifest lists what the graph takes (a TensorRT profile
    names exactly those)."""
    names = {value.name for value in model.graph.input}
    return {name: spec for name, spec in specs.items() if name in names}


def phase_graphs(schedule) -> list[tuple[str, object, str | None]]:
    """(graph name, schedule phase, role) of every graph a build of ``schedule`` holds: one per
    phase without cached steps (role None); with them, per phase a ``full`` graph under the
    phase's name (every phase has one: the first call of a run is full, wherever it starts) and,
    where the cache rule caches one of its steps, a ``cached`` graph named ``<phase>.cached``."""
    if schedule.cache is None:
        return [(phase.name, phase, None) for phase in schedule.phases]
    graphs = []
    for phase in schedule.phases:
        graphs.append((phase.name, phase, "full"))
        if any(schedule.role_at(step) == "cached" for step in phase.steps):
            graphs.append((phase.name + CACHED_SUFFIX, phase, "cached"))
    return graphs


def manifest_schedule(manifest):
    """The ``Schedule`` a manifest records (preset, steps, options and, where set, the cache)."""
    from ..config import DeepCacheConfig
    from ..schedule import make_schedule

    cache = manifest.schedule.get("cache")
    return make_schedule(manifest.schedule["preset"], manifest.num_steps, **manifest.schedule["options"],
                         cache=DeepCacheConfig(**cache) if cache is not None else None)
