"""Content keys: the sha256 of files and JSON data, what every artefact of a build depends on
(``build_settings``) and what one phase graph is made from (``export_key``)."""

from __future__ import annotations

from ..files import sha256_file, sha256_json  # noqa: F401  (re-exported: the export package's names)
from .contract import FORMAT_VERSION, TensorSpec


def export_key(manifest, rules: list, inputs: dict[str, TensorSpec], role: str | None = None) -> str:
    """What one phase graph is made from: the model, precision, exporter, opset and tool versions,
    the phase's rules, the pruning settings and the input specs (not its step range: the same graph
    serves any). In a build with cached steps, also the graph's role and the cache's branch (not
    its interval or spacing, which decide only which graph a step runs). A graph is re-exported
    when its key changes."""
    content = {"format": FORMAT_VERSION, "settings": build_settings(manifest), "rules": rules,
               "pruning": manifest.pruning, "inputs": {k: v.to_dict() for k, v in inputs.items()},
               "atedm": manifest.tools["atedm-compile"]}
    if role is not None:  # builds without a cache keep the keys they had
        content["step"] = {"role": role, "branch": manifest.schedule["cache"]["branch"]}
    return sha256_json(content)


def build_settings(manifest) -> dict:
    """What every artefact of a build depends on: when it changes, nothing of an older build is reused."""
    identity = {k: v for k, v in manifest.model.items() if k != "config"}
    return {"model": identity, "precision": manifest.precision, "exporter": manifest.exporter,
            "opset": manifest.opset, "torch": manifest.tools.get("torch")}
