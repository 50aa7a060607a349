"""The one attention implementation of both models: multi-head attention through
`torch.nn.functional.scaled_dot_product_attention`, with key padding masks, right-aligned causal masks,
rotary position embeddings and an optional key/value cache.

Shapes: B batch, H heads, Nq queries, Nk keys, C channels, c channels per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from perceiver_cli.models.common import FieldName, Problem, field_path, raise_problems


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding (https://arxiv.org/abs/2104.09864), GPT-J style: interleaved channel pairs
# (x0, x1), (x2, x3), ... are rotated, on the first `dim` channels of each head only.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Rotary:
    """Precomputed rotation for a batch of positions; cos and sin are (B, 1, N, dim).

    `sin` carries the sign of the rotation: (-sin, +sin) on each channel pair, so that rotating is two products
    with the pair-swapped input (see `rotate`).
    """

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def at(cls, positions: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> "Rotary":
        """Rotation for integer `positions` of shape (B, N), with frequencies 1 / 10000^(2i/dim)."""
        exact = torch.float64 if dtype == torch.float64 else torch.float32
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=positions.device, dtype=exact) / dim))
        angles = positions.to(exact)[..., None] * inv_freq  # (B, N, dim/2)
        angles = angles.repeat_interleave(2, dim=-1)[:, None]  # (B, 1, N, dim): one angle per channel pair
        sign = torch.tensor([-1.0, 1.0], device=positions.device, dtype=exact).repeat(dim // 2)
        return cls(angles.cos().to(dtype), (angles.sin() * sign).to(dtype))

    def __getitem__(self, index) -> "Rotary":
        """Select positions: `rotary[:, :, a:b]` slices the position axis of both tables."""
        return Rotary(self.cos[index], self.sin[index])

    def gather(self, index: torch.Tensor) -> "Rotary":
        """Select per-example positions: `index` is (B, K)."""
        b, dim = index.shape[0], self.cos.shape[-1]
        idx = index[:, None, :, None].expand(-1, 1, -1, dim)
        return Rotary(self.cos.expand(b, -1, -1, -1).gather(2, idx), self.sin.expand(b, -1, -1, -1).gather(2, idx))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate the first `dim` channels of each head of x (B, H, N, c); the rest pass through."""
        dim = self.cos.shape[-1]
        x_rot, x_pass = x[..., :dim], x[..., dim:]
        x_swapped = x_rot.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x0, x1) -> (x1, x0); sin holds the signs
        return torch.cat((x_rot * self.cos + x_swapped * self.sin, x_pass), dim=-1)


class RotaryTable:
    """The rotation of every position below a bound, computed once: a forward pass then only looks its positions
    up (two index operations instead of ten to build the rotation anew). It grows by doubling when longer inputs
    come and is rebuilt for another device or dtype; not a module buffer, so checkpoints do not carry it."""

    def __init__(self, dim: int):
        self.dim = dim
        self._table: Rotary | None = None  # cos and sin of shape (length, dim)

    def at(self, positions: torch.Tensor, bound: int, dtype: torch.dtype) -> Rotary:
        """The rotation (B, 1, N, dim) of `positions` (B, N), all of which are below `bound`."""
        table = self._covering(bound, positions.device, dtype)
        return Rotary(table.cos[positions][:, None], table.sin[positions][:, None])

    def span(self, start: int, length: int, device: torch.device, dtype: torch.dtype) -> Rotary:
        """The rotation (1, 1, length, dim) of positions start .. start + length - 1, the same for every example: a
        slice of the table, no index tensor."""
        table = self._covering(start + length, device, dtype)
        return Rotary(table.cos[None, None, start : start + length], table.sin[None, None, start : start + length])

    def _covering(self, bound: int, device: torch.device, dtype: torch.dtype) -> Rotary:
        table = self._table
        if table is None or table.cos.shape[0] < bound or table.cos.device != device or table.cos.dtype != dtype:
            with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, usable in training too
                length = max(2 * bound, 64)
                table = Rotary.at(torch.arange(length, device=device)[None], self.dim, dtype)
            self._table = table = Rotary(table.cos[0, 0], table.sin[0, 0])
        return table


# ---------------------------------------------------------------------------------------------------------------
# Key/value cache of one attention layer
# ---------------------------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values (B, H, N, c) of positions seen earlier by one attention layer.

    Keys are stored after the rotary embedding, so a cached position is never rotated twice. The buffers grow by
    doubling: appending a token writes one position instead of copying the whole cache (as `torch.cat` would).
    """

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None  # (B, H, capacity, c)
        self._v: torch.Tensor | None = None
        self._length = 0

    def __len__(self) -> int:
        return self._length

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self._length]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self._length]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys and values (B, H, n, c); return all of them (views of the buffers)."""
        end = self._length + k.shape[2]
        if self._k is None or end > self._k.shape[2]:
            self._k, self._v = self._grown(self._k, k, end), self._grown(self._v, v, end)
        self._k[:, :, self._length : end] = k
        self._v[:, :, self._length : end] = v
        self._length = end
        return self.k, self.v

    def _grown(self, buffer: torch.Tensor | None, new: torch.Tensor, needed: int) -> torch.Tensor:
        b, h, _, c = new.shape
        grown = new.new_empty(b, h, max(2 * needed, 16), c)
        if buffer is not None:
            grown[:, :, : self._length] = buffer[:, :, : self._length]
        return grown

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on; the buffers stay for the positions that come next."""
        self._length = min(self._length, length)

    def select(self, batch_index: torch.Tensor) -> None:
        """Keep/reorder batch entries (beam search, copies of one prompt)."""
        if self._k is not None:
            self._k, self._v = self._k[batch_index], self._v[batch_index]


# ---------------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------------


def attention_mask(
    pad_mask: torch.Tensor | None, num_queries: int, num_keys: int, causal: bool, device: torch.device | None = None
) -> torch.Tensor | None:
    """Boolean mask for SDPA (True = may attend), broadcastable to (B, H, Nq, Nk), or None for "attend to all".

    `pad_mask` (B, Nk) is True at padding keys. A causal mask is right-aligned: query i sits at key position
    i + Nk - Nq (Perceiver AR's latents are the last positions of its keys). A padded query position (left padding)
    would then see no key at all and produce NaN; it may see itself, which changes no real position's output.
    """
    if pad_mask is None and not causal:
        return None
    keep = None if pad_mask is None else ~pad_mask[:, None, None, :]  # (B, 1, 1, Nk)
    if not causal:
        return keep
    query_pos = torch.arange(num_queries, device=device)[:, None] + (num_keys - num_queries)  # (Nq, 1)
    key_pos = torch.arange(num_keys, device=device)  # (Nk,)
    mask = key_pos <= query_pos  # (Nq, Nk)
    if keep is not None:
        mask = mask & (keep | (key_pos == query_pos))
    return mask


# ---------------------------------------------------------------------------------------------------------------
# Multi-head attention
# ---------------------------------------------------------------------------------------------------------------


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, dropout: float
) -> torch.Tensor:
    """softmax(q k^T / sqrt(c)) v for (B, H, N, c) heads, through `scaled_dot_product_attention`.

    SDPA has no fused CPU kernel for query/key heads and value heads of different widths (the Perceiver IO layouts),
    and its fallback is slower than the plain formulation below. Padding the narrower heads with zeros to
    the wider width (zeros change no score and no output channel we keep) runs the fused kernel instead, which
    never holds the whole score matrix; `_pads_heads` says when that pays.
    """
    c, c_v = q.shape[-1], v.shape[-1]
    if q.is_cpu and c != c_v:
        if not _pads_heads(q, k):
            scores = (q * c**-0.5) @ k.transpose(-2, -1)  # (B, H, Nq, Nk)
            if is_causal:
                mask = attention_mask(None, q.shape[2], k.shape[2], True, q.device)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = F.dropout(scores.softmax(dim=-1), dropout) if dropout else scores.softmax(dim=-1)
            return probs @ v
        if c < c_v:
            q, k = F.pad(q, (0, c_v - c)), F.pad(k, (0, c_v - c))
        else:
            v = F.pad(v, (0, c - c_v))
        o = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal, scale=c**-0.5)
        return o[..., :c_v]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)


def _pads_heads(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether attention of unequal head widths on the CPU is faster through SDPA on zero-padded heads than in the
    plain formulation: in training, fp32 only and from 65k scores per head (where the fused kernel also saves the
    score matrix's memory); in inference, in low precision always and in fp32 once all heads' scores outgrow the
    allocator's caches. The measurements: benchmarks/README.md, "Measurements behind choices in the code".
    """
    low_precision = q.dtype in (torch.bfloat16, torch.float16)
    if q.requires_grad or k.requires_grad:
        return not low_precision and q.shape[2] * k.shape[2] >= 65536
    return low_precision or q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] >= 1_500_000


def call_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` without `nn.Module.__call__` and its hook checks: for cached generation steps, which make many
    such calls, each of a single token (measured in benchmarks/README.md). No hooks run on this path."""
    return F.linear(x, layer.weight, layer.bias)


def call_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` without `nn.Module.__call__`: see `call_linear`."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def attention_channels(
    num_q_input_channels: int, num_qk_channels: int | None = None, num_v_channels: int | None = None
) -> tuple[int, int]:
    """The query/key and value channels of an attention, defaults resolved: query/key channels default to the query
    input's channels, value channels to the query/key channels. Every reader of a config's attention channels (the
    models, their layout checks, the converters) resolves them here."""
    num_qk_channels = num_qk_channels or num_q_input_channels
    return num_qk_channels, num_v_channels or num_qk_channels


def head_problems(
    num_heads: int, channels: list[tuple[str, str, int]], heads_field: str = "num_heads", name: FieldName = field_path
) -> list[Problem]:
    """What keeps channel counts from splitting into `num_heads` heads: `channels` holds (field, what it is, count)
    of each count; `heads_field` is the heads' field. (See `perceiver_cli.models.common` for `name`.)"""
    if num_heads < 1:
        return [(name(heads_field), "must be at least 1")]
    return [
        (name(field), f"{what} ({count}) must be divisible by {name(heads_field)} ({num_heads})")
        for field, what, count in channels
        if count % num_heads
    ]


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Perceiver IO paper, appendix E) with separate query/key and value widths.

    Query/key channels default to the query input's channels, value channels to the query/key channels and output
    channels to the query input's channels.

    The projections are fused where the inputs allow: self-attention computes queries, keys and values with one
    matrix product (`qkv_proj`), cross-attention its keys and values with one (`kv_proj`). One product instead of
    three runs closer to the machine's peak, and a cached generation step makes nine fewer calls. A fused weight is
    the reference implementations' query, key and value weights stacked along the output axis (`fused_projections`
    says which); the converters split and stack them (`perceiver_cli.models.huggingface.state_dicts`).
    """

    def __init__(
        self,
        num_heads: int,
        num_q_input_channels: int,
        num_kv_input_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        num_output_channels: int | None = None,
        max_heads_parallel: int | None = None,
        causal: bool = False,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        out_bias: bool = True,
        self_attention: bool = False,
    ):
        super().__init__()
        num_qk_channels, num_v_channels = attention_channels(num_q_input_channels, num_qk_channels, num_v_channels)
        num_output_channels = num_output_channels or num_q_input_channels
        raise_problems(
            head_problems(
                num_heads,
                [("num_qk_channels", "query/key channels", num_qk_channels),
                 ("num_v_channels", "value channels", num_v_channels)],
            )
        )
        if self_attention and num_kv_input_channels != num_q_input_channels:
            raise ValueError("self-attention needs as many key/value input channels as query input channels")
        self.num_heads = num_heads
        self.num_qk_channels = num_qk_channels
        self.num_v_channels = num_v_channels
        self.max_heads_parallel = max_heads_parallel or num_heads
        self.causal = causal
        self.dropout = dropout
        self.self_attention = self_attention

        if self_attention:
            self.qkv_proj = nn.Linear(num_q_input_channels, 2 * num_qk_channels + num_v_channels, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(num_q_input_channels, num_qk_channels, bias=qkv_bias)
            self.kv_proj = nn.Linear(num_kv_input_channels, num_qk_channels + num_v_channels, bias=qkv_bias)
        self.o_proj = nn.Linear(num_v_channels, num_output_channels, bias=out_bias)

    def fused_projections(self) -> dict[str, list[tuple[str, int]]]:
        """Each fused projection and the separate projections it stacks, with their output channels."""
        qk, v = self.num_qk_channels, self.num_v_channels
        if self.self_attention:
            return {"qkv_proj": [("q_proj", qk), ("k_proj", qk), ("v_proj", v)]}
        return {"kv_proj": [("k_proj", qk), ("v_proj", v)]}

    def forward(
        self,
        x_q: torch.Tensor,
        x_kv: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        rotary_q: Rotary | None = None,
        rotary_k: Rotary | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x_q (B, Nq, Cq) attends to x_kv (B, Nk, Ckv), or to itself in self-attention (x_kv None) -> (B, Nq, C_out).

        With a `cache`, x_kv holds only the new positions; `pad_mask` and the causal mask then cover the cached
        positions followed by the new ones.
        """
        if self.self_attention:
            if x_kv is not None or rotary_k is not rotary_q:
                raise ValueError("self-attention takes one input, whose queries and keys share their positions")
            qkv = self.qkv_proj(x_q)  # (B, N, 2 * H * c + H * c_v)
            if rotary_q is None:
                q, k, v = qkv.split([self.num_qk_channels, self.num_qk_channels, self.num_v_channels], dim=-1)
                q, k = self._heads(q), self._heads(k)  # (B, H, N, c) each
            else:  # queries and keys rotated at once
                qk, v = qkv.split([2 * self.num_qk_channels, self.num_v_channels], dim=-1)
                q, k = rotary_q.rotate(self._heads(qk, 2 * self.num_heads)).chunk(2, dim=1)  # (B, 2H, N, c) -> 2x
            v = self._heads(v)  # (B, H, N, c_v)
        else:
            q = self._heads(self.q_proj(x_q))  # (B, H, Nq, c)
            k, v = self.kv_proj(x_kv).split([self.num_qk_channels, self.num_v_channels], dim=-1)
            k, v = self._heads(k), self._heads(v)  # (B, H, Nk, c), (B, H, Nk, c_v)
            if v.requires_grad:  # attention saves v for the backward pass; as a view it would keep the keys too
                v = v.contiguous()  # in the layout of the attention's products
            if rotary_q is not None:
                q = rotary_q.rotate(q)
            if rotary_k is not None:
                k = rotary_k.rotate(k)
        if cache is not None:
            k, v = cache.extend(k, v)

        num_queries, num_keys = q.shape[2], k.shape[2]
        dropout = self.dropout if self.training else 0.0
        if self.causal and pad_mask is None and (num_queries == num_keys or num_queries == 1):
            # Square: SDPA's fused causal kernel. One query (a cached generation step) is the last position and
            # sees every key: no mask at all.
            mask, is_causal = None, num_queries > 1
        else:
            mask, is_causal = attention_mask(pad_mask, num_queries, num_keys, self.causal, q.device), False

        if self.max_heads_parallel >= self.num_heads:
            o = attend(q, k, v, mask, is_causal, dropout)
        else:  # bound peak memory by attending with a few heads at a time
            chunks = zip(*(t.split(self.max_heads_parallel, dim=1) for t in (q, k, v)), strict=True)
            o = torch.cat([attend(qc, kc, vc, mask, is_causal, dropout) for qc, kc, vc in chunks], dim=1)
        o = o.transpose(1, 2).flatten(2)  # (B, Nq, H * c_v)
        return self.o_proj(o)

    def step(self, h: torch.Tensor, cache: KVCache, rotary: Rotary | None = None) -> torch.Tensor:
        """`forward` for a cached generation step: one new position per sequence, h (B, 1, C), which gives the
        queries, keys and values (Perceiver AR's cross-attention has no new prefix then) and attends to itself and
        every cached position, so there is no mask.

        The same numbers as `forward` with less overhead: on the CPU, the cost of each call is about half of a small
        model's step, so this path skips the general case's reshapes and masks, and calls the projections'
        functions directly instead of through `nn.Module.__call__` (see `call_linear`). Two paths for speed: a cached
        step 1.1-1.3x faster (benchmarks/README.md); tests/test_step_paths.py holds them equal."""
        b, heads = h.shape[0], self.num_heads  # N = 1: (B, 1, H * c) views as (B, H, 1, c)
        if self.self_attention:
            qk, v = call_linear(self.qkv_proj, h).split([2 * self.num_qk_channels, self.num_v_channels], dim=-1)
            qk = qk.view(b, 2 * heads, 1, -1)  # (B, 2H, 1, c): queries, then keys
            if rotary is not None:
                qk = rotary.rotate(qk)  # both at once
            q, k = qk.chunk(2, dim=1)
        else:
            q = call_linear(self.q_proj, h).view(b, heads, 1, -1)
            k, v = call_linear(self.kv_proj, h).split([self.num_qk_channels, self.num_v_channels], dim=-1)
            k = k.view(b, heads, 1, -1)
            if rotary is not None:
                q, k = rotary.rotate(q), rotary.rotate(k)
        k, v = cache.extend(k, v.view(b, heads, 1, -1))
        o = attend(q, k, v, None, False, 0.0)  # (B, H, 1, c_v)
        return call_linear(self.o_proj, o.reshape(b, 1, -1))

    def _heads(self, x: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        # (B, N, H*c) -> (B, H, N, c), a view
        return x.unflatten(-1, (num_heads or self.num_heads, -1)).transpose(1, 2)
