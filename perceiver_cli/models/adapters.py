"""Adapters between tokens and the generic Perceiver cores: token embeddings in, tied logits out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenInputAdapter(nn.Module):
    """Token embedding plus (optionally) a learned absolute position embedding: (B, N) ids -> (B, N, C). Token
    embeddings computed elsewhere, (B, N, C) floats (Hugging Face's `inputs_embeds`), get the positions only."""

    def __init__(self, vocab_size: int, max_seq_len: int, num_channels: int, abs_pos_emb: bool = True):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.txt_embedding = nn.Embedding(vocab_size, num_channels)
        self.pos_embedding = nn.Embedding(max_seq_len, num_channels) if abs_pos_emb else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """`positions` (B, N) defaults to start .. start + N - 1 for every example."""
        n = x.shape[1]
        if start + n > self.max_seq_len:
            raise ValueError(f"input length {start + n} exceeds the model's max_seq_len {self.max_seq_len}")
        emb = x if x.is_floating_point() else self.txt_embedding(x)
        if self.pos_embedding is None:
            return emb
        if positions is None:
            return emb + self.pos_embedding.weight[start : start + n]  # a slice, not a lookup: no index tensor
        return emb + self.pos_embedding(positions)


def tied_logits(h: torch.Tensor, embedding: nn.Embedding, bias: torch.Tensor | None) -> torch.Tensor:
    """Logits from hidden states (..., C) through the transposed token embedding (weight tying), plus a bias (one
    fused product-and-add)."""
    return F.linear(h, embedding.weight, bias)
