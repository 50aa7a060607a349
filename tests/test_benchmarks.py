"""The benchmark suite runs end to end at toy sizes and writes its table, JSON and plot (a smoke test; the numbers
of a real run belong to `python -m benchmarks`, not to the test suite)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
