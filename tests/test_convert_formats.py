"""`perceiver convert`: directories of the perceiver-io library, plain safetensors, and every way to get it wrong."""

import dataclasses
import datetime
import json
import re

import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import save_file
from tiny_models import tiny_clm_config, tiny_mlm_config
from transformers import PerceiverTokenizer

from perceiver_cli.checkpoints import load_model, write_checkpoint
from perceiver_cli.models.clm import CausalLanguageModel
from perceiver_cli.models.huggingface.state_dicts import unfused_state_dict
from perceiver_cli.models.mlm import MaskedLanguageModel

# ---------------------------------------------------------------------------------------------------------------
# The perceiver-io library's format (krasserm/perceiver-io 0.11.0), written here from its source's module layout:
# attention layers are Sequential(Residual(attention), Residual(MLP)) (`.0.module.`, `.1.module.`; an attention
# without its residual is not wrapped), MLPs Sequential(LayerNorm, Linear, GELU, Linear), the masked LM
# Sequential(encoder, decoder), and the HF wrapper holds the backend as `backend_model`.
# ---------------------------------------------------------------------------------------------------------------

MLP_RULES = [(r"\.mlp\.norm\.", ".1.module.0."), (r"\.mlp\.fc1\.", ".1.module.1."), (r"\.mlp\.fc2\.", ".1.module.3.")]


def perceiver_io_mlm_name(name: str, decoder_residual: bool) -> str:
    decoder_attention = ".0.module." if decoder_residual else ".0."
    rules = [
        (r"^encoder\.latents$", "0.latent_provider._query"),
        (r"^encoder\.input_adapter\.", "0.input_adapter."),
        (r"^encoder\.(cross_attn_[1n])\.(q_norm|kv_norm|attention)\.", r"0.\1.0.module.\2."),
        (r"^encoder\.(self_attn_[1n])\.layers\.(\d+)\.(norm|attention)\.", r"0.\1.\2.0.module.\3."),
        (r"^encoder\.(self_attn_[1n])\.layers\.(\d+)\.mlp\.", r"0.\1.\2.mlp."),
        (r"^encoder\.(cross_attn_[1n])\.", r"0.\1."),
        (r"^decoder\.output_queries$", "1.output_query_provider._query"),
        (r"^decoder\.cross_attn\.(q_norm|kv_norm|attention)\.", rf"1.cross_attn{decoder_attention}\1."),
        (r"^decoder\.cross_attn\.", "1.cross_attn."),
        (r"^output_bias$", "1.output_adapter.bias"),
        (r"^output_linear\.", "1.output_adapter.linear."),
    ]
    for pattern, replacement in rules + MLP_RULES:
        name = re.sub(pattern, replacement, name)
    return "backend_model." + name


def perceiver_io_clm_name(name: str) -> str:
    rules = [
        (r"^cross_attention\.(q_norm|kv_norm|attention)\.", r"cross_attention.0.module.\1."),
        (r"^self_attention\.layers\.(\d+)\.(norm|attention)\.", r"self_attention.\1.0.module.\2."),
        (r"^self_attention\.layers\.(\d+)\.mlp\.", r"self_attention.\1.mlp."),
        (r"^output_bias$", "output_adapter.bias"),
    ]
    for pattern, replacement in rules + MLP_RULES:
        name = re.sub(pattern, replacement, name)
    return "backend_model." + name


def save_perceiver_io_dir(directory, model_type, model_config, tensors, weights_file="model.safetensors"):
    directory.mkdir()
    config = {"model_type": model_type, "model_config": model_config, "architectures": ["PerceiverIOModel"]}
    (directory / "config.json").write_text(json.dumps(config))
    if weights_file.endswith(".bin"):
        torch.save(tensors, directory / weights_file)
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, directory / weights_file, {"format": "pt"})
    PerceiverTokenizer().save_pretrained(directory)
    return directory


def random_model(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


def assert_same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("variant", ["like krasserm/perceiver-io-mlm", "untied, residual, unshared"])
def test_perceiver_io_masked_lm_converts(variant, tmp_path, capsys):
    config = tiny_mlm_config()  # its decoder has no query residual, as in krasserm/perceiver-io-mlm
    weights_file = "pytorch_model.bin"
    if variant != "like krasserm/perceiver-io-mlm":
        config.decoder = dataclasses.replace(
            config.decoder, cross_attention_residual=True, num_output_query_channels=16
        )
        config.encoder = dataclasses.replace(
            config.encoder,
            num_cross_attention_layers=2,
            num_self_attention_blocks=3,
            first_self_attention_block_shared=False,
        )
        weights_file = "model.safetensors"
    model = random_model(MaskedLanguageModel(config))
    residual = config.decoder.cross_attention_residual
    tensors = {perceiver_io_mlm_name(k, residual): v for k, v in unfused_state_dict(model).items()}
    # Anchors checked against the library's own state dict names.
    decoder_q_norm = "1.cross_attn.0.module.q_norm.weight" if residual else "1.cross_attn.0.q_norm.weight"
    for anchor in (decoder_q_norm, "0.self_attn_1.1.1.module.3.weight", "0.latent_provider._query"):
        assert f"backend_model.{anchor}" in tensors
    model_config = config.to_dict()
    model_config["encoder"]["params"] = None  # a library setting of training time only
    model_config["max_heads_parallel"] = 4  # a memory setting our masked LM does not have
    source = save_perceiver_io_dir(
        tmp_path / "lib", "perceiver-io-masked-language-model", model_config, tensors, weights_file
    )

    assert run_cli(capsys, "convert", "--from", "hf", str(source), str(tmp_path / "out.ckpt"))[0] == 0
    loaded = load_model(tmp_path / "out.ckpt", task="mlm")
    assert loaded.config == config and loaded.tokenizer == "utf8"
    assert_same_weights(loaded.model, model)


@pytest.fixture
def perceiver_io_clm(tmp_path):
    config = tiny_clm_config(output_norm=True)
    model = random_model(CausalLanguageModel(config))
    tensors = {perceiver_io_clm_name(k): v for k, v in unfused_state_dict(model).items()}
    assert "backend_model.self_attention.1.1.module.3.weight" in tensors
    rotated = config.num_rotary_channels_per_head
    # The library keeps its rotary frequencies as a float32 buffer.
    tensors["backend_model.input_adapter.frq_pos_encoding.inv_freq"] = 1.0 / (
        10000 ** (torch.arange(0, rotated, 2).float() / rotated)
    )
    model_config = config.to_dict() | {"params": "the library's path to initialise from"}
    return config, model, tensors, model_config


def test_perceiver_ar_causal_lm_converts(perceiver_io_clm, tmp_path, capsys):
    config, model, tensors, model_config = perceiver_io_clm
    source = save_perceiver_io_dir(tmp_path / "lib", "perceiver-ar-causal-language-model", model_config, tensors)
    assert run_cli(capsys, "convert", "--from", "hf", str(source), str(tmp_path / "out.ckpt"))[0] == 0
    loaded = load_model(tmp_path / "out.ckpt", task="clm")
    assert loaded.config == config
    assert_same_weights(loaded.model, model)


@pytest.mark.parametrize(
    "change, message",
    [
        ("extra tensor", "1 unused: backend_model.stray"),
        ("missing tensor", "1 missing: backend_model.output_adapter.bias"),
        ("wrong inv_freq", "rotary frequencies"),
        ("unknown setting", "unknown CausalLanguageModelConfig fields: attention_sinks"),
    ],
)
def test_perceiver_ar_directory_that_does_not_match_is_refused(perceiver_io_clm, change, message, tmp_path, capsys):
    _, _, tensors, model_config = perceiver_io_clm
    if change == "extra tensor":
        tensors["backend_model.stray"] = torch.zeros(3)
    elif change == "missing tensor":
        del tensors["backend_model.output_adapter.bias"]
    elif change == "wrong inv_freq":
        tensors["backend_model.input_adapter.frq_pos_encoding.inv_freq"] *= 2
    else:
        model_config["attention_sinks"] = 4
    source = save_perceiver_io_dir(tmp_path / "lib", "perceiver-ar-causal-language-model", model_config, tensors)
    status, _, err = run_cli(capsys, "convert", "--from", "hf", str(source), str(tmp_path / "out.ckpt"))
    assert status == 2
    assert message in err and err.startswith(f"error: {source}")
    assert not (tmp_path / "out.ckpt").exists()


# ---------------------------------------------------------------------------------------------------------------
# Plain safetensors
# ---------------------------------------------------------------------------------------------------------------


def test_to_safetensors_writes_weights_with_the_config_in_the_metadata(tmp_path, capsys):
    config = tiny_clm_config()
    model = random_model(CausalLanguageModel(config))
    write_checkpoint(tmp_path / "clm.ckpt", "clm", model, config)
    out = tmp_path / "weights.safetensors"
    assert run_cli(capsys, "convert", "--to", "safetensors", "--model", str(tmp_path / "clm.ckpt"), str(out))[0] == 0
    loaded = load_model(out, task="clm")
    assert loaded.config == config
    assert_same_weights(loaded.model, model)


# ---------------------------------------------------------------------------------------------------------------
# Errors: exit status 2, one line (and maybe a hint), no traceback
# ---------------------------------------------------------------------------------------------------------------


def assert_user_error(result, *fragments: str) -> None:
    status, _, err = result
    assert status == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert len(err.splitlines()) <= 2  # the message and an optional hint
    for fragment in fragments:
        assert fragment in err


@pytest.fixture
def mlm_ckpt(tmp_path):
    config = tiny_mlm_config()
    return write_checkpoint(tmp_path / "mlm.ckpt", "mlm", MaskedLanguageModel(config), config)


def test_wrong_option_combinations(mlm_ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    cases = [
        ((out,), "give either --to hf|safetensors (export) or --from hf"),
        (("--to", "hf", "--from", "hf", out), "give either"),
        (("--to", "onnx", out), "unknown --to 'onnx'"),
        (("--from", "gguf", out), "unknown --from 'gguf'"),
        (("--to", "hf", str(mlm_ckpt), out), "--to hf writes one output"),
        (("--to", "safetensors", "--remote-code", out), "--remote-code goes with --to hf"),
        (("--from", "hf", "--model", str(mlm_ckpt), out), "--model names a model to export"),
        (("--from", "hf", "--remote-code", out), "--remote-code goes with --to hf"),
        (("--to", "hf", "--remote-code", "--model", str(mlm_ckpt), out), "--remote-code is for causal LMs"),
    ]
    for args, fragment in cases:
        assert_user_error(run_cli(capsys, "convert", *args), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlm.ckpt"]


def test_missing_and_broken_inputs(tmp_path, capsys):
    def convert_in(directory):
        return run_cli(capsys, "convert", "--from", "hf", str(directory), str(tmp_path / "out.ckpt"))

    assert_user_error(convert_in(tmp_path / "nowhere"), "is not a directory")
    (tmp_path / "empty").mkdir()
    assert_user_error(convert_in(tmp_path / "empty"), "has no config.json")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"d_model": 8}')
    assert_user_error(convert_in(broken), "has no model_type")
    (broken / "config.json").write_text('{"model_type": "bert"}')
    assert_user_error(
        convert_in(broken), "unknown model_type 'bert'", "'perceiver'", "'perceiver-ar-causal-language-model'"
    )

    (broken / "config.json").write_text('{"model_type": "perceiver", "architectures": ["PerceiverForMaskedLM"]}')
    assert_user_error(convert_in(broken), "holds no tokenizer files")
    PerceiverTokenizer().save_pretrained(broken)
    assert_user_error(convert_in(broken), "holds no weights")

    save_file({"x": torch.zeros(1000)}, broken / "model.safetensors")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(convert_in(broken), "model.safetensors", "truncated")

    (broken / "model.safetensors").unlink()
    # Any object outside tensors and plain containers could run code while unpickled.
    torch.save({"weight": torch.zeros(2), "when": datetime.date(2024, 1, 1)}, broken / "pytorch_model.bin")
    assert_user_error(convert_in(broken), "refusing to load", "pickled Python objects")
    assert not (tmp_path / "out.ckpt").exists()


def test_existing_outputs_are_replaced_only_with_force(tmp_path, capsys):
    config = tiny_clm_config()
    ckpt = write_checkpoint(tmp_path / "clm.ckpt", "clm", CausalLanguageModel(config), config)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old-file").write_text("keep me")
    export = ("convert", "--to", "hf", "--model", str(ckpt), str(out))
    assert_user_error(run_cli(capsys, *export), "already exists", "--force")
    assert [p.name for p in out.iterdir()] == ["old-file"]

    assert run_cli(capsys, *export, "--force")[0] == 0
    assert "old-file" not in {p.name for p in out.iterdir()} and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clm.ckpt", "hf"]  # no staging directories left

    back = tmp_path / "back.ckpt"
    back.write_text("old")
    assert_user_error(run_cli(capsys, "convert", "--from", "hf", str(out), str(back)), "already exists")
    assert run_cli(capsys, "convert", "--from", "hf", str(out), str(back), "--force")[0] == 0
    assert load_model(back).task == "clm"
