"""What an export backend is: the interface the build, ``load``, ``check`` and the commands ask,
so that none of them names a backend. The implementations live beside their engines
(``onnxruntime.OnnxRuntimeBackend``, ``tensorrt.TensorRTBackend``); the table of them, keyed by
the name ``--backend`` takes and the manifest records, is ``backends.BACKENDS``.

An engine (what ``load`` returns per phase graph) has one method, ``infer(feed) -> outputs``:
named torch tensors in, named torch tensors out (``latent``, and ``deep_features`` from a full
step of a build with cached steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .extras import UnavailableError, require_extra
from .stages import BuildStage


class Backend:
    """One way to run a build's phase graphs. Subclass it and override what differs.

    Attributes:
        name: what ``--backend`` takes and the manifest records.
        title: the name for people (``ONNX Runtime``).
        extra, modules: the pip extra that installs it and the modules it needs (``missing``).
        packages: the distributions whose versions every manifest records (``backends.tool_versions``).
        device: where its engines take their inputs (``cpu``, or ``cuda``: the memory a run needs
            is counted on the GPU, and the exported U-Net reports that device to its pipeline).
        strict_lint: a TensorRT-compatibility issue in a phase graph fails the build (the backend
            compiles the graphs further) instead of being a warning.
    """

    name: str = ""
    title: str = ""
    extra: str = ""
    modules: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    device: str = "cpu"
    strict_lint: bool = False

    def require(self) -> None:
        """Raise ``UnavailableError`` (saying what is missing: a module, the hardware) where this
        backend cannot run here."""
        if self.modules:
            require_extra(self.extra, f"the {self.name} backend", self.modules)

    def missing(self) -> str | None:
        """Why this backend cannot run here (``require``'s message), None when it can."""
        try:
            self.require()
        except UnavailableError as error:
            return str(error)
        return None

    def check_options(self, providers: list[str] | None = None) -> None:
        """ValueError for load options this machine cannot honour, before anything is loaded."""

    def phase_stages(self, plan, entry) -> list[BuildStage]:
        """The build stages of one phase after its ONNX graph is checked (an engine, say); each
        records what it made with ``plan.record_engine``. None by default: the graphs are enough."""
        return []

    def artefacts(self, entry) -> list:
        """The files of ``entry`` this backend runs besides its ONNX graph (``verify_artefacts``)."""
        return []

    def load(self, directory: Path, manifest, *, providers: list[str] | None = None,
             cuda_graphs: bool = False, cpu_cache: bool = True, verify: bool = True,
             log: Callable[[str], None] | None = None) -> dict:
        """Phase name -> engine for every graph of the build in ``directory``."""
        raise NotImplementedError(f"the {self.name} backend cannot load builds")

    def compare(self, directory: Path, entry, precision: str) -> bool | None:
        """Whether this backend's own artefact of ``entry`` agrees with the ONNX graph in ONNX
        Runtime (``check``); None where it has nothing of its own to compare."""
        return None

