"""Perceiver IO (https://arxiv.org/abs/2107.14795): a generic encoder/decoder core.

Encoder: an input adapter turns task input into (B, M, C) vectors; learned latents (N, D) cross-attend to them,
then blocks of self-attention layers process the latents. Decoder: output queries (O, F) cross-attend to the
latents. Task models (see `mlm/model.py`) supply the input adapter and turn decoder output into predictions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from perceiver_cli.models.attention import attention_channels, head_problems
from perceiver_cli.models.common import (
    FieldName,
    Problem,
    at_least_one,
    field_path,
    init_parameters,
    offloaded,
    raise_problems,
)
from perceiver_cli.models.layers import CrossAttentionLayer, SelfAttentionBlock, run_layer


@dataclass
class EncoderConfig:
    num_cross_attention_heads: int = 8
    num_cross_attention_qk_channels: int | None = None
    num_cross_attention_v_channels: int | None = None
    num_cross_attention_layers: int = 1
    first_cross_attention_layer_shared: bool = False
    cross_attention_widening_factor: int = 1
    num_self_attention_heads: int = 8
    num_self_attention_qk_channels: int | None = None
    num_self_attention_v_channels: int | None = None
    num_self_attention_layers_per_block: int = 8
    num_self_attention_blocks: int = 1
    first_self_attention_block_shared: bool = True
    self_attention_widening_factor: int = 1
    dropout: float = 0.0
    init_scale: float = 0.02
    freeze: bool = False


@dataclass
class DecoderConfig:
    num_cross_attention_heads: int = 8
    num_cross_attention_qk_channels: int | None = None
    num_cross_attention_v_channels: int | None = None
    cross_attention_widening_factor: int = 1
    cross_attention_residual: bool = True
    dropout: float = 0.0
    init_scale: float = 0.02
    freeze: bool = False


E = TypeVar("E", bound=EncoderConfig)
D = TypeVar("D", bound=DecoderConfig)


@dataclass
class PerceiverIOConfig(Generic[E, D]):
    encoder: E
    decoder: D
    num_latents: int
    num_latent_channels: int
    activation_checkpointing: bool = False
    activation_offloading: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (nested configs as dicts)."""
        return asdict(self)


def attention_problems(
    prefix: str, num_heads: int, qk: int | None, v: int | None, num_q_input_channels: int, name: FieldName
) -> list[Problem]:
    """What keeps one attention of a config from splitting into heads: its fields are `prefix` + "_heads",
    "_qk_channels" and "_v_channels" (e.g. "encoder.num_cross_attention"), its channels resolved from the query
    input's channels as the attention resolves them."""
    qk, v = attention_channels(num_q_input_channels, qk, v)
    channels = [(f"{prefix}_qk_channels", "query/key channels", qk), (f"{prefix}_v_channels", "value channels", v)]
    return head_problems(num_heads, channels, f"{prefix}_heads", name)


ENCODER_COUNTS = ("num_cross_attention_layers", "num_self_attention_layers_per_block", "num_self_attention_blocks",
                  "cross_attention_widening_factor", "self_attention_widening_factor")


def encoder_problems(
    config: EncoderConfig, num_latent_channels: int, name: FieldName = field_path, prefix: str = ""
) -> list[Problem]:
    """What keeps `config` from building a `PerceiverEncoder` over latents of `num_latent_channels`; `prefix` is
    the encoder config's path in the model config (e.g. "encoder.")."""
    named = lambda path: name(prefix + path)  # noqa: E731
    problems = at_least_one(config, ENCODER_COUNTS, named)
    for kind in ("cross", "self"):
        attention = f"num_{kind}_attention"
        problems += attention_problems(
            f"{prefix}{attention}", getattr(config, f"{attention}_heads"), getattr(config, f"{attention}_qk_channels"),
            getattr(config, f"{attention}_v_channels"), num_latent_channels, name,
        )
    if config.num_cross_attention_layers > config.num_self_attention_blocks:
        problems.append((named("num_cross_attention_layers"), "must not exceed num_self_attention_blocks"))
    return problems


def decoder_problems(
    config: DecoderConfig, num_output_query_channels: int, name: FieldName = field_path, prefix: str = ""
) -> list[Problem]:
    """What keeps `config` from building a `PerceiverDecoder` with output queries of `num_output_query_channels`
    (see `encoder_problems` for `prefix`)."""
    problems = at_least_one(config, ("cross_attention_widening_factor",), lambda path: name(prefix + path))
    return problems + attention_problems(
        f"{prefix}num_cross_attention", config.num_cross_attention_heads, config.num_cross_attention_qk_channels,
        config.num_cross_attention_v_channels, num_output_query_channels, name,
    )


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class PerceiverEncoder(nn.Module):
    def __init__(
        self,
        config: EncoderConfig,
        input_adapter: nn.Module,
        num_input_channels: int,
        num_latents: int,
        num_latent_channels: int,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        raise_problems(encoder_problems(config, num_latent_channels))
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        self.input_adapter = input_adapter
        self.latents = nn.Parameter(torch.empty(num_latents, num_latent_channels))

        def cross_attention() -> CrossAttentionLayer:
            return CrossAttentionLayer(
                num_heads=config.num_cross_attention_heads,
                num_q_input_channels=num_latent_channels,
                num_kv_input_channels=num_input_channels,
                num_qk_channels=config.num_cross_attention_qk_channels,
                num_v_channels=config.num_cross_attention_v_channels,
                widening_factor=config.cross_attention_widening_factor,
                dropout=config.dropout,
            )

        def self_attention() -> SelfAttentionBlock:
            return SelfAttentionBlock(
                num_layers=config.num_self_attention_layers_per_block,
                activation_checkpointing=activation_checkpointing,
                num_heads=config.num_self_attention_heads,
                num_channels=num_latent_channels,
                num_qk_channels=config.num_self_attention_qk_channels,
                num_v_channels=config.num_self_attention_v_channels,
                widening_factor=config.self_attention_widening_factor,
                dropout=config.dropout,
            )

        # The first cross-attention layer and self-attention block have their own weights; later repetitions share
        # one extra set (`*_n`) unless they are told to share the first one's.
        self.cross_attn_1 = cross_attention()
        self.self_attn_1 = self_attention()
        if config.num_cross_attention_layers > 1 and not config.first_cross_attention_layer_shared:
            self.cross_attn_n = cross_attention()
        if config.num_self_attention_blocks > 1 and not config.first_self_attention_block_shared:
            self.self_attn_n = self_attention()

        init_parameters(self, config.init_scale)
        with torch.no_grad():
            self.latents.normal_(0.0, config.init_scale)
        if config.freeze:
            freeze(self)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: task input (adapted to (B, M, C)); pad_mask (B, M), True at padding. Returns latents (B, N, D)."""
        x_adapted = self.input_adapter(x)
        x_latent = self.latents.expand(x_adapted.shape[0], -1, -1)
        cross_attn_n = getattr(self, "cross_attn_n", self.cross_attn_1)
        self_attn_n = getattr(self, "self_attn_n", self.self_attn_1)
        for i in range(self.config.num_self_attention_blocks):
            if i < self.config.num_cross_attention_layers:
                cross_attn = self.cross_attn_1 if i == 0 else cross_attn_n
                x_latent = run_layer(
                    cross_attn, x_latent, x_adapted, pad_mask=pad_mask, checkpointed=self.activation_checkpointing
                )
            x_latent = (self.self_attn_1 if i == 0 else self_attn_n)(x_latent)
        return x_latent


class PerceiverDecoder(nn.Module):
    """Learned output queries (O, F) cross-attend to the latents. Each query is decoded independently, so only the
    queries whose outputs are needed are computed."""

    def __init__(
        self,
        config: DecoderConfig,
        num_output_queries: int,
        num_output_query_channels: int,
        num_latent_channels: int,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        raise_problems(decoder_problems(config, num_output_query_channels))
        self.activation_checkpointing = activation_checkpointing
        self.output_queries = nn.Parameter(torch.empty(num_output_queries, num_output_query_channels))
        self.cross_attn = CrossAttentionLayer(
            num_heads=config.num_cross_attention_heads,
            num_q_input_channels=num_output_query_channels,
            num_kv_input_channels=num_latent_channels,
            num_qk_channels=config.num_cross_attention_qk_channels,
            num_v_channels=config.num_cross_attention_v_channels,
            widening_factor=config.cross_attention_widening_factor,
            attention_residual=config.cross_attention_residual,
            dropout=config.dropout,
        )
        init_parameters(self, config.init_scale)
        with torch.no_grad():
            self.output_queries.normal_(0.0, config.init_scale)
        if config.freeze:
            freeze(self)

    def forward(self, x_latent: torch.Tensor, output_positions: torch.Tensor | None = None) -> torch.Tensor:
        """x_latent (B, N, D) -> (B, O, F). `output_positions` selects queries: (O,) for all examples or (B, O)
        per example; None decodes all of them."""
        b = x_latent.shape[0]
        if output_positions is None:
            queries = self.output_queries.expand(b, -1, -1)
        elif output_positions.dim() == 1:
            queries = F.embedding(output_positions, self.output_queries).expand(b, -1, -1)
        else:
            # A lookup, not indexing: its backward pass is much faster (benchmarks/README.md).
            queries = F.embedding(output_positions, self.output_queries)  # (B, O, F)
        return run_layer(self.cross_attn, queries, x_latent, checkpointed=self.activation_checkpointing)


class PerceiverIO(nn.Module):
    """Encoder followed by decoder; task models subclass it."""

    def __init__(self, encoder: PerceiverEncoder, decoder: PerceiverDecoder, activation_offloading: bool = False):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.activation_offloading = activation_offloading

    def forward(
        self, x: torch.Tensor, pad_mask: torch.Tensor | None = None, output_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        with offloaded(self.activation_offloading and torch.is_grad_enabled()):
            return self.decoder(self.encoder(x, pad_mask), output_positions)
