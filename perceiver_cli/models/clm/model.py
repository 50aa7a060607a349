"""Perceiver AR causal language model: token (+ absolute position) embeddings, the Perceiver AR core, and logits
tied to the token embedding plus a bias. Which tokens a pass sees and predicts from (the windows of scoring and
generation) is `perceiver_cli.models.clm.windows`.

Shapes: B batch, N input positions, P prefix positions, L latents (N = P + L), V vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from perceiver_cli.models.adapters import TokenInputAdapter, tied_logits
from perceiver_cli.models.attention import head_problems
from perceiver_cli.models.common import (
    FieldName,
    Problem,
    at_least_one,
    config_from_dict,
    field_path,
    init_parameters,
    raise_problems,
)
from perceiver_cli.models.perceiver_ar import PerceiverAR, PerceiverARCache, PerceiverARConfig


@dataclass
class CausalLanguageModelConfig(PerceiverARConfig):
    vocab_size: int = 262
    max_seq_len: int = 4096
    max_latents: int = 512
    num_channels: int = 512
    output_norm: bool = False
    output_bias: bool = True
    abs_pos_emb: bool = True
    init_scale: float = 0.02

    @property
    def max_prefix_len(self) -> int:
        return self.max_seq_len - self.max_latents

    @property
    def num_rotary_channels_per_head(self) -> int:
        # With absolute position embeddings, the rotary embedding covers half of each head's channels.
        per_head = self.num_channels // self.num_heads
        return per_head // 2 if self.abs_pos_emb else per_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CausalLanguageModelConfig":
        return config_from_dict(cls, values)


def layout_problems(config: CausalLanguageModelConfig, name: FieldName = field_path) -> list[Problem]:
    """What keeps `config` from building a `CausalLanguageModel`, each field named by `name` (see
    `perceiver_cli.models.common`): the constructor raises these, the preset schema reports them."""
    problems = at_least_one(config, ("num_channels", "max_latents", "num_heads", "num_self_attention_layers"), name)
    if problems:
        return problems
    problems = head_problems(config.num_heads, [("num_channels", "num_channels", config.num_channels)], name=name)
    rotary = config.num_rotary_channels_per_head
    if not problems and rotary % 2:
        problems.append(
            (name("num_channels"), f"the rotary embedding needs an even channel count per head, got {rotary}")
        )
    if config.max_latents > config.max_seq_len:
        limit = f"must not exceed {name('max_seq_len')} ({config.max_seq_len})"
        problems.append((name("max_latents"), f"({config.max_latents}) {limit}"))
    if not -1 <= config.num_self_attention_rotary_layers <= config.num_self_attention_layers:
        problems.append(
            (name("num_self_attention_rotary_layers"), "must be -1 (all) or 0 .. num_self_attention_layers")
        )
    return problems + at_least_one(config, ("self_attention_widening_factor", "cross_attention_widening_factor"), name)


class CausalLanguageModel(PerceiverAR):
    def __init__(self, config: CausalLanguageModelConfig):
        raise_problems(layout_problems(config))
        super().__init__(config, config.num_channels, config.num_rotary_channels_per_head)
        self.config = config
        self.input_adapter = TokenInputAdapter(
            config.vocab_size, config.max_seq_len, config.num_channels, abs_pos_emb=config.abs_pos_emb
        )
        self.out_norm = nn.LayerNorm(config.num_channels) if config.output_norm else None
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size)) if config.output_bias else None
        init_parameters(self, config.init_scale)

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    @property
    def max_latents(self) -> int:
        return self.config.max_latents

    @property
    def max_prefix_len(self) -> int:
        return self.config.max_prefix_len

    def forward(
        self,
        x: torch.Tensor,
        prefix_len: int,
        pad_mask: torch.Tensor | None = None,
        cache: PerceiverARCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, L, V) of the latent positions of token ids x (B, N), the last N - prefix_len positions.

        Inputs are left-padded; `pad_mask` (True = padding) covers cached and new positions. Position p of a real
        token is its index after the padding, so padding never shifts the model's view of the text.
        """
        num_cached = 0 if cache is None else len(cache)
        num_cached_latents = 0 if cache is None else cache.num_latents
        n = x.shape[1]
        if not 0 <= prefix_len < n:
            raise ValueError(f"prefix_len ({prefix_len}) must be in [0, {n}) for an input of length {n}")
        total_prefix_len = num_cached - num_cached_latents + prefix_len
        if total_prefix_len > self.max_prefix_len:
            raise ValueError(f"prefix length {total_prefix_len} exceeds max_prefix_len {self.max_prefix_len}")
        if num_cached_latents + n - prefix_len > self.max_latents:
            raise ValueError(f"{num_cached_latents + n - prefix_len} latents exceed max_latents {self.max_latents}")

        positions = self._positions(pad_mask, num_cached, n, x.device)
        h = super().forward(self.input_adapter(x, positions), positions, prefix_len, pad_mask, cache)
        return self._logits(h)

    def step(self, tokens: torch.Tensor, cache: PerceiverARCache) -> torch.Tensor:
        """Logits (B, V) of the token after `tokens` (B,), the newest token of each sequence, which joins `cache` as
        one more latent: `forward(tokens[:, None], 0, cache=cache)[:, -1]` with less overhead (a cached generation
        step). Sequences without padding only: the new token's position is len(cache). Two paths for speed (a
        cached step 1.1-1.3x faster, benchmarks/README.md), held equal by tests/test_step_paths.py."""
        if cache.num_latents + 1 > self.max_latents:
            raise ValueError(f"{cache.num_latents + 1} latents exceed max_latents {self.max_latents}")
        x = self.input_adapter(tokens[:, None], start=len(cache))  # (B, 1, C)
        return self._logits(super().step(x, cache)[:, 0])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of latent outputs h (..., C): the optional output norm, then the tied embedding."""
        if self.out_norm is not None:
            h = self.out_norm(h)
        return tied_logits(h, self.input_adapter.txt_embedding, self.output_bias)

    @staticmethod
    def _positions(pad_mask: torch.Tensor | None, num_cached: int, n: int, device: torch.device) -> torch.Tensor:
        """Positions (B, n) of the n new tokens: count of real tokens before each one (left padding -> 0)."""
        if pad_mask is None:
            return torch.arange(num_cached, num_cached + n, device=device)[None]
        return ((~pad_mask).cumsum(dim=1) - 1).clamp(min=0)[:, -n:]
