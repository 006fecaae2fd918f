"""Find the attention blocks of a diffusers U-Net, name them, and trace each into an FX graph.

A block (``Transformer2DModel``) is traced with its unused arguments fixed to ``None`` and each
``BasicTransformerBlock`` as a leaf. The first layer is then opened into its sub-layers (norm1,
attn1, norm2, attn2, norm3, ff and the residual adds) so that passes can reach its attention and
the points before and after its feed-forward. Nodes carry ``meta["atedm_role"]`` (the names in ``roles``); passes match
on roles and module paths, never on node names.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from . import roles
from .roles import ROLE
_UNUSED_ARGS = (
    "timestep",
    "added_cond_kwargs",
    "class_labels",
    "cross_attention_kwargs",
    "attention_mask",
    "encoder_attention_mask",
)


@dataclass(frozen=True)
class BlockInfo:
    """One attention block of a U-Net.

    name: stage and position, ``down1.F``, ``mid``, ``up0.M`` (supp. Fig. 3: each down stage has
        F, L; each up stage F, M, L; diffusers' stage index).
    path: module path in the U-Net, ``down_blocks.1.attentions.0``.
    level: feature level, 1 = the highest resolution (SD-XL: no attention at level 1).
    num_layers: ``BasicTransformerBlock`` layers in the block.
    """

    name: str
    path: str
    stage: str
    level: int
    num_layers: int


def _position_names(count: int) -> list[str]:
    if count == 1:
        return ["F"]
    if count == 2:
        return ["F", "L"]
    if count == 3:
        return ["F", "M", "L"]
    return ["F"] + [f"M{i}" for i in range(1, count - 1)] + ["L"]


def attention_blocks(unet: torch.nn.Module) -> list[BlockInfo]:
    """Every ``Transformer2DModel`` of a ``UNet2DConditionModel``, in execution order."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    def blocks_of(stage_module, stage: str, prefix: str, level: int, label: str) -> list[BlockInfo]:
        attentions = [m for m in getattr(stage_module, "attentions", None) or [] if isinstance(m, Transformer2DModel)]
        names = [label] if stage == "mid" else [f"{label}.{p}" for p in _position_names(len(attentions))]
        return [
            BlockInfo(name, f"{prefix}.attentions.{i}", stage, level, len(block.transformer_blocks))
            for i, (name, block) in enumerate(zip(names, attentions))
        ]

    if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
        raise ValueError(f"expected a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    levels = len(unet.down_blocks)
    found: list[BlockInfo] = []
    for i, stage in enumerate(unet.down_blocks):
        found += blocks_of(stage, "down", f"down_blocks.{i}", i + 1, f"down{i}")
    if unet.mid_block is not None:
        found += blocks_of(unet.mid_block, "mid", "mid_block", levels, "mid")
    for i, stage in enumerate(unet.up_blocks):
        found += blocks_of(stage, "up", f"up_blocks.{i}", levels - i, f"up{i}")
    if not found:
        raise ValueError(
            f"{type(unet).__name__} has no attention blocks (Transformer2DModel): nothing to prune"
        )
    return found


def _check_layer(layer: torch.nn.Module, where: str) -> None:
    unsupported = {
        "norm_type": (layer.norm_type, "layer_norm"),
        "pos_embed": (layer.pos_embed, None),
        "only_cross_attention": (layer.only_cross_attention, False),
        "_chunk_size": (layer._chunk_size, None),
    }
    for field, (value, expected) in unsupported.items():
        if value != expected if expected is not None else value is not None:
            raise NotImplementedError(
                f"{where}: BasicTransformerBlock with {field}={value!r} is not supported (only {expected!r})"
            )


def open_layer(gm: fx.GraphModule, index: int, where: str = "block") -> None:
    """Replace the leaf call of ``transformer_blocks.{index}`` by the sub-layer calls of its forward
    (norm1, attn1, norm2, attn2, norm3, ff, residual adds). Layer 0's nodes get roles
    (``self_attention``, ``cross_attention``, ``before_ff``, ``layer_out``). No-op when the layer is
    already open."""
    target = f"transformer_blocks.{index}"
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    if not calls:
        return
    (node,) = calls
    layer = gm.get_submodule(target)
    _check_layer(layer, f"{where} layer {index}")
    graph = gm.graph
    hidden = node.args[0]
    context = node.kwargs["encoder_hidden_states"]

    def mark(new, role):
        if index == 0:
            new.meta[ROLE] = role
        return new

    def sub(name, *args, **kwargs):
        return graph.call_module(f"{target}.{name}", args, kwargs)

    with graph.inserting_before(node):
        attn = mark(sub("attn1", sub("norm1", hidden)), roles.SELF_ATTENTION)
        hidden = graph.call_function(operator.add, (attn, hidden))
        if layer.attn2 is not None:
            attn = mark(sub("attn2", sub("norm2", hidden), encoder_hidden_states=context), roles.CROSS_ATTENTION)
            hidden = graph.call_function(operator.add, (attn, hidden))
        mark(hidden, roles.BEFORE_FF)
        out = mark(graph.call_function(operator.add, (sub("ff", sub("norm3", hidden)), hidden)), roles.LAYER_OUT)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def layer_indices(gm: fx.GraphModule) -> list[int]:
    """The layers the graph calls (the GraphModule holds only the submodules it calls)."""
    targets = [n.target.split(".") for n in gm.graph.nodes if n.op == "call_module"]
    return sorted({int(t[1]) for t in targets if len(t) > 1 and t[0] == "transformer_blocks"})


def sublayer_call(gm: fx.GraphModule, target: str) -> fx.Node | None:
    """The one call of the sub-layer at module path ``target`` (None when the graph has none)."""
    found = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    return found[0] if found else None


def _drop_fixed_arguments(gm: fx.GraphModule) -> None:
    # concrete_args leave placeholders and asserts behind; the traced block takes
    # (hidden_states, encoder_hidden_states) only.
    graph = gm.graph
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and not node.users and node.target is not operator.getitem:
            if "_assert" in getattr(node.target, "__name__", ""):
                graph.erase_node(node)
    graph.eliminate_dead_code()
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.target not in ("hidden_states", "encoder_hidden_states"):
            graph.erase_node(node)
    for node in graph.nodes:
        if node.op == "placeholder" and node.target == "hidden_states":
            node.meta[ROLE] = roles.BLOCK_INPUT


def _third_party_wrappers() -> tuple[type, ...]:
    """Module classes that wrap a layer with Python control flow of their own (peft's LoRA tuner
    layers): called as leaves, so that whatever they do at run time (set_adapters, disable,
    fuse) happens in the graph too."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return ()
    return (BaseTunerLayer,)


def is_leaf_module(module: torch.nn.Module) -> bool:
    """Whether a block graph calls ``module`` as one node: a ``BasicTransformerBlock`` (layer 0 is
    opened afterwards), a third-party wrapper, or a torch layer."""
    from diffusers.models.attention import BasicTransformerBlock

    if isinstance(module, (BasicTransformerBlock, *_third_party_wrappers())):
        return True
    return fx.Tracer().is_leaf_module(module, "")


class _BlockTracer(fx.Tracer):
    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return is_leaf_module(module)


def trace_block(block: torch.nn.Module, where: str = "block") -> fx.GraphModule:
    """Trace one ``Transformer2DModel`` into a ``GraphModule`` taking
    ``(hidden_states [B, C, H, W], encoder_hidden_states [B, L, D])`` and returning a 1-tuple.

    The graph calls the block's own submodules: no weight is copied.
    """
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if not isinstance(block, Transformer2DModel) or not block.is_input_continuous:
        raise NotImplementedError(f"{where}: only continuous-input Transformer2DModel blocks can be traced")
    concrete = {name: None for name in _UNUSED_ARGS} | {"return_dict": False}
    graph = _BlockTracer().trace(block, concrete_args=concrete)
    gm = fx.GraphModule(block, graph, class_name="AttentionBlock")
    _drop_fixed_arguments(gm)
    open_layer(gm, 0, where)
    finalize(gm)
    return gm


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """The common end of every graph change: drop dead nodes, check, regenerate code.

    Nodes with a role are the anchors later passes look for (an exposed map nobody reads yet,
    say): they stay even when unused.
    """
    gm.graph.eliminate_dead_code(is_impure_node=lambda node: ROLE in node.meta or node.is_impure())
    gm.graph.lint()
    gm.recompile()
    return gm


def nodes_with_role(gm: fx.GraphModule, role: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.meta.get(ROLE) == role]


def node_with_role(gm: fx.GraphModule, role: str) -> fx.Node | None:
    found = nodes_with_role(gm, role)
    if len(found) > 1:
        raise RuntimeError(f"graph has {len(found)} nodes with role {role!r}, expected at most one")
    return found[0] if found else None


def last_layer_node(gm: fx.GraphModule) -> fx.Node:
    """The output of the block's last ``BasicTransformerBlock`` (recovery goes after it)."""
    layers = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("transformer_blocks.")
              and n.target.count(".") == 1]
    if layers:
        return layers[-1]
    return node_with_role(gm, roles.LAYER_OUT)
