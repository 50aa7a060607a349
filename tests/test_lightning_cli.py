"""The seed's third interface: its Lightning CLI scripts (examples/mlm.py and examples/clm.py, the guide's scripts
with only the import paths changed) show, bind and train the seed's models, and write checkpoints every command
reads.

The scripts run as the user runs them, in subprocesses, at tiny sizes on a local corpus; `--print_config` and
`run=False` run in this process, where importing the script's module is all it takes.
"""

import importlib.util
import os
import re
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cli_runner import run_cli
from perceiver_cli.checkpoints import load_model, write_checkpoint
from perceiver_cli.errors import UserError
from perceiver_cli.models.clm import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_cli.models.mlm import MaskedLanguageModel, MaskedLanguageModelConfig
from perceiver_cli.models.saved_model import CHECKPOINT_KEY, checkpoint_metadata
from tiny_models import tiny_clm_config, tiny_mlm_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# The seed's training commands (model-construction.md), but for the accelerator, the logger's directory and, in
# `fit` runs, the data module (local files) and the model's size.
SEED_CLM = [
    "--model.cross_attention_dropout=0.6", "--data=WikiTextDataModule", "--data.tokenizer=deepmind/language-perceiver",
    "--data.padding_side=left", "--data.max_seq_len=4096", "--data.batch_size=24", "--data.task=clm",
    "--optimizer=Adam", "--optimizer.lr=2e-4", "--trainer.accelerator=cpu", "--trainer.devices=1",
    "--trainer.max_epochs=5",
]
SEED_MLM = [
    "--model.encoder.dropout=0.0", "--model.decoder.dropout=0.0", "--data=WikipediaDataModule",
    "--data.tokenizer=deepmind/language-perceiver", "--data.task=mlm", "--data.max_seq_len=2048",
    "--data.batch_size=128", "--optimizer=Lamb", "--optimizer.lr=1e-3", "--trainer.accelerator=cpu",
    "--trainer.devices=1",
]
TINY_CLM = [
    "--model.max_latents=16", "--model.num_channels=32", "--model.num_heads=4", "--model.num_self_attention_layers=1",
]
TINY_MLM = [
    "--model.num_latents=8", "--model.num_latent_channels=32", "--model.encoder.num_input_channels=32",
    "--model.encoder.num_cross_attention_heads=2", "--model.encoder.num_cross_attention_qk_channels=16",
    "--model.encoder.num_cross_attention_v_channels=32", "--model.encoder.num_self_attention_heads=2",
    "--model.encoder.num_self_attention_qk_channels=16", "--model.encoder.num_self_attention_v_channels=32",
    "--model.encoder.num_self_attention_layers_per_block=1",
    # The decoder keeps the script's heads and query/key channels: transformers' PerceiverForMaskedLM fixes them.
    "--model.decoder.num_cross_attention_v_channels=32",
]


def script(name: str, *args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python examples/NAME ARGS` as a user runs it (the test environment: offline, the test cache)."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PERCEIVER_DEBUG": "0"},
    )


def script_module(name: str):
    """The example script as a module (its `CLI` class and imports), without running its main block."""
    spec = importlib.util.spec_from_file_location(f"seed_{name.removesuffix('.py')}", EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def options(help_text: str) -> set[str]:
    return set(re.findall(r"^\s+(--[\w.]+)", help_text, flags=re.MULTILINE))


def with_local_data(args: list[str], corpus: Path) -> list[str]:
    """The seed's flags with the local-files data module in place of the hub one (the data module's options follow
    its choice), at a tiny max_seq_len and batch size, without the seed's training length."""
    local = []
    for arg in args:
        if arg.startswith("--data="):
            local += ["--data=TextFilesDataModule", f"--data.path={corpus}"]
        elif not arg.startswith(("--data.max_seq_len", "--data.batch_size", "--trainer.max_")):
            local.append(arg)
    return local + ["--data.max_seq_len=64", "--data.batch_size=4"]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"Paragraph {i} tells of a river that ran past {i} quiet houses." for i in range(120)))
    return path


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- the command line the scripts offer -------------------------------------------------------------------------


def test_fit_help_lists_the_seed_options(tmp_path):
    clm, mlm = script("clm.py", "fit", "--help", cwd=tmp_path), script("mlm.py", "fit", "--help", cwd=tmp_path)
    assert clm.returncode == 0 and mlm.returncode == 0, clm.stderr + mlm.stderr
    clm_options, mlm_options = options(clm.stdout), options(mlm.stdout)
    # Every --model option of the seed's commands and set_defaults, and the optimizer and data groups.
    assert {
        "--model.max_latents", "--model.num_channels", "--model.num_self_attention_layers",
        "--model.cross_attention_dropout", "--model.post_attention_dropout", "--model.num_heads", "--model.params",
        "--optimizer", "--data", "--trainer.max_steps",
    } <= clm_options
    assert {
        "--model.num_latents", "--model.num_latent_channels", "--model.params", "--model.encoder.dropout",
        "--model.decoder.dropout", "--model.encoder.num_input_channels", "--model.encoder.num_cross_attention_heads",
        "--model.encoder.num_self_attention_layers_per_block", "--model.decoder.cross_attention_residual",
        "--model.decoder.num_cross_attention_v_channels", "--optimizer", "--data",
    } <= mlm_options
    # The links make the model's vocab_size and max_seq_len the data module's: not options of their own.
    assert not {"--model.vocab_size", "--model.max_seq_len"} & clm_options
    assert not {"--model.encoder.vocab_size", "--model.decoder.max_seq_len"} & mlm_options
    assert "default: 512" in clm.stdout.split("--model.max_latents MAX_LATENTS", 2)[2][:200]  # the script's default


@pytest.mark.parametrize(
    ("name", "data_class", "optimizer"),
    [("clm.py", "WikiTextDataModule", "Adam"), ("mlm.py", "WikipediaDataModule", "Lamb")],
)
def test_the_data_modules_and_optimizers_of_the_seed_resolve_by_name(name, data_class, optimizer, capsys, monkeypatch):
    for args in (["fit", f"--data.help={data_class}"], ["fit", f"--optimizer.help={optimizer}"]):
        monkeypatch.setattr(sys, "argv", [name, *args])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(EXAMPLES / name), run_name="__main__")
        assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    seed_data_options = {"--data.tokenizer", "--data.task", "--data.max_seq_len", "--data.batch_size"}
    assert seed_data_options | {"--data.padding_side", "--optimizer.lr"} <= options(out)
    optimizer_class = "perceiver_cli.models.optim.Lamb" if optimizer == "Lamb" else "torch.optim.Adam"
    assert f"Help for --data.help=perceiver_cli.data.text.{data_class}" in out
    assert f"Help for --optimizer.help={optimizer_class}" in out


@pytest.mark.parametrize(
    ("name", "seed_args", "count"), [("clm.py", SEED_CLM, 30_563_078), ("mlm.py", SEED_MLM, 201_108_230)]
)
def test_print_config_of_the_seed_commands_builds_the_seed_models(name, seed_args, count, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, "fit", *seed_args, "--print_config"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert exit_.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    module = script_module(name)
    data_class = getattr(module, config["data"]["class_path"].rsplit(".", 1)[1])
    data = data_class(**config["data"]["init_args"])  # no data loaded: the tokenizer only
    model = dict(config["model"])
    linked = dict(vocab_size=data.vocab_size, max_seq_len=data.max_seq_len)  # the scripts' link_arguments
    if name == "clm.py":
        assert model["max_latents"] == 512 and model["cross_attention_dropout"] == 0.6
        model |= linked
        lit_class = module.LitCausalLanguageModel
    else:
        assert model["num_latents"] == 256 and model["encoder"]["dropout"] == 0.0
        model["encoder"] = model["encoder"] | linked
        model["decoder"] = model["decoder"] | linked
        lit_class = module.LitMaskedLanguageModel
    with torch.device("meta"):
        assert num_params(lit_class(**model).model) == count


# --- training with the scripts ----------------------------------------------------------------------------------


def trained_checkpoint(logs: Path, name: str) -> Path:
    [checkpoint] = (logs / name / "version_0" / "checkpoints").glob("*.ckpt")
    return checkpoint


def test_clm_script_trains_with_the_seed_flags_and_writes_a_checkpoint_every_command_reads(tmp_path, corpus, capsys):
    args = with_local_data(SEED_CLM, corpus) + TINY_CLM + [
        "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.logger=TensorBoardLogger", f"--trainer.logger.save_dir={tmp_path / 'logs'}",
        "--trainer.logger.name=clm",
    ]
    result = script("clm.py", "fit", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint_path = trained_checkpoint(tmp_path / "logs", "clm")
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert checkpoint["global_step"] == 2
    config = checkpoint[CHECKPOINT_KEY]["model_config"]
    assert config["cross_attention_dropout"] == 0.6  # the seed's flag
    assert (config["vocab_size"], config["max_seq_len"], config["max_latents"]) == (262, 64, 16)  # linked, tiny
    assert checkpoint[CHECKPOINT_KEY]["tokenizer"] == "utf8"  # deepmind/language-perceiver's bytes
    [group] = checkpoint["optimizer_states"][0]["param_groups"]
    assert "amsgrad" in group and group["lr"] == 2e-4  # --optimizer=Adam --optimizer.lr=2e-4

    from perceiver_cli.models.clm import LitCausalLanguageModel

    lit = LitCausalLanguageModel.load_from_checkpoint(checkpoint_path)
    for name, tensor in load_model(checkpoint_path).model.state_dict().items():
        assert torch.equal(lit.model.state_dict()[name], tensor), name

    code, out, err = run_cli(capsys, "generate", "The river", "--model", str(checkpoint_path), "--max-new-tokens", "4")
    assert code in (0, None), err
    code, out, err = run_cli(capsys, "convert", "--to", "hf", "--model", str(checkpoint_path), str(tmp_path / "hf"))
    assert code in (0, None), err
    assert load_model(tmp_path / "hf").config == load_model(checkpoint_path).config


def test_mlm_script_trains_with_lamb_and_writes_a_checkpoint_every_command_reads(tmp_path, corpus, capsys):
    args = with_local_data(SEED_MLM, corpus) + TINY_MLM + [
        "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.logger=TensorBoardLogger",
        f"--trainer.logger.save_dir={tmp_path / 'logs'}", "--trainer.logger.name=mlm",
    ]
    result = script("mlm.py", "fit", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint_path = trained_checkpoint(tmp_path / "logs", "mlm")
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert checkpoint["global_step"] == 2
    config = checkpoint[CHECKPOINT_KEY]["model_config"]
    assert config["encoder"]["dropout"] == 0.0 and config["decoder"]["dropout"] == 0.0  # the seed's flags
    assert config["decoder"]["cross_attention_residual"] is False  # the script's default
    assert (config["encoder"]["max_seq_len"], config["decoder"]["max_seq_len"], config["decoder"]["vocab_size"]) == (
        64, 64, 262,
    )  # linked from the data module
    [group] = checkpoint["optimizer_states"][0]["param_groups"]
    assert set(group) == {"lr", "betas", "eps", "weight_decay", "params"} and group["lr"] == 1e-3  # Lamb's

    code, out, err = run_cli(capsys, "fill-mask", "The river ran past [MASK]", "--model", str(checkpoint_path))
    assert code in (0, None), err
    code, out, err = run_cli(capsys, "convert", "--to", "hf", "--model", str(checkpoint_path), str(tmp_path / "hf"))
    assert code in (0, None), err


def test_a_hub_dataset_out_of_reach_fails_within_seconds_with_one_message(tmp_path):
    start = time.perf_counter()
    result = script("clm.py", "fit", *SEED_CLM, *TINY_CLM, "--trainer.max_steps=1", "--trainer.logger=false",
                    cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert result.returncode != 0
    assert "error: could not load dataset 'wikitext'" in result.stderr and "--data=TextFilesDataModule" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 60  # the script's start-up (imports) included; the data's own failure takes well under a second


# --- model.params ---------------------------------------------------------------------------------------------------


def test_params_start_from_a_checkpoint_at_step_0(tmp_path, corpus):
    from perceiver_cli.models.clm import LitCausalLanguageModel

    config = CausalLanguageModelConfig(
        vocab_size=262, max_seq_len=64, max_latents=16, num_channels=32, num_heads=4, num_self_attention_layers=1
    )
    source = CausalLanguageModel(config)
    write_checkpoint(tmp_path / "source.ckpt", "clm", source, config)
    args = with_local_data(SEED_CLM, corpus) + TINY_CLM + [
        f"--model.params={tmp_path / 'source.ckpt'}", "--trainer.logger=false",
    ]
    cli = script_module("clm.py").CLI(LitCausalLanguageModel, run=False, args=args)
    assert cli.model.global_step == 0
    for name, tensor in source.state_dict().items():
        assert torch.equal(cli.model.model.state_dict()[name], tensor), name
    assert cli.model.hparams["params"] == str(tmp_path / "source.ckpt")

    with pytest.raises(UserError, match="architecture differs"):
        LitCausalLanguageModel(**(config.to_dict() | {"num_channels": 64}), params=str(tmp_path / "source.ckpt"))
    with pytest.raises(UserError, match="is a causal language model"):
        mlm = tiny_mlm_config()
        from perceiver_cli.models.mlm import LitMaskedLanguageModel

        LitMaskedLanguageModel.create(mlm, params=str(tmp_path / "source.ckpt"))


def test_params_naming_a_hub_model_out_of_reach_fails_fast():
    from perceiver_cli.models.mlm import LitMaskedLanguageModel

    start = time.perf_counter()
    with pytest.raises(UserError, match="cannot load model krasserm/perceiver-io-mlm"):
        LitMaskedLanguageModel.create(tiny_mlm_config(), params="krasserm/perceiver-io-mlm")
    assert time.perf_counter() - start < 10


# --- the wrappers' constructors and checkpoints ---------------------------------------------------------------------


def test_the_clm_wrapper_takes_every_config_field_with_its_default():
    import inspect
    from dataclasses import MISSING, fields

    from perceiver_cli.models.clm import LitCausalLanguageModel

    parameters = inspect.signature(LitCausalLanguageModel.__init__).parameters
    for field in fields(CausalLanguageModelConfig):
        assert field.name in parameters, field.name
        assert field.default is MISSING or parameters[field.name].default == field.default, field.name
    assert {"params", "optimizer", "scheduler"} <= set(parameters)


def old_checkpoint(path: Path, task: str, model, config, hyper_parameters: dict) -> Path:
    """A checkpoint as the wrappers wrote it before their constructors took typed fields: hyperparameters
    `optimizer`, `scheduler` and the config's fields (the masked LM's encoder and decoder as dicts), saved under the
    name "kwargs"."""
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": hyper_parameters,
            "hparams_name": "kwargs",
            "pytorch-lightning_version": "2.6.6",
            "epoch": 0,
            "global_step": 1,
            CHECKPOINT_KEY: checkpoint_metadata(task, config, {"model": {"task": task}}, "utf8"),
        },
        path,
    )
    return path


def test_checkpoints_of_the_earlier_constructors_still_load(tmp_path):
    from perceiver_cli.models.clm import LitCausalLanguageModel
    from perceiver_cli.models.mlm import LitMaskedLanguageModel

    optimizer = {"name": "adamw", "lr": 0.002, "weight_decay": 0.01, "betas": [0.9, 0.99], "eps": 1e-08}
    scheduler = {"name": "cosine", "warmup_steps": 100, "min_lr_ratio": 0.1}
    for task, lit_class, model_class, config in [
        ("clm", LitCausalLanguageModel, CausalLanguageModel, tiny_clm_config()),
        ("mlm", LitMaskedLanguageModel, MaskedLanguageModel, tiny_mlm_config()),
    ]:
        model = model_class(config)
        path = old_checkpoint(
            tmp_path / f"{task}.ckpt", task, model, config,
            {"optimizer": optimizer, "scheduler": scheduler, **config.to_dict()},
        )
        lit = lit_class.load_from_checkpoint(path)
        assert lit.model.config == config and lit.optimizer_config == optimizer and lit.scheduler_config == scheduler
        for name, tensor in model.state_dict().items():
            assert torch.equal(lit.model.state_dict()[name], tensor), name


def test_hyperparameters_stay_plain_values_and_rebuild_the_model(tmp_path):
    from perceiver_cli.models.mlm import LitMaskedLanguageModel, TextDecoderConfig, TextEncoderConfig

    config = tiny_mlm_config()
    # As the Lightning CLI calls it: encoder and decoder as dataclasses.
    lit = LitMaskedLanguageModel(
        encoder=TextEncoderConfig(**config.to_dict()["encoder"]),
        decoder=TextDecoderConfig(**config.to_dict()["decoder"]),
        num_latents=config.num_latents,
        num_latent_channels=config.num_latent_channels,
    )
    assert lit.model.config == config
    assert dict(lit.hparams) == config.to_dict() | {"params": None, "optimizer": None, "scheduler": None}
    assert MaskedLanguageModelConfig.from_dict({k: lit.hparams[k] for k in config.to_dict()}) == config
    assert LitMaskedLanguageModel.create(config).model.config == config
