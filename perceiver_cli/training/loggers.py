"""Experiment trackers: `[output] loggers` names Lightning loggers, each given the same metrics and, as its
hyperparameters, the run's resolved config.

- "tensorboard": `tensorboard/` in the run directory.
- "csv": `csv/metrics.csv` (a resumed run writes csv-1/, csv-2/, ...: see `next_csv_dir`); loss.png is drawn from it.
- "wandb": Weights & Biases (optional extra `wandb`), project $WANDB_PROJECT or the run's name, files under the run
  directory; `WANDB_MODE=offline` keeps it on the machine (`wandb sync` uploads it later).
- "mlflow": MLflow (optional extra `mlflow`), experiment named after the run, run named after its version; tracking
  URI $MLFLOW_TRACKING_URI or a local store in the output directory: `mlflow.db` (SQLite: MLflow 3 refuses new
  `file:` stores unless MLFLOW_ALLOW_FILE_STORE=true) with artifacts in `mlartifacts/`
  (`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`).

The packages of the optional ones are checked before anything is prepared (`check_loggers`), so that a missing one
costs seconds, not a data preparation, and the message says what to install.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytorch_lightning as pl

from perceiver_cli.errors import UserError, first_line

LOGGERS = ("tensorboard", "csv", "wandb", "mlflow")
# logger -> (the module it needs, the command that installs it)
PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "csv": (None, None),
    "wandb": ("wandb", "pip install 'perceiver-cli[wandb]'  (or: pip install wandb)"),
    "mlflow": ("mlflow", "pip install 'perceiver-cli[mlflow]'  (or: pip install mlflow)"),
}


def check_loggers(names: list[str]) -> None:
    """Refuse loggers whose package is not installed, all of them in one message, with the install commands."""
    missing = [name for name in names if PACKAGES[name][0] and importlib.util.find_spec(PACKAGES[name][0]) is None]
    if not missing:
        return
    what = ", ".join(f"{name!r} needs the {PACKAGES[name][0]} package" for name in missing)
    raise UserError(
        f"output.loggers: {what}, which is not installed: {'; '.join(PACKAGES[name][1] for name in missing)}",
        hint="or leave it out of output.loggers",
    )


def next_csv_dir(run_dir: Path) -> str:
    return f"csv-{len(list(run_dir.glob('csv-*'))) + 1}"


def build_loggers(names: list[str], run_dir: Path, run_name: str, output_dir: Path, resumed: bool = False) -> list:
    """The Lightning loggers for `names`, writing under `run_dir` (runs/NAME/version_N)."""
    check_loggers(names)
    loggers = []
    for name in names:
        try:
            loggers.append(_build(name, run_dir, run_name, output_dir, resumed))
        except UserError:
            raise
        except Exception as e:  # a tracking URI that does not answer, a bad W&B setting: the library's own error
            raise UserError(f"output.loggers: {name} could not start: {first_line(e)}",
                            hint=f"fix its settings (environment variables) or leave {name!r} out") from e
    return loggers


def _build(name: str, run_dir: Path, run_name: str, output_dir: Path, resumed: bool):
    if name == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=run_dir, name="", version="tensorboard")
    if name == "csv":
        from pytorch_lightning.loggers import CSVLogger

        # Lightning's CSV logger rewrites its file from what it logged itself: a resumed run logs into a new
        # folder (csv-1, csv-2, ...) so that the history before the resume survives.
        return CSVLogger(save_dir=run_dir, name="", version=next_csv_dir(run_dir) if resumed else "csv")
    if name == "wandb":
        from pytorch_lightning.loggers import WandbLogger

        return WandbLogger(name=f"{run_name}/{run_dir.name}", project=os.environ.get("WANDB_PROJECT") or run_name,
                           save_dir=str(run_dir))
    if name == "mlflow":
        import mlflow  # noqa: F401 (it sets its loggers' levels when imported: before the lines below)
        from pytorch_lightning.loggers import MLFlowLogger

        for library in ("mlflow", "alembic"):  # the database set-up's INFO lines
            logging.getLogger(library).setLevel(logging.WARNING)
        output_dir = output_dir.resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_dir / 'mlflow.db'}"
        output_dir.mkdir(parents=True, exist_ok=True)
        return MLFlowLogger(experiment_name=run_name, run_name=run_dir.name, tracking_uri=uri,
                            artifact_location=str(output_dir / "mlartifacts"))
    raise UserError(f"unknown logger {name!r}: use one of {', '.join(LOGGERS)}")  # the config allows only LOGGERS


class LogConfig(pl.Callback):
    """Every logger gets the resolved config (as config.toml has it) as the run's hyperparameters, instead of the
    model's constructor arguments that Lightning would log."""

    def __init__(self, config: dict):
        self.config = config

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Before Lightning logs the module's hyperparameters (after the setup hooks): it logs none now.
        pl_module.save_hyperparameters(dict(pl_module.hparams), logger=False)
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config)
