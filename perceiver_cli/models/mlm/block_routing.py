"""Block routing: an initialisation that starts a Perceiver IO masked LM as a transformer over blocks of bytes.

Why: from the usual small random initialisation, a byte-level Perceiver IO masked LM sits on the unigram plateau
for thousands of steps (issue 15). Every latent reads the same average of the input and every output query reads
the same average of the latents, so no latent carries anything specific to a position and the gradient that would
make the cross-attentions position-specific is a product of two near-zero terms. This initialisation sets the two
cross-attentions to the routing a trained model needs, and leaves everything else random:

- the input is cut into blocks of P bytes, P = the encoder's cross-attention heads; latent j reads block j, head h
  of latent j attending to byte P * j + h, and writes it to its own slot h of the latent's channels (a lossless
  copy of the block, in order);
- the output query of position i = P * j + h reads slot h of latent j through decoder head h; the decoder's other
  heads read one extra latent, the sink (the last one), which starts empty;
- the self-attention layers in between start as usual: they learn to turn each block's slots into predictions,
  looking at the other blocks.

Only parameter values change: the layout is the usual Perceiver IO one (it converts to transformers'
`PerceiverForMaskedLM` unchanged), and training may move the routing anywhere.

Positions are named by Fourier codes (cos, sin) of periods 4, 8, ..., >= the sequence length. Shifting a position
by h rotates each (cos, sin) pair by a fixed angle, so one linear map per head turns latent j's code (that of
position P * j) into the code of byte P * j + h; and the codes of two different positions differ by at least 1 in
their dot product, so a moderate gain makes each head's attention sharp.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from perceiver_cli.models.attention import attention_channels

# Gains of the routing logits, chosen so that at initialisation over 95% of each encoder head's attention and over
# 80% of each decoder head's lands on its target (tests/test_block_routing.py checks the routing).
ENCODER_GAIN = 3.0
DECODER_GAIN = 8.0
SINK_GAIN = 24.0  # how strongly a decoder head that does not serve a query's position prefers the sink
SLOT_SCALE = 0.3  # the copied bytes' scale in the latents, below the position code's so keys stay readable


def periods(max_seq_len: int) -> list[int]:
    """Fourier periods 4, 8, ..., up to the first one that covers the sequence."""
    result = [4]
    while result[-1] < max_seq_len:
        result.append(2 * result[-1])
    return result


def position_code(positions: torch.Tensor, periods: list[int]) -> torch.Tensor:
    """(N,) positions -> (N, 2K) codes: (cos, sin) of each period, scaled to unit norm."""
    angles = 2 * math.pi * positions[:, None].double() / torch.tensor(periods, dtype=torch.double)  # (N, K)
    return (torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(1) / math.sqrt(len(periods))).float()


def shift_map(shift: int, periods: list[int]) -> torch.Tensor:
    """(2K, 2K) map taking the code of position p to the code of position p + shift."""
    rotation = torch.zeros(2 * len(periods), 2 * len(periods))
    for k, period in enumerate(periods):
        t = 2 * math.pi * shift / period
        rotation[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = torch.tensor(
            [[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]
        )
    return rotation


def problems(config) -> list[tuple[str, str]]:
    """What keeps a `MaskedLanguageModelConfig` from block routing, as (field path under the model, message)."""
    enc, dec = config.encoder, config.decoder
    length, p = enc.max_seq_len, enc.num_cross_attention_heads
    code = 2 * len(periods(length))
    found = []
    if length % p:
        found.append(("encoder.num_cross_attention_heads",
                      f"block routing cuts the {length} positions into blocks of one byte per encoder "
                      f"cross-attention head: {p} heads do not divide them"))
        return found
    if config.num_latents != length // p + 1:
        found.append(("num_latents", f"block routing needs one latent per block of {p} bytes and one sink: set "
                                     f"num_latents = {length} / {p} + 1 = {length // p + 1}"))
    if dec.num_cross_attention_heads != p:
        found.append(("decoder.num_cross_attention_heads",
                      f"block routing reads each byte of a block through its own decoder head, but the decoder has "
                      f"{dec.num_cross_attention_heads} heads and the encoder's cross-attention {p}: make them equal "
                      "(8 keeps `convert --to hf` possible)"))
    enc_qk = attention_channels(config.num_latent_channels, enc.num_cross_attention_qk_channels)[0] // p
    if enc_qk < code:
        found.append(("encoder.num_cross_attention_qk_channels",
                      f"block routing needs {code} query/key channels per head for the position code of "
                      f"{length} positions: set at least {code * p}"))
    query_channels = config.output_query_channels
    dec_qk = attention_channels(query_channels, dec.num_cross_attention_qk_channels)[0] // dec.num_cross_attention_heads
    if dec_qk < code + 1:
        found.append(("decoder.num_cross_attention_qk_channels",
                      f"block routing needs {code + 1} query/key channels per decoder head: set at least "
                      f"{(code + 1) * dec.num_cross_attention_heads}"))
    if enc.num_input_channels <= code:
        found.append(("encoder.num_input_channels", f"block routing keeps {code} input channels for the position "
                                                    f"code: set more than {code}"))
    if query_channels < code + p:
        key = "decoder.num_output_query_channels" if dec.num_output_query_channels else "encoder.num_input_channels"
        found.append((key, f"block routing needs at least {code + p} decoder query channels (a position code and "
                           f"one of {p} slots): set at least {code + p}"))
    if config.num_latent_channels < p + code + 2:
        found.append(("num_latent_channels", f"block routing needs at least {p + code + 2} latent channels"))
    return found


@torch.no_grad()
def init_block_routing(model: nn.Module) -> None:
    """Set a `MaskedLanguageModel`'s embeddings, latents and cross-attentions to block routing (see the module
    docstring). `problems(model.config)` must be empty. The random parts draw from torch's global generator, as the
    rest of the initialisation does."""
    enc, dec = model.encoder, model.decoder
    adapter, attn = enc.input_adapter, enc.cross_attn_1.attention
    length, c = adapter.pos_embedding.weight.shape  # sequence length L, input channels C
    p = attn.num_heads  # P bytes per block
    blocks = length // p  # B blocks
    pers = periods(length)
    f = 2 * len(pers)  # position code channels F
    t = c - f  # token channels T: the input is [token (T) | position code (F)]

    def normal_(x: torch.Tensor, fan_in: int, scale: float = 1.0) -> torch.Tensor:
        return x.normal_(0.0, scale / math.sqrt(fan_in))

    # Input: token embeddings in the first T channels, position codes in the last F. All token embeddings have unit
    # norm, as the codes do, so the input LayerNorm scales every position's code alike and no key outshouts another.
    tokens = adapter.txt_embedding.weight
    tokens.zero_()
    tokens[:, :t] = F.normalize(torch.randn(tokens.shape[0], t), dim=-1)
    adapter.pos_embedding.weight.zero_()
    adapter.pos_embedding.weight[:, t:] = position_code(torch.arange(length), pers)

    # Latents: [slot 0 | ... | slot P-1 (S each) | position code of the block's first byte (F) | block flag | sink flag]
    d = enc.latents.shape[1]
    s = (d - f - 2) // p
    code, flag, sink = p * s, p * s + f, p * s + f + 1
    enc.latents.zero_()
    enc.latents[:blocks, code : code + f] = position_code(torch.arange(blocks) * p, pers)
    enc.latents[:blocks, flag] = 1.0
    enc.latents[blocks, sink] = 1.0

    # Encoder cross-attention: head h of latent j queries the code of byte P * j + h, keys are the position codes,
    # values the token channels, and the output projection writes head h to slot h.
    qk, cq, cv = attn.num_qk_channels, attn.num_qk_channels // p, attn.num_v_channels // p
    for linear in (attn.q_proj, attn.kv_proj, attn.o_proj):
        linear.weight.zero_()
        linear.bias.zero_()
    for h in range(p):
        attn.q_proj.weight[h * cq : h * cq + f, code : code + f] = ENCODER_GAIN * shift_map(h, pers)
        attn.kv_proj.weight[h * cq : h * cq + f, t:] = torch.eye(f)
        normal_(attn.kv_proj.weight[qk + h * cv : qk + (h + 1) * cv, :t], t)
        normal_(attn.o_proj.weight[h * s : (h + 1) * s, h * cv : (h + 1) * cv], cv, SLOT_SCALE)

    # Decoder: the query of position i = P * j + h is [code of position P * j (F) | one-hot of h (P) | 0]. Decoder
    # head h matches it against the latents' codes; every other head is pushed to the sink, the one latent without
    # the block flag. Head h's values read slot h; all heads share one output map into the token channels.
    da = dec.cross_attn.attention
    dqk, dq, dv = da.num_qk_channels, da.num_qk_channels // p, da.num_v_channels // p
    queries = dec.output_queries
    positions = torch.arange(queries.shape[0])
    queries.zero_()
    queries[:, :f] = position_code(positions // p * p, pers)
    queries[positions, f + positions % p] = 1.0
    for linear in (da.q_proj, da.kv_proj, da.o_proj):
        linear.weight.zero_()
        linear.bias.zero_()
    shared_output = normal_(torch.empty(min(t, da.o_proj.weight.shape[0]), dv), dv)
    for h in range(p):
        rows = slice(h * dq, h * dq + f)
        da.q_proj.weight[rows, :f] = DECODER_GAIN * torch.eye(f)
        da.q_proj.weight[h * dq + f, f : f + p] = -SINK_GAIN
        da.q_proj.weight[h * dq + f, f + h] = 0.0
        da.kv_proj.weight[rows, code : code + f] = torch.eye(f)
        da.kv_proj.weight[h * dq + f, flag] = 1.0
        normal_(da.kv_proj.weight[dqk + h * dv : dqk + (h + 1) * dv, h * s : (h + 1) * s], s)
        da.o_proj.weight[: shared_output.shape[0], h * dv : (h + 1) * dv] = shared_output
