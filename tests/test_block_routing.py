"""Block routing (models/block_routing.py): the initialisation that gets a masked LM off the unigram plateau."""

import math

import pytest
import torch
import torch.nn.functional as F

from perceiver_cli.data.masking import IGNORE_INDEX
from perceiver_cli.models.mlm.block_routing import problems
from perceiver_cli.models.mlm import MaskedLanguageModel, MaskedLanguageModelConfig, TextDecoderConfig, TextEncoderConfig

VOCAB, MASK = 20, 19  # 16 letters, a few unused ids, a mask id
LENGTH, BLOCK = 32, 4  # 8 blocks of 4 bytes


def routed_config(routing_init: str = "blocks", **overrides) -> MaskedLanguageModelConfig:
    encoder = TextEncoderConfig(
        vocab_size=VOCAB, max_seq_len=LENGTH, num_input_channels=32,
        num_cross_attention_heads=BLOCK, num_cross_attention_qk_channels=32, num_cross_attention_v_channels=64,
        num_self_attention_heads=4, num_self_attention_qk_channels=64, num_self_attention_v_channels=64,
        num_self_attention_layers_per_block=2,
    )
    decoder = TextDecoderConfig(
        vocab_size=VOCAB, max_seq_len=LENGTH, num_cross_attention_heads=BLOCK,
        num_cross_attention_qk_channels=64, num_cross_attention_v_channels=32, cross_attention_residual=False,
    )
    values = dict(num_latents=LENGTH // BLOCK + 1, num_latent_channels=64, routing_init=routing_init) | overrides
    return MaskedLanguageModelConfig(encoder, decoder, **values)


def attention_weights(layer, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
    """(B, H, Nq, Nk) attention probabilities of a cross-attention layer (what SDPA computes inside)."""
    attn = layer.attention
    h = attn.num_heads
    q = attn.q_proj(layer.q_norm(x_q))
    k = attn.kv_proj(layer.kv_norm(x_kv))[..., : attn.num_qk_channels]
    q = q.unflatten(-1, (h, -1)).transpose(1, 2)
    k = k.unflatten(-1, (h, -1)).transpose(1, 2)
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(dim=-1)


def test_blocks_start_routed_one_byte_per_head_and_back():
    torch.manual_seed(0)
    model = MaskedLanguageModel(routed_config()).eval()
    x = torch.randint(0, 16, (4, LENGTH))
    enc, dec = model.encoder, model.decoder
    with torch.no_grad():
        # Encoder: head h of latent j reads byte BLOCK * j + h.
        inputs = enc.input_adapter(x)
        enc_weights = attention_weights(enc.cross_attn_1, enc.latents.expand(4, -1, -1), inputs)  # (B, H, N, L)
        blocks = LENGTH // BLOCK
        target = torch.arange(blocks)[None, :] * BLOCK + torch.arange(BLOCK)[:, None]  # (H, blocks)
        on_target = enc_weights[:, torch.arange(BLOCK)[:, None], torch.arange(blocks)[None], target]
        assert on_target.min() > 0.9
        # Decoder: position i reads latent i // BLOCK through head i % BLOCK; its other heads read the sink.
        latents = enc(x)
        dec_weights = attention_weights(dec.cross_attn, dec.output_queries.expand(4, -1, -1), latents)  # (B, H, L, N)
        i = torch.arange(LENGTH)
        assert dec_weights[:, i % BLOCK, i, i // BLOCK].min() > 0.7
        others = torch.arange(BLOCK)[:, None] != (i % BLOCK)[None]  # (H, L)
        assert dec_weights[..., blocks][:, others].min() > 0.9


def test_routing_keeps_the_parameter_count_and_the_random_default():
    routed, plain = MaskedLanguageModel(routed_config()), MaskedLanguageModel(routed_config("random"))
    assert sum(p.numel() for p in routed.parameters()) == sum(p.numel() for p in plain.parameters())
    assert MaskedLanguageModelConfig.__dataclass_fields__["routing_init"].default == "random"
    assert plain.encoder.latents.std().item() == pytest.approx(0.02, rel=0.3)  # the reference's Normal(0, 0.02)


def test_a_layout_that_cannot_be_routed_is_refused_with_the_fix():
    config = routed_config(num_latents=8)
    assert [path for path, _ in problems(config)] == ["num_latents"]
    with pytest.raises(ValueError, match=r"num_latents = 32 / 4 \+ 1 = 9"):
        MaskedLanguageModel(config)
    config = routed_config()
    config.decoder.num_cross_attention_heads = 8
    assert "decoder.num_cross_attention_heads" in dict(problems(config))


def paired_batch(generator: torch.Generator, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of random letters in equal pairs (positions 2k and 2k + 1); one byte of some pairs is masked, so
    it can only be predicted from its partner: position-specific information or nothing (the unigram plateau)."""
    letters = torch.randint(0, 16, (batch, LENGTH // 2), generator=generator)
    x = letters.repeat_interleave(2, dim=1)
    pair_masked = torch.rand(batch, LENGTH // 2, generator=generator) < 0.3
    which = torch.randint(0, 2, (batch, LENGTH // 2), generator=generator)
    masked = torch.zeros(batch, LENGTH, dtype=torch.bool)
    masked[:, 0::2] = pair_masked & (which == 0)
    masked[:, 1::2] = pair_masked & (which == 1)
    labels = torch.where(masked, x, IGNORE_INDEX)
    return x.masked_fill(masked, MASK), labels


def train_pairs(config: MaskedLanguageModelConfig, steps: int) -> float:
    torch.manual_seed(0)
    model = MaskedLanguageModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x, labels = paired_batch(generator)
        loss = F.cross_entropy(model(x).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


def test_block_routing_leaves_the_plateau_where_random_initialisation_stays():
    plateau = math.log(16)  # a uniform guess over the 16 letters
    routed, plain = routed_config(), routed_config("random")
    routed.encoder.num_self_attention_layers_per_block = plain.encoder.num_self_attention_layers_per_block = 1
    assert train_pairs(routed, 150) < 0.25 * plateau  # measured: 0.3 after 100 steps, 0.05 after 150
    assert train_pairs(plain, 150) > 0.95 * plateau  # measured: 2.78 (log 16 = 2.77) for 200 steps
