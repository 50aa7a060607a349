"""The benchmark suite: `python -m benchmarks [--quick] [--out DIR] [--only PART ...]`.

Prints one table and writes `benchmarks.json` and `scaling.png` into the output folder. Every comparison is
measured side by side in this process: the two sides alternate over several repetitions after a warm-up, and the
table reports medians. `--quick` runs toy sizes (a smoke test, seconds); the full run takes several minutes on a
2-core CPU. The learning benchmark (time to quality against BERT and GPT-2 baselines, see benchmarks/learning.py)
trains models for many minutes, so it runs only when asked for: `--only learning`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import learning
from benchmarks import models as bm
from benchmarks import serve
from benchmarks.corpora import check_available

RESULTS: list[dict] = []  # one row each: name, ours, theirs, unit, ratio, note


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class SideBySide:
    ours: float  # median seconds
    theirs: float
    speedup: float  # median over the alternated pairs of theirs / ours: how many times faster ours is


def side_by_side(ours, theirs, repeats: int, warmup: int = 2) -> SideBySide:
    """Time the two alternately (and which goes first), so that drifts of this shared machine (other load, caches,
    clock) hit both alike. The speedup is the median of the pairs' ratios: a pair runs within seconds, so a change
    of the machine's speed during the measurement moves both of its sides, where it would move only one side's
    median."""
    for _ in range(warmup):
        ours()
        theirs()
    a, b = [], []
    for i in range(repeats):
        if i % 2:
            b.append(median_seconds(theirs, 1))
            a.append(median_seconds(ours, 1))
        else:
            a.append(median_seconds(ours, 1))
            b.append(median_seconds(theirs, 1))
    return SideBySide(statistics.median(a), statistics.median(b), statistics.median(y / x for x, y in zip(a, b)))


def row(name: str, ours: float, theirs: float | None, unit: str, note: str = "", higher_is_better: bool = True,
        ratio: float | None = None, extra: dict | None = None) -> dict:
    """Record and print one row; `ratio` defaults to ours against theirs (better over worse when higher is not).
    `extra` adds fields to the row's JSON (learning curves, parameter counts)."""
    if ratio is None and theirs:
        ratio = ours / theirs if higher_is_better else theirs / ours
    RESULTS.append({"name": name, "ours": ours, "theirs": theirs, "unit": unit, "ratio": ratio, "note": note,
                    **(extra or {})})
    shown = f"{ratio:.2f}x" if ratio is not None else "-"
    digits = decimals(ours, theirs)
    print(f"  {name}: ours {ours:,.{digits}f} {unit}" + (f", other {theirs:,.{digits}f}" if theirs else "")
          + f" ({shown})", flush=True)
    return RESULTS[-1]


def decimals(ours: float, theirs: float | None) -> int:
    """Decimals to show a row's values with: three where both are below 10 (bits per byte, losses), else one."""
    return 3 if max(abs(ours), abs(theirs or 0.0)) < 10 else 1


def tokens_row(name: str, tokens: int, timing: SideBySide, note: str) -> None:
    """A throughput row: `tokens` per call, from the median seconds of each side; the ratio is the pairs' speedup."""
    row(name, tokens / timing.ours, tokens / timing.theirs, "tok/s", note, ratio=timing.speedup)


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


def mlm_rows(sizes: dict) -> None:
    """Rows 1 and 2: MLM training step and fill-mask forward, ours against transformers' PerceiverForMaskedLM with
    the same configuration, weights (through the converter's mapping), batches and precision: fp32, and bfloat16
    autocast (`trainer.precision = "bf16-mixed"`) where this CPU multiplies bfloat16 faster than fp32; then ours in
    bfloat16 against transformers in fp32, its default (the bf16 lever, which changes the numerics)."""
    for precision in sizes["precisions"]:
        suffix = "" if precision == "32" else f", {precision}"
        for label, (config, b) in sizes["mlm_configs"].items():
            ours, hf = bm.mlm_pair(config)
            n = config.encoder.max_seq_len
            batch = bm.mlm_batch(b, n)
            train_ours, train_hf = bm.mlm_train_steps(ours, hf, batch, precision)
            tokens_row(f"MLM train step ({label}{suffix})", b * n,
                       side_by_side(train_ours, train_hf, sizes["repeats"]), "vs transformers")
            step_flops = bm.flops(train_ours)  # the same for the compiled step
            rate_against_peak(RESULTS[-1], train_ours, step_flops, precision, sizes)
            infer_ours, infer_hf = bm.mlm_fill_mask(ours, hf, batch, precision)
            tokens_row(f"MLM fill-mask forward ({label}{suffix})", b * n,
                       side_by_side(infer_ours, infer_hf, sizes["repeats"]), "vs transformers")
            if precision != "32":  # the bf16 lever: ours in bf16 against transformers as it runs by default, fp32
                _, train_hf32 = bm.mlm_train_steps(ours, hf, batch, "32")
                tokens_row(f"MLM train step ({label}, ours {precision})", b * n,
                           side_by_side(train_ours, train_hf32, sizes["repeats"]), "vs transformers in fp32")
                _, infer_hf32 = bm.mlm_fill_mask(ours, hf, batch, "32")
                tokens_row(f"MLM fill-mask forward ({label}, ours {precision})", b * n,
                           side_by_side(infer_ours, infer_hf32, sizes["repeats"]), "vs transformers in fp32")
            if sizes["compile"] and precision == "32":  # trainer.compile = true
                compiled_ours = bm.compiled(ours)
                train_compiled, _ = bm.mlm_train_steps(compiled_ours, hf, batch)
                train_compiled()  # compiles (tens of seconds), outside the timing
                tokens_row(f"MLM train step ({label}, compiled)", b * n,
                           side_by_side(train_compiled, train_hf, sizes["repeats"]), "trainer.compile vs transformers")
                rate_against_peak(RESULTS[-1], train_compiled, step_flops, precision, sizes)


def clm_scaling_rows(sizes: dict) -> dict:
    """Row 3: CLM training step at growing sequence lengths with a fixed latent count, against a decoder-only
    Transformer of the same width and depth (our own blocks) attending over the whole sequence."""
    scaling = {key: [] for key in ("seq_len", "ar_s", "full_s", "ar_act", "full_act", "ar_peak", "full_peak")}
    for n in sizes["clm_lengths"]:
        ar, full = bm.clm_pair(n, sizes["clm_latents"])
        x = torch.randint(6, 262, (sizes["clm_batch"], n + 1))
        step_ar, step_full = bm.clm_train_steps(ar, full, x, sizes["clm_latents"])
        timing = side_by_side(step_ar, step_full, sizes["clm_repeats"])
        s_ar, s_full = timing.ours, timing.theirs
        act_ar, act_full = bm.activation_bytes(step_ar), bm.activation_bytes(step_full)
        peak_ar, peak_full = peak_memory("ar", n, sizes), peak_memory("full", n, sizes)
        tokens = sizes["clm_batch"] * n
        tokens_row(f"CLM train step, {n} tokens", tokens, timing, "vs full attention")
        row(f"CLM activation memory, {n} tokens", act_ar / 2**20, act_full / 2**20, "MiB",
            "saved for the backward pass", higher_is_better=False)
        if peak_ar and peak_full:
            row(f"CLM peak memory, {n} tokens", peak_ar / 2**20, peak_full / 2**20, "MiB",
                "resident set above the step's start", higher_is_better=False)
        for key, value in zip(scaling, (n, s_ar, s_full, act_ar, act_full, peak_ar, peak_full), strict=True):
            scaling[key].append(value)
    first, last = 0, len(scaling["seq_len"]) - 1
    growth = scaling["seq_len"][last] / scaling["seq_len"][first]
    row(f"CLM step time growth for {growth:.0f}x length", scaling["ar_s"][last] / scaling["ar_s"][first],
        None, "x", "Perceiver AR; target <= 1.25x the length growth")
    return scaling


def peak_memory(which: str, n: int, sizes: dict) -> int | None:
    """Peak memory of one training step of the `which` model ("ar" or "full"), measured in a fresh process."""
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave the resident set at once
    command = [sys.executable, "-m", "benchmarks.peak_memory", which, str(n), str(sizes["clm_latents"])]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip()
    return int(out) if out else None


def generation_rows(sizes: dict) -> None:
    """Row 4: generation tokens/s with the key/value cache against recomputing the window at every token."""
    model = bm.generation_model(sizes["gen_max_seq_len"], sizes["gen_latents"])
    for prompt_len in sizes["gen_prompts"]:
        cached, uncached = bm.generation_runs(model, prompt_len, sizes["gen_new_tokens"])
        timing = side_by_side(cached, uncached, sizes["gen_repeats"], warmup=1)
        tokens_row(f"generate, {prompt_len}-token prompt", sizes["gen_new_tokens"], timing, "cache vs none")

    # Past max_seq_len the window slides: a token must cost what it cost before the window was full.
    window, block = sizes["slide_max_seq_len"], sizes["slide_block"]
    model = bm.generation_model(window, sizes["slide_latents"])
    runs = [bm.per_token_seconds(model, sizes["slide_prompt"], sizes["slide_new_tokens"], block)
            for _ in range(sizes["gen_repeats"])]
    ends = [sizes["slide_prompt"] + block * (i + 1) for i in range(len(runs[0]))]  # sequence length after each block
    before = [i for i, end in enumerate(ends) if end <= window]
    far_past = range(len(ends) // 2, len(ends))  # 2x to 4x past max_seq_len
    # The blocks of one run follow each other in time, so a drift of the machine's speed during a run would read as
    # a change with the length: compare within each run, and take the median over runs.
    per_run = [(statistics.median(t[i] for i in far_past), statistics.median(t[i] for i in before)) for t in runs]
    far_s, before_s = (statistics.median(side) for side in zip(*per_run, strict=True))
    row(f"generate past max_seq_len ({window}): ms per token, {ends[len(ends) // 2]:,}-{ends[-1]:,} tokens",
        1000 * far_s, 1000 * before_s, "ms", f"vs up to {window} tokens; flat is 1.0x", higher_is_better=False,
        ratio=statistics.median(b / f for f, b in per_run))
    RESULTS[-1]["per_block_ms"] = [1000 * statistics.median(block) for block in zip(*runs, strict=True)]


def rate_against_peak(result: dict, step, step_flops: int, precision: str, sizes: dict) -> None:
    """Time `step` side by side with the matmul peak of its precision (fp32, or bfloat16 for bf16-mixed, whose
    products run in bfloat16) and note its model FLOPs utilisation in `result`."""
    product, product_flops = bm.matmul(sizes["peak_n"], torch.float32 if precision == "32" else torch.bfloat16)
    timing = side_by_side(step, product, sizes["repeats"])
    # Utilisation = (step FLOPs / step time) / (product FLOPs / product time), per pair: speedup = product / step.
    result |= {"peak_flops": product_flops / timing.theirs, "mfu": step_flops / product_flops * timing.speedup,
               "precision": precision}


def mfu_rows(sizes: dict) -> None:
    """Row 5: model FLOPs utilisation of the MLM training steps: achieved FLOP/s against the matmul peak measured
    side by side with each step (see `rate_against_peak`)."""
    rated = [r for r in RESULTS if "mfu" in r]
    for precision in sizes["precisions"]:
        peaks = [r["peak_flops"] for r in rated if r["precision"] == precision]
        if peaks:
            name = "fp32" if precision == "32" else "bf16"
            row(f"{name} matmul peak", statistics.median(peaks) / 1e9, None, "GFLOP/s",
                f"{sizes['peak_n']}^3 matmul, median of the runs beside each step")
    for r in rated:
        achieved = r["mfu"] * r["peak_flops"]
        row(f"MFU, {r['name']}", 100 * r["mfu"], None, "%", f"{achieved / 1e9:.1f} GFLOP/s")


def help_row() -> None:
    """Row 6: `perceiver --help` wall time in a fresh process."""
    def run():
        subprocess.run([sys.executable, "-m", "perceiver_cli", "--help"], check=True, capture_output=True)

    run()
    row("perceiver --help", median_seconds(run, 5) * 1000, None, "ms", "fresh process; target < 300 ms",
        higher_is_better=False)


# ---------------------------------------------------------------------------------------------------------------


def bf16_is_faster(n: int) -> bool:
    """Whether this CPU multiplies bfloat16 matrices clearly faster than fp32 (AMX or AVX-512 BF16): only then do
    bf16-mixed rows say something."""
    return bm.matmul_peak_flops(n, torch.bfloat16) > 1.5 * bm.matmul_peak_flops(n, torch.float32)


def cpu_name() -> str:
    """The processor's model name (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def print_table() -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"perceiver benchmarks ({cpu_name()}, "
                        f"{torch.get_num_threads()} threads, torch {torch.__version__})")
    for column in ("benchmark", "ours", "other", "unit", "ratio", "note"):
        table.add_column(column, justify="left" if column in ("benchmark", "note", "unit") else "right")
    for r in RESULTS:
        digits = decimals(r["ours"], r["theirs"])
        theirs = "-" if r["theirs"] is None else f"{r['theirs']:,.{digits}f}"
        table.add_row(r["name"], f"{r['ours']:,.{digits}f}", theirs, r["unit"], "-" if r["ratio"] is None else f"{r['ratio']:.2f}x", r["note"])
    Console(width=160).print(table)


def plot_scaling(scaling: dict, out: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(10, 4))
    n = scaling["seq_len"]
    time_ax.plot(n, scaling["ar_s"], "o-", label="Perceiver AR")
    time_ax.plot(n, scaling["full_s"], "s-", label="full attention")
    time_ax.set(xlabel="sequence length (tokens)", ylabel="training step (s)", xscale="log", yscale="log")
    kind = "peak" if all(scaling["ar_peak"] + scaling["full_peak"]) else "act"  # peak needs Linux's counters
    mem_ax.plot(n, [m / 2**20 for m in scaling[f"ar_{kind}"]], "o-", label="Perceiver AR")
    mem_ax.plot(n, [m / 2**20 for m in scaling[f"full_{kind}"]], "s-", label="full attention")
    ylabel = "peak memory of a step (MiB)" if kind == "peak" else "activation memory (MiB)"
    mem_ax.set(xlabel="sequence length (tokens)", ylabel=ylabel, xscale="log", yscale="log")
    for ax in (time_ax, mem_ax):
        ax.set_xticks(n, [f"{v:,}" for v in n], minor=False)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke test that takes seconds")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--only", nargs="*", choices=["mlm", "clm", "generate", "mfu", "help", "serve", "learning",
                                                       *learning.ROWS, "context"],
                        help="parts to run (default: all but learning); learning = its four rows; context = "
                             "learning-long (context scaling)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PRESET:KEY=VALUE",
                        help="learning rows: override a preset value, e.g. mlm-small:trainer.max_steps=1000")
    parser.add_argument("--corpora", nargs="+", choices=list(learning.CORPORA), default=None,
                        help="the MLM and CLM learning rows' corpora (default: all three; benchmarks/corpora.py)")
    args = parser.parse_args()
    overrides = {"mlm-small": [], "clm-small": [], "clm-long": []}  # preset -> its --set overrides
    for override in args.overrides:
        preset, _, setting = override.partition(":")
        if preset not in overrides or "=" not in setting:
            parser.error(f"--set {override!r}: use mlm-small:key=value, clm-small:key=value or clm-long:key=value")
        overrides[preset].append(setting)
    # As `perceiver train` does, before torch starts its intra-op threads (they inherit it): subnormal attention
    # probabilities (block routing's sharp attention) make the CPU's matrix products several times slower. Both
    # sides of every row run under it.
    torch.set_flush_denormal(True)
    sizes = bm.sizes(quick=args.quick)
    sizes["precisions"] = ["32"] + (["bf16-mixed"] if bf16_is_faster(sizes["peak_n"]) else [])
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    wanted = set(args.only or ["mlm", "clm", "generate", "mfu", "help", "serve"])
    if "learning" in wanted:
        wanted |= set(learning.ROWS)
    if "context" in wanted:  # the context-scaling benchmark is the learning-long row
        wanted.add("learning-long")
    if wanted & {"learning-mlm", "learning-clm"}:
        check_available(args.corpora or list(learning.settings(args.quick).corpora))
    started = time.perf_counter()
    scaling, plots = None, []
    with torch.inference_mode(False):
        if "mlm" in wanted:
            print("MLM against transformers", flush=True)
            mlm_rows(sizes)
        if "clm" in wanted:
            print("CLM scaling against full attention", flush=True)
            scaling = clm_scaling_rows(sizes)
        if "generate" in wanted:
            print("generation with and without the cache", flush=True)
            generation_rows(sizes)
        if "mfu" in wanted:
            print("model FLOPs utilisation", flush=True)
            mfu_rows(sizes)
        if "help" in wanted:
            help_row()
        if "serve" in wanted:
            print("perceiver serve: concurrent streaming clients, batched vs one request at a time", flush=True)
            serve.serve_rows(row, args.quick)
        if wanted & set(learning.ROWS):
            plots += learning.learning_rows(wanted, args.quick, args.out, row, overrides, args.corpora)
    print_table()
    machine = {"processor": cpu_name(), "machine": platform.machine(), "cpus": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "quick": args.quick,
               "seconds": round(time.perf_counter() - started, 1)}
    (args.out / "benchmarks.json").write_text(json.dumps({"machine": machine, "rows": RESULTS}, indent=2))
    if scaling:
        plot_scaling(scaling, args.out)
        plots.insert(0, "scaling.png")
    print(f"wrote {args.out}/benchmarks.json" + "".join(f", {p}" for p in plots) + f" in {machine['seconds']} s")


if __name__ == "__main__":
    main()
