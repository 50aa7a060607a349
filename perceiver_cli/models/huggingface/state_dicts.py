"""The converters' state-dict surgery: our attention fuses its projections (`MultiHeadAttention.qkv_proj`,
`kv_proj`), the reference implementations (transformers, the perceiver-io library) keep separate query, key and
value projections (`q_proj`, `k_proj`, `v_proj`). A fused weight is theirs stacked along the output axis, in the
order `MultiHeadAttention.fused_projections` gives; these functions split and stack them, so that each format's
module maps separate-projection names only.
"""

from __future__ import annotations

import torch
from torch import nn

from perceiver_cli.models.attention import MultiHeadAttention

_PARAMETER_KINDS = ("weight", "bias")


def unfused_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every fused projection split into the separate query, key and value projections
    (`q_proj`, `k_proj`, `v_proj`) of the reference implementations: the names the converters map."""
    state = model.state_dict()
    for prefix, module in _attention_modules(model):
        for fused, parts in module.fused_projections().items():
            for kind in _PARAMETER_KINDS:
                tensor = state.pop(f"{prefix}{fused}.{kind}", None)
                if tensor is not None:
                    pieces = tensor.split([size for _, size in parts])  # clones: files refuse shared storage
                    state.update({f"{prefix}{n}.{kind}": piece.clone() for (n, _), piece in zip(parts, pieces)})
    return state


def fused_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict for `model` from one with separate query, key and value projections (a converter's); fused
    tensors pass through unchanged."""
    state = dict(state)
    for fused, parts in separate_parameters(model).items():
        if all(name in state for name in parts):
            state[fused] = torch.cat([state.pop(name) for name in parts])
    return state


def separate_parameters(model: nn.Module) -> dict[str, list[str]]:
    """The name of each fused projection parameter of `model` -> the names of the separate parameters it stacks."""
    parts = {}
    for prefix, module in _attention_modules(model):
        for fused, pieces in module.fused_projections().items():
            for kind in _PARAMETER_KINDS:
                if getattr(getattr(module, fused), kind) is not None:
                    parts[f"{prefix}{fused}.{kind}"] = [f"{prefix}{name}.{kind}" for name, _ in pieces]
    return parts


def _attention_modules(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadAttention):
            yield (f"{name}." if name else ""), module
