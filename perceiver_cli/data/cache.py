"""Where the project keeps what it builds (the embedded corpus, Hugging Face dataset caches for local text)."""

import os
from pathlib import Path


def cache_root() -> Path:
    """`$PERCEIVER_CACHE`, else `$XDG_CACHE_HOME/perceiver`, else `~/.cache/perceiver` (read on every call, so
    tests and users can redirect it at run time)."""
    if os.environ.get("PERCEIVER_CACHE"):
        return Path(os.environ["PERCEIVER_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "perceiver"
    return Path.home() / ".cache" / "perceiver"


def datasets_cache_dir() -> Path:
    """Cache dir for Hugging Face `datasets` built from local text (embedded corpus, files): arrow tables and
    tokenization results live next to each other there, so they are found again on the next run."""
    return cache_root() / "datasets"
