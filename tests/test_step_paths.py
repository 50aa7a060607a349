"""The contract between each module's `forward` and its cached generation `step`: the same numbers, and the same
cache afterwards. Seven modules keep both (attention, the four layer kinds, the Perceiver AR core, the causal LM):
the step is the forward pass of one new latent per sequence with the general case's masks, reshapes and module
calls left out, which makes a cached generation step 1.1-1.3x faster at `clm-small`'s shape (benchmarks/README.md,
"A cached generation step: its own path or the forward pass"). Each pair has its own test here, so that a change
to one path that the other lacks fails where it was made.

Every test fills a cache with a forward pass over a few positions, copies it, then runs several steps both ways.
"""

import copy

import pytest
import torch

from perceiver_cli.models.attention import KVCache, MultiHeadAttention, Rotary
from perceiver_cli.models.clm import CausalLanguageModel
from perceiver_cli.models.layers import MLP, CrossAttentionLayer, SelfAttentionBlock, SelfAttentionLayer
from perceiver_cli.models.perceiver_ar import PerceiverAR, PerceiverARConfig
from tiny_models import tiny_clm_config

B, C, HEADS, PROMPT, STEPS = 3, 32, 4, 5, 4
ROTARY = 4  # rotary channels per head (of 8)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def randomised(module: torch.nn.Module) -> torch.nn.Module:
    """`module` in eval mode with every parameter drawn anew (biases and norms too, so a misplaced one shows)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module.eval()


def rotary_at(start: int, length: int) -> Rotary:
    return Rotary.at(torch.arange(start, start + length)[None], ROTARY)


def assert_same_caches(a: list[KVCache], b: list[KVCache]) -> None:
    for mine, theirs in zip(a, b, strict=True):
        assert len(mine) == len(theirs)
        torch.testing.assert_close(mine.k, theirs.k, rtol=0, atol=1e-6)
        torch.testing.assert_close(mine.v, theirs.v, rtol=0, atol=1e-6)


def compare(prefill, by_forward, by_step, caches) -> None:
    """Fill `caches` (a list of KVCache) with `prefill(caches)`, then run STEPS new positions (B, 1, C) through
    `by_forward(x, caches, position)` and `by_step(x, caches, position)` on copies of them."""
    with torch.inference_mode():
        prefill(caches)
        step_caches, forward_caches = copy.deepcopy(caches), copy.deepcopy(caches)
        for position in range(PROMPT, PROMPT + STEPS):
            x = torch.randn(B, 1, C)
            torch.testing.assert_close(
                by_step(x, step_caches, position), by_forward(x, forward_caches, position), rtol=0, atol=1e-6
            )
        assert_same_caches(step_caches, forward_caches)


@pytest.mark.parametrize("self_attention", [True, False], ids=["self-attention", "cross-attention"])
@pytest.mark.parametrize("rotary", [True, False], ids=["rotary", "no-rotary"])
def test_multi_head_attention(self_attention, rotary):
    attention = randomised(MultiHeadAttention(HEADS, C, C, causal=True, self_attention=self_attention))

    def run(x, caches, position, length=1):
        r = rotary_at(position, length) if rotary else None
        kv = None if self_attention else x  # Perceiver AR's cross-attention: the new latent is its own key/value
        return attention(x, kv, rotary_q=r, rotary_k=r, cache=caches[0])

    compare(
        lambda caches: run(torch.randn(B, PROMPT, C), caches, 0, PROMPT),
        run,
        lambda x, caches, position: attention.step(x, caches[0], rotary_at(position, 1) if rotary else None),
        [KVCache()],
    )


def test_mlp():
    mlp = randomised(MLP(C, widening_factor=2))
    with torch.inference_mode():
        x = torch.randn(B, 1, C)
        torch.testing.assert_close(mlp.step(x), mlp(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("attention_residual", [True, False])
def test_cross_attention_layer(attention_residual):
    layer = randomised(CrossAttentionLayer(HEADS, C, C, causal=True, widening_factor=2, qkv_bias=False,
                                           attention_residual=attention_residual))
    prefix = torch.randn(B, 2, C)

    def prefill(caches):  # a prefix and latents, as Perceiver AR's first pass over a window
        r = rotary_at(0, PROMPT)
        layer(torch.randn(B, PROMPT - 2, C), x_kv_prefix=prefix, rotary_q=r[:, :, 2:], rotary_k=r, cache=caches[0])

    def by_forward(x, caches, position):  # a cached pass of one new latent: the prefix is empty
        r = rotary_at(position, 1)
        return layer(x, x_kv_prefix=x[:, :0], rotary_q=r, rotary_k=r, cache=caches[0])

    compare(prefill, by_forward, lambda x, caches, position: layer.step(x, caches[0], rotary_at(position, 1)),
            [KVCache()])


@pytest.mark.parametrize("rotary", [True, False], ids=["rotary", "no-rotary"])
def test_self_attention_layer(rotary):
    layer = randomised(SelfAttentionLayer(HEADS, C, causal=True, widening_factor=2))

    def run(x, caches, position, length=1):
        return layer(x, rotary=rotary_at(position, length) if rotary else None, cache=caches[0])

    compare(
        lambda caches: run(torch.randn(B, PROMPT, C), caches, 0, PROMPT),
        run,
        lambda x, caches, position: layer.step(x, caches[0], rotary_at(position, 1) if rotary else None),
        [KVCache()],
    )


@pytest.mark.parametrize("num_rotary_layers", [-1, 0, 1])
def test_self_attention_block(num_rotary_layers):
    block = randomised(SelfAttentionBlock(num_layers=3, num_rotary_layers=num_rotary_layers, num_heads=HEADS,
                                          num_channels=C, causal=True, widening_factor=2))

    def run(x, caches, position, length=1):
        return block(x, rotary=rotary_at(position, length), caches=caches)

    compare(
        lambda caches: run(torch.randn(B, PROMPT, C), caches, 0, PROMPT),
        run,
        lambda x, caches, position: block.step(x, caches, rotary_at(position, 1)),
        [KVCache() for _ in range(3)],
    )


def test_perceiver_ar():
    config = PerceiverARConfig(num_heads=HEADS, num_self_attention_layers=2, cross_attention_dropout=0.5)
    core = randomised(PerceiverAR(config, C, ROTARY))
    cache = core.empty_cache()
    with torch.inference_mode():
        core(torch.randn(B, PROMPT, C), torch.arange(PROMPT)[None], prefix_len=2, cache=cache)  # 2 prefix, 3 latents
        by_step, by_forward = copy.deepcopy(cache), copy.deepcopy(cache)
        for position in range(PROMPT, PROMPT + STEPS):
            x = torch.randn(B, 1, C)
            expected = core(x, torch.tensor([[position]]), 0, cache=by_forward)
            torch.testing.assert_close(core.step(x, by_step), expected, rtol=0, atol=1e-6)
        assert_same_caches([by_step.cross_attention, *by_step.self_attention],
                           [by_forward.cross_attention, *by_forward.self_attention])
        assert len(by_step) == PROMPT + STEPS and by_step.num_latents == PROMPT - 2 + STEPS


@pytest.mark.parametrize("abs_pos_emb", [True, False])
def test_causal_language_model(abs_pos_emb):
    # The whole model, on a real prefix and with the tied logits (tests/test_generate.py runs it with generation).
    model = randomised(CausalLanguageModel(tiny_clm_config(abs_pos_emb=abs_pos_emb)))
    prompts = torch.randint(6, 262, (B, 14))
    cache = model.empty_cache()
    with torch.inference_mode():
        model(prompts, 10, cache=cache)
        by_step, by_forward = copy.deepcopy(cache), copy.deepcopy(cache)
        tokens = prompts[:, -1]
        for _ in range(STEPS):
            expected = model(tokens[:, None], 0, cache=by_forward)[:, -1]
            torch.testing.assert_close(model.step(tokens, by_step), expected, rtol=0, atol=1e-5)
            tokens = expected.argmax(dim=-1)
        assert_same_caches([by_step.cross_attention, *by_step.self_attention],
                           [by_forward.cross_attention, *by_forward.self_attention])
