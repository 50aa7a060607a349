"""Test-wide setup: run offline, and keep the project's cache out of the user's home.

The environment is set when pytest imports this file, before any test module imports datasets or transformers
(which read these variables at import time); subprocesses started by tests inherit it.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Without these a Hugging Face hub name retries for minutes before failing; offline it fails at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def pytest_configure(config: pytest.Config) -> None:
    # One fresh cache per test session, unless the caller chose one (e.g. to reuse it between runs).
    if "PERCEIVER_CACHE" not in os.environ:
        cache = Path(tempfile.mkdtemp(prefix="perceiver-test-cache-"))
        os.environ["PERCEIVER_CACHE"] = str(cache)
        config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
