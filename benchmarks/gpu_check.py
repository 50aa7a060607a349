"""GPU checks (CUDA, bf16, SDPA kernels) and GPU throughput of the seed-sized models, in one short run.

    python benchmarks/gpu_check.py [--out DIR]

Needs a CUDA device and torch; transformers for the PerceiverForMaskedLM comparison. Each section reports on its
own, so one failure does not hide the others. Not part of the test suite (CI has no GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perceiver_cli.models.clm import CausalLanguageModel, CausalLanguageModelConfig  # noqa: E402
from perceiver_cli.models.mlm import (  # noqa: E402
    MaskedLanguageModel,
    MaskedLanguageModelConfig,
    TextDecoderConfig,
    TextEncoderConfig,
)

RESULTS: dict[str, object] = {}


def section(fn):
    def run():
        start = time.perf_counter()
        try:
            RESULTS[fn.__name__] = fn()
        except Exception as err:  # one failing check must not hide the others
            RESULTS[fn.__name__] = {"error": f"{type(err).__name__}: {err}"}
            traceback.print_exc()
        print(f"[{fn.__name__}] {time.perf_counter() - start:.1f} s: {RESULTS[fn.__name__]}", flush=True)

    run.__name__ = fn.__name__
    return run


def timed(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of fn() on the GPU (synchronised), after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def seed_clm_config(**kw) -> CausalLanguageModelConfig:
    seed = dict(vocab_size=262, max_seq_len=4096, max_latents=512, num_channels=512, num_self_attention_layers=8,
                cross_attention_dropout=0.5)
    return CausalLanguageModelConfig(**(seed | kw))


def seed_mlm_config(layers: int = 26) -> MaskedLanguageModelConfig:
    enc = TextEncoderConfig(vocab_size=262, max_seq_len=2048, num_input_channels=768,
                            num_cross_attention_qk_channels=256, num_cross_attention_v_channels=1280,
                            num_cross_attention_heads=8, num_self_attention_qk_channels=256,
                            num_self_attention_v_channels=1280, num_self_attention_heads=8,
                            num_self_attention_layers_per_block=layers, dropout=0.0)
    dec = TextDecoderConfig(vocab_size=262, max_seq_len=2048, num_cross_attention_qk_channels=256,
                            num_cross_attention_v_channels=768, num_cross_attention_heads=8,
                            cross_attention_residual=False, dropout=0.0)
    return MaskedLanguageModelConfig(enc, dec, num_latents=256, num_latent_channels=1280)


@section
def environment():
    return {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "bf16": torch.cuda.is_bf16_supported()}


@section
def cpu_vs_cuda_fp32():
    """Same weights, same inputs: CUDA fp32 logits match the CPU's (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    out = {}
    clm = CausalLanguageModel(seed_clm_config(num_self_attention_layers=2)).eval()
    x = torch.randint(6, 262, (2, 1024))
    pad = torch.zeros(2, 1024, dtype=torch.bool)
    pad[1, :300] = True
    with torch.no_grad():
        a = clm(x, 512, pad_mask=pad)
        b = clm.cuda()(x.cuda(), 512, pad_mask=pad.cuda()).cpu()
    out["clm_max_abs_diff"] = (a - b).abs().max().item()
    mlm = MaskedLanguageModel(seed_mlm_config(layers=2)).eval()
    x = torch.randint(6, 262, (2, 2048))
    with torch.no_grad():
        a = mlm(x)
        b = mlm.cuda()(x.cuda()).cpu()
    out["mlm_max_abs_diff"] = (a - b).abs().max().item()
    return out


@section
def bf16_autocast():
    """bf16 autocast: forward and backward finite, logits close to fp32 (relative error of the logits)."""
    torch.manual_seed(0)
    clm = CausalLanguageModel(seed_clm_config()).cuda()
    x = torch.randint(6, 262, (4, 4096), device="cuda")
    clm.eval()
    with torch.no_grad():
        ref = clm(x, 3584).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = clm(x, 3584).float()
    clm.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(clm(x[:, :-1], 3583).flatten(0, 1).float(), x[:, -512:].flatten())
    loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in clm.parameters() if p.grad is not None)
    return {"rel_err": ((low - ref).norm() / ref.norm()).item(), "loss": loss.item(), "grads_finite": grads_finite}


@section
def sdpa_kernels():
    """Which attention kernels SDPA picks for the seed CLM (bf16): fused ones, not the math path."""
    from torch.profiler import ProfilerActivity, profile

    clm = CausalLanguageModel(seed_clm_config()).cuda().eval()
    x = torch.randint(6, 262, (2, 4096), device="cuda")
    pad = torch.zeros(2, 4096, dtype=torch.bool, device="cuda")
    pad[1, :100] = True
    kernels = {}
    for name, mask in (("no_padding", None), ("left_padding", pad)):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), profile(
            activities=[ProfilerActivity.CUDA]
        ) as prof:
            clm(x, 3584, pad_mask=mask)
        names = {e.key for e in prof.key_averages()}
        kernels[name] = sorted(k[:60] for k in names if any(s in k.lower() for s in ("flash", "fmha", "efficient",
                                                                                      "cutlass", "softmax")))
    return kernels


@section
def clm_training_throughput():
    """Seed CLM (30.6M) training step, batch 24 x 4096 (the seed recipe), fp32 and bf16 autocast."""
    torch.manual_seed(0)
    clm = CausalLanguageModel(seed_clm_config(cross_attention_dropout=0.6)).cuda().train()
    opt = torch.optim.Adam(clm.parameters(), lr=2e-4)
    x = torch.randint(6, 262, (24, 4097), device="cuda")
    out = {}
    for precision in ("fp32", "bf16"):
        def step(precision=precision):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = clm(x[:, :-1], 4096 - 512)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, -512:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        torch.cuda.reset_peak_memory_stats()
        seconds = timed(step, repeats=5)
        out[precision] = {"step_s": round(seconds, 4), "tokens_per_s": round(24 * 4096 / seconds),
                          "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return out


@section
def mlm_vs_transformers():
    """Seed MLM (201M) training step and inference, ours against transformers' PerceiverForMaskedLM with the same
    weights and batches, bf16 autocast, batch 32 x 2048 with 15% masked positions."""
    from transformers import PerceiverForMaskedLM

    from perceiver_cli.models.huggingface.perceiver_for_masked_lm import config_to_hf, hf_name
    from perceiver_cli.models.huggingface.state_dicts import unfused_state_dict
    from perceiver_cli.models.lightning import LitMaskedLanguageModel

    torch.manual_seed(0)
    config = seed_mlm_config()
    lit = LitMaskedLanguageModel.create(config).cuda().train()
    hf = PerceiverForMaskedLM(config_to_hf(config)).cuda().train()
    hf.load_state_dict({hf_name(k): v for k, v in unfused_state_dict(lit.model).items()}, strict=True)
    b, n = 32, 2048
    x = torch.randint(6, 262, (b, n), device="cuda")
    masked = torch.rand(b, n, device="cuda") < 0.15
    labels = torch.where(masked, x, -100)
    inputs = x.masked_fill(masked, 3)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        lit.eval(), hf.eval()
        ours_logits = lit.model(inputs[:2]).float()
        hf_logits = hf(input_ids=inputs[:2]).logits.float()
    agreement = ((ours_logits - hf_logits).norm() / hf_logits.norm()).item()
    lit.train(), hf.train()
    opt_ours = torch.optim.AdamW(lit.parameters(), fused=True)  # both sides: what perceiver train and HF Trainer use
    opt_hf = torch.optim.AdamW(hf.parameters(), fused=True)

    def ours_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lit.loss({"input_ids": inputs, "labels": labels})
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def hf_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = hf(input_ids=inputs, labels=labels).loss
        opt_hf.zero_grad(set_to_none=True)
        loss.backward()
        opt_hf.step()

    def ours_infer():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            lit.model(inputs)

    def hf_infer():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            hf(input_ids=inputs)

    out = {"bf16_logit_rel_diff": agreement}
    for name, a, c in (("train", ours_step, hf_step), ("infer", ours_infer, hf_infer)):
        ta, tc = [], []
        for _ in range(3):  # alternate the two sides
            ta.append(timed(a, repeats=3, warmup=1))
            tc.append(timed(c, repeats=3, warmup=1))
        ours_s, hf_s = statistics.median(ta), statistics.median(tc)
        out[name] = {"ours_tokens_per_s": round(b * n / ours_s), "hf_tokens_per_s": round(b * n / hf_s),
                     "speedup": round(hf_s / ours_s, 2)}
    return out


@section
def generation_cache():
    """Seed CLM greedy generation on the GPU: tokens/s with and without the key/value cache, 512-token prompt."""
    from perceiver_cli.generation import GenerationSettings, generate_tokens

    torch.manual_seed(0)
    clm = CausalLanguageModel(seed_clm_config()).cuda().eval()
    prompt = torch.randint(6, 262, (512,)).tolist()
    out = {}
    for use_cache in (True, False):
        settings = GenerationSettings(max_new_tokens=128, do_sample=False, use_cache=use_cache, stop_at_eos=False)
        with torch.no_grad():
            torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = [t for t in generate_tokens(clm, prompt, settings)]
            torch.cuda.synchronize()
        out["cache" if use_cache else "no_cache"] = round(len(tokens) / (time.perf_counter() - start), 1)
    out["speedup"] = round(out["cache"] / out["no_cache"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", nargs="*", help="run only these checks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    checks = (environment, cpu_vs_cuda_fp32, bf16_autocast, sdpa_kernels, clm_training_throughput,
              mlm_vs_transformers, generation_cache)
    for check in checks:
        if not args.only or check.__name__ in args.only:
            check()
    text = json.dumps(RESULTS, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(text)


if __name__ == "__main__":
    main()
