"""Run a Python script in a fresh interpreter that cannot import perceiver_cli, as a user of stock transformers
without our package would: the venv installs perceiver_cli (editable), so a meta path finder refuses it."""

import json
import os
import subprocess
import sys
from pathlib import Path

BLOCK_PERCEIVER_CLI = """
import importlib.abc, sys

class _NoPerceiverCli(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "perceiver_cli":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

sys.meta_path.insert(0, _NoPerceiverCli())
"""

# The last line the script prints: whether perceiver_cli got imported, and whether it could have been.
REPORT_ISOLATION = """
try:
    import perceiver_cli
    importable = True
except ModuleNotFoundError:
    importable = False
print(json.dumps({"perceiver_cli_imported": "perceiver_cli" in sys.modules, "perceiver_cli_importable": importable}))
"""


def run_isolated(script: str, cwd: Path, timeout: float = 120) -> tuple[dict, dict]:
    """Run `script` (which prints one JSON object as its last line but one) without perceiver_cli; return that
    object and the isolation report."""
    env = {**os.environ, "HF_MODULES_CACHE": str(cwd / "hf_modules"), "PYTHONPATH": ""}
    code = BLOCK_PERCEIVER_CLI + "\nimport json\n" + script + REPORT_ISOLATION
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    *_, output, report = result.stdout.strip().splitlines()
    return json.loads(output), json.loads(report)
