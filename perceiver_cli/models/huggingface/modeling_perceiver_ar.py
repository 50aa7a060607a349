"""Hugging Face classes for the Perceiver AR causal LM (transformers has none): a config and a `PreTrainedModel`
that `AutoModelForCausalLM` loads and whose `generate()` follows the Perceiver AR generation protocol.

The protocol (the same as `perceiver generate`'s, see `perceiver_cli/generation.py`): the model sees a window of at
most `max_seq_len` tokens; the last `num_latents` are latents, the earlier ones the prefix. The prompt starts with
`num_latents` latents (a `generate()` argument; default: as many as fit). Each generated token then adds a latent
while there are fewer than `max_latents`, else moves the oldest latent into the prefix while the prefix is shorter
than `max_seq_len - max_latents`, else the window slides. `generate()` carries the number of latents from step to
step in its model kwargs (`_update_model_kwargs_for_generation`); recomputing it from the sequence length at each
step would get the split wrong.

With `use_cache=False` every step is a full forward pass over the window. With the cache (the default) each step
computes one latent. That is exact while the latents grow. When a latent joins the prefix, its cross-attention
key/value is recomputed as a prefix position's; when the window slides, the cached rotary keys are turned back by
one position; what stays stale are the self-attention keys/values of the latents (and, once the window slides, the
absolute position embeddings in the cached keys/values), so from then on the cached run deviates slightly from the
full computation. Recomputing them would cost the full forward pass the cache exists to avoid.

This module imports only the backend and transformers: `remote_code.py` concatenates it with the backend modules
into the self-contained modeling file of `perceiver convert --to hf --remote-code`. It registers nothing; see
`perceiver_cli.models.huggingface`.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from perceiver_cli.models.attention import Rotary
from perceiver_cli.models.clm import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_cli.models.perceiver_ar import PerceiverARCache


class PerceiverARCausalLMConfig(PreTrainedConfig):
    """The fields of `CausalLanguageModelConfig`, with the same names and defaults (a test keeps them in step)."""

    model_type = "perceiver-cli-causal-lm"  # krasserm/perceiver-io's own is "perceiver-ar-causal-language-model"
    # No max_position_embeddings: generation slides the window, so sequences may grow past max_seq_len.
    attribute_map = {
        "hidden_size": "num_channels",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_self_attention_layers",
    }

    num_heads: int = 8
    max_heads_parallel: int | None = None
    num_self_attention_layers: int = 8
    num_self_attention_rotary_layers: int = 1
    self_attention_widening_factor: int = 4
    cross_attention_widening_factor: int = 4
    cross_attention_dropout: float = 0.5
    post_attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    activation_checkpointing: bool = False
    activation_offloading: bool = False
    vocab_size: int = 262
    max_seq_len: int = 4096
    max_latents: int = 512
    num_channels: int = 512
    output_norm: bool = False
    output_bias: bool = True
    abs_pos_emb: bool = True
    init_scale: float = 0.02

    @classmethod
    def from_backend_config(cls, config: CausalLanguageModelConfig, **kwargs) -> "PerceiverARCausalLMConfig":
        return cls(**config.to_dict(), **kwargs)

    def backend_config(self) -> CausalLanguageModelConfig:
        return CausalLanguageModelConfig(**{f.name: getattr(self, f.name) for f in fields(CausalLanguageModelConfig)})


class PerceiverARForCausalLM(PreTrainedModel, GenerationMixin):
    """`self.model` is the backend `CausalLanguageModel`, so the weights are its parameters prefixed by `model.`.

    `forward` returns the logits of the latent positions only, (B, N - prefix_len, V), not of every position.
    """

    config_class = PerceiverARCausalLMConfig
    base_model_prefix = "model"

    def __init__(self, config: PerceiverARCausalLMConfig):
        super().__init__(config)
        self.model = CausalLanguageModel(config.backend_config())
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The backend's initialisation (normal(0, init_scale), zero biases), for weights a checkpoint does not set.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.init_scale)
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
            init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
        if isinstance(module, CausalLanguageModel) and module.output_bias is not None:
            init.zeros_(module.output_bias)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not make a DynamicCache: prepare_inputs_for_generation makes a PerceiverARCache.
        return False

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        prefix_len: int | None = None,
        cache: PerceiverARCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits of the positions after the first `prefix_len` of `input_ids` (B, N); by default as many
        positions as `max_latents` allows. `attention_mask` (1 = token, 0 = left padding) covers the cached
        positions followed by `input_ids`. `labels` (B, N), usually `input_ids`, give the next-token loss of those
        positions (-100: ignored)."""
        n = input_ids.shape[1]
        if prefix_len is None:
            prefix_len = max(0, n - self.config.max_latents)
        if use_cache and cache is None:
            cache = self.model.empty_cache()
        pad_mask = None if attention_mask is None else attention_mask == 0
        logits = self.model(input_ids, prefix_len, pad_mask=pad_mask, cache=cache)
        loss = None
        if labels is not None:
            # The logits at position i predict token i + 1: the last one has no label.
            targets = labels[:, prefix_len + 1 :]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    # -----------------------------------------------------------------------------------------------------------
    # generate()
    # -----------------------------------------------------------------------------------------------------------

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: PerceiverARCache | None = None,
        attention_mask: torch.Tensor | None = None,
        num_latents: int | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> dict:
        """The forward inputs of one step: the window and its prefix length, or, with a cache, the newest token.

        `num_latents` is the requested number of latents: the user's initial value (None: as many as fit), grown
        by one per generated token; the window caps it (see the module docstring).
        """
        window, prefix_len = self._window(input_ids.shape[1], num_latents)
        mask = None if attention_mask is None else attention_mask[:, -window:]
        inputs = {"attention_mask": mask, "use_cache": use_cache}
        if not use_cache:
            return inputs | {"input_ids": input_ids[:, -window:], "prefix_len": prefix_len}
        if cache is None:  # the first step: the whole window, filling a new cache
            cache = self.model.empty_cache()
            return inputs | {"input_ids": input_ids[:, -window:], "prefix_len": prefix_len, "cache": cache}
        if next_sequence_length != 1:
            raise ValueError("Perceiver AR's cache takes one new token per step; generate with use_cache=False")
        slide = len(cache) == window  # the window was full: its oldest position leaves
        dropped_mask = attention_mask[:, -window - 1] if slide and attention_mask is not None else None
        self._update_cache(cache, input_ids[:, -window:], mask, prefix_len, slide, dropped_mask)
        return inputs | {"input_ids": input_ids[:, -1:], "prefix_len": 0, "cache": cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        # A new token is a new latent; `_window` caps the latents at max_latents and the window at max_seq_len.
        requested = model_kwargs.get("num_latents") or self.config.max_latents
        model_kwargs["num_latents"] = requested + num_new_tokens
        return model_kwargs

    def _reorder_cache(self, cache: PerceiverARCache, beam_idx: torch.LongTensor) -> PerceiverARCache:
        for kv_cache in [cache.cross_attention, *cache.self_attention]:
            kv_cache.select(beam_idx)
        return cache

    def _window(self, seq_len: int, num_latents: int | None) -> tuple[int, int]:
        """(window length, prefix length) of a sequence of `seq_len` tokens with `num_latents` requested latents."""
        config = self.config
        if num_latents is not None and num_latents < 1:
            raise ValueError(f"num_latents must be at least 1, got {num_latents}")
        window = min(seq_len, config.max_seq_len)
        wanted = config.max_latents if num_latents is None else min(num_latents, config.max_latents)
        latents = max(min(wanted, window), window - (config.max_seq_len - config.max_latents))
        return window, window - latents

    @torch.no_grad()
    def _update_cache(
        self,
        cache: PerceiverARCache,
        window_ids: torch.LongTensor,
        window_mask: torch.Tensor | None,
        prefix_len: int,
        slide: bool,
        dropped_mask: torch.Tensor | None,
    ) -> None:
        """Bring `cache` to the window `window_ids` (B, n) without its newest token, with `prefix_len` prefix
        positions: after a slide, forget the oldest position and turn the rotary keys back by the shift of the
        positions; when the oldest latent has joined the prefix, recompute its cross-attention key/value as a
        prefix position's and drop it from the latents' self-attention caches."""
        model = self.model
        if slide:
            cache.cross_attention.drop_first(1)
            # Positions count the tokens before a position, so they shift only where the dropped one was a token.
            shift = torch.ones(window_ids.shape[0], 1, dtype=torch.long, device=window_ids.device)
            if dropped_mask is not None:
                shift = dropped_mask.long()[:, None]
            k = cache.cross_attention.k
            back = Rotary.at(-shift, model.num_rotary_channels, dtype=k.dtype)
            for kv_cache in [cache.cross_attention, *cache.self_attention[: model.self_attention.num_rotary_layers]]:
                kv_cache.k = back.rotate(kv_cache.k)
        if prefix_len > len(cache) - cache.num_latents:
            for kv_cache in cache.self_attention:
                kv_cache.drop_first(1)
            i = prefix_len - 1  # the new last prefix position, in the window and in the cross-attention cache
            positions = _window_positions(window_ids, window_mask)[:, i : i + 1]  # (B, 1)
            x = model.input_adapter(window_ids[:, i : i + 1], positions)  # (B, 1, C)
            layer = model.cross_attention
            kv = layer.kv_norm(x)
            heads = layer.attention.num_heads
            k = layer.attention.k_proj(kv).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, 1, c)
            v = layer.attention.v_proj(kv).unflatten(-1, (heads, -1)).transpose(1, 2)
            k = Rotary.at(positions, model.num_rotary_channels, dtype=k.dtype).rotate(k)
            cache.cross_attention.k[:, :, i] = k[:, :, 0]
            cache.cross_attention.v[:, :, i] = v[:, :, 0]


def _window_positions(window_ids: torch.Tensor, window_mask: torch.Tensor | None) -> torch.Tensor:
    """Positions (B, n) the backend gives a window: the number of tokens before each position (padding: 0)."""
    if window_mask is None:
        return torch.arange(window_ids.shape[1], device=window_ids.device).expand(window_ids.shape[0], -1)
    return (window_mask.long().cumsum(dim=1) - 1).clamp(min=0)
