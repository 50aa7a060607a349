"""Perceiver AR (https://arxiv.org/abs/2202.07765): a causal core over a long context.

The last positions of the input are the latents (queries); the earlier ones are the prefix. One causal
cross-attention lets each latent read the prefix and the latents up to itself, then a stack of causal self-attention
layers runs over the latents only, so cost grows linearly in the prefix length. Positions enter as a rotary
embedding in the cross-attention and the first self-attention layer(s).

Shapes: B batch, N input positions, P prefix positions, L latents (N = P + L), C channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from perceiver_cli.models.attention import KVCache, Rotary, RotaryTable
from perceiver_cli.models.common import offloaded
from perceiver_cli.models.layers import CrossAttentionLayer, SelfAttentionBlock, run_layer


@dataclass
class PerceiverARConfig:
    num_heads: int = 8
    max_heads_parallel: int | None = None  # attend with at most this many heads at a time (bounds memory)
    num_self_attention_layers: int = 8
    num_self_attention_rotary_layers: int = 1  # -1: all layers
    self_attention_widening_factor: int = 4
    cross_attention_widening_factor: int = 4
    cross_attention_dropout: float = 0.5  # fraction of prefix positions dropped per example in training
    post_attention_dropout: float = 0.0  # dropout on attention probabilities
    residual_dropout: float = 0.0
    activation_checkpointing: bool = False
    activation_offloading: bool = False


class PerceiverARCache:
    """Key/value caches of the cross-attention (all positions) and each self-attention layer (latents only)."""

    def __init__(self, num_self_attention_layers: int):
        self.cross_attention = KVCache()
        self.self_attention = [KVCache() for _ in range(num_self_attention_layers)]

    def __len__(self) -> int:
        return len(self.cross_attention)

    @property
    def num_latents(self) -> int:
        """Cached latent positions: the self-attention layers see the latents only."""
        return len(self.self_attention[0]) if self.self_attention else 0

    def keep_prefix(self, length: int) -> None:
        """Keep the cross-attention's first `length` positions, all of them prefix, and forget every latent."""
        if length > len(self) - self.num_latents:
            raise ValueError(f"only {len(self) - self.num_latents} cached positions are prefix, not {length}")
        self.cross_attention.truncate(length)
        for kv_cache in self.self_attention:
            kv_cache.truncate(0)


class PerceiverAR(nn.Module):
    def __init__(self, config: PerceiverARConfig, num_channels: int, num_rotary_channels_per_head: int):
        super().__init__()  # the attention layers check that their channels divide into the heads
        self.num_rotary_channels = num_rotary_channels_per_head
        self.rotary_table = RotaryTable(num_rotary_channels_per_head)
        self.cross_attention_dropout = config.cross_attention_dropout
        self.activation_checkpointing = config.activation_checkpointing
        self.activation_offloading = config.activation_offloading
        # Bias only on the cross-attention's output projection, as in the reference implementation.
        self.cross_attention = CrossAttentionLayer(
            num_heads=config.num_heads,
            num_q_input_channels=num_channels,
            num_kv_input_channels=num_channels,
            max_heads_parallel=config.max_heads_parallel,
            causal=True,
            widening_factor=config.cross_attention_widening_factor,
            dropout=config.post_attention_dropout,
            residual_dropout=config.residual_dropout,
            qkv_bias=False,
            out_bias=True,
            mlp_bias=False,
        )
        self.self_attention = SelfAttentionBlock(
            num_layers=config.num_self_attention_layers,
            num_rotary_layers=config.num_self_attention_rotary_layers,
            activation_checkpointing=config.activation_checkpointing,
            num_heads=config.num_heads,
            num_channels=num_channels,
            max_heads_parallel=config.max_heads_parallel,
            causal=True,
            widening_factor=config.self_attention_widening_factor,
            dropout=config.post_attention_dropout,
            residual_dropout=config.residual_dropout,
            qkv_bias=False,
            out_bias=False,
            mlp_bias=False,
        )

    def empty_cache(self) -> PerceiverARCache:
        return PerceiverARCache(len(self.self_attention.layers))

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        prefix_len: int,
        pad_mask: torch.Tensor | None = None,
        cache: PerceiverARCache | None = None,
    ) -> torch.Tensor:
        """x (B, N, C) embedded inputs at `positions` (B, N); returns the latents' outputs (B, L, C), L = N - P.

        `pad_mask` (True = padding, left padding) covers the cached positions followed by the N new ones. With a
        `cache`, the cached positions are attended to as well and the new ones are added to it.
        """
        num_positions = x.shape[1] + (0 if cache is None else len(cache))  # every position is below this
        rotary = self.rotary_table.at(positions, num_positions, x.dtype)  # (B, 1, N, r)
        x_prefix, x_latent = x[:, :prefix_len], x[:, prefix_len:]
        rotary_k, rotary_latent = rotary, rotary[:, :, prefix_len:]
        num_latents = x_latent.shape[1]

        if self.training and self.cross_attention_dropout > 0.0 and prefix_len > 0:
            if cache is not None:
                raise ValueError("cross-attention dropout is for training; a cache is for inference")
            x_prefix, rotary_k, pad_mask = self._drop_prefix(x_prefix, rotary, pad_mask, prefix_len)

        if cache is None:
            ca_cache, sa_caches, num_sa_keys = None, None, num_latents
        else:
            ca_cache, sa_caches = cache.cross_attention, cache.self_attention
            num_sa_keys = len(sa_caches[0]) + num_latents if sa_caches else num_latents

        with offloaded(self.activation_offloading and torch.is_grad_enabled()):
            x_latent = run_layer(
                self.cross_attention,
                x_latent,
                x_kv_prefix=x_prefix,
                pad_mask=pad_mask,
                rotary_q=rotary_latent,
                rotary_k=rotary_k,
                cache=ca_cache,
                checkpointed=self.activation_checkpointing,
            )
            # The latents are the right-most positions, so their padding mask is the end of the full one.
            sa_pad_mask = None if pad_mask is None else pad_mask[:, -num_sa_keys:]
            return self.self_attention(x_latent, pad_mask=sa_pad_mask, rotary=rotary_latent, caches=sa_caches)

    def step(self, x: torch.Tensor, cache: PerceiverARCache) -> torch.Tensor:
        """A cached generation step: x (B, 1, C), the embedded newest token of each sequence, joins the cache as one
        more latent at position len(cache); returns its output (B, 1, C). The same numbers as
        `forward(x, positions, 0, cache=cache)` with fewer operations (see `MultiHeadAttention.step`). Two paths for
        speed (the timing is in benchmarks/README.md), held equal by tests/test_step_paths.py."""
        rotary = self.rotary_table.span(len(cache), 1, x.device, x.dtype)  # (1, 1, 1, r)
        x = self.cross_attention.step(x, cache.cross_attention, rotary)
        return self.self_attention.step(x, cache.self_attention, rotary)

    def _drop_prefix(
        self, x_prefix: torch.Tensor, rotary: Rotary, pad_mask: torch.Tensor | None, prefix_len: int
    ) -> tuple[torch.Tensor, Rotary, torch.Tensor | None]:
        """Keep a random subset of prefix positions per example (the paper's cross-attention dropout).

        Each latent sees every kept prefix position, so their order does not matter and needs no sorting.
        """
        b = x_prefix.shape[0]
        keep = prefix_len - int(prefix_len * self.cross_attention_dropout)
        kept = torch.rand(b, prefix_len, device=x_prefix.device).topk(keep, dim=1).indices  # (B, K)
        latent_idx = torch.arange(prefix_len, rotary.cos.shape[2], device=x_prefix.device).expand(b, -1)
        x_prefix = x_prefix.gather(1, kept[..., None].expand(-1, -1, x_prefix.shape[-1]))  # (B, K, C)
        rotary_k = rotary.gather(torch.cat([kept, latent_idx], dim=1))  # (B, 1, K + L, r)
        if pad_mask is not None:
            pad_mask = torch.cat([pad_mask[:, :prefix_len].gather(1, kept), pad_mask[:, prefix_len:]], dim=1)
        return x_prefix, rotary_k, pad_mask
