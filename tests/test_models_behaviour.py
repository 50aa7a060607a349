"""Behaviour of the backend models: causality, padding, decoding subsets, memory knobs, learning."""

import pytest
import torch
import torch.nn.functional as F

from perceiver_cli.data.masking import IGNORE_INDEX
from perceiver_cli.models.clm import CausalLanguageModel
from perceiver_cli.models.lightning import LitCausalLanguageModel, LitMaskedLanguageModel
from perceiver_cli.models.mlm import MaskedLanguageModel
from tiny_models import tiny_clm_config, tiny_mlm_config


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def random_tokens(b: int, n: int) -> torch.Tensor:
    return torch.randint(6, 262, (b, n))


# --- Perceiver AR --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_len", [0, 10, 20])
def test_clm_is_causal(prefix_len):
    model = CausalLanguageModel(tiny_clm_config()).eval()
    n = prefix_len + 12
    x = random_tokens(2, n)
    logits = model(x, prefix_len)  # (B, 12, V) for positions prefix_len .. n-1
    for changed in range(prefix_len, n):  # change one latent token: no earlier latent may notice
        x2 = x.clone()
        x2[:, changed] = (x2[:, changed] + 1 - 6) % 256 + 6
        logits2 = model(x2, prefix_len)
        j = changed - prefix_len
        torch.testing.assert_close(logits2[:, :j], logits[:, :j], rtol=0, atol=1e-6)
        assert (logits2[:, j:] - logits[:, j:]).abs().max() > 1e-4  # and the position itself does notice


def test_clm_prefix_tokens_reach_every_latent():
    model = CausalLanguageModel(tiny_clm_config()).eval()
    x = random_tokens(1, 30)
    x2 = x.clone()
    x2[0, 3] = (x2[0, 3] + 1 - 6) % 256 + 6
    diff = (model(x, 18) - model(x2, 18)).abs().amax(dim=-1)  # (1, 12)
    assert (diff > 1e-5).all()


@pytest.mark.parametrize("abs_pos_emb", [True, False])
def test_clm_left_padding_does_not_change_real_logits(abs_pos_emb):
    model = CausalLanguageModel(tiny_clm_config(abs_pos_emb=abs_pos_emb)).eval()
    lengths = [30, 22, 7]  # 7 < 12 latents: padding among the latents too
    n = max(lengths)
    x = torch.zeros(len(lengths), n, dtype=torch.long)
    pad_mask = torch.ones(len(lengths), n, dtype=torch.bool)
    rows = [random_tokens(1, length)[0] for length in lengths]
    for i, row in enumerate(rows):
        x[i, n - len(row) :] = row
        pad_mask[i, n - len(row) :] = False
    padded = model(x, n - 12, pad_mask=pad_mask)
    assert torch.isfinite(padded).all()
    for i, row in enumerate(rows):
        num_latents = min(12, len(row))
        alone = model(row[None], len(row) - num_latents)  # (1, num_latents, V)
        torch.testing.assert_close(padded[i, 12 - num_latents :], alone[0], rtol=0, atol=1e-5)


def test_clm_cross_attention_dropout_only_in_training():
    model = CausalLanguageModel(tiny_clm_config(cross_attention_dropout=0.5))
    x = random_tokens(2, 40)
    model.eval()
    torch.testing.assert_close(model(x, 28), model(x, 28))
    model.train()
    torch.manual_seed(1)
    a = model(x, 28)
    torch.manual_seed(2)
    b = model(x, 28)
    assert (a - b).abs().max() > 1e-4  # different prefix positions were dropped


def test_clm_runtime_number_of_latents():
    model = CausalLanguageModel(tiny_clm_config()).eval()
    x = random_tokens(1, 30)
    for num_latents in (1, 5, 12):
        assert model(x, 30 - num_latents).shape == (1, num_latents, 262)
    with pytest.raises(ValueError, match="max_latents"):
        model(x, 30 - 13)
    with pytest.raises(ValueError, match="max_prefix_len"):
        model(random_tokens(1, 48), 37)


# --- Perceiver IO --------------------------------------------------------------------------------------------------


def test_mlm_right_padding_does_not_change_real_logits():
    model = MaskedLanguageModel(tiny_mlm_config()).eval()
    x = random_tokens(3, 32)
    pad_mask = torch.zeros(3, 32, dtype=torch.bool)
    pad_mask[1, 20:] = True
    pad_mask[2, 5:] = True
    padded = model(x.masked_fill(pad_mask, 0), pad_mask=pad_mask)
    for i, length in enumerate([32, 20, 5]):
        alone = model(x[i : i + 1, :length])
        torch.testing.assert_close(padded[i, :length], alone[0], rtol=0, atol=1e-5)


def test_mlm_decodes_only_requested_positions():
    model = MaskedLanguageModel(tiny_mlm_config()).eval()
    x = random_tokens(2, 32)
    full = model(x)
    assert full.shape == (2, 32, 262)
    shared = torch.tensor([3, 17, 31])
    torch.testing.assert_close(model(x, output_positions=shared), full[:, shared], rtol=0, atol=1e-6)
    per_example = torch.tensor([[0, 5], [9, 2]])
    expected = torch.stack([full[0, [0, 5]], full[1, [9, 2]]])
    torch.testing.assert_close(model(x, output_positions=per_example), expected, rtol=0, atol=1e-6)


def test_mlm_untied_output_queries():
    config = tiny_mlm_config()
    config.decoder.num_output_query_channels = 24
    model = MaskedLanguageModel(config).eval()
    assert not hasattr(model, "output_bias") and model.output_linear.in_features == 24
    assert model(random_tokens(2, 10)).shape == (2, 10, 262)


def test_mlm_rejects_input_longer_than_max_seq_len():
    model = MaskedLanguageModel(tiny_mlm_config())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_tokens(1, 33))


# --- knobs that must not change the numbers ------------------------------------------------------------------------


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_activation_checkpointing_gives_the_same_gradients(task):
    if task == "mlm":
        make = lambda ckpt: MaskedLanguageModel(tiny_mlm_config(activation_checkpointing=ckpt))  # noqa: E731
        run = lambda m, x: m(x)  # noqa: E731
    else:
        make = lambda ckpt: CausalLanguageModel(  # noqa: E731
            tiny_clm_config(activation_checkpointing=ckpt, cross_attention_dropout=0.0)
        )
        run = lambda m, x: m(x, 20)  # noqa: E731
    plain = make(False)
    checkpointed = make(True)
    checkpointed.load_state_dict(plain.state_dict())
    x = random_tokens(2, 32)
    for model in (plain, checkpointed):
        run(model, x).square().mean().backward()
    for a, b in zip(grads(plain), grads(checkpointed), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_max_heads_parallel_gives_the_same_output():
    full = CausalLanguageModel(tiny_clm_config()).eval()
    chunked = CausalLanguageModel(tiny_clm_config(max_heads_parallel=1)).eval()
    chunked.load_state_dict(full.state_dict())
    x = random_tokens(2, 30)
    torch.testing.assert_close(chunked(x, 18), full(x, 18), rtol=0, atol=1e-6)


# --- learning ------------------------------------------------------------------------------------------------------


def overfit(lit: torch.nn.Module, batch: dict, steps: int) -> tuple[float, float]:
    optimizer = torch.optim.Adam(lit.parameters(), lr=3e-3)
    lit.train()
    first = None
    for _ in range(steps):
        loss = lit.loss(batch)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return first, loss.item()


def test_tiny_mlm_learns_a_batch():
    # Each example alternates two tokens; masked tokens are recoverable only by reading the example through the
    # encoder and the position through the decoder. Tiny Perceiver IO MLMs (transformers' too) sit on a plateau
    # for a seed-dependent while; the decoder's query residual (the default) shortens it.
    lit = LitMaskedLanguageModel.create(tiny_mlm_config())
    lit.model.decoder.cross_attn.attention_residual = True
    a, c = random_tokens(4, 1), random_tokens(4, 1)
    x = torch.where(torch.arange(32) % 2 == 0, a, c)
    masked = torch.rand(x.shape) < 0.15
    labels = torch.where(masked, x, IGNORE_INDEX)
    first, last = overfit(lit, {"input_ids": x.masked_fill(masked, 3), "labels": labels}, steps=400)
    assert first > 1.5 and last < 0.1


def test_tiny_clm_memorises_a_batch():
    lit = LitCausalLanguageModel.create(tiny_clm_config(cross_attention_dropout=0.0))
    tokens = random_tokens(4, 41)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    first, last = overfit(lit, batch, steps=300)
    assert first > 5.0 and last < 0.05


def test_mlm_loss_counts_only_masked_positions():
    lit = LitMaskedLanguageModel.create(tiny_mlm_config()).eval()
    x = random_tokens(2, 32)
    labels = torch.full_like(x, IGNORE_INDEX)
    labels[0, [1, 7]] = x[0, [1, 7]]
    labels[1, [4]] = x[1, [4]]
    logits = lit.model(x)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(lit.loss({"input_ids": x, "labels": labels}), expected)


def test_lightning_checkpoint_rebuilds_the_model_without_pickled_code(tmp_path):
    import pytorch_lightning as pl

    for lit in (LitCausalLanguageModel.create(tiny_clm_config()), LitMaskedLanguageModel.create(tiny_mlm_config())):
        trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
        trainer.strategy.connect(lit)
        path = tmp_path / f"{type(lit).__name__}.ckpt"
        trainer.save_checkpoint(path)
        checkpoint = torch.load(path, weights_only=True)  # refuses anything but tensors and plain data
        assert checkpoint["hyper_parameters"]
        loaded = type(lit).load_from_checkpoint(path)
        for (name, a), (_, b) in zip(lit.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(a, b), name


def test_masks_are_built_on_the_inputs_device(monkeypatch):
    # The cross-attention's right-aligned causal mask is built inside the model; on another device than the
    # inputs' (seen on CUDA) SDPA refuses it. On the meta device the mask's device shows without a GPU.
    import perceiver_cli.models.attention as attention

    seen = []
    sdpa = attention.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(None if attn_mask is None else attn_mask.device.type)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    with torch.device("meta"):
        model = CausalLanguageModel(tiny_clm_config())
    model(torch.zeros(2, 30, dtype=torch.long, device="meta"), 18)  # outside the context: no default device
    assert "meta" in seen and "cpu" not in seen


@pytest.mark.parametrize("case", ["plain", "mask", "causal"])
@pytest.mark.parametrize("c, c_v", [(8, 20), (20, 8)])
@pytest.mark.parametrize(
    "n, training, padded",
    # (queries = keys, whether gradients flow, whether `attend` takes the zero-padded SDPA path for these sizes)
    [(6, False, False), (448, False, True), (6, True, False), (256, True, True)],
)
def test_cpu_attention_for_unequal_head_widths_matches_sdpa(case, c, c_v, n, training, padded):
    # `attend` computes attention itself on the CPU when query/key and value heads differ in width (faster there
    # than SDPA's fallback): in plain tensor operations, or through the fused kernel on zero-padded heads, by size.
    # Either way outputs and gradients must be SDPA's.
    from perceiver_cli.models.attention import _pads_heads, attend, attention_mask

    q, k, v = torch.randn(2, 4, n, c), torch.randn(2, 4, n, c), torch.randn(2, 4, n, c_v)
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[1, :2] = True
    mask = attention_mask(pad, n, n, causal=True) if case == "mask" else None
    is_causal = case == "causal"
    ours = [t.clone().requires_grad_(training) for t in (q, k, v)]
    ref = [t.clone().requires_grad_(training) for t in (q, k, v)]
    assert _pads_heads(ours[0], ours[1]) == padded  # each path stays covered if the size rule changes
    out = attend(*ours, mask, is_causal, 0.0)
    expected = F.scaled_dot_product_attention(*ref, attn_mask=mask, is_causal=is_causal)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    if training:
        grad = torch.randn_like(expected)
        out.backward(grad)
        expected.backward(grad)
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-4)
    # bfloat16 (padded in inference, plain in training at any size): as SDPA's in fp32, to bf16's precision.
    low = [t.bfloat16().requires_grad_(training) for t in (q, k, v)]
    ref = [t.clone().requires_grad_(training) for t in (q, k, v)]
    assert _pads_heads(low[0], low[1]) == (not training)
    out = attend(*low, mask, is_causal, 0.0)
    expected = F.scaled_dot_product_attention(*ref, attn_mask=mask, is_causal=is_causal)
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=3e-2)
    if training:
        grad = torch.randn_like(expected)
        out.backward(grad.bfloat16())
        expected.backward(grad)
        for a, b in zip(low, ref, strict=True):
            torch.testing.assert_close(a.grad.float(), b.grad, rtol=0, atol=6e-2)


# --- fused projections -----------------------------------------------------------------------------------------


def separate_projection_attention(state, prefix, x_q, x_kv, heads, rotary_q, rotary_k, causal):
    """Attention computed the reference implementations' way: separate query, key and value projections, each
    rotated on its own. `state` is in the layout of `unfused_state_dict`."""
    def project(name, x):
        return F.linear(x, state[f"{prefix}{name}.weight"], state.get(f"{prefix}{name}.bias"))

    def split(t):
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    q, k, v = split(project("q_proj", x_q)), split(project("k_proj", x_kv)), split(project("v_proj", x_kv))
    q, k = rotary_q.rotate(q), rotary_k.rotate(k)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return project("o_proj", o.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("self_attention", [True, False])
def test_fused_projections_compute_the_separate_projections_attention(self_attention):
    from perceiver_cli.models.attention import MultiHeadAttention, Rotary
    from perceiver_cli.models.huggingface.state_dicts import unfused_state_dict

    attention = MultiHeadAttention(num_heads=4, num_q_input_channels=32, num_kv_input_channels=32,
                                   num_qk_channels=16, num_v_channels=48, causal=True,
                                   self_attention=self_attention).eval()
    for p in attention.parameters():  # non-zero biases, so that a misplaced bias shows
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 10, 32)
    rotary = Rotary.at(torch.arange(10)[None], 2)
    if self_attention:
        ours = attention(x, rotary_q=rotary, rotary_k=rotary)
    else:
        ours = attention(x, x, rotary_q=rotary, rotary_k=rotary)
    state = unfused_state_dict(attention)
    assert {"q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias"} <= state.keys()
    reference = separate_projection_attention(state, "", x, x, 4, rotary, rotary, causal=True)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_the_separate_projection_layout_round_trips(task):
    from perceiver_cli.models.huggingface.state_dicts import fused_state_dict, unfused_state_dict

    config = tiny_clm_config() if task == "clm" else tiny_mlm_config()
    model = CausalLanguageModel(config) if task == "clm" else MaskedLanguageModel(config)
    state = model.state_dict()
    separate = unfused_state_dict(model)
    assert not any("qkv_proj" in name or "kv_proj" in name for name in separate)
    assert sum(t.numel() for t in separate.values()) == sum(t.numel() for t in state.values())
    fused = fused_state_dict(model, separate)
    assert fused.keys() == state.keys() and all(torch.equal(fused[k], state[k]) for k in state)
