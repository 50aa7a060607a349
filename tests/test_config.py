"""Presets: built-ins validate and build; bad presets and overrides are reported all at once with key paths."""

import math

import pytest

from cli_runner import run_cli
from perceiver_cli.config import apply_overrides, load_run_config, parse_override, validate
from perceiver_cli.errors import UserError
from perceiver_cli.presets import list_presets
from perceiver_cli.training.run import count_parameters

SEED_PARAMETERS = {"clm-wikitext": 30_563_078, "mlm-wikipedia": 201_108_230}


@pytest.mark.parametrize("name", list_presets())
def test_built_in_presets_validate_and_build(name):
    cfg, preset_name = load_run_config(name)
    assert preset_name == name
    params = count_parameters(cfg, cfg.vocab_size())
    assert params == SEED_PARAMETERS.get(name, params) and params > 0


def test_seed_recipes_keep_the_seed_settings():
    clm, _ = load_run_config("clm-wikitext")
    assert (clm.data.name, clm.data.config_name, clm.data.padding_side) == ("wikitext", "wikitext-103-raw-v1", "left")
    assert (clm.data.max_seq_len, clm.data.batch_size, clm.trainer.max_epochs) == (4096, 24, 5)
    assert (clm.optimizer.name, clm.optimizer.lr, clm.model.cross_attention_dropout) == ("adam", 2e-4, 0.6)
    mlm, _ = load_run_config("mlm-wikipedia")
    assert (mlm.data.name, mlm.data.max_seq_len, mlm.data.batch_size) == ("wikipedia", 2048, 128)
    assert (mlm.optimizer.name, mlm.optimizer.lr, mlm.model.encoder.dropout, mlm.model.decoder.dropout) == (
        "lamb", 1e-3, 0.0, 0.0
    )


def test_dry_run_prints_config_size_and_cost(capsys):
    code, out, _ = run_cli(capsys, "train", "--preset", "clm-wikitext", "--dry-run")
    assert code in (0, None)
    assert "30,563,078" in out and "98,304" in out and 'name = "wikitext"' in out


@pytest.mark.parametrize(
    "text, expected",
    [
        ("trainer.max_steps=100", (["trainer", "max_steps"], 100)),
        ("optimizer.lr=3e-4", (["optimizer", "lr"], 3e-4)),
        ("trainer.deterministic=true", (["trainer", "deterministic"], True)),
        ("optimizer.betas=[0.9, 0.95]", (["optimizer", "betas"], [0.9, 0.95])),
        ('output.sample_prompt="a b"', (["output", "sample_prompt"], "a b")),
        ("trainer.strategy=ddp", (["trainer", "strategy"], "ddp")),  # not TOML: a plain string
        ("data.path=/tmp/x y.txt", (["data", "path"], "/tmp/x y.txt")),
    ],
)
def test_override_values_are_toml_or_plain_strings(text, expected):
    assert parse_override(text) == expected


def test_precision_32_may_be_written_as_a_number():
    for written in ("trainer.precision=32", 'trainer.precision="32"'):
        config = validate(apply_overrides({"model": {"task": "clm"}}, ["trainer.max_steps=1", written]), "preset x")
        assert config.trainer.precision == "32"


def test_overrides_are_validated_like_the_file():
    values = apply_overrides({"model": {"task": "clm"}}, ["trainer.max_steps=5", "model.num_heads=3"])
    with pytest.raises(UserError) as err:
        validate(values, "preset x")
    assert "model.num_channels: num_channels (512) must be divisible by model.num_heads (3)" in err.value.message


BAD_PRESETS = {
    "unknown key": ('[model]\ntask = "clm"\nbogus = 1\n[trainer]\nmax_steps = 1\n', ["model.bogus: unknown key"]),
    "unknown section": ('[model]\ntask = "clm"\n[trainer]\nmax_steps = 1\n[extra]\n', ["extra: unknown key"]),
    "wrong type": ('[model]\ntask = "clm"\n[data]\nmax_seq_len = "long"\n[trainer]\nmax_steps = 1\n',
                   ["data.max_seq_len: Input should be a valid integer"]),
    "out of range": ('[model]\ntask = "clm"\n[data]\nbatch_size = 0\nmask_prob = 1.5\n[trainer]\nmax_steps = 1\n',
                     ["data.batch_size:", "data.mask_prob:"]),
    "unknown choice": ('[model]\ntask = "clm"\n[optimizer]\nname = "sgd"\n[trainer]\nmax_steps = 1\n',
                       ["optimizer.name: Input should be 'adam', 'adamw', 'lamb' or 'muon'"]),
    "muon settings of another optimizer (reported with the others)": (
        '[model]\ntask = "clm"\n[optimizer]\nname = "adamw"\nmuon_lr = 0.02\nmuon_momentum = 0.9\n',
        ['optimizer.muon_lr: applies to name = "muon" only', 'optimizer.muon_momentum: applies to name = "muon" only',
         "trainer.max_steps: set max_steps"],
    ),
    "muon under fsdp": ('[model]\ntask = "clm"\n[optimizer]\nname = "muon"\n[trainer]\nmax_steps = 1\n'
                        'strategy = "fsdp"\naccelerator = "gpu"\n', ['optimizer.name: Muon needs whole weight']),
    "unknown task": ('[model]\ntask = "gpt"\n', ['model: task must be "clm" or "mlm"']),
    "missing task": ("[model]\nnum_heads = 4\n", ["model.task: missing"]),
    "contradictions (all reported)": (
        '[model]\ntask = "clm"\nnum_channels = 100\nnum_heads = 8\nmax_latents = 1024\n'
        '[data]\nmax_seq_len = 512\npadding_side = "right"\n',
        ["model.num_channels: num_channels (100) must be divisible by model.num_heads (8)",
         "model.max_latents:", "data.padding_side:", "trainer.max_steps: set max_steps"],
    ),
    "mlm channels": ('[model]\ntask = "mlm"\nnum_latents = 8\nnum_latent_channels = 60\n'
                     '[model.encoder]\nnum_self_attention_heads = 7\n[trainer]\nmax_steps = 1\n',
                     ["model.encoder.num_self_attention_qk_channels: query/key channels (60) must be divisible by "
                      "model.encoder.num_self_attention_heads (7)"]),
    "mlm missing latents": ('[model]\ntask = "mlm"\n[trainer]\nmax_steps = 1\n',
                            ["model.num_latents: Field required", "model.num_latent_channels: Field required"]),
    "files without path": ('[model]\ntask = "clm"\n[data]\nsource = "files"\n[trainer]\nmax_steps = 1\n',
                           ["data.path: source = \"files\" needs a path"]),
    "bad max_time": ('[model]\ntask = "clm"\n[trainer]\nmax_time = "10 minutes"\n', ["trainer.max_time: expected"]),
    "toml syntax": ('[model]\ntask = "clm\n', ["invalid TOML", "line 2"]),
}


@pytest.mark.parametrize("case", BAD_PRESETS)
def test_bad_presets_exit_2_with_every_key_path(case, capsys, tmp_path):
    text, expected = BAD_PRESETS[case]
    preset = tmp_path / "bad.toml"
    preset.write_text(text)
    code, out, err = run_cli(capsys, "train", "--preset", str(preset), "--dry-run")
    assert code == 2
    assert "Traceback" not in out + err
    for fragment in expected:
        assert fragment in err, (fragment, err)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trainer.max_steps", "expected key.path=value"),
        ("trainer.bogus=1", "trainer.bogus: unknown key"),
        ("trainer.max_steps=many", "trainer.max_steps: Input should be a valid integer"),
        ("=3", "key path is empty"),
        ("model.task.x=1", "'task' is a value, not a section"),
    ],
)
def test_bad_overrides_exit_2(override, fragment, capsys):
    code, out, err = run_cli(capsys, "train", "--preset", "clm-small", "--set", override, "--dry-run")
    assert code == 2 and fragment in err and "Traceback" not in err


def test_unknown_preset_name_lists_the_built_ins(capsys):
    code, _, err = run_cli(capsys, "train", "--preset", "no-such-preset", "--dry-run")
    assert code == 2 and "clm-small" in err and "mlm-wikipedia" in err


def test_rough_memory_estimate_grows_with_batch():
    small, _ = load_run_config("clm-small")
    big, _ = load_run_config("clm-small", [f"data.batch_size={4 * small.data.batch_size}"])
    from perceiver_cli.training.run import activation_bytes

    assert math.isclose(activation_bytes(big) / activation_bytes(small), 4.0, rel_tol=1e-6)
