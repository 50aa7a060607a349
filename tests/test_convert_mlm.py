"""`perceiver convert` for masked LMs: transformers' PerceiverForMaskedLM in and out, numerically exact."""

import json

import pytest
import torch
from cli_runner import run_cli
from isolated_python import run_isolated
from safetensors.torch import load_file
from tiny_models import tiny_mlm_config
from transformers import PerceiverConfig, PerceiverForMaskedLM, PerceiverTokenizer

from perceiver_cli.checkpoints import load_model, write_checkpoint
from perceiver_cli.models.mlm import MaskedLanguageModel

MAX_SEQ_LEN = 40
MASK, PAD = 3, 0


def save_random_hf_mlm(directory, **config):
    """A PerceiverForMaskedLM with every parameter random (LayerNorms included), saved with its tokenizer."""
    torch.manual_seed(0)
    model = PerceiverForMaskedLM(PerceiverConfig(vocab_size=262, max_position_embeddings=MAX_SEQ_LEN, **config))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    PerceiverTokenizer().save_pretrained(directory)
    return directory


# Deliberately uneven: different head counts for cross- and self-attention, widening factors above 1, qk channels
# unlike the latent channels, and two blocks applying the same (shared) self-attention layers.
UNEVEN = dict(
    num_latents=12,
    d_latents=96,
    d_model=48,
    num_blocks=2,
    num_self_attends_per_block=3,
    num_self_attention_heads=4,
    num_cross_attention_heads=2,
    qk_channels=32,
    v_channels=96,
    cross_attention_widening_factor=2,
    self_attention_widening_factor=3,
    attention_probs_dropout_prob=0.0,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_random_hf_mlm(tmp_path_factory.mktemp("hf") / "uneven-perceiver", **UNEVEN)


def padded_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) pairs with [MASK] tokens and right padding, full and shorter than max_seq_len."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for n, lengths in ((MAX_SEQ_LEN, (40, 31, 9)), (25, (25, 17))):
        ids = torch.randint(6, 262, (len(lengths), n), generator=generator)
        mask = torch.zeros(len(lengths), n, dtype=torch.long)
        for row, length in enumerate(lengths):
            mask[row, :length] = 1
            ids[row, length:] = PAD
            ids[row, torch.randperm(length, generator=generator)[:3]] = MASK
        batches.append((ids, mask))
    return batches


def test_import_gives_the_logits_of_transformers(hf_dir, tmp_path, capsys):
    ckpt = tmp_path / "imported.ckpt"
    status, out, err = run_cli(capsys, "convert", "--from", "hf", str(hf_dir), str(ckpt))
    assert status == 0, err
    assert str(ckpt) in out
    loaded = load_model(ckpt, task="mlm")
    assert loaded.tokenizer == "utf8"
    hf = PerceiverForMaskedLM.from_pretrained(hf_dir).eval()
    ours = loaded.model

    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        hf.to(dtype)
        ours.to(dtype)
        for ids, mask in padded_batches():
            with torch.no_grad():
                expected = hf(input_ids=ids, attention_mask=mask).logits[:, : ids.shape[1]]
                actual = ours(ids, pad_mask=mask == 0)
            assert (expected - actual).abs().max().item() <= tolerance, dtype


def test_export_loads_in_stock_transformers_without_perceiver_cli(hf_dir, tmp_path, capsys):
    ckpt, out_dir = tmp_path / "imported.ckpt", tmp_path / "exported"
    assert run_cli(capsys, "convert", "--from", "hf", str(hf_dir), str(ckpt))[0] == 0
    status, out, err = run_cli(capsys, "convert", "--to", "hf", "--model", str(ckpt), str(out_dir))
    assert status == 0, err
    assert "AutoModelForMaskedLM" in out

    ours = load_model(ckpt).model
    ids, mask = padded_batches()[0]
    with torch.no_grad():
        torch.save({"ids": ids, "mask": mask, "ours": ours(ids, pad_mask=mask == 0)}, tmp_path / "batch.pt")
    script = f"""
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, pipeline

exported, info = AutoModelForMaskedLM.from_pretrained("exported", output_loading_info=True)
source = AutoModelForMaskedLM.from_pretrained({str(hf_dir)!r})
batch = torch.load("batch.pt")
with torch.no_grad():
    logits = exported(input_ids=batch["ids"], attention_mask=batch["mask"]).logits
    source_logits = source(input_ids=batch["ids"], attention_mask=batch["mask"]).logits
a, b = exported.state_dict(), source.state_dict()
files = load_file("exported/model.safetensors"), load_file({str(hf_dir / "model.safetensors")!r})
candidates = pipeline("fill-mask", model="exported")("The [MASK]at")
print(json.dumps({{
    "class": type(exported).__name__,
    "loading_info": {{key: list(map(str, value)) for key, value in info.items()}},
    "same_names": sorted(a) == sorted(b) and sorted(files[0]) == sorted(files[1]),
    "tensors_identical": all(torch.equal(a[k], b[k]) for k in a)
        and all(torch.equal(files[0][k], files[1][k]) for k in files[1]),
    "logits_identical": torch.equal(logits, source_logits),
    "max_diff_to_ours": (logits - batch["ours"]).abs().max().item(),
    "fill_mask": [sorted(c) for c in candidates],
}}))
"""
    result, isolation = run_isolated(script, cwd=tmp_path)
    assert isolation == {"perceiver_cli_imported": False, "perceiver_cli_importable": False}
    assert result["class"] == "PerceiverForMaskedLM"
    assert all(not value for value in result["loading_info"].values()), result["loading_info"]
    assert result["same_names"] and result["tensors_identical"] and result["logits_identical"]
    assert result["max_diff_to_ours"] <= 1e-5
    assert result["fill_mask"] == [["score", "sequence", "token", "token_str"]] * 5


def test_round_trip_is_bit_exact(hf_dir, tmp_path, capsys):
    first, exported, second = tmp_path / "first.ckpt", tmp_path / "exported", tmp_path / "second.ckpt"
    for args in (
        ("--from", "hf", str(hf_dir), str(first)),
        ("--to", "hf", "--model", str(first), str(exported)),
        ("--from", "hf", str(exported), str(second)),
    ):
        assert run_cli(capsys, "convert", *args)[0] == 0
    a, b = load_model(first).model.state_dict(), load_model(second).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    source, copy = load_file(hf_dir / "model.safetensors"), load_file(exported / "model.safetensors")
    assert source.keys() == copy.keys() and all(torch.equal(source[k], copy[k]) for k in source)


def test_sharded_weights_convert(hf_dir, tmp_path, capsys):
    sharded = tmp_path / "sharded"
    PerceiverForMaskedLM.from_pretrained(hf_dir).save_pretrained(sharded, max_shard_size="300KB")
    PerceiverTokenizer().save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    for directory, ckpt in ((hf_dir, "whole.ckpt"), (sharded, "sharded.ckpt")):
        assert run_cli(capsys, "convert", "--from", "hf", str(directory), str(tmp_path / ckpt))[0] == 0
    a = load_model(tmp_path / "whole.ckpt").model.state_dict()
    b = load_model(tmp_path / "sharded.ckpt").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_transformers_default_attention_channels_convert_both_ways(tmp_path, capsys):
    # qk_channels and v_channels unset: transformers derives the cross-attention's from the inputs (d_model) and
    # the self-attention's from the latents, which our config states explicitly and the export unsets again.
    hf_dir = save_random_hf_mlm(
        tmp_path / "defaults", num_latents=8, d_latents=48, d_model=32, num_self_attends_per_block=2,
        num_self_attention_heads=4, num_cross_attention_heads=2, attention_probs_dropout_prob=0.0,
    )
    ckpt, exported = tmp_path / "defaults.ckpt", tmp_path / "exported"
    assert run_cli(capsys, "convert", "--from", "hf", str(hf_dir))[0] == 0  # default output: next to the input
    assert ckpt.is_file()
    encoder = load_model(ckpt).config.encoder
    assert (encoder.num_cross_attention_qk_channels, encoder.num_self_attention_qk_channels) == (32, 48)
    assert run_cli(capsys, "convert", "--to", "hf", "--model", str(ckpt), str(exported))[0] == 0
    config = json.loads((exported / "config.json").read_text())
    assert config.get("qk_channels") is None and config.get("v_channels") is None
    source, copy = load_file(hf_dir / "model.safetensors"), load_file(exported / "model.safetensors")
    assert source.keys() == copy.keys() and all(torch.equal(source[k], copy[k]) for k in source)


def test_inexpressible_model_is_refused_with_every_difference(tmp_path, capsys):
    config = tiny_mlm_config()  # decoder: 4 heads, 16 query/key channels
    config.decoder.cross_attention_residual = True
    config.decoder.cross_attention_widening_factor = 2
    config.encoder.num_self_attention_qk_channels = 8  # the cross-attention has 16
    config.encoder.first_self_attention_block_shared = False
    config.decoder.dropout = 0.1
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt", "mlm", MaskedLanguageModel(config), config)

    status, _, err = run_cli(capsys, "convert", "--to", "hf", "--model", str(ckpt), str(tmp_path / "out"))
    assert status == 2
    message = err.splitlines()[0]
    assert message.startswith("error: this masked LM cannot be exported as a transformers PerceiverForMaskedLM")
    for difference in (
        "decoder.num_cross_attention_heads is 4 (must be 8)",
        "decoder query/key channels are 16 (must be 256)",
        "decoder.cross_attention_widening_factor is 2 (must be 1)",
        "decoder.cross_attention_residual is true (must be false)",
        "encoder.first_self_attention_block_shared is false",
        "cross-attention query/key 16, value 48; self-attention query/key 8, value 48",
        "decoder.dropout (0.1) differs from encoder.dropout (0.0)",
    ):
        assert difference in message
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.ckpt"]  # nothing written, nothing left behind


def test_mlm_small_with_block_routing_exports_with_identical_logits(tmp_path, capsys):
    """The default preset's layout (block routing, 65 latents, 8 cross-attention heads) is one transformers can
    express: the export gives our logits."""
    from perceiver_cli.config import load_run_config

    config = load_run_config("mlm-small")[0].backend_config(262)
    assert config.routing_init == "blocks"
    torch.manual_seed(0)
    ours = MaskedLanguageModel(config).eval()
    ckpt = write_checkpoint(tmp_path / "mlm-small.ckpt", "mlm", ours, config)
    status, _, err = run_cli(capsys, "convert", "--to", "hf", "--model", str(ckpt), str(tmp_path / "hf"))
    assert status == 0, err
    hf = PerceiverForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(6, 262, (2, config.encoder.max_seq_len), generator=torch.Generator().manual_seed(0))
    ids[:, ::7] = MASK
    with torch.no_grad():  # in float64: the routing's sharp attention amplifies float32 rounding (1.8e-5 seen)
        assert (hf.double()(input_ids=ids).logits - ours.double()(ids)).abs().max().item() <= 1e-10
