"""A cached generation step two ways: `CausalLanguageModel.step` (the step's own path) against the forward pass with
the cache, `forward(tokens[:, None], 0, cache=cache)`, at `clm-small`'s shape.

    nice -n 15 .venv/bin/python -m benchmarks.step_paths [--repeats 7] [--steps 100] [--batch 1] [--threads 1]

Each repeat starts both sides from a copy of the same prompt cache and times `--steps` steps of each, alternating
which side goes first; it prints each side's median milliseconds a step and the median over repeats of the ratio
forward / step (a pair's two runs are next to each other in time, so the ratio drifts less with the machine's load
than the times do). As `perceiver generate` does, fp32 on the CPU runs with oneDNN off (`WindowStepper._kernels`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from perceiver_cli.models.clm.model import CausalLanguageModel, CausalLanguageModelConfig

# presets/clm-small.toml's model (max_seq_len from its [data]; vocabulary: the UTF-8 tokenizer's).
CLM_SMALL = dict(num_channels=128, num_heads=4, max_latents=128, num_self_attention_layers=3,
                 cross_attention_dropout=0.0, output_norm=True, max_seq_len=512, vocab_size=262)


def time_steps(step, cache, tokens: torch.Tensor) -> float:
    """Seconds a step, over the columns of `tokens` (B, steps)."""
    start = time.perf_counter()
    for i in range(tokens.shape[1]):
        step(tokens[:, i], cache)
    return (time.perf_counter() - start) / tokens.shape[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens, all latents (steps + prompt <= 128)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.mkldnn.enabled = False
    torch.manual_seed(0)
    model = CausalLanguageModel(CausalLanguageModelConfig(**CLM_SMALL)).eval()
    prompt = torch.randint(6, 262, (args.batch, args.prompt))
    tokens = torch.randint(6, 262, (args.batch, args.steps))

    def own_path(token, cache):
        return model.step(token, cache)

    def forward_path(token, cache):
        return model(token[:, None], 0, cache=cache)[:, -1]

    with torch.inference_mode():
        prompt_cache = model.empty_cache()
        model(prompt, 0, cache=prompt_cache)
        check_a, check_b = copy.deepcopy(prompt_cache), copy.deepcopy(prompt_cache)
        difference = max(
            (own_path(t, check_a) - forward_path(t, check_b)).abs().max().item() for t in tokens.T[:8]
        )
        sides = {"step": own_path, "forward": forward_path}
        times: dict[str, list[float]] = {name: [] for name in sides}
        for name, fn in sides.items():  # warm-up
            time_steps(fn, copy.deepcopy(prompt_cache), tokens)
        for repeat in range(args.repeats):
            order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
            for name in order:
                times[name].append(time_steps(sides[name], copy.deepcopy(prompt_cache), tokens))
    step_ms, forward_ms = (1e3 * statistics.median(times[name]) for name in ("step", "forward"))
    print(f"clm-small shape, batch {args.batch}, {args.steps} steps after a {args.prompt}-token prompt, "
          f"{args.threads} thread(s), torch {torch.__version__}; largest logit difference {difference:.1e}")
    for name in sides:
        ms = [f"{1e3 * t:.3f}" for t in sorted(times[name])]
        print(f"  {name:8s} median {1e3 * statistics.median(times[name]):.3f} ms a step  (all: {', '.join(ms)})")
    ratios = sorted(f / s for f, s in zip(times["forward"], times["step"]))
    print(f"  forward / step: {statistics.median(ratios):.3f} (median of the repeats' ratios; "
          f"{ratios[0]:.2f}-{ratios[-1]:.2f}), {forward_ms / step_ms:.3f} (ratio of the medians)")


if __name__ == "__main__":
    main()
