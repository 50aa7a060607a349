"""The benchmark suite runs end to end at toy sizes and writes its table, JSON and plot (a smoke test; the numbers
of a real run belong to `python -m benchmarks`, not to the test suite)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Every row at toy sizes takes over a minute and a half (serving and the context rows included): behind the slow
# marker, to keep the default suite within its 10 minutes; the learning rows' own quick run stays below.
@pytest.mark.slow
def test_quick_benchmark_run_writes_every_row(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads((tmp_path / "benchmarks.json").read_text())["rows"]}
    for prefix in ("MLM train step", "MLM fill-mask forward", "CLM train step", "CLM activation memory",
                   "CLM peak memory", "generate,", "generate past max_seq_len", "fp32 matmul peak", "MFU",
                   "perceiver --help"):
        assert any(name.startswith(prefix) for name in rows), prefix
    assert all(row["ours"] > 0 for row in rows.values())
    if any("bf16-mixed" in name for name in rows):  # only where this CPU multiplies bfloat16 faster than fp32
        for prefix in ("MLM train step", "MLM fill-mask forward"):  # ours in bf16 against transformers in fp32
            assert any(name.startswith(prefix) and name.endswith("ours bf16-mixed)") for name in rows), prefix
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert "perceiver benchmarks" in result.stdout


def test_quick_learning_benchmark_scores_every_validation_byte_of_both_sides(tmp_path):
    """`--only learning --quick`: a few seconds of training per model, every evaluation over the whole validation
    split (each byte and each end-of-text token once; the long-context row: the same first bytes of its corpus's
    validation stream for every model), finite numbers, one plot per row."""
    from benchmarks.learning import settings
    from perceiver_cli.data.corpus import embedded_corpus_files

    texts = [json.loads(line)["text"] for line in embedded_corpus_files()["validation"].read_text().splitlines()]
    validation_bytes = sum(len(text.encode("utf-8")) + 1 for text in texts if text.strip())  # + 1: end of text
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "learning", "--out", str(tmp_path),
         "--set", "mlm-small:trainer.max_steps=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "benchmarks.json").read_text())["rows"]
    names = [row["name"] for row in rows]
    for prefix in ("learning (prose): MLM masked-byte accuracy at equal time", "learning (prose): MLM masked-byte loss",
                   "learning (prose): MLM training tokens per second", "learning (prose): MLM words filled exactly",
                   "learning (prose): CLM bits per byte at GPT's training time",
                   "learning (prose): CLM bits per byte at the end", "learning (prose): CLM training time",
                   "learning: long-context CLM bits per byte at equal time (clm-long, window",
                   "learning: long-context CLM bits per byte at equal time (clm-long vs clm-small"):
        assert sum(name.startswith(prefix) for name in names) == 1, prefix
    assert all(math.isfinite(row["ours"]) and (row["theirs"] is None or math.isfinite(row["theirs"]))
               for row in rows)

    time_rows = [row for row in rows if row["name"].startswith("learning: long vs short window after")]
    curves = {row["name"].split(": ")[1].split(" ")[0]: row["runs"] for row in rows
              if "runs" in row and row not in time_rows}
    assert set(curves) == {"MLM", "CLM", "long-context"}
    quick = settings(quick=True)
    for kind, runs in curves.items():
        # The long-context row: every window, every block and the reference (clm-small on the same corpus).
        sides = len(quick.context_windows) + len(quick.context_gpt_blocks) + 1 if kind == "long-context" else 2
        assert len(runs) == sides and all(run["parameters"] > 0 and run["steps"] > 0 for run in runs), kind
        for run in runs:
            assert run["curve"] and run["train_seconds"] > 0, (kind, run["label"])
            for point in run["curve"]:
                metrics = [v for k, v in point.items() if k in ("loss", "accuracy", "bits_per_byte")]
                assert metrics and all(math.isfinite(v) for v in metrics), point
                if kind == "long-context":  # the first bytes of the "code" corpus's validation documents, once
                    assert point["bytes"] == quick.context_eval_bytes, point  # GPT's bytes, or BPE tokens of them
                    assert (point["scored_tokens"] == point["bytes"]) == run["label"].startswith("GPT"), point
                elif kind == "CLM":  # every byte once: GPT's bytes, or clm-small's BPE tokens of the same bytes
                    assert point["bytes"] == validation_bytes, (kind, run["label"], point)
                    gpt = run["label"].startswith("GPT")
                    assert (point["scored_tokens"] == validation_bytes) == gpt, (kind, run["label"], point)
                else:
                    assert point["scored_tokens"] == validation_bytes, (kind, run["label"], point)

    # Long context: every window and block trained for the same budget; each Perceiver AR model's context curve runs
    # from 64 bytes to its window; generation timed and measured at each context, with its two targets.
    long_runs = curves["long-context"]
    windows = sorted(run["window"] for run in long_runs if run["family"] == "Perceiver AR")
    assert windows == sorted([*quick.context_windows, 64]), windows  # the reference: a window of 64 at toy size
    assert sorted(run["window"] for run in long_runs if run["family"] == "GPT-2") == list(quick.context_gpt_blocks)
    for run in long_runs:
        final = run["curve"][-1]
        assert final["window"] == run["window"]
        if run["family"] == "Perceiver AR":
            contexts = [point["context"] for point in final["context_curve"]]
            assert contexts[0] == 64 and contexts[-1] == run["window"], contexts
            assert all(math.isfinite(point["bits_per_byte"]) for point in final["context_curve"])
    for window in quick.context_windows:
        assert names.count(f"learning: long-context bits per byte, Perceiver AR window {window:,} tokens") == 1
    for context in quick.generation_contexts:
        for what in ("ms per token", "peak memory above the model"):
            assert f"learning: long-context generation, {context:,}-token context: {what}" in names, (context, what)
    generation = [row["generation"] for row in rows if "generation" in row]
    assert [g["context"] for g in generation] == list(quick.generation_contexts)
    assert all(g["rebuilds"] == quick.generation_periods and g["timed_steps"] == g["period"] * g["rebuilds"]
               and g["seconds_per_token"] > 0 and g["peak_mib"] > 0 for g in generation), generation
    assert any(name.startswith("learning: long-context generation, time per token") for name in names)
    assert any(name.startswith("learning: long-context generation, memory growth") for name in names)
    # The time row: clm-long against clm-small, a fresh pair per training budget, each run evaluated along its
    # schedule; the row's numbers are the runs' last evaluations.
    assert [row["budget_s"] for row in time_rows] == list(quick.context_time_budgets_s)
    for row in time_rows:
        long, short = row["runs"]
        assert "(clm-long)" in long["label"] and "(clm-small)" in short["label"], row["runs"]
        assert (row["ours"], row["theirs"]) == (long["curve"][-1]["bits_per_byte"], short["curve"][-1]["bits_per_byte"])
        for run in row["runs"]:
            assert 1 <= len(run["curve"]) <= quick.context_time_evaluations, run
            assert all(point["bytes"] == quick.context_eval_bytes for point in run["curve"]), run
    assert [run["steps"] for run in curves["MLM"]] == [4, 4]  # --set reached the preset, and BERT's step count
    # The two masked LMs are scored on the same masks, and fill the same number of words.
    assert len({point["masked_tokens"] for run in curves["MLM"] for point in run["curve"]}) == 1
    words = next(row for row in rows if row["name"].startswith("learning (prose): MLM masked-byte accuracy"))["word_fill"]
    assert len(words) == 2 and {fill["words"] for fill in words.values()} == {20}
    for plot in ("learning-mlm.png", "learning-clm.png", "learning-long.png", "learning-long-time.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG", plot
