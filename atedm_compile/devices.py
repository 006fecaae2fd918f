"""Where a model runs: device and dtype names (``--device cuda --dtype fp16``) checked against this
machine, casts, and the clock of a device."""

from __future__ import annotations

import time

import torch

# The one dtype vocabulary: the short names of --dtype, --precision and manifests' precision; the
# names torch and numpy spell (float32...) are taken too.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` -> ``torch.device``; ValueError naming the device when this
    machine does not have it."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device {str(name)!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} is not available here: torch {torch.__version__} sees no CUDA GPU "
                         f"(use --device cpu)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(name)!r} is not available here: {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``fp32``, ``fp16`` or ``bf16`` (or ``float32``, ``float16``, ``bfloat16``, or one of those
    ``torch.dtype``s) -> ``torch.dtype``; ValueError naming the value and the names allowed.

    Example:
        >>> resolve_dtype("fp16"), resolve_dtype("bfloat16"), dtype_name(torch.float32)
        (torch.float16, torch.bfloat16, 'fp32')
    """
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    short = DTYPE_ALIASES.get(name, name) if isinstance(name, str) else name
    if not isinstance(short, str) or short not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {list(DTYPES)} (or {', '.join(DTYPE_ALIASES)})")
    return DTYPES[short]


def dtype_name(dtype: str | torch.dtype) -> str:
    """The short name (``fp32``, ``fp16``, ``bf16``) of a dtype or any name ``resolve_dtype`` takes."""
    dtype = resolve_dtype(dtype)
    return next(name for name, value in DTYPES.items() if value == dtype)


def cast(module: torch.nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """``module.to(device, dtype)`` in place, without diffusers' warning (its models warn at every
    dtype cast, even with no module to keep in float32). Returns the module."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Times calls on a device: CUDA events on a GPU (no host wait between calls; read the times
    once at the end), ``perf_counter`` on the CPU.

    Example:
        >>> watch = Stopwatch(torch.device("cpu"))
        >>> with watch:
        ...     _ = torch.ones(8) * 2
        >>> len(watch.milliseconds())
        1
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._spans: list = []

    def __enter__(self):
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        self._spans.append([start, None])
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self._spans[-1][1] = end
        return False

    def milliseconds(self) -> list[float]:
        """Each timed span in ms (waits for the device first)."""
        synchronize(self.device)
        if self.device.type == "cuda":
            return [start.elapsed_time(end) for start, end in self._spans]
        return [(end - start) * 1e3 for start, end in self._spans]
