"""Every kind of bad input, through the real `perceiver` entry point: exit status 2, one `error:` line that names
the problem, and no traceback. One table, so that a new command or check has an obvious place to add its row."""

import json
import os

import pytest
import torch

from cli_runner import assert_one_error, run_cli, write_run
from perceiver_cli.checkpoints import write_checkpoint
from perceiver_cli.models.clm import CausalLanguageModel
from perceiver_cli.models.mlm import MaskedLanguageModel
from tiny_models import tiny_clm_config, tiny_mlm_config

TINY_CLM = ["--set", "model.num_channels=32", "--set", "model.num_heads=4", "--set", "model.max_latents=8",
            "--set", "model.num_self_attention_layers=1", "--set", "data.max_seq_len=32", "--set",
            "trainer.max_steps=1", "--set", 'output.sample_prompt=""', "--set", "data.tokenizer=utf8"]

PRESETS = {
    "syntax.toml": '[model]\ntask = "clm\n',
    "unknown-key.toml": '[model]\ntask = "clm"\nbogus = 1\n[trainer]\nmax_steps = 1\n',
    "wrong-type.toml": '[model]\ntask = "clm"\n[data]\nmax_seq_len = "long"\n[trainer]\nmax_steps = 1\n',
    "out-of-range.toml": '[model]\ntask = "clm"\n[data]\nbatch_size = 0\n[trainer]\nmax_steps = 1\n',
    "contradiction.toml": '[model]\ntask = "clm"\nnum_channels = 100\nnum_heads = 8\n[trainer]\nmax_steps = 1\n',
}


class Evil:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    torch.manual_seed(0)
    clm_config, mlm_config = tiny_clm_config(), tiny_mlm_config()
    clm = CausalLanguageModel(clm_config)
    write_run(root, "clm-tiny", "clm", clm, clm_config)
    write_run(root, "mlm-tiny", "mlm", MaskedLanguageModel(mlm_config), mlm_config)
    for name, text in PRESETS.items():
        (root / name).write_text(text)
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n\nune autre phrase\n".encode("latin-1"))
    (root / "empty.txt").write_text("")
    (root / "a-directory").mkdir()
    torch.save({"state_dict": {}, "payload": Evil()}, root / "evil.ckpt")
    good = root / "runs" / "clm-tiny" / "version_0" / "checkpoints" / "last.ckpt"
    (root / "truncated.ckpt").write_bytes(good.read_bytes()[:2000])
    (root / "garbage.ckpt").write_bytes(bytes(range(256)) * 12)
    # weights of the tiny model under a config that describes a wider one
    write_checkpoint(root / "mismatch.ckpt", "clm", clm, tiny_clm_config(num_channels=64))
    (root / "hf-unknown").mkdir()
    (root / "hf-unknown" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return root


CASES = {
    # presets and overrides
    "toml syntax error": (["train", "--preset", "syntax.toml", "--dry-run"], "invalid TOML"),
    "unknown key": (["train", "--preset", "unknown-key.toml", "--dry-run"], "model.bogus: unknown key"),
    "wrong type": (["train", "--preset", "wrong-type.toml", "--dry-run"], "data.max_seq_len: Input should be"),
    "value out of range": (["train", "--preset", "out-of-range.toml", "--dry-run"], "data.batch_size:"),
    "contradictory values": (["train", "--preset", "contradiction.toml", "--dry-run"], "must be divisible"),
    "unknown preset name": (["train", "--preset", "no-such-preset", "--dry-run"], "built-in presets:"),
    "--set without =": (["train", "--set", "trainer.max_steps", "--dry-run"], "expected key.path=value"),
    "--set unknown key": (["train", "--set", "trainer.bogus=1", "--dry-run"], "trainer.bogus: unknown key"),
    "--set wrong type": (["train", "--set", "trainer.max_steps=many", "--dry-run"], "trainer.max_steps: Input"),
    # paths
    "missing data path": (["train", *TINY_CLM, "--set", "data.source=files", "--set", "data.path=nope/*.txt"],
                          "nope"),
    "empty corpus": (["train", *TINY_CLM, "--set", "data.source=files", "--set", "data.path=empty.txt"],
                     "no text found"),
    "corpus not UTF-8": (["train", *TINY_CLM, "--set", "data.source=files", "--set", "data.path=latin1.txt"],
                         "utf-8"),
    "preset path is a directory": (["train", "--preset", "a-directory/", "--dry-run"], "a-directory"),
    "directory given as a file": (["generate", "--file", "a-directory", "--model", "runs/clm-tiny/version_0"],
                                  "is a directory"),
    "file given as a model directory": (["generate", "x", "--model", "latin1.txt"], "cannot read checkpoint"),
    "missing model": (["generate", "x", "--model", "missing"], "model not found"),
    "missing resume checkpoint": (["train", "--resume", "nowhere.ckpt", "--dry-run"], "no checkpoint at"),
    "hub dataset offline": (["train", *TINY_CLM, "--set", "data.source=hub", "--set", "data.name=wikitext"],
                            "wikitext"),
    # models
    "wrong task": (["generate", "x", "--model", "runs/mlm-tiny/version_0"], "masked language model"),
    "truncated checkpoint": (["generate", "x", "--model", "truncated.ckpt"], "truncated"),
    "corrupt checkpoint": (["eval", "--model", "garbage.ckpt"], "not a PyTorch checkpoint"),
    "checkpoint with pickled code": (["generate", "x", "--model", "evil.ckpt"], "refusing to load"),
    "architecture differs from config": (["generate", "x", "--model", "mismatch.ckpt"], "do not match"),
    "unknown model type": (["fill-mask", "[MASK]", "--model", "hf-unknown"], "unknown model_type 'bert'"),
    # prompts and masks
    "empty prompt": (["generate", "", "--model", "runs/clm-tiny/version_0"], "empty"),
    "prompt file not UTF-8": (["generate", "--file", "latin1.txt", "--model", "runs/clm-tiny/version_0"], "UTF-8"),
    "text without a mask": (["fill-mask", "no mask here", "--model", "runs/mlm-tiny/version_0"], "[MASK]"),
    "text longer than the model": (["fill-mask", "x" * 40 + "[MASK]", "--model", "runs/mlm-tiny/version_0"],
                                   "max_seq_len"),
    # generation options
    "top-p out of range": (["generate", "x", "--top-p", "1.5", "--model", "runs/clm-tiny/version_0"], "top-p"),
    "negative temperature": (["generate", "x", "--temperature", "-1", "--model", "runs/clm-tiny/version_0"],
                             "temperature"),
    "zero latents": (["generate", "x", "--num-latents", "0", "--model", "runs/clm-tiny/version_0"], "num-latents"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_clear_line(case, workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("PERCEIVER_DEBUG", "0")
    args, fragment = CASES[case]
    status, out, err = run_cli(capsys, *args)
    assert_one_error(status, err, fragment, out)
    assert not (workspace / "PWNED").exists()  # nothing was unpickled
    assert not list((workspace / "runs").glob("clm-small/*"))  # a failed start leaves no empty run behind
