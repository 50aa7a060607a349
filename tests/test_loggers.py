"""`[output] loggers`: TensorBoard and CSV by default, Weights & Biases and MLflow when installed (run offline here),
each given the resolved config as hyperparameters and the same metrics; a missing package is named before anything
is prepared, with its install command."""

import csv
import importlib.util

import pytest
import yaml

from cli_runner import assert_one_error, run_cli
from perceiver_cli.config import load_run_config
from perceiver_cli.training import loggers

TINY = [
    "model.num_channels=32", "model.num_heads=4", "model.max_latents=8", "model.num_self_attention_layers=1",
    "data.max_seq_len=32", "data.batch_size=4", "trainer.max_steps=2", "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", 'output.sample_prompt=""', "data.tokenizer=utf8",
]


def train(capsys, runs, *overrides):
    args = ["train", "--preset", "clm-small", "--output", str(runs)]
    for override in TINY + list(overrides):
        args += ["--set", override]
    return run_cli(capsys, *args)


def csv_metric_names(run) -> set[str]:
    with (run / "csv" / "metrics.csv").open() as f:
        return set(next(csv.reader(f))) - {"epoch", "step"}


def test_the_default_loggers_are_tensorboard_and_csv_with_the_resolved_config(capsys, tmp_path):
    cfg, _ = load_run_config("clm-small")
    assert cfg.output.loggers == ["tensorboard", "csv"]
    code, _, err = train(capsys, tmp_path)
    assert code in (0, None), err
    run = tmp_path / "clm-small" / "version_0"
    assert {"train_loss", "val_loss"} <= csv_metric_names(run)
    for logged in (run / "csv" / "hparams.yaml", run / "tensorboard" / "hparams.yaml"):
        hparams = yaml.safe_load(logged.read_text())
        assert hparams["data"]["max_seq_len"] == 32 and hparams["model"]["task"] == "clm"  # config.toml's sections
        assert "params" not in hparams  # not the model's constructor arguments


def test_no_loggers_at_all(capsys, tmp_path):
    code, _, err = train(capsys, tmp_path, "output.loggers=[]")
    assert code in (0, None), err
    run = tmp_path / "clm-small" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "csv").exists()


@pytest.mark.parametrize("missing", [["wandb"], ["wandb", "mlflow"]])
def test_a_missing_logger_package_is_reported_before_anything_is_prepared(missing, capsys, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name, *a: None if name in missing else
                        find_spec(name, *a))
    monkeypatch.setenv("PERCEIVER_DEBUG", "0")
    names = ", ".join(f'"{name}"' for name in ["csv", *missing])
    code, out, err = train(capsys, tmp_path, f"output.loggers=[{names}]")
    assert_one_error(code, err, f"pip install 'perceiver-cli[{missing[0]}]'", out)
    assert all(f"'{name}' needs the {name} package" in err for name in missing)
    assert not (tmp_path / "clm-small").exists() and "preparing" not in out  # before data and run directory
    code, out, err = run_cli(capsys, "train", "--preset", "clm-small", "--dry-run", "--set",
                             f"output.loggers=[{names}]")
    assert_one_error(code, err, "not installed", out)


def test_a_logger_named_twice_is_refused(capsys):
    code, out, err = run_cli(capsys, "train", "--dry-run", "--set", 'output.loggers=["csv","csv"]')
    assert_one_error(code, err, "output.loggers: names a logger more than once", out)


def _spy(monkeypatch, cls) -> dict:
    seen = {"metrics": set(), "hparams": []}
    log_metrics, log_hyperparams = cls.log_metrics, cls.log_hyperparams

    def metrics(self, metrics, step=None):
        seen["metrics"] |= set(metrics)
        return log_metrics(self, metrics, step)

    def hyperparams(self, params, *args, **kwargs):
        seen["hparams"].append(params)
        return log_hyperparams(self, params, *args, **kwargs)

    monkeypatch.setattr(cls, "log_metrics", metrics)
    monkeypatch.setattr(cls, "log_hyperparams", hyperparams)
    return seen


def test_weights_and_biases_offline(capsys, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    for key, value in {"WANDB_MODE": "offline", "WANDB_CONSOLE": "off", "WANDB_SILENT": "true",
                       "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_CACHE_DIR": tmp_path / "cache",
                       "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(key, str(value))
    seen = _spy(monkeypatch, WandbLogger)
    code, _, err = train(capsys, tmp_path / "runs", 'output.loggers=["csv","wandb"]')
    assert code in (0, None), err
    run = tmp_path / "runs" / "clm-small" / "version_0"
    assert list(run.glob("wandb/offline-run-*/run-*.wandb"))  # `wandb sync` uploads it later
    assert {name for name in seen["metrics"] if name not in ("epoch", "trainer/global_step")} == csv_metric_names(run)
    [config] = seen["hparams"]
    assert config["data"]["max_seq_len"] == 32 and config["output"]["loggers"] == ["csv", "wandb"]


def test_mlflow_with_a_local_store(capsys, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    code, _, err = train(capsys, runs, 'output.loggers=["csv","mlflow"]')
    assert code in (0, None), err
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")  # in the output directory, no server
    [logged] = client.search_runs([client.get_experiment_by_name("clm-small").experiment_id])
    assert logged.info.run_name == "version_0"
    assert logged.data.params["data/max_seq_len"] == "32" and logged.data.params["model/task"] == "clm"
    assert set(logged.data.metrics) - {"epoch"} == csv_metric_names(runs / "clm-small" / "version_0")
