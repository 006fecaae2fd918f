"""Whether a build's files are the ones its manifest lists: complete, each with its recorded
sha256, and each phase graph saying in its ONNX metadata which phase it is."""

from __future__ import annotations

from pathlib import Path

from .contract import EXPORT_KEY, MANIFEST, PHASE_KEY, ManifestError
from .keys import sha256_file


def verify_artefacts(directory: Path, manifest, engines: bool = True) -> None:
    """ManifestError unless the build is complete and every artefact exists with its recorded hash
    (``engines``: also what its backend built besides the graphs, ``Backend.artefacts``)."""
    directory = Path(directory)
    if not manifest.complete:
        raise ManifestError(f"{directory} holds an incomplete build (interrupted?): run `atedm-compile build` again")
    from .backends import get_backend

    backend = get_backend(manifest.backend)
    artefacts = [manifest.weights] if manifest.weights else []
    for phase in manifest.phases:
        artefacts.append(phase.onnx)
        if engines:
            artefacts += backend.artefacts(phase)
    for artefact in artefacts:
        if artefact is None:
            raise ManifestError(f"{directory / MANIFEST} lists a phase without its artefact: rebuild")
        check_artefact(directory, artefact)
    for phase in manifest.phases:
        check_graph_metadata(directory / phase.onnx.file, phase)


def check_graph_metadata(path: Path, phase) -> None:
    """ManifestError unless the graph at ``path`` says it is ``phase`` (name and export key)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    found = (props.get(PHASE_KEY), props.get(EXPORT_KEY))
    if found != (phase.name, phase.export_key):
        raise ManifestError(
            f"{path} is the graph of phase {found[0]!r} (export key {str(found[1])[:16]}...), but the manifest "
            f"lists it for phase {phase.name!r} (export key {phase.export_key[:16]}...): rebuild with "
            f"`atedm-compile build`")


def check_artefact(directory: Path, artefact) -> None:
    path = Path(directory) / artefact.file
    if not path.is_file():
        raise ManifestError(f"artefact {path} is missing: rebuild with `atedm-compile build`")
    actual = sha256_file(path)
    if actual != artefact.sha256:
        raise ManifestError(
            f"artefact {path} was altered: sha256 {actual[:16]}... but the manifest expects "
            f"{artefact.sha256[:16]}...; rebuild with `atedm-compile build`"
        )
