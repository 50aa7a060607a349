"""What the backend models share and neither core owns: building a config dataclass from a dict, the weight
initialisation, activation offloading, and the form in which a model reports what is wrong with its layout.

Layout problems: each model package has one function that lists what keeps a config from being built (the
channels of an attention that do not divide into its heads, more latents than positions, ...) as `Problem`s. The
model's constructor raises them (`raise_problems`); the preset schema (`perceiver_cli.config`) reports them to the
user with every other mistake of a preset, under the names the preset uses (`FieldName`), so each limit is written
once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from torch import nn

Problem = tuple[str, str]  # (the field at fault, as `FieldName` names it; what is wrong)
FieldName = Callable[[str], str]  # a config field's path ("num_heads", "encoder.num_cross_attention_heads") -> its name


def field_path(path: str) -> str:
    """The default `FieldName`: a field is named by its path in the model config."""
    return path


def raise_problems(problems: list[Problem]) -> None:
    """Raise one ValueError listing `problems`, if there are any: a model's constructor asserts its layout."""
    if problems:
        raise ValueError("; ".join(f"{field}: {message}" for field, message in problems))


def at_least_one(config: Any, paths: tuple[str, ...], name: FieldName = field_path) -> list[Problem]:
    """The counts among `paths` (dotted, from `config`) that are below 1."""
    problems = []
    for path in paths:
        value = config
        for part in path.split("."):
            value = getattr(value, part)
        if value < 1:
            problems.append((name(path), "must be at least 1"))
    return problems


def config_from_dict(cls: type, values: dict[str, Any]):
    """Build a flat config dataclass from a dict, rejecting unknown keys with their names."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**values)


def init_parameters(module: nn.Module, init_scale: float) -> None:
    """Normal(0, init_scale) weights and zero biases for linear and embedding layers (LayerNorms keep 1 and 0)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, init_scale)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, init_scale)


def offloaded(enabled: bool):
    """Keep saved activations in host memory during the forward pass (pays off on accelerators only)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
