"""`perceiver fill-mask`: tokenization as the Hugging Face pipeline does it, candidates in the pipeline's shape,
and clear errors."""

import json

import pytest
import torch
from transformers import PerceiverTokenizer

from perceiver_cli.commands.fill_mask import best_filling, encode_with_masks, predict_masks
from perceiver_cli.data.tokenizer import load_tokenizer
from perceiver_cli.models.clm import CausalLanguageModel
from perceiver_cli.models.mlm import MaskedLanguageModel
from tiny_models import tiny_clm_config, tiny_mlm_config
from cli_runner import assert_one_error, run_cli, write_run

TEXT = "The capital of France is [MASK][MASK][MASK][MASK][MASK]."


def mlm() -> MaskedLanguageModel:
    torch.manual_seed(0)
    config = tiny_mlm_config(max_seq_len=64)
    config.encoder.init_scale = config.decoder.init_scale = 0.2  # spread the scores a little
    return MaskedLanguageModel(config).eval()


def test_input_ids_are_the_pipelines_with_a_mask_per_marker():
    tokenizer = load_tokenizer("utf8")
    ids = encode_with_masks(tokenizer, TEXT, max_seq_len=64)
    assert ids == PerceiverTokenizer()(TEXT)["input_ids"]
    text_bytes = TEXT.replace("[MASK]", "\0").encode()  # one byte per mask
    expected = [4] + [3 if b == 0 else b + 6 for b in text_bytes] + [5]  # [CLS] ... [SEP], [MASK] = 3
    assert ids == expected


def test_top_k_candidates_per_mask_with_scores_that_sum_to_at_most_one():
    tokenizer = load_tokenizer("utf8")
    candidates = predict_masks(mlm(), tokenizer, TEXT, top_k=7)
    assert len(candidates) == 5
    for row in candidates:
        assert len(row) == 7
        scores = [c["score"] for c in row]
        assert scores == sorted(scores, reverse=True)
        assert all(0 <= s <= 1 for s in scores) and sum(scores) <= 1 + 1e-6
        for c in row:
            assert set(c) == {"score", "token", "token_str", "sequence"}
            assert c["token_str"] == tokenizer.decode([c["token"]])
            # Several masks: like the pipeline, the sequence keeps the special tokens, so the other masks show.
            assert c["sequence"].startswith("[CLS]") and c["sequence"].count("[MASK]") == 4


def test_single_mask_sequence_is_the_filled_text():
    tokenizer = load_tokenizer("utf8")
    [row] = predict_masks(mlm(), tokenizer, "ab[MASK]d", top_k=10)
    bytes_ = [c for c in row if c["token"] >= 6]  # a special token as candidate leaves the sequence as "abd"
    assert bytes_
    for c in bytes_:
        assert c["sequence"] == "ab" + c["token_str"] + "d"


def test_best_filling_takes_the_first_candidate_of_each_mask():
    tokenizer = load_tokenizer("utf8")
    candidates = [[{"token": ord("x") + 6}], [{"token": ord("y") + 6}]]
    assert best_filling(tokenizer, "a[MASK]b[MASK]", candidates) == "axby"


def test_decoding_only_the_masked_positions_gives_the_full_pass_scores():
    model, tokenizer = mlm(), load_tokenizer("utf8")
    ids = encode_with_masks(tokenizer, TEXT, 64)
    full = model(torch.tensor([ids]))[0].softmax(dim=-1)  # (M, V)
    for position, row in zip([i for i, t in enumerate(ids) if t == 3], predict_masks(model, tokenizer, TEXT, 3)):
        assert row[0]["token"] == full[position].argmax().item()
        assert row[0]["score"] == pytest.approx(full[position].max().item(), abs=1e-6)


# --- the command ---------------------------------------------------------------------------------------------------


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PERCEIVER_DEBUG", "0")
    model = mlm()
    write_run(tmp_path, "mlm-tiny", "mlm", model, model.config)
    clm_config = tiny_clm_config()
    write_run(tmp_path, "clm-tiny", "clm", CausalLanguageModel(clm_config), clm_config)
    return tmp_path


def test_json_has_the_pipelines_shape(runs, capsys):
    status, out, err = run_cli(capsys, "fill-mask", "ab[MASK]d", "--json", "--top-k", "3")
    assert status == 0 and "using runs/mlm-tiny/version_0 (most recent mlm run)" in err
    one = json.loads(out)  # one mask: a list of candidates
    assert len(one) == 3 and all(set(c) == {"score", "token", "token_str", "sequence"} for c in one)
    status, out, _ = run_cli(capsys, "fill-mask", "a[MASK]b[MASK]", "--json", "--top-k", "2")
    several = json.loads(out)  # several masks: a list of candidates per mask
    assert [len(row) for row in several] == [2, 2] and isinstance(several[0][0]["score"], float)


def test_table_shows_candidates_and_the_most_likely_filling(runs, capsys):
    status, out, _ = run_cli(capsys, "fill-mask", TEXT)
    assert status == 0
    assert "score" in out and "token" in out
    assert out.splitlines()[-1].startswith("most likely filling: The capital of France is ")


@pytest.mark.parametrize(
    "args, message",
    [
        (["fill-mask", "no mask here"], "no [MASK] in the text"),
        (["fill-mask", ""], "the text is empty"),
        (["fill-mask", "[MASK]" + "x" * 70], "more than the model's max_seq_len (64)"),
        (["fill-mask", "[MASK]", "--top-k", "0"], "top-k must be at least 1"),
        (["fill-mask", "[MASK]", "--model", "runs/clm-tiny/version_0"], "needs a masked language model"),
        (["fill-mask", "[MASK]", "--model", "missing.ckpt"], "model not found"),
        (["fill-mask", "[MASK]", "--device", "cuda:99"], "device"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(runs, capsys, args, message):
    status, out, err = run_cli(capsys, *args)
    assert_one_error(status, err, message, out)


def test_no_run_says_how_to_train_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_cli(capsys, "fill-mask", "[MASK]")
    assert status == 2 and "perceiver train --preset mlm-small" in err

