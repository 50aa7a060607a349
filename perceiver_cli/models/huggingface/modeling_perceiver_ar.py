"""Hugging Face classes for the Perceiver AR causal LM (transformers has none): a config and a `PreTrainedModel`
that `AutoModelForCausalLM` loads and whose `generate()` follows the Perceiver AR generation protocol.

The protocol is `perceiver generate`'s (see `perceiver_cli.models.clm.next_window`): the model sees a window of at
most `max_seq_len` tokens; the last `num_latents` are latents, the earlier ones the prefix. The prompt starts with
`num_latents` latents (a `generate()` argument; default: as many as fit). Each generated token adds a latent until
the latents or the window are full; then half of the latents join the prefix at once and, when the prefix is full,
its oldest tokens leave the window. `generate()` carries the window from step to step in its model kwargs
(`_update_model_kwargs_for_generation`).

With `use_cache=False` every step is a full forward pass over the window. With the cache (the default) a step
computes one latent, and whenever latents join the prefix or tokens leave, one pass rebuilds what the cache cannot
keep (see `perceiver_cli.models.clm.reusable_prefix`): both give the same logits.

This module imports only the backend and transformers: `remote_code.py` concatenates it with the backend modules
into the self-contained modeling file of `perceiver convert --to hf --remote-code`. It registers nothing; see
`perceiver_cli.models.huggingface`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from perceiver_cli.models.clm import (
    CausalLanguageModel,
    CausalLanguageModelConfig,
    Window,
    first_window,
    next_window,
    reusable_prefix,
)
from perceiver_cli.models.perceiver_ar import PerceiverARCache


@dataclass
class PerceiverARCausalLMOutput(CausalLMOutputWithPast):
    """Adds the window the step saw, which `generate()` carries to the next step."""

    window: Window | None = None


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
    ) -> PerceiverARCausalLMOutput:
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
        window = Window(len(cache), cache.num_latents) if cache is not None else Window(n, n - prefix_len)
        return PerceiverARCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None, window=window)

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
        window: Window | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> dict:
        """The forward inputs of one step: the window and its prefix length, or, with a cache that stays valid,
        the newest token. `num_latents` (the user's) sets the first window; `window` is the previous step's."""
        config = self.config.backend_config()
        old_window = window
        if window is None:
            window, fresh = first_window(input_ids.shape[1], config, num_latents), True
        else:
            window, fresh = next_window(window, config)
        mask = None if attention_mask is None else attention_mask[:, -window.length :]
        inputs = {"attention_mask": mask, "use_cache": use_cache}
        whole_window = {"input_ids": input_ids[:, -window.length :], "prefix_len": window.prefix_len}
        if not use_cache:
            return inputs | whole_window
        if cache is None or old_window is None:  # the prompt: one full pass fills a new cache
            return inputs | whole_window | {"cache": self.model.empty_cache()}
        if fresh:  # latents joined the prefix or tokens left: recompute what the cache cannot keep
            kept = reusable_prefix(old_window, window)
            cache.keep_prefix(kept)
            rest = {"input_ids": input_ids[:, -window.length + kept :], "prefix_len": window.prefix_len - kept}
            return inputs | rest | {"cache": cache}
        if next_sequence_length not in (None, 1):
            raise ValueError("Perceiver AR's cache takes one new token per step; generate with use_cache=False")
        return inputs | {"input_ids": input_ids[:, -1:], "prefix_len": 0, "cache": cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        model_kwargs["window"] = outputs.window
        return model_kwargs

    def _reorder_cache(self, cache: PerceiverARCache, beam_idx: torch.LongTensor) -> PerceiverARCache:
        for kv_cache in [cache.cross_attention, *cache.self_attention]:
            kv_cache.select(beam_idx)
        return cache
