"""What the benchmark rows measure: model pairs, batches and step functions, sized for a 2-core CPU."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from perceiver_cli.models.adapters import TokenInputAdapter, tied_logits
from perceiver_cli.models.clm import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_cli.models.huggingface.state_dicts import unfused_state_dict
from perceiver_cli.models.layers import SelfAttentionBlock
from perceiver_cli.models.lightning import LitMaskedLanguageModel
from perceiver_cli.models.mlm import MaskedLanguageModelConfig, TextDecoderConfig, TextEncoderConfig


def scaled_paper_mlm(max_seq_len: int, input_channels: int, latents: int, latent_channels: int, layers: int):
    """The paper's MLM layout (8 heads, 256 query/key channels, decoder as in PerceiverForMaskedLM), scaled down."""
    encoder = TextEncoderConfig(
        vocab_size=262, max_seq_len=max_seq_len, num_input_channels=input_channels,
        num_cross_attention_heads=8, num_cross_attention_qk_channels=256, num_cross_attention_v_channels=latent_channels,
        num_self_attention_heads=8, num_self_attention_qk_channels=256, num_self_attention_v_channels=latent_channels,
        num_self_attention_layers_per_block=layers,
    )
    decoder = TextDecoderConfig(
        vocab_size=262, max_seq_len=max_seq_len, num_cross_attention_heads=8, num_cross_attention_qk_channels=256,
        num_cross_attention_v_channels=input_channels, cross_attention_residual=False,
    )
    return MaskedLanguageModelConfig(encoder, decoder, num_latents=latents, num_latent_channels=latent_channels)


def sizes(quick: bool) -> dict:
    from perceiver_cli.config import load_run_config

    mlm_small = load_run_config("mlm-small")[0]
    if quick:
        return {
            "repeats": 2,
            "mlm_configs": {"paper, toy": (scaled_paper_mlm(64, 32, 8, 64, 1), 2)},  # (config, batch size)
            "clm_lengths": [128, 256], "clm_latents": 32, "clm_batch": 1, "clm_repeats": 2,
            "gen_max_seq_len": 256, "gen_latents": 32, "gen_prompts": [16, 64], "gen_new_tokens": 8, "gen_repeats": 1,
            "slide_max_seq_len": 64, "slide_latents": 16, "slide_prompt": 8, "slide_new_tokens": 192, "slide_block": 32,
            "peak_n": 256, "compile": False,
        }
    return {
        "repeats": 11,
        "mlm_configs": {  # (config, batch size): mlm-small as its preset trains it
            "mlm-small": (mlm_small.backend_config(262), mlm_small.data.batch_size),
            "paper, scaled down": (scaled_paper_mlm(1024, 384, 128, 640, 6), 8),
        },
        "clm_lengths": [1024, 2048, 4096, 8192], "clm_latents": 256, "clm_batch": 1, "clm_repeats": 5,
        "gen_max_seq_len": 4096, "gen_latents": 128, "gen_prompts": [64, 512, 2048], "gen_new_tokens": 128,
        "gen_repeats": 7,
        # clm-small's window (512 tokens, 128 latents), generated 4x past its length
        "slide_max_seq_len": 512, "slide_latents": 128, "slide_prompt": 64, "slide_new_tokens": 2048,
        "slide_block": 128,
        "peak_n": 2048, "compile": True,
    }


# --- MLM: ours against transformers ---------------------------------------------------------------------------


def mlm_pair(config: MaskedLanguageModelConfig):
    """Our Lightning MLM and transformers' PerceiverForMaskedLM holding the same weights."""
    from transformers import PerceiverForMaskedLM

    from perceiver_cli.models.huggingface.perceiver_for_masked_lm import config_to_hf, hf_name

    ours = LitMaskedLanguageModel.create(config)
    hf = PerceiverForMaskedLM(config_to_hf(config))
    hf.load_state_dict({hf_name(k): v for k, v in unfused_state_dict(ours.model).items()}, strict=True)
    return ours.train(), hf.train()


def compiled(lit: LitMaskedLanguageModel) -> LitMaskedLanguageModel:
    """A copy of `lit` that trains through torch.compile, as `trainer.compile = true` does."""
    twin = LitMaskedLanguageModel.create(lit.model.config)
    twin.load_state_dict(lit.state_dict())
    twin.compile_model()
    return twin.train()


def mlm_batch(b: int, n: int, mask_prob: float = 0.15) -> dict:
    x = torch.randint(6, 262, (b, n))
    masked = torch.rand(b, n) < mask_prob
    return {"input_ids": x.masked_fill(masked, 3), "labels": torch.where(masked, x, -100)}


def autocast(precision: str):
    """The mixed precision `trainer.precision` names: "32" (off) or "bf16-mixed" (bfloat16 autocast)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """Fused AdamW on both sides: what `perceiver train` builds and transformers' Trainer uses by default."""
    return torch.optim.AdamW(model.parameters(), fused=True)


def mlm_train_steps(ours, hf, batch, precision: str = "32"):
    opt_ours, opt_hf = adamw(ours), adamw(hf)

    def ours_step():
        with autocast(precision):
            loss = ours.loss(batch)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def hf_step():
        with autocast(precision):
            loss = hf(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        opt_hf.zero_grad(set_to_none=True)
        loss.backward()
        opt_hf.step()

    return ours_step, hf_step


def mlm_fill_mask(ours, hf, batch, precision: str = "32"):
    """A fill-mask forward pass: logits of the masked positions. transformers decodes every position."""
    selected = batch["labels"] != -100
    positions = torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)[:, : int(selected.sum(1).max())]

    def ours_forward():
        with torch.inference_mode(), autocast(precision):
            ours.model(batch["input_ids"], output_positions=positions)

    def hf_forward():
        with torch.inference_mode(), autocast(precision):
            hf(input_ids=batch["input_ids"]).logits.gather(1, positions[..., None].expand(-1, -1, 262))

    return ours_forward, hf_forward


# --- CLM: Perceiver AR against full attention -----------------------------------------------------------------


class FullAttentionLM(nn.Module):
    """A decoder-only Transformer of our own blocks: causal self-attention over every position."""

    def __init__(self, max_seq_len: int, num_channels: int, num_heads: int, num_layers: int):
        super().__init__()
        self.input_adapter = TokenInputAdapter(262, max_seq_len, num_channels)
        self.layers = SelfAttentionBlock(num_layers=num_layers, num_rotary_layers=0, num_heads=num_heads,
                                         num_channels=num_channels, causal=True, widening_factor=4,
                                         qkv_bias=False, out_bias=False, mlp_bias=False)
        self.output_bias = nn.Parameter(torch.zeros(262))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tied_logits(self.layers(self.input_adapter(x)), self.input_adapter.txt_embedding, self.output_bias)


def clm_pair(n: int, latents: int):
    """Perceiver AR with clm-small's width and depth over n tokens, and the full-attention model of the same width
    and depth (1 cross-attention + 4 self-attention layers against 5 self-attention layers)."""
    ar = CausalLanguageModel(CausalLanguageModelConfig(max_seq_len=n, max_latents=latents, num_channels=256,
                                                       num_heads=4, num_self_attention_layers=4,
                                                       cross_attention_dropout=0.0))
    full = FullAttentionLM(n, 256, 4, 5)
    return ar.train(), full.train()


def clm_train_steps(ar, full, x: torch.Tensor, latents: int):
    inputs, labels = x[:, :-1], x[:, 1:]
    n = inputs.shape[1]
    opt_ar, opt_full = adamw(ar), adamw(full)

    def ar_step():
        logits = ar(inputs, n - latents)
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, -latents:].flatten())
        opt_ar.zero_grad(set_to_none=True)
        loss.backward()
        opt_ar.step()

    def full_step():
        loss = F.cross_entropy(full(inputs).flatten(0, 1), labels.flatten())
        opt_full.zero_grad(set_to_none=True)
        loss.backward()
        opt_full.step()

    return ar_step, full_step


def activation_bytes(step) -> int:
    """Bytes of the tensors the forward pass saves for the backward pass (parameters excluded, shared storage
    counted once): the activation memory of a training step, measured exactly and independent of the allocator."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if not (t.is_leaf and t.requires_grad):  # parameters are not activations
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


# --- generation -------------------------------------------------------------------------------------------------


def generation_model(max_seq_len: int, latents: int) -> CausalLanguageModel:
    config = CausalLanguageModelConfig(max_seq_len=max_seq_len, max_latents=latents, num_channels=256, num_heads=4,
                                       num_self_attention_layers=4, cross_attention_dropout=0.0)
    return CausalLanguageModel(config).eval()


def generation_runs(model: CausalLanguageModel, prompt_len: int, new_tokens: int):
    from perceiver_cli.generation import GenerationSettings, generate_tokens

    prompt = torch.randint(6, 262, (prompt_len,)).tolist()

    def run(use_cache: bool):
        settings = GenerationSettings(max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
                                      stop_at_eos=False)
        return lambda: [t for t in generate_tokens(model, prompt, settings)]

    return run(True), run(False)


def per_token_seconds(model: CausalLanguageModel, prompt_len: int, new_tokens: int, block: int) -> list[float]:
    """Mean seconds per generated token (with the cache) in consecutive blocks of `block` tokens: the cost of a
    token as the sequence grows, past `max_seq_len` too (where the window slides)."""
    from perceiver_cli.generation import GenerationSettings, generate_tokens

    prompt = torch.randint(6, 262, (prompt_len,)).tolist()
    settings = GenerationSettings(max_new_tokens=new_tokens, do_sample=False, stop_at_eos=False)
    stamps = [time.perf_counter()]
    for _ in generate_tokens(model, prompt, settings):
        stamps.append(time.perf_counter())
    return [(stamps[i + block] - stamps[i]) / block for i in range(0, new_tokens - block + 1, block)]


# --- FLOPs ------------------------------------------------------------------------------------------------------


def flops(step) -> int:
    """FLOPs of one call of `step` (matrix products and attention, as torch's FLOP counter counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul(n: int, dtype: torch.dtype = torch.float32):
    """One n x n x n matrix product in `dtype` and its FLOPs: this machine's matmul peak, the ceiling for model
    FLOPs utilisation, timed side by side with the step it rates (a shared machine's speed drifts)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return (lambda: a @ b), 2 * n**3


def matmul_peak_flops(n: int, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """The matmul rate (FLOP/s) in `dtype`: the median of `repeats` products after one warm-up."""
    product, flop = matmul(n, dtype)
    product()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return flop / sorted(times)[len(times) // 2]
