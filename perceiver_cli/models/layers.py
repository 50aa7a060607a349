"""Pre-LayerNorm attention layers shared by Perceiver IO and Perceiver AR: cross-attention, self-attention and
their MLPs. Shapes: B batch, N positions, C channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from perceiver_cli.models.attention import KVCache, MultiHeadAttention, Rotary, call_layer_norm, call_linear


def run_layer(layer: nn.Module, *args, checkpointed: bool = False, **kwargs) -> torch.Tensor:
    """Call `layer`, recomputing its activations in the backward pass instead of storing them if `checkpointed`."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False, **kwargs)
    return layer(*args, **kwargs)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Residual dropout; a no-op costs nothing (a cached generation step makes ten of these calls per token)."""
    return F.dropout(x, p, training=True) if training and p > 0.0 else x


class MLP(nn.Module):
    """LayerNorm -> Linear (widen) -> GELU -> Linear."""

    def __init__(self, num_channels: int, widening_factor: int, bias: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(num_channels)
        self.fc1 = nn.Linear(num_channels, widening_factor * num_channels, bias=bias)
        self.fc2 = nn.Linear(widening_factor * num_channels, num_channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))  # exact (erf) GELU, as in the paper and transformers

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` for a cached generation step, without `nn.Module.__call__` (see `call_linear`). Two paths for
        speed, held equal by tests/test_step_paths.py (see `MultiHeadAttention.step`)."""
        return call_linear(self.fc2, F.gelu(call_linear(self.fc1, call_layer_norm(self.norm, x))))


class CrossAttentionLayer(nn.Module):
    """Queries attend to a separate key/value input, then an MLP; both with residual connections (the attention
    residual can be switched off, as in the Perceiver IO language model's decoder)."""

    def __init__(
        self,
        num_heads: int,
        num_q_input_channels: int,
        num_kv_input_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        max_heads_parallel: int | None = None,
        causal: bool = False,
        widening_factor: int = 1,
        dropout: float = 0.0,
        residual_dropout: float = 0.0,
        attention_residual: bool = True,
        qkv_bias: bool = True,
        out_bias: bool = True,
        mlp_bias: bool = True,
    ):
        super().__init__()
        self.q_norm = nn.LayerNorm(num_q_input_channels)
        self.kv_norm = nn.LayerNorm(num_kv_input_channels)
        self.attention = MultiHeadAttention(
            num_heads=num_heads,
            num_q_input_channels=num_q_input_channels,
            num_kv_input_channels=num_kv_input_channels,
            num_qk_channels=num_qk_channels,
            num_v_channels=num_v_channels,
            max_heads_parallel=max_heads_parallel,
            causal=causal,
            dropout=dropout,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
        )
        self.attention_residual = attention_residual
        self.mlp = MLP(num_q_input_channels, widening_factor, bias=mlp_bias)
        self.residual_dropout = residual_dropout

    def forward(
        self,
        x_q: torch.Tensor,
        x_kv: torch.Tensor | None = None,
        x_kv_prefix: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        rotary_q: Rotary | None = None,
        rotary_k: Rotary | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Attend from x_q (B, Nq, Cq) to x_kv (B, Nk, Ckv).

        Perceiver AR passes `x_kv_prefix` instead: the keys/values are then the prefix followed by the queries
        themselves, the prefix normalised by `kv_norm` and the queries by `q_norm`.
        """
        q = self.q_norm(x_q)
        if x_kv is None:
            # An empty prefix (a sequence no longer than the latents, a cached generation step) still goes through
            # kv_norm when gradients are computed: under DDP every rank must use the same parameters at every step,
            # or the ranks' gradient all-reduces stop matching and the run hangs (issue 17).
            no_prefix = x_kv_prefix is None or (x_kv_prefix.shape[1] == 0 and not torch.is_grad_enabled())
            kv = q if no_prefix else torch.cat([self.kv_norm(x_kv_prefix), q], dim=1)
        else:
            kv = self.kv_norm(x_kv)
        attended = self.attention(q, kv, pad_mask=pad_mask, rotary_q=rotary_q, rotary_k=rotary_k, cache=cache)
        attended = dropout(attended, self.residual_dropout, self.training)
        x = x_q + attended if self.attention_residual else attended
        return x + dropout(self.mlp(x), self.residual_dropout, self.training)

    def step(self, x: torch.Tensor, cache: KVCache, rotary: Rotary | None = None) -> torch.Tensor:
        """`forward` for Perceiver AR's cached generation step: one new latent per sequence, x (B, 1, C), which is
        also the only new key/value position (see `MultiHeadAttention.step`). Inference only: no dropout. Two paths
        for speed, held equal by tests/test_step_paths.py."""
        attended = self.attention.step(call_layer_norm(self.q_norm, x), cache, rotary)
        x = x + attended if self.attention_residual else attended
        return x + self.mlp.step(x)


class SelfAttentionLayer(nn.Module):
    """Self-attention, then an MLP, both with residual connections."""

    def __init__(
        self,
        num_heads: int,
        num_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        max_heads_parallel: int | None = None,
        causal: bool = False,
        widening_factor: int = 1,
        dropout: float = 0.0,
        residual_dropout: float = 0.0,
        qkv_bias: bool = True,
        out_bias: bool = True,
        mlp_bias: bool = True,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(num_channels)
        self.attention = MultiHeadAttention(
            num_heads=num_heads,
            num_q_input_channels=num_channels,
            num_kv_input_channels=num_channels,
            num_qk_channels=num_qk_channels,
            num_v_channels=num_v_channels,
            max_heads_parallel=max_heads_parallel,
            causal=causal,
            dropout=dropout,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            self_attention=True,
        )
        self.mlp = MLP(num_channels, widening_factor, bias=mlp_bias)
        self.residual_dropout = residual_dropout

    def forward(
        self,
        x: torch.Tensor,
        pad_mask: torch.Tensor | None = None,
        rotary: Rotary | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        h = self.norm(x)
        attended = self.attention(h, pad_mask=pad_mask, rotary_q=rotary, rotary_k=rotary, cache=cache)
        x = x + dropout(attended, self.residual_dropout, self.training)
        return x + dropout(self.mlp(x), self.residual_dropout, self.training)

    def step(self, x: torch.Tensor, cache: KVCache, rotary: Rotary | None = None) -> torch.Tensor:
        """`forward` for a cached generation step, x (B, 1, C): see `MultiHeadAttention.step`. No dropout. Two
        paths for speed, held equal by tests/test_step_paths.py."""
        x = x + self.attention.step(call_layer_norm(self.norm, x), cache, rotary)
        return x + self.mlp.step(x)


class SelfAttentionBlock(nn.Module):
    """A stack of self-attention layers; the first `num_rotary_layers` use the rotary embedding (-1: all)."""

    def __init__(self, num_layers: int, num_rotary_layers: int = -1, activation_checkpointing: bool = False, **kwargs):
        super().__init__()
        self.layers = nn.ModuleList(SelfAttentionLayer(**kwargs) for _ in range(num_layers))
        self.num_rotary_layers = num_layers if num_rotary_layers == -1 else num_rotary_layers
        self.activation_checkpointing = activation_checkpointing

    def forward(
        self,
        x: torch.Tensor,
        pad_mask: torch.Tensor | None = None,
        rotary: Rotary | None = None,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = run_layer(
                layer,
                x,
                pad_mask=pad_mask,
                rotary=rotary if i < self.num_rotary_layers else None,
                cache=None if caches is None else caches[i],
                checkpointed=self.activation_checkpointing,
            )
        return x

    def step(self, x: torch.Tensor, caches: list[KVCache], rotary: Rotary | None = None) -> torch.Tensor:
        """`forward` for a cached generation step, x (B, 1, C): see `MultiHeadAttention.step`. Two paths for
        speed, held equal by tests/test_step_paths.py."""
        for i, (layer, cache) in enumerate(zip(self.layers, caches, strict=True)):
            x = layer.step(x, cache, rotary if i < self.num_rotary_layers else None)
        return x
