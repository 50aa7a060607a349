"""The import rules of the package, read from the source: imports point down the layers, never in a circle.

    commands (cli, commands.*)
      -> training and inference (training.*, config, presets, runs, checkpoints, generation, evaluation, ...)
        -> wrappers (models.lightning, models.huggingface.*, the task packages' public names)
          -> backend and data (models.*, data.*)
            -> foundation (errors, files)

Every import counts, including those inside functions (the lazy ones), so that a new upward import fails here
however it is written.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "perceiver_cli"

# Each module's layer, by the longest matching prefix of its dotted name (without "perceiver_cli.").
LAYERS = {
    "": 0,  # the package root: the version only
    "errors": 0,
    "files": 0,
    "models": 1,
    "models.common": 1,  # what the backend models share (config dicts, initialisation, layout problems)
    "data": 1,
    "models.lightning": 2,
    "models.huggingface": 2,
    "models.clm": 2,  # the package's __init__ re-exports the Lightning wrapper; its modules are backend
    "models.mlm": 2,
    "models.clm.model": 1,
    "models.clm.decoding": 1,
    "models.clm.windows": 1,
    "models.mlm.model": 1,
    "models.mlm.block_routing": 1,
    "models.mlm.positions": 2,  # reads the collators' labels (data.masking.IGNORE_INDEX): a wrapper-side helper
    "models.huggingface.state_dicts": 2,
    "models.loading": 2,  # loads exported directories too (models.huggingface)
    "training": 3,
    "training.lightning_compat": 3,  # every private Lightning and torch attribute the training uses
    "config": 3,
    "presets": 3,
    "runs": 3,
    "checkpoints": 3,
    "generation": 3,
    "evaluation": 3,
    "harness": 3,
    "model_choice": 3,
    "serving": 3,
    "commands": 4,
    "cli": 4,
    "__main__": 4,
}
LAYER_NAMES = ["foundation", "backend and data", "wrappers", "training and inference", "commands"]
# Libraries the backend must not import: it is pure PyTorch, and `remote_code` ships it inside exported models.
NOT_IN_BACKEND = ("pytorch_lightning", "lightning", "transformers", "datasets", "pydantic", "typer", "rich")


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = module_names()


def layer(name: str) -> int:
    matches = [prefix for prefix in LAYERS if name == prefix or name.startswith(prefix + ".") or prefix == ""]
    return LAYERS[max(matches, key=len)]


def imports(path: Path) -> tuple[set[str], set[str]]:
    """The modules of this package that a module imports (anywhere in it), and the other top-level packages."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from package import submodule` imports the submodule.
            targets = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}".removeprefix("perceiver_cli.") in MODULES
                else node.module
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "perceiver_cli" or target.startswith("perceiver_cli."):
                ours.add(target.removeprefix("perceiver_cli").removeprefix("."))
            else:
                others.add(target.split(".")[0])
    return ours, others


GRAPH = {name: imports(path)[0] for name, path in MODULES.items()}


def test_every_module_has_a_layer_and_every_import_points_down():
    upward = [
        f"{name} ({LAYER_NAMES[layer(name)]}) imports {target} ({LAYER_NAMES[layer(target)]})"
        for name, targets in GRAPH.items()
        for target in sorted(targets)
        if layer(target) > layer(name)
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH.get(name, ())):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target] if target in path else [name, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_backend_and_data_import_neither_each_other_nor_wrapper_libraries():
    problems = []
    for name, path in MODULES.items():
        if layer(name) != 1:
            continue
        ours, others = imports(path)
        side = name.split(".")[0]
        problems += [f"{name} imports {t}" for t in sorted(ours) if layer(t) == 1 and t.split(".")[0] != side]
        if side == "models":
            problems += [f"{name} imports {lib}" for lib in sorted(set(others) & set(NOT_IN_BACKEND))]
    assert not problems, "\n".join(problems)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    # The rules above hold only if an upward import is seen: one written inside a function, as lazy imports are.
    source = tmp_path / "backend.py"
    source.write_text("def f():\n    from perceiver_cli.training.build import build_trainer\n")
    ours, _ = imports(source)
    assert ours == {"training.build"} and layer("training.build") > layer("models.attention")


def test_importing_the_task_packages_imports_no_lightning():
    # The seed's import paths (`perceiver_cli.models.mlm.LitMaskedLanguageModel`) resolve lazily: the backend
    # stays importable without Lightning's import time, and the wrappers are there when asked for.
    code = (
        "import sys\n"
        "import perceiver_cli.models.clm, perceiver_cli.models.mlm\n"
        "assert 'pytorch_lightning' not in sys.modules and 'transformers' not in sys.modules, 'eager'\n"
        "from perceiver_cli.models.clm import LitCausalLanguageModel\n"
        "from perceiver_cli.models.mlm import LitMaskedLanguageModel\n"
        "from perceiver_cli.models.lightning import LitCausalLanguageModel as C, LitMaskedLanguageModel as M\n"
        "assert (LitCausalLanguageModel, LitMaskedLanguageModel) == (C, M)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
