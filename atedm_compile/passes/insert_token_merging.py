"""Pass: ToMe for SD (supp. B.1), the baseline: merge tokens before and unmerge them after the
chosen sub-layers of every layer of a block, as ``tomesd.apply_patch`` does."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import tome
from ..tracing import ROLE, finalize, node_with_role, open_layer

SUBLAYERS = {"self-attention": "attn1", "cross-attention": "attn2", "ff": "ff"}
DESTINATIONS = ("random", "fixed")


@dataclass(frozen=True)
class ToMeConfig:
    """Args:
    ratio: share of a layer's tokens merged away, r = int(N * ratio) (tomesd's ``ratio``); at
        most 1 - 1 / (sx * sy), 0.75 with 2 x 2 cells. 0.5 is the paper's baseline at 4.1 TMACs.
    sublayers: where to merge, any of ``self-attention``, ``cross-attention``, ``ff`` (tomesd's
        ``merge_attn``, ``merge_crossattn``, ``merge_mlp``). Default: all three, the paper's baseline.
    destination: ``random`` (one token per cell drawn from ``seed``, the same draw at every call;
        tomesd's ``use_rand=True`` redraws at every call) or ``fixed`` (the top-left token of every
        cell, tomesd's ``use_rand=False``).
    seed: seed of the ``random`` destinations; layer i of a block draws from ``seed + i``.
    sx, sy: cell width and height in tokens.

    Every layer of every block it is applied to merges: tomesd's ``max_downsample`` is the choice
    of blocks, which belongs to the caller (the paper's baseline: all levels).
    """

    ratio: float = 0.5
    sublayers: tuple[str, ...] = ("self-attention", "cross-attention", "ff")
    destination: str = "random"
    seed: int = 0
    sx: int = 2
    sy: int = 2

    def __post_init__(self):
        for field in ("sx", "sy"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} must be an integer >= 1")
        check_merge_ratio(self.ratio, self.sx, self.sy)
        if not self.sublayers or any(s not in SUBLAYERS for s in self.sublayers):
            raise ValueError(f"sublayers={self.sublayers!r}: choose one or more of {list(SUBLAYERS)}")
        if self.destination not in DESTINATIONS:
            raise ValueError(f"destination={self.destination!r} is not allowed; choose one of {list(DESTINATIONS)}")


def check_merge_ratio(ratio, sx: int = 2, sy: int = 2) -> float:
    """A merge ratio lies in [0, 1 - 1 / (sx * sy)]: each cell keeps its destination."""
    cap = 1.0 - 1.0 / (sx * sy)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= cap:
        raise ValueError(f"merge ratio={ratio!r} is outside [0, {cap}] (one destination per {sy}x{sx} cell stays)")
    return float(ratio)


def _static_sizes(*sizes) -> tuple[int, ...]:
    # Traced for export, sizes are tensors; the grid is static per engine (one per shape
    # profile), so they become constants on purpose and the tracer's warning says nothing new.
    if torch.compiler.is_compiling():  # plain ints there, and no warnings filter to trace
        return tuple(int(size) for size in sizes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return tuple(int(size) for size in sizes)


class TokenMatching(torch.nn.Module):
    """Computes the matching of one layer from the hidden states entering it.

    forward(x [B, N, C], grid [B, C', H, W] (the block input, for H and W; N = H * W)) -> tome.Matching
    """

    def __init__(self, ratio: float, sx: int, sy: int, seed: int | None, where: str = ""):
        super().__init__()
        self.ratio = ratio
        self.sx, self.sy = sx, sy
        self.seed = seed
        self.where = where
        # (height, width, device) -> the grid's split, kept from eager calls: on a GPU, no
        # host-to-device copy (and wait) per layer and call; a compiled graph reads it as a constant.
        self._splits: dict = {}

    def extra_repr(self) -> str:
        return f"where={self.where!r}, ratio={self.ratio}, cell={self.sy}x{self.sx}, seed={self.seed}"

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> tome.Matching:
        height, width, tokens = _static_sizes(grid.shape[-2], grid.shape[-1], x.shape[1])
        if height * width != tokens:
            raise ValueError(f"{self.where}: {tokens} tokens do not form the {height}x{width} grid")
        r = tome.merge_count(tokens, self.ratio)
        key = (height, width, x.device)
        split = None if torch.jit.is_tracing() else self._splits.get(key)
        if split is None and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            split = self._splits[key] = tome.grid_split(height, width, self.sx, self.sy, self.seed, x.device)
        return tome.bipartite_soft_matching(x, height, width, r, self.sx, self.sy, self.seed, split)


class TokenMerge(torch.nn.Module):
    """forward(x [B, N, C], matching) -> [B, N - r, C]"""

    def forward(self, x: torch.Tensor, matching: tome.Matching) -> torch.Tensor:
        return tome.merge_tokens(x, matching)


class TokenUnmerge(torch.nn.Module):
    """forward(x [B, N - r, C], matching) -> [B, N, C]"""

    def forward(self, x: torch.Tensor, matching: tome.Matching) -> torch.Tensor:
        return tome.unmerge_tokens(x, matching)


def _layer_indices(gm: fx.GraphModule) -> list[int]:
    """The layers the graph calls (the GraphModule holds only the submodules it calls)."""
    targets = [n.target.split(".") for n in gm.graph.nodes if n.op == "call_module"]
    return sorted({int(t[1]) for t in targets if len(t) > 1 and t[0] == "transformer_blocks"})


def _sublayer_call(gm: fx.GraphModule, target: str) -> fx.Node | None:
    found = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    return found[0] if found else None


def insert_token_merging(
    gm: fx.GraphModule,
    ratio: float | None = None,
    config: ToMeConfig = ToMeConfig(),
    block_name: str = "",
) -> fx.GraphModule:
    """Open every layer of a traced block and wrap each of ``config.sublayers`` in a merge of its
    input and an unmerge of its output; the matching of a layer is computed once from the hidden
    states entering it, on the grid of the block input (``tomesd``'s ``compute_merge``, which
    derives the grid from the latent size and the token count: the same H and W for every latent
    that ``runner.check_latent`` accepts).

    Args:
        gm: a block traced by ``tracing.trace_block``.
        ratio: the merge ratio; ``None`` takes ``config.ratio``.
        config: sub-layers, destinations, cells.
        block_name: for messages and the inserted modules' ``repr``.

    Adds modules ``tome_match_{i}``, ``tome_merge_{i}``, ``tome_unmerge_{i}`` for layer i and nodes
    with roles ``tome_matching``, ``tome_merged``, ``tome_unmerged``. Returns the graph unchanged
    when the ratio is 0 or the block already merges.

    Example:
        >>> from atedm_compile.models import build_unet
        >>> from atedm_compile.tracing import trace_block
        >>> unet = build_unet("tiny")
        >>> gm = insert_token_merging(trace_block(unet.mid_block.attentions[0]), 0.5)
        >>> sample = torch.randn(1, 128, 8, 8)
        >>> gm(sample, torch.randn(1, 77, 64))[0].shape
        torch.Size([1, 128, 8, 8])
    """
    ratio = check_merge_ratio(config.ratio if ratio is None else ratio, config.sx, config.sy)
    if ratio == 0.0 or any(name.startswith("tome_") for name, _ in gm.named_children()):
        return gm
    grid = node_with_role(gm, "block_input")
    if grid is None:
        raise ValueError("graph has no block input (role 'block_input'): trace it with tracing.trace_block")
    graph = gm.graph
    for index in _layer_indices(gm):
        open_layer(gm, index, block_name or "block")
        prefix = f"tome_{{}}_{index}"
        seed = None if config.destination == "fixed" else config.seed + index
        gm.add_submodule(prefix.format("match"), TokenMatching(ratio, config.sx, config.sy, seed, f"{block_name}[{index}]"))
        gm.add_submodule(prefix.format("merge"), TokenMerge())
        gm.add_submodule(prefix.format("unmerge"), TokenUnmerge())

        norm1 = _sublayer_call(gm, f"transformer_blocks.{index}.norm1")
        with graph.inserting_before(norm1):
            matching = graph.call_module(prefix.format("match"), (norm1.args[0], grid))
        matching.meta[ROLE] = "tome_matching"
        for sublayer in config.sublayers:
            node = _sublayer_call(gm, f"transformer_blocks.{index}.{SUBLAYERS[sublayer]}")
            if node is None:
                continue
            with graph.inserting_before(node):
                merged = graph.call_module(prefix.format("merge"), (node.args[0], matching))
            node.replace_input_with(node.args[0], merged)
            with graph.inserting_after(node):
                unmerged = graph.call_module(prefix.format("unmerge"), (node, matching))
            node.replace_all_uses_with(unmerged, delete_user_cb=lambda user: user is not unmerged)
            merged.meta[ROLE] = "tome_merged"
            unmerged.meta[ROLE] = "tome_unmerged"
    return finalize(gm)
