"""The context-scaling benchmark: the `learning-long` row of `python -m benchmarks` (`--only learning-long`, or
`--only context`). What the row measures, and why so (benchmarks/README.md, "Long context"):

1. Learning at equal training time, on the embedded long-document corpus "code" (the standard library's .py files
   whole, one document each; its validation split is held-out files). Perceiver AR at each window of
   `Settings.context_windows` (`data.max_seq_len`, in tokens of the preset's tokenizer), trained by the project's
   own training code (`learning.train_ours`: the builders `perceiver train` uses) from the `clm-long` preset (its
   latents, or `context_latents`, at most the window; a batch of as many tokens as the preset's; its window
   curriculum where the window is longer than the curriculum's short pieces); the reference, `clm-small` on the
   same corpus (our short-window model); then the GPT-2 nanoGPT recipe (`learning.train_gpt`, bytes) at each block of
   `Settings.context_gpt_blocks` (64 to 1,024), on random windows of the same training text. Every model gets the
   same training time (`context_budget_s`): a short timed run of each (2 untimed steps, `calibration_steps` timed,
   1 untimed; with the curriculum one such run per phase, weighted by its share of the steps) gives its seconds per
   step, the step count (and so the cosine schedule, whose warmup is capped at a quarter of it on both sides) is
   the budget over that, and training stops at the first step past the budget in any case (the preset's
   `max_time`, which counts validation too, is lifted).
2. Held-out bits per byte of each at its full window (`evaluate_clm`, the code of `perceiver eval`) on the first
   `context_eval_bytes` bytes of the validation documents (`first_bytes`: the last one cut), the same bytes for
   every model whatever its tokenizer (the summed loss of the tokens over the bytes): stride max_latents for
   Perceiver AR, a quarter of the block for GPT, as in the CLM row. Perceiver AR's models also get their context
   curve (`evaluate_context_curve`, `perceiver eval --context-curve`: the same bytes scored with at most 64, 256,
   1,024, ... tokens of context, up to the window), which should fall as the context grows. The full-window number
   is the curve's last point where that point's stride is max_latents (the same windows as `evaluate_clm`'s
   default), so it is computed once. `learning-long.png`: bits per byte against the window in bytes (tokens times
   the bytes per token of the scored text; log2 axis), one line per family and a point for the reference; and the
   context curves.
3. Generation at long context: a randomly initialised model of the same shape whose `max_seq_len` is
   `generation_max_seq_len` (65,536), no training. For each context of `generation_contexts` (1k to 64k tokens), in a
   process of its own (`python -m benchmarks.context generate SPEC`): a random prompt of that many tokens of the
   preset's vocabulary, the `WindowStepper` with the cache and the chunked schedule (what `perceiver generate` runs), with
   `generation_threads` torch threads (1, as `perceiver serve` defaults to: a step of one sequence is too small to
   share, and on a shared 2-core machine two threads made such steps several times slower), one cache cycle of
   warm-up, then `generation_periods` cycles timed. A cycle is max_latents // 2 + 1 tokens: max_latents // 2 cached
   steps and one that rebuilds the cache (`windows.next_window`), so every timed span holds the same mix; at the
   full window (64k) that rebuild is a pass over the whole window, which slides. Time per token: the cached steps
   at their median and the rebuilds at theirs, weighted as they occur (the plain mean, which takes every preemption
   of a shared machine in full, is in the JSON as `mean_seconds_per_token`). Memory is the process's peak
   resident set (Linux `VmHWM`, reset by `/proc/self/clear_refs` once the model is built) above its resident set at
   that point: what the prompt's pass, the cache and the steps added. Not `tracemalloc` (it sees Python's allocator
   only, and torch allocates tensors with its own), nor torch's memory profiler (it counts tensors, not what the
   process holds, and slows every operator it records); a fresh process per context, so that no context's peak
   hides behind an earlier one's. Where the kernel has no `clear_refs`, `ru_maxrss` (never reset) stands in.
   Targets, printed with PASS/MISS and never asserted: time per token at the largest context within 20% of the
   smallest's; memory at most linear in the window (each step up in context at most 1.2x its growth).
"""

from __future__ import annotations

import json
import math
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = "code"
REFERENCE_PRESET = "clm-small"  # our short-window model, trained on the same corpus for the same time
PRESET = "clm-long"
# The benchmark's budget stops training, not the preset's max_time, which counts validation and evaluation too.
NO_TIME_LIMIT = "trainer.max_time=01:00:00:00"
TIME_TARGET = 1.2  # time per token at the largest generation context over the smallest's
MEMORY_TARGET = 1.2  # memory growth over context growth, each step up in context


def context_preset() -> tuple[str, list[str]]:
    """The preset of the Perceiver AR models and the overrides on top of it (none: `clm-long` is the long-context
    preset as it is)."""
    return PRESET, []


def model_overrides(s, preset: str, base: list[str], window: int) -> list[str]:
    """`--set` overrides of the Perceiver AR model of `window` tokens: `context_overrides`, the window, its latents
    (`context_latents`, or the preset's when that is None), at most the window, and a batch of as many tokens as the
    preset's (at least one window); a window no longer than the preset's window curriculum's short one
    (`data.short_seq_len`) trains without the curriculum."""
    from perceiver_cli.config import load_run_config

    cfg = load_run_config(preset, [*base, *s.context_overrides])[0]
    latents = s.context_latents if s.context_latents is not None else cfg.model.max_latents
    batch = max(1, cfg.data.batch_size * cfg.data.max_seq_len // window)
    overrides = [*base, *s.context_overrides, f"data.max_seq_len={window}", f"model.max_latents={min(latents, window)}",
                 f"data.batch_size={batch}"]
    if cfg.data.short_seq_len is not None and window <= cfg.data.short_seq_len:
        overrides.append("data.short_fraction=0")
    return overrides


# ---------------------------------------------------------------------------------------------------------------
# The row
# ---------------------------------------------------------------------------------------------------------------


def context_row(s, out: Path, runs: Path, record) -> None:
    from perceiver_cli.config import load_run_config
    from perceiver_cli.data.sources import load_text_splits

    from benchmarks.learning import clm_stream, runs_json

    preset, base = context_preset()
    budget = s.context_budget_s
    splits = load_text_splits("embedded", name=CORPUS)
    texts, eval_bytes = first_bytes(splits["validation"]["text"], s.context_eval_bytes)
    train_stream = torch.tensor(clm_stream(splits["train"]["text"])[0])  # the GPT's: UTF-8 bytes
    print(f"  corpus {CORPUS!r}: {len(train_stream):,} training bytes; scoring the first {eval_bytes:,} held-out "
          f"bytes; {budget:.0f} s of training per model; Perceiver AR from {preset}", flush=True)

    theirs = [train_gpt_block(s, block, train_stream, budget, texts) for block in s.context_gpt_blocks]
    ours = [train_window(s, preset, model_overrides(s, preset, base, window), budget, texts, runs)
            for window in s.context_windows]
    reference = train_reference(s, budget, texts, runs)

    best_theirs = min(theirs, key=lambda run: run.final["bits_per_byte"])
    long_window = load_run_config(preset, base)[0].data.max_seq_len
    main = next((run for run in ours if run.window == long_window),
                min(ours, key=lambda run: run.final["bits_per_byte"]))
    shown = ", ".join(f"{run.window:,} ({run.window * run.bytes_per_token / 1024:.1f} KB): "
                      f"{run.final['bits_per_byte']:.3f}" for run in ours)
    shown_gpt = ", ".join(f"{run.window:,}: {run.final['bits_per_byte']:.3f}" for run in theirs)
    extra = {"runs": [dict(entry, window=run.window, family=run.family, bytes_per_token=run.bytes_per_token)
                      for entry, run in zip(runs_json(*theirs, *ours, reference), [*theirs, *ours, reference],
                                            strict=True)],
             "budget_s": budget, "corpus": CORPUS, "eval_bytes": eval_bytes, "preset": preset}
    record(f"learning: long-context CLM bits per byte at equal time ({preset}, window {main.window:,} tokens, vs the "
           f"best GPT block)", main.final["bits_per_byte"], best_theirs.final["bits_per_byte"], "bit/B",
           f"{budget:.0f} s each; Perceiver AR windows (tokens) {shown}; GPT blocks (bytes) {shown_gpt}",
           higher_is_better=False, extra=extra)
    record(f"learning: long-context CLM bits per byte at equal time ({preset} vs {REFERENCE_PRESET}, "
           f"{reference.window:,} tokens)", main.final["bits_per_byte"], reference.final["bits_per_byte"], "bit/B",
           f"{main.steps} vs {reference.steps} steps in {budget:.0f} s", higher_is_better=False,
           extra={"context_curve": reference.final["context_curve"]})
    for run in ours:
        falls = curve_falls(run.final["context_curve"])
        record(f"learning: long-context bits per byte, Perceiver AR window {run.window:,} tokens",
               run.final["bits_per_byte"], best_theirs.final["bits_per_byte"], "bit/B",
               f"{run.steps} steps in {run.train_seconds:.0f} s, vs GPT block {best_theirs.window:,}; context curve "
               f"{'falls to the window: PASS' if falls else 'does not fall at every step: MISS'}",
               higher_is_better=False, extra={"context_curve": run.final["context_curve"]})
    for run in theirs:
        record(f"learning: long-context bits per byte, GPT-2 block {run.window:,} (vs {preset})",
               main.final["bits_per_byte"], run.final["bits_per_byte"], "bit/B",
               f"{run.steps} steps in {run.train_seconds:.0f} s, vs Perceiver AR window {main.window:,}",
               higher_is_better=False)
    print_curves([*ours, reference])
    plot_context(out / "learning-long.png", ours, theirs, reference,
                 f"{eval_bytes:,} held-out bytes of the {CORPUS!r} corpus, {budget:.0f} s of training each")
    generation_rows(s, preset, base, record)


def time_row(s, out: Path, runs: Path, record) -> None:
    """`learning-long-time`: `clm-long` against `clm-small`, our short-window model, on the context row's corpus and
    held-out bytes, each trained for every budget of `Settings.context_time_budgets_s` (a fresh run per budget, its
    schedule fitted to it, as in the context row, whose 600-s runs are the first budget's), with
    `context_time_evaluations` evaluations per run. Where the long window starts to win: the crossover."""
    from perceiver_cli.config import load_run_config
    from perceiver_cli.data.sources import load_text_splits

    from benchmarks.learning import runs_json

    preset, base = context_preset()
    splits = load_text_splits("embedded", name=CORPUS)
    texts, eval_bytes = first_bytes(splits["validation"]["text"], s.context_eval_bytes)
    window = load_run_config(preset, base)[0].data.max_seq_len
    minutes = ", ".join(f"{budget / 60:.3g}" for budget in s.context_time_budgets_s)
    print(f"  corpus {CORPUS!r}: {preset} against {REFERENCE_PRESET} after {minutes} minutes of training "
          f"({sum(s.context_time_budgets_s) / 60:.3g} minutes per model); scoring the first {eval_bytes:,} held-out "
          "bytes", flush=True)
    timed = replace(s, context_evaluations=s.context_time_evaluations)
    pairs = []
    for budget in s.context_time_budgets_s:
        long = train_window(timed, preset, model_overrides(s, preset, base, window), budget, texts, runs)
        short = train_reference(timed, budget, texts, runs)
        pairs.append((budget, long, short))
        record(f"learning: long vs short window after {budget / 60:.3g} min: bits per byte ({preset} vs "
               f"{REFERENCE_PRESET})",
               long.final["bits_per_byte"], short.final["bits_per_byte"], "bit/B",
               f"{long.steps} vs {short.steps} steps", higher_is_better=False,
               extra={"budget_s": budget, "runs": runs_json(long, short)})
    crossover = next((budget for budget, long, short in pairs
                      if long.final["bits_per_byte"] < short.final["bits_per_byte"]), None)
    longest = s.context_time_budgets_s[-1]
    verdict = (f"{preset} first below {REFERENCE_PRESET} after {crossover / 60:.3g} minutes: PASS" if crossover
               else f"{preset} not below {REFERENCE_PRESET} within {longest / 60:.3g} minutes: MISS")
    print(f"  crossover: {verdict}", flush=True)
    plot_time(out / "learning-long-time.png", pairs,
              f"{eval_bytes:,} held-out bytes of the {CORPUS!r} corpus: {verdict.rsplit(':', 1)[0]}")


def plot_time(path: Path, pairs, title: str) -> None:
    """Held-out bits per byte against training minutes: each budget's final score, one line per model, and each
    run's own evaluations (its learning curve) as thin lines."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, style in ((1, "o-"), (2, "D-")):
        runs = [pair[index] for pair in pairs]
        line = ax.plot([budget / 60 for budget, *_ in pairs], [run.final["bits_per_byte"] for run in runs], style,
                       label=f"{runs[0].preset}, {runs[0].window:,}-token window (end of each run)")[0]
        for run in runs:
            ax.plot([point["seconds"] / 60 for point in run.curve], [point["bits_per_byte"] for point in run.curve],
                    ":", color=line.get_color(), alpha=0.5)
    ax.set(xlabel="training time (minutes)", ylabel="held-out bits per byte", xscale="log")
    ax.set_title("dotted: each run's evaluations along its schedule (clm-long's, during its curriculum's\n"
                 "short pieces, scored at the full window it has not trained on yet)", fontsize=9)
    ax.set_xticks([budget / 60 for budget, *_ in pairs], [f"{budget / 60:.3g}" for budget, *_ in pairs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def first_bytes(texts: list[str], max_bytes: int) -> tuple[list[str], int]:
    """The first documents of `texts`, the last one cut, whose stream (`[EOS] doc [EOS] doc ...`) predicts at most
    `max_bytes` bytes (each document's UTF-8 bytes and one per separator after it), and that count: the same bytes
    for every model, whatever its tokenizer."""
    kept, total = [], 0
    for text in texts:
        room = max_bytes - total - 1  # this document's bytes, after which its separator
        data = text.encode("utf-8")[: max(0, room)]
        if not data:
            break
        kept.append(data.decode("utf-8", errors="ignore"))
        total += len(kept[-1].encode("utf-8")) + 1
    return kept, total


def model_seconds_per_step(preset: str, overrides: list[str], steps: int, runs: Path, datamodule) -> float:
    """Seconds per training step of the preset with `overrides`, from a short timed run."""
    from benchmarks.learning import Schedule, load_preset, seconds_per_step, train_ours

    probe, _ = load_preset(preset, overrides + [f"trainer.max_steps={steps}", "output.name=calibration"], runs)
    calibration = train_ours(probe, "calibration", datamodule, Schedule([]), lambda model: {}, "calibration")
    return seconds_per_step(calibration)


def train_window(s, preset: str, overrides: list[str], budget: float, texts: list[str], runs: Path):
    """Perceiver AR from `preset` with `overrides`, trained for `budget` seconds as `perceiver train` trains, scored
    with its context curve. With the window curriculum (`data.short_seq_len`) each phase is timed on its own, and
    the step count is the budget over their mean weighted by `data.short_fraction`."""
    from perceiver_cli.training.build import build_datamodule

    from benchmarks.learning import Schedule, evenly, load_preset, train_ours

    overrides = [*overrides, NO_TIME_LIMIT]
    probe, _ = load_preset(preset, overrides, runs)
    window = probe.data.max_seq_len
    short = probe.data.short_seq_len if probe.data.short_fraction > 0 else None
    datamodule = build_datamodule(probe)
    datamodule.prepare_data()
    calibration = 3 + s.calibration_steps
    long_step = model_seconds_per_step(preset, overrides + ["data.short_fraction=0"], calibration, runs, datamodule)
    step_seconds, fraction = long_step, 0.0
    if short is not None:
        fraction = probe.data.short_fraction
        short_step = model_seconds_per_step(preset, overrides + ["data.short_fraction=1"], calibration, runs,
                                            datamodule)
        step_seconds = fraction * short_step + (1 - fraction) * long_step
    steps = max(2, int(budget / step_seconds))
    warmup = min(probe.scheduler.warmup_steps, steps // 4)  # as train_gpt caps the GPT's
    cfg, name = load_preset(preset, overrides + [f"trainer.max_steps={steps}", f"scheduler.warmup_steps={warmup}"],
                            runs)
    score = window_scorer(texts, s.eval_batch_tokens, curve=True, tokenizer=datamodule.tokenizer)
    run = train_ours(cfg, f"{name}-{window}", datamodule,
                     Schedule(evenly(steps, s.context_evaluations), budget_s=budget), score,
                     f"Perceiver AR ({name}), window {window:,}")
    run.window, run.family, run.preset = window, "Perceiver AR", name
    run.bytes_per_token = score.bytes_per_token
    curriculum = f", the first {fraction:.0%} on pieces of {short}" if short else ""
    print(f"  {run.label}: {run.parameters:,} parameters, {cfg.model.max_latents} latents, {run.steps} of {steps} "
          f"steps in {run.train_seconds:.0f} s{curriculum}; {score.bytes_per_token:.2f} bytes per token", flush=True)
    return run


def train_reference(s, budget: float, texts: list[str], runs: Path):
    """The reference, `clm-small` (our short-window model), on the row's corpus, as `train_window` trains."""
    return train_window(s, REFERENCE_PRESET, [f"data.name={CORPUS}", *s.context_reference_overrides], budget, texts,
                        runs)


def train_gpt_block(s, block: int, train_stream: torch.Tensor, budget: float, texts: list[str]):
    """The nanoGPT recipe with `block`, trained for `budget` seconds on random windows of `train_stream`."""
    from benchmarks.learning import Schedule, evenly, seconds_per_step, train_gpt

    recipe = replace(s.gpt, block=block)
    calibration = train_gpt(recipe, train_stream, Schedule([]), lambda model: {}, steps=3 + s.calibration_steps)
    steps = max(2, int(budget / seconds_per_step(calibration)))
    run = train_gpt(recipe, train_stream, Schedule(evenly(steps, s.context_evaluations), budget_s=budget),
                    window_scorer(texts, s.eval_batch_tokens, curve=False), steps=steps)
    run.window, run.family, run.bytes_per_token = block, "GPT-2", 1.0
    print(f"  {run.label}: {run.parameters:,} parameters, {run.steps} of {steps} steps in {run.train_seconds:.0f} s",
          flush=True)
    return run


def window_scorer(texts: list[str], batch_tokens: int, curve: bool, tokenizer=None):
    """Bits per byte of the stream of `texts` (in `tokenizer`'s tokens; UTF-8 bytes by default) at the model's full
    window (`evaluate_clm`), with `curve` also its context curve (`evaluate_context_curve`), whose last point is the
    full-window score where its stride is the model's own."""
    from perceiver_cli.evaluation import evaluate_clm, evaluate_context_curve

    from benchmarks.learning import clm_stream

    stream, num_bytes = clm_stream(texts, tokenizer)

    def score(model) -> dict:
        batch_size = max(1, batch_tokens // model.max_seq_len)
        points = evaluate_context_curve(model, stream, num_bytes, batch_size) if curve else []
        if points and points[-1]["stride"] == model.max_latents:
            full = {"bits_per_byte": points[-1]["bits_per_byte"], "tokens": points[-1]["tokens"],
                    "stride": points[-1]["stride"]}
        else:
            full = evaluate_clm(model, stream, num_bytes, batch_size)
        result = {"bits_per_byte": full["bits_per_byte"], "scored_tokens": full["tokens"], "bytes": num_bytes,
                  "window": model.max_seq_len, "stride": full["stride"]}
        return result | ({"context_curve": points} if curve else {})

    score.bytes_per_token = num_bytes / max(1, len(stream) - 1)
    return score


def curve_falls(points: list[dict]) -> bool:
    """Whether bits per byte fall at every step up in context, to the window."""
    values = [point["bits_per_byte"] for point in points]
    return all(later < earlier for earlier, later in zip(values, values[1:]))


def print_curves(runs) -> None:
    for run in runs:
        points = run.final["context_curve"]
        shown = ", ".join(f"{p['context']:,}: {p['bits_per_byte']:.3f}" for p in points)
        verdict = "PASS" if curve_falls(points) else "MISS"
        print(f"  context curve, window {run.window:,} (bits per byte by context): {shown}; falls: {verdict}",
              flush=True)


def plot_context(path: Path, ours, theirs, reference, title: str) -> None:
    """Bits per byte against the window in bytes (a Perceiver AR window of tokens times its bytes per token), one
    line per family and a point for the reference; beside it the context curves, also in bytes."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (window_ax, curve_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for runs, style in ((ours, "o-"), (theirs, "s--")):
        if runs:
            low, high = (f"{count / 1e6:.3g}M" for count in (min(r.parameters for r in runs),
                                                             max(r.parameters for r in runs)))
            parameters = low if low == high else f"{low}-{high}"  # a longer window has more position embeddings
            window_ax.plot([run.window * run.bytes_per_token for run in runs],
                           [run.final["bits_per_byte"] for run in runs], style,
                           label=f"{runs[0].family} ({parameters} parameters)")
    window_ax.plot([reference.window * reference.bytes_per_token], [reference.final["bits_per_byte"]], "D",
                   label=f"{reference.preset}, {reference.window:,} tokens")
    window_ax.set(xlabel="window / block (bytes; tokens x bytes per token)", ylabel="held-out bits per byte",
                  title="each model at its full window")
    for run in [*ours, reference]:
        points = run.final["context_curve"]
        curve_ax.plot([p["context"] * run.bytes_per_token for p in points], [p["bits_per_byte"] for p in points],
                      "o-" if run is not reference else "D:", label=f"window {run.window:,} tokens"
                      + (" (reference)" if run is reference else ""))
    curve_ax.set(xlabel="evaluation context (bytes; tokens x bytes per token)", ylabel="held-out bits per byte",
                 title="Perceiver AR: context curves")
    for ax in (window_ax, curve_ax):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Generation at long context
# ---------------------------------------------------------------------------------------------------------------


def generation_rows(s, preset: str, base: list[str], record) -> list[dict]:
    """Time per token and peak memory of cached generation at each context of `generation_contexts`, each in a
    process of its own, and the two targets."""
    overrides = model_overrides(s, preset, base, s.generation_max_seq_len)
    results = []
    for context in s.generation_contexts:
        spec = {"preset": preset, "overrides": overrides, "context": context, "periods": s.generation_periods,
                "threads": s.generation_threads}
        command = [sys.executable, "-m", "benchmarks.context", "generate", json.dumps(spec)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"generation at a {context}-token context failed:\n{done.stderr}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"    {context:,}-token context: {1000 * result['seconds_per_token']:.2f} ms per token (cached step "
              f"{1000 * result['step_median_s']:.2f} ms, rebuild {1000 * result['rebuild_s']:.1f} ms every "
              f"{result['period']} tokens; plain mean {1000 * result['mean_seconds_per_token']:.2f} ms), prompt "
              f"{result['prefill_s']:.2f} s; peak {result['peak_mib']:.0f} MiB, "
              f"{result['above_model_mib']:.1f} above the model (cache {result['cache_mib']:.1f}; {result['memory']})",
              flush=True)
    first = results[0]
    for result in results:
        context = result["context"]
        record(f"learning: long-context generation, {context:,}-token context: ms per token",
               1000 * result["seconds_per_token"], 1000 * first["seconds_per_token"], "ms",
               f"cached, chunked, {result['threads']} thread(s); vs {first['context']:,} tokens; "
               f"{result['period']}-token cycles, step {1000 * result['step_median_s']:.2f} ms, "
               f"rebuild {1000 * result['rebuild_s']:.0f} ms",
               higher_is_better=False, extra={"generation": result})
        record(f"learning: long-context generation, {context:,}-token context: peak memory above the model",
               result["above_model_mib"], first["above_model_mib"] or None, "MiB",
               f"vs {first['context']:,} tokens; peak resident set {result['peak_mib']:.0f} MiB, cache "
               f"{result['cache_mib']:.1f} MiB", higher_is_better=False)
    if len(results) > 1:
        last = results[-1]
        growth = last["seconds_per_token"] / first["seconds_per_token"]
        verdict = "PASS" if growth <= TIME_TARGET else "MISS"
        record(f"learning: long-context generation, time per token {last['context']:,} vs {first['context']:,} "
               "tokens", growth, None, "x", f"target <= {TIME_TARGET:.2f}x: {verdict}", higher_is_better=False)
        print(f"  target: time per token within {TIME_TARGET - 1:.0%} from {first['context']:,} to "
              f"{last['context']:,} tokens of context: {growth:.2f}x, {verdict}", flush=True)
        worst = memory_growth(results)
        verdict = "PASS" if worst <= MEMORY_TARGET else "MISS"
        record("learning: long-context generation, memory growth over context growth (worst step)", worst, None,
               "x", f"target <= {MEMORY_TARGET:.2f}x (at most linear in the window): {verdict}",
               higher_is_better=False)
        print(f"  target: memory linear in the window: the worst step up in context grows memory {worst:.2f}x the "
              f"context's growth (target <= {MEMORY_TARGET:.2f}x), {verdict}", flush=True)
    return results


def memory_growth(results: list[dict]) -> float:
    """The largest ratio, over consecutive contexts, of the memory's growth (above the model) to the context's:
    1 for memory proportional to the context, below for a fixed part, 4 for quadratic memory and 4x the context."""
    ratios = [(b["above_model_mib"] / a["above_model_mib"]) / (b["context"] / a["context"])
              for a, b in zip(results, results[1:]) if a["above_model_mib"] > 0]
    return max(ratios, default=math.nan)


# --- the measuring process -------------------------------------------------------------------------------------

STATUS = Path("/proc/self/status")


def status_bytes(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE).group(1)) * 1024


def reset_peak() -> bool:
    """Reset the kernel's high-water mark of this process's resident set (VmHWM) to its current size."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_generation(preset: str, overrides: list[str], context: int, periods: int, threads: int | None) -> dict:
    """Cached generation from a random `context`-token prompt with a random model: the prompt's pass, one cycle of
    warm-up, `periods` cycles timed; memory above the process's resident set once the model is built. `threads`:
    torch's intra-op threads (None: its default)."""
    from perceiver_cli.config import load_run_config
    from perceiver_cli.models.clm.decoding import WindowStepper
    from perceiver_cli.models.clm.model import CausalLanguageModel
    from perceiver_cli.models.clm.windows import latent_chunk

    torch.set_flush_denormal(True)  # as `perceiver generate` runs
    if threads is not None:
        torch.set_num_threads(threads)
    cfg, _ = load_run_config(preset, overrides)
    torch.manual_seed(0)
    vocab_size = cfg.vocab_size()  # a "bpe:N" tokenizer's N: no tokenizer is needed for random tokens
    model = CausalLanguageModel(cfg.backend_config(vocab_size)).eval()
    prompt = torch.randint(6, vocab_size, (1, context))
    period = latent_chunk(model.config.max_latents) + 1  # one cache cycle: the rebuild and the cached steps after it
    exact = reset_peak() and STATUS.is_file()
    before = status_bytes("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stepper = WindowStepper(model, "chunked", use_cache=True)
    times = []
    with torch.inference_mode():
        start = time.perf_counter()
        token = stepper.start(prompt).argmax(dim=-1)
        prefill = time.perf_counter() - start
        for _ in range((periods + 1) * period):
            start = time.perf_counter()
            token = stepper.step(token).argmax(dim=-1)
            times.append(time.perf_counter() - start)
    peak = status_bytes("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    group = stepper.groups[0]
    rebuilds = [fresh for _, fresh in group.history][period:]
    timed = times[period:]
    cycles = [sum(timed[i * period : (i + 1) * period]) / period for i in range(periods)]
    cached = [t for t, fresh in zip(timed, rebuilds) if not fresh]
    rebuilt = [t for t, fresh in zip(timed, rebuilds) if fresh]
    step_s, rebuild_s = statistics.median(cached), statistics.median(rebuilt) if rebuilt else 0.0
    caches = [group.cache.cross_attention, *group.cache.self_attention]
    cache_bytes = sum(t.numel() * t.element_size() for c in caches for t in (c._k, c._v) if t is not None)
    return {
        "context": context,
        "max_seq_len": model.config.max_seq_len,
        "max_latents": model.config.max_latents,
        "period": period,
        "timed_steps": len(timed),
        "rebuilds": sum(rebuilds),
        # Each kind of step at its median, in the timed mix: robust to the preemptions of a shared machine, which
        # the plain means (below) take in full.
        "seconds_per_token": (step_s * len(cached) + rebuild_s * len(rebuilt)) / len(timed),
        "mean_seconds_per_token": sum(timed) / len(timed),
        "cycle_seconds_per_token": cycles,
        "step_median_s": step_s,
        "rebuild_s": rebuild_s,
        "prefill_s": prefill,
        "window": group.window.length,
        "peak_mib": peak / 2**20,
        "above_model_mib": (peak - before) / 2**20,
        "cache_mib": cache_bytes / 2**20,
        "memory": "VmHWM after clear_refs" if exact else "ru_maxrss (not reset)",
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] != "generate":
        sys.exit("usage: python -m benchmarks.context generate SPEC (JSON: preset, overrides, context, periods, "
                 "threads)")
    spec = json.loads(sys.argv[2])
    result = measure_generation(spec["preset"], spec["overrides"], spec["context"], spec["periods"],
                                spec.get("threads"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
