"""``build --verify``: each phase graph in ONNX Runtime against the PyTorch U-Net in its phase."""

from __future__ import annotations

from .contract import WEIGHTS
from .onnx import example_inputs
from .onnxruntime import OrtEngine, SharedWeights


def verify_phase(plan, entry) -> None:
    """ValueError unless ``entry``'s graph in ONNX Runtime gives what the PyTorch U-Net gives in
    its phase, on the same random inputs (relative to the output's largest value)."""
    import torch

    from ..runner import apply, remove

    unet = plan.real_unet()
    own = plan.runner is None or plan.traced is not unet  # the exported U-Net was a meta copy
    runner = apply(unet, plan.pruning_schedule, plan.config.pruning) if own else plan.runner
    try:
        runner.start(plan.schedule.num_steps)
        runner.use_phase(plan.phase_name(entry))
        feed = example_inputs(plan.all_inputs(entry), seed=1, device=next(unet.parameters()).device)
        with torch.no_grad():
            expected = plan.graph_module(unet, entry)(*feed.values())
    finally:
        if own:
            remove(unet)
    expected = expected if isinstance(expected, tuple) else (expected,)
    shared = SharedWeights(plan.directory / WEIGHTS, plan.store.index)
    got = OrtEngine(plan.directory / entry.onnx.file, shared, providers=["cpu"]).infer(feed)
    error = 0.0
    for name, value in zip(entry.outputs, expected):  # the latent, and a full step's deep features
        value = value.float().cpu()
        error = max(error, (got[name].float() - value).abs().max().item() / max(value.abs().max().item(), 1e-12))
    tolerance = 3e-2 if plan.config.precision == "fp16" else 1e-4
    if not error <= tolerance:
        raise ValueError(f"{entry.onnx.file}: ONNX Runtime differs from PyTorch by {error:.2e} of the output's "
                         f"largest value (allowed {tolerance:.0e})")
    plan.log(f"verify: {entry.name}: ONNX Runtime matches PyTorch within {error:.2e} of the largest value")
