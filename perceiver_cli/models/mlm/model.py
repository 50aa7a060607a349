"""Perceiver IO masked language model (Perceiver IO paper, section 4 and appendix F).

Token and learned absolute position embeddings feed the generic encoder; one learned output query per position
decodes the latents; logits are tied to the token embedding plus a bias. The layout maps one-to-one onto
transformers' `PerceiverForMaskedLM` for configurations that class can express.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from perceiver_cli.models.adapters import TokenInputAdapter, tied_logits
from perceiver_cli.models.common import FieldName, Problem, at_least_one, config_from_dict, field_path, raise_problems
from perceiver_cli.models.mlm.block_routing import init_block_routing
from perceiver_cli.models.mlm.block_routing import problems as routing_problems
from perceiver_cli.models.perceiver_io import (
    DecoderConfig,
    EncoderConfig,
    PerceiverDecoder,
    PerceiverEncoder,
    PerceiverIO,
    PerceiverIOConfig,
    decoder_problems,
    encoder_problems,
)


@dataclass
class TextEncoderConfig(EncoderConfig):
    vocab_size: int = 262  # UTF-8 bytes plus 6 special tokens
    max_seq_len: int = 2048
    num_input_channels: int = 768


@dataclass
class TextDecoderConfig(DecoderConfig):
    num_output_query_channels: int | None = None  # None: input channels, with logits tied to the token embedding
    vocab_size: int = 262
    max_seq_len: int = 2048


@dataclass
class MaskedLanguageModelConfig(PerceiverIOConfig[TextEncoderConfig, TextDecoderConfig]):
    # "random": every weight Normal(0, init_scale), as the reference; "blocks": the cross-attentions start routing
    # blocks of bytes to latents and back (block_routing.py), which lets a small model learn from scratch.
    routing_init: Literal["random", "blocks"] = "random"

    @property
    def output_query_channels(self) -> int:
        """The decoder's output query channels: `decoder.num_output_query_channels`, by default the input's."""
        return self.decoder.num_output_query_channels or self.encoder.num_input_channels

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MaskedLanguageModelConfig":
        """Inverse of `to_dict`; unknown keys are errors."""
        values = dict(values)
        values["encoder"] = config_from_dict(TextEncoderConfig, values.get("encoder", {}))
        values["decoder"] = config_from_dict(TextDecoderConfig, values.get("decoder", {}))
        return config_from_dict(cls, values)


def layout_problems(config: MaskedLanguageModelConfig, name: FieldName = field_path) -> list[Problem]:
    """What keeps `config` from building a `MaskedLanguageModel`, each field named by `name` (see
    `perceiver_cli.models.common`): the constructor raises these, the preset schema reports them."""
    enc, dec = config.encoder, config.decoder
    problems = at_least_one(config, ("num_latents", "num_latent_channels", "encoder.num_input_channels"), name)
    problems += encoder_problems(enc, config.num_latent_channels, name, prefix="encoder.")
    problems += decoder_problems(dec, config.output_query_channels, name, prefix="decoder.")
    for field in ("max_seq_len", "vocab_size"):
        if getattr(enc, field) != getattr(dec, field):
            problems.append((name(f"decoder.{field}"), f"must equal {name(f'encoder.{field}')}"))
    if config.routing_init == "blocks" and not problems:
        problems += [(name(path), message) for path, message in routing_problems(config)]
    return problems


class MaskedLanguageModel(PerceiverIO):
    def __init__(self, config: MaskedLanguageModelConfig):
        raise_problems(layout_problems(config))
        enc, dec = config.encoder, config.decoder
        encoder = PerceiverEncoder(
            enc,
            input_adapter=TokenInputAdapter(enc.vocab_size, enc.max_seq_len, enc.num_input_channels),
            num_input_channels=enc.num_input_channels,
            num_latents=config.num_latents,
            num_latent_channels=config.num_latent_channels,
            activation_checkpointing=config.activation_checkpointing,
        )
        query_channels = config.output_query_channels
        decoder = PerceiverDecoder(
            dec,
            num_output_queries=dec.max_seq_len,
            num_output_query_channels=query_channels,
            num_latent_channels=config.num_latent_channels,
            activation_checkpointing=config.activation_checkpointing,
        )
        super().__init__(encoder, decoder, activation_offloading=config.activation_offloading)
        self.config = config
        if dec.num_output_query_channels is None:
            self.output_bias = nn.Parameter(torch.zeros(dec.vocab_size))  # logits tied to the token embedding
        else:
            self.output_linear = nn.Linear(query_channels, dec.vocab_size)
            with torch.no_grad():
                self.output_linear.weight.normal_(0.0, dec.init_scale)
                self.output_linear.bias.zero_()
        if config.routing_init == "blocks":
            init_block_routing(self)

    @property
    def max_seq_len(self) -> int:
        return self.config.encoder.max_seq_len

    def forward(
        self, x_masked: torch.Tensor, pad_mask: torch.Tensor | None = None, output_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, O, vocab) for token ids x_masked (B, M) with padding mask (B, M) (True = padding).

        `output_positions` (O,) or (B, O) chooses the positions to decode; the default is all M input positions.
        Decoding only the masked positions is what makes training fast: each decoder query is independent.
        """
        if output_positions is None:
            output_positions = torch.arange(x_masked.shape[1], device=x_masked.device)
        h = super().forward(x_masked, pad_mask, output_positions)  # (B, O, F)
        if hasattr(self, "output_bias"):
            return tied_logits(h, self.encoder.input_adapter.txt_embedding, self.output_bias)
        return self.output_linear(h)

