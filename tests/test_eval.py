"""`perceiver eval`: every token scored once by the strided window, bits per byte consistent with the loss and the
byte count, masked-LM metrics, the run's data by default, any text scored whole with --path, a bounded context
(--context) and the context curve, and clear errors."""

import json
import math
from pathlib import Path

import pytest
import torch

from perceiver_cli.data.tokenizer import load_tokenizer
from perceiver_cli.evaluation import clm_token_stream, context_window, evaluate_clm, evaluate_word_fill
from perceiver_cli.models.clm.windows import scoring_windows
from perceiver_cli.models.clm import CausalLanguageModel
from perceiver_cli.models.mlm import MaskedLanguageModel
from tiny_models import tiny_clm_config, tiny_mlm_config
from cli_runner import assert_one_error, run_cli, write_run


@pytest.mark.parametrize("num_tokens", [2, 5, 12, 13, 48, 49, 50, 200])
def test_windows_score_every_token_once_with_as_much_context_as_fits(num_tokens):
    max_seq_len, max_latents = 48, 12
    scored = []
    for lo, hi, k in scoring_windows(num_tokens - 1, max_seq_len, max_latents):  # inputs lo .. hi-1
        assert lo == max(0, hi - max_seq_len)  # the window reaches back as far as the model reads
        assert 1 <= k <= min(max_latents, hi - lo)  # scored tokens sit at latent positions
        scored += range(hi - k + 1, hi + 1)  # the targets: the tokens after the last k inputs
    assert scored == list(range(1, num_tokens))


def test_token_stream_starts_with_a_separator_and_counts_bytes():
    tokenizer = load_tokenizer("utf8")
    stream, num_bytes = clm_token_stream(tokenizer, ["héllo", "", "  ", "wörld"])
    # Empty documents are dropped as in training; each document is followed by EOS (2).
    assert stream == [2, *(b + 6 for b in "héllo".encode()), 2, *(b + 6 for b in "wörld".encode()), 2]
    assert num_bytes == len("héllo".encode()) + 1 + len("wörld".encode()) + 1 == len(stream) - 1


def clm() -> CausalLanguageModel:
    torch.manual_seed(0)
    return CausalLanguageModel(tiny_clm_config(cross_attention_dropout=0.0, init_scale=0.2)).eval()


def test_bits_per_byte_is_consistent_with_loss_and_bytes():
    tokenizer = load_tokenizer("utf8")
    stream, num_bytes = clm_token_stream(tokenizer, ["Perceiver AR reads long contexts.", "Ünïcödé text, too."] * 3)
    result = evaluate_clm(clm(), stream, num_bytes, batch_size=4)
    assert result["tokens"] == len(stream) - 1 == result["bytes"]  # utf8: one token per byte (EOS counts one)
    total_nll = result["loss"] * result["tokens"]
    assert result["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / result["bytes"], rel=1e-12)
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2), rel=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_batching_windows_of_different_lengths_changes_nothing():
    # The first windows are shorter than max_seq_len; in a batch they are left-padded.
    tokenizer = load_tokenizer("utf8")
    stream, num_bytes = clm_token_stream(tokenizer, ["a few words of text, " * 8])
    model = clm()
    one = evaluate_clm(model, stream, num_bytes, batch_size=1)
    many = evaluate_clm(model, stream, num_bytes, batch_size=5)
    assert one["loss"] == pytest.approx(many["loss"], abs=1e-5)


def test_loss_of_the_first_window_is_the_models_loss_on_it():
    tokenizer = load_tokenizer("utf8")
    stream, num_bytes = clm_token_stream(tokenizer, ["short text"])  # 12 tokens: one window, 11 targets
    model = clm()
    x, y = torch.tensor([stream[:-1]]), torch.tensor(stream[1:])
    expected = torch.nn.functional.cross_entropy(model(x, 0)[0], y).item()
    assert evaluate_clm(model, stream, num_bytes, batch_size=1)["loss"] == pytest.approx(expected, abs=1e-5)


# --- the command ---------------------------------------------------------------------------------------------------


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A clm run trained (in its preset) on corpus.txt, an mlm run on the embedded corpus, and other.txt."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PERCEIVER_DEBUG", "0")
    words = "the cat sat on a mat while dogs ran round the garden and birds sang über café".split()
    generator = torch.Generator().manual_seed(0)
    for name in ("corpus.txt", "other.txt"):
        paragraphs = [
            " ".join(words[int(i)] for i in torch.randint(len(words), (int(n),), generator=generator))
            for n in torch.randint(5, 30, (30,), generator=generator)
        ]
        Path(name).write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    model = clm()
    clm_run = {"model": {"task": "clm"}, "data": {"source": "files", "path": "corpus.txt", "batch_size": 4}}
    write_run(tmp_path, "clm-tiny", "clm", model, model.config, clm_run)
    torch.manual_seed(0)
    mlm_config = tiny_mlm_config()
    write_run(tmp_path, "mlm-tiny", "mlm", MaskedLanguageModel(mlm_config), mlm_config, {"model": {"task": "mlm"}})
    return tmp_path


CLM = "runs/clm-tiny/version_0"
MLM = "runs/mlm-tiny/version_0"


def test_clm_eval_uses_the_runs_data_and_reports_json(runs, capsys):
    status, out, _ = run_cli(capsys, "eval", "--model", CLM, "--json")
    assert status == 0
    result = json.loads(out)
    assert set(result) == {
        "task", "model", "split", "data", "documents", "loss", "perplexity", "bits_per_byte", "tokens", "bytes",
        "window", "stride",
    }  # fmt: skip
    assert result["data"] == {"source": "files", "path": "corpus.txt", "text_column": "text"}
    assert result["split"] == "validation" and result["tokens"] == result["bytes"]
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2))
    assert (result["window"], result["stride"]) == (48, 12)


def test_data_options_override_the_runs_data(runs, capsys):
    _, out, _ = run_cli(capsys, "eval", "--model", CLM, "--json", "--path", "other.txt")
    result = json.loads(out)
    assert result["data"]["path"] == "other.txt"
    assert result["split"] == "all" and result["documents"] == 30  # all of it, no validation split
    _, limited, _ = run_cli(capsys, "eval", "--model", CLM, "--json", "--path", "other.txt", "--limit", "2")
    assert json.loads(limited)["documents"] <= 2


def test_mlm_eval_reports_masked_loss_and_accuracy_but_no_perplexity(runs, capsys):
    args = ["eval", "--model", MLM, "--json", "--path", "corpus.txt", "--limit", "10"]
    status, out, _ = run_cli(capsys, *args)
    assert status == 0
    result = json.loads(out)
    assert {"loss", "accuracy", "masked_tokens", "sequences", "word_accuracy", "words"} <= set(result)
    assert "perplexity" not in result and "bits_per_byte" not in result
    assert 0 <= result["accuracy"] <= 1 and result["masked_tokens"] > 0
    assert 0 <= result["word_accuracy"] <= 1 and result["words"] > 0
    _, again, _ = run_cli(capsys, *args)
    again = json.loads(again)
    assert (again["loss"], again["word_accuracy"]) == (result["loss"], result["word_accuracy"])  # fixed draws
    _, without_words, _ = run_cli(capsys, *args, "--words", "0")
    assert "word_accuracy" not in json.loads(without_words)


class Oracle(torch.nn.Module):
    """A masked LM that knows the chunks: it finds the chunk behind each masked row and predicts its tokens, except
    at the positions in `wrong_at` (offsets into the masked word), where it predicts [PAD]. It records what it saw."""

    def __init__(self, chunks: list[list[int]], mask_id: int, wrong_at: tuple[int, ...] = ()):
        super().__init__()
        self.chunks, self.mask_id, self.wrong_at, self.seen = chunks, mask_id, wrong_at, []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, pad_mask=None, output_positions=None):
        logits = torch.zeros(*output_positions.shape, 262)
        for b, (row, positions) in enumerate(zip(x.tolist(), output_positions.tolist())):
            original = next(c for c in self.chunks
                            if len(c) <= len(row) and all(r in (t, self.mask_id) for r, t in zip(row, c)))
            self.seen.append((original, row[:len(original)], positions))
            for k, p in enumerate(positions):
                logits[b, k, 0 if k in self.wrong_at else original[p]] = 1.0
        return logits


def word_fill_chunks():
    from datasets import Dataset

    tokenizer = load_tokenizer("utf8")
    texts = ["Return the number of bytes, or None.", "x = 1 if the flag is set", "an ünïcode word list here"]
    chunks = [tokenizer(text)["input_ids"] for text in texts]  # [CLS] bytes [SEP], of different lengths
    return tokenizer, chunks, Dataset.from_dict({"input_ids": chunks})


def test_word_fill_masks_whole_words_of_letters_alone_and_counts_exact_fills():
    tokenizer, chunks, dataset = word_fill_chunks()
    oracle = Oracle(chunks, tokenizer.mask_token_id)
    result = evaluate_word_fill(oracle, tokenizer, dataset, num_words=100, seed=0, batch_size=4)
    assert result == {"word_accuracy": 1.0, "words": len(oracle.seen)}
    filled = []
    for original, masked, positions in oracle.seen:
        assert positions == list(range(positions[0], positions[-1] + 1))  # one word, all of its tokens
        assert all(masked[p] == tokenizer.mask_token_id for p in positions)
        assert [t for p, t in enumerate(masked) if p not in positions] == [
            t for p, t in enumerate(original) if p not in positions]  # nothing else changed
        filled.append(tokenizer.decode(original[positions[0]:positions[-1] + 1]))
    # Every word of letters between other tokens, each once: not "bytes," or "None." (punctuation), "Return", "x",
    # "an" and "here" (beside [CLS] or [SEP]: perhaps cut by the chunk's edge), nor "1" and "=".
    expected = ["the", "number", "of", "or", "if", "the", "flag", "is", "ünïcode", "word", "list"]
    assert sorted(filled) == sorted(expected)


def test_word_fill_counts_a_word_with_one_wrong_token_as_wrong_and_draws_by_seed():
    tokenizer, chunks, dataset = word_fill_chunks()
    wrong_second = Oracle(chunks, tokenizer.mask_token_id, wrong_at=(1,))  # every word of two letters or more fails
    result = evaluate_word_fill(wrong_second, tokenizer, dataset, num_words=100, seed=0)
    assert result == {"word_accuracy": 0.0, "words": 11}
    draws = []
    for seed in (0, 0, 1):
        oracle = Oracle(chunks, tokenizer.mask_token_id)
        evaluate_word_fill(oracle, tokenizer, dataset, num_words=3, seed=seed)
        draws.append(sorted(tuple(positions) for _, _, positions in oracle.seen))
    assert draws[0] == draws[1] != draws[2] and len(draws[0]) == 3


def test_table_by_default(runs, capsys):
    status, out, err = run_cli(capsys, "eval", "--limit", "3", "--path", "corpus.txt")
    assert status == 0
    assert "using runs/" in err and "(most recent run)" in err
    assert "loss" in out and "documents" in out


# --- any text, whole ------------------------------------------------------------------------------------------------


def test_path_scores_a_one_document_file_whole(runs, capsys):
    text = "Ein einziges Dokument, ohne Leerzeile: zu kurz, um eine Validierung abzuspalten. " * 3
    Path("one.txt").write_text(text.strip(), encoding="utf-8")
    status, out, err = run_cli(capsys, "eval", "--model", CLM, "--json", "--path", "one.txt")
    assert status == 0, err
    result = json.loads(out)
    assert (result["split"], result["documents"]) == ("all", 1)
    assert result["bytes"] == len(text.strip().encode("utf-8")) + 1 == result["tokens"]  # + 1: the separator


def test_path_scores_a_directory_of_validation_files_only(runs, capsys):
    texts = ["first validation document", "zweites Dokument über Käse", "third"]
    Path("held-out").mkdir()
    Path("held-out/validation.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), "utf-8")
    status, out, err = run_cli(capsys, "eval", "--model", CLM, "--json", "--path", "held-out")
    assert status == 0, err
    result = json.loads(out)
    assert (result["split"], result["documents"]) == ("all", 3)
    assert result["bytes"] == sum(len(t.encode("utf-8")) + 1 for t in texts) == result["tokens"]


# --- a bounded context ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_latents", [64, 16])
def test_a_context_gives_every_token_three_quarters_of_it_to_all_of_it(max_latents):
    context, num_tokens = 256, 1500
    length, stride = context_window(1024, max_latents, context)
    assert (length, stride) == (256, min(max_latents, 64))
    scored = []
    for lo, hi, k in scoring_windows(num_tokens - 1, length, stride):
        for position in range(hi - k, hi):  # input position p predicts token p + 1 from tokens lo .. p
            seen = position + 1 - lo
            assert seen <= context
            if position + 1 >= context:  # once the stream is that long
                assert context - stride + 1 <= seen
            scored.append(position + 1)
    assert scored == list(range(1, num_tokens))  # every token once


def eval_text(capsys, text: str, *options: str) -> dict:
    """`perceiver eval --json` of the tiny causal LM on a file that holds `text`, with `options`."""
    Path("text.txt").write_text(text, encoding="utf-8")
    status, out, err = run_cli(capsys, "eval", "--model", CLM, "--json", "--path", "text.txt", *options)
    assert status == 0, err
    return json.loads(out)


def nll_by_hand(model, stream: list[int], context: int) -> float:
    """The summed loss of every token of `stream` after the first, each predicted by its own pass over exactly the
    `context` tokens before it (fewer at the start), at the last position; as in training, the last max_latents
    positions of a window are latents."""
    total = 0.0
    with torch.inference_mode():
        for t in range(1, len(stream)):
            inputs = torch.tensor([stream[max(0, t - context) : t]])
            logits = model(inputs, max(0, inputs.shape[1] - model.max_latents))[0, -1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(stream[t])).item()
    return total


def test_context_is_the_score_of_each_token_from_its_last_n_tokens(runs, capsys):
    text = "Kurze Zeilen über Käse, und mehr."
    result = eval_text(capsys, text, "--context", "3")
    assert (result["context"], result["window"], result["stride"]) == (3, 3, 1)
    # By hand: token t scored from exactly tokens max(0, t - 3) .. t - 1, one pass each, all of them latents (as
    # in training, the last max_latents positions of a window are latents).
    model = clm()
    stream, num_bytes = clm_token_stream(load_tokenizer("utf8"), [text])
    total_nll = nll_by_hand(model, stream, context=3)
    assert result["tokens"] == len(stream) - 1
    assert result["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / num_bytes, abs=1e-5)
    # The same, batched: windows of different lengths left-padded together change nothing.
    batched = evaluate_clm(model, stream, num_bytes, batch_size=7, context=3)
    assert batched["bits_per_byte"] == pytest.approx(result["bits_per_byte"], abs=1e-5)


def test_stride_scores_each_token_from_the_window_that_ends_at_it(runs, capsys):
    text = "Ein langer Satz über Käse und Brot, der länger ist als das Fenster des kleinen Modells: zweimal so lang."
    result = eval_text(capsys, text, "--stride", "1")
    assert (result["window"], result["stride"]) == (48, 1)
    # By hand: token t scored as the last latent of the window of (up to) 48 tokens before it, one pass each.
    model = clm()
    stream, num_bytes = clm_token_stream(load_tokenizer("utf8"), [text])
    assert len(stream) > 2 * model.max_seq_len  # most windows are full: a prefix of 36 before the 12 latents
    total_nll = nll_by_hand(model, stream, context=48)
    assert result["tokens"] == len(stream) - 1
    assert result["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / num_bytes, abs=1e-5)
    # Between 1 and the latents, a stride trades passes for context: the default (all 12 latents) differs.
    default = evaluate_clm(model, stream, num_bytes, batch_size=4)
    assert default["stride"] == 12 and default["bits_per_byte"] != pytest.approx(result["bits_per_byte"], abs=1e-6)


def test_a_context_whose_stride_is_below_the_latents_keeps_the_trained_prefix_length():
    # Window 48 with 24 latents (prefix at most 24): context 48 scores 12 tokens a window, yet each window still has
    # its 24 latents; a prefix of 36 would be longer than the model was built for.
    torch.manual_seed(0)
    model = CausalLanguageModel(tiny_clm_config(max_latents=24, cross_attention_dropout=0.0)).eval()
    stream = torch.randint(6, 262, (300,)).tolist()
    result = evaluate_clm(model, stream, len(stream), batch_size=4, context=48)
    assert (result["window"], result["stride"], result["tokens"]) == (48, 12, len(stream) - 1)
    # Scoring 12 of the 24 latents of each window gives each token more context than the default stride of 24.
    default = evaluate_clm(model, stream, len(stream), batch_size=4)
    assert default["stride"] == 24 and result["bits_per_byte"] != default["bits_per_byte"]


def test_context_of_the_whole_window_is_the_default_score_here(runs, capsys):
    # The tiny model's window is 48 and its latents 12 = 48 // 4: the same windows as without --context.
    _, default, _ = run_cli(capsys, "eval", "--model", CLM, "--json", "--path", "other.txt")
    _, full, _ = run_cli(capsys, "eval", "--model", CLM, "--json", "--path", "other.txt", "--context", "48")
    default, full = json.loads(default), json.loads(full)
    assert "context" not in default and (full["context"], full["window"], full["stride"]) == (48, 48, 12)
    assert full["bits_per_byte"] == pytest.approx(default["bits_per_byte"], abs=1e-9)


def test_context_curve_draws_a_png_and_lists_the_contexts(runs, capsys):
    torch.manual_seed(0)
    config = tiny_clm_config(max_seq_len=320, max_latents=64, cross_attention_dropout=0.0)
    write_run(runs, "clm-long", "clm", CausalLanguageModel(config), config, {"model": {"task": "clm"}})
    args = ["eval", "--model", "runs/clm-long/version_0", "--path", "other.txt", "--context-curve"]
    status, out, err = run_cli(capsys, *args, "--json", "--plot", "curve.png")
    assert status == 0, err
    result = json.loads(out)
    curve = result["context_curve"]
    assert [point["context"] for point in curve] == [64, 256, 320]
    assert [point["stride"] for point in curve] == [16, 64, 64]
    assert all(point["tokens"] == result["bytes"] for point in curve)  # every byte scored at every context
    assert {"loss", "bits_per_byte"} <= set(curve[0]) and result["plot"] == "curve.png"
    assert Path("curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    status, out, err = run_cli(capsys, *args)  # the table, and the default plot file
    assert status == 0, err
    assert "bits per byte" in out and "context-curve.png" in out
    assert Path("context-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--split", "test"], "unknown split 'test'"),
        (["eval", "--limit", "0"], "--limit must be at least 1"),
        (["eval", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["eval", "--words", "-1"], "--words must be 0"),
        (["eval", "--model", CLM, "--source", "nowhere"], "unknown data source 'nowhere'"),
        (["eval", "--model", CLM, "--path", "missing.txt"], "does not exist"),
        (["eval", "--model", CLM, "--source", "files"], "needs a path"),
        (["eval", "--model", "missing"], "model not found"),
        (["eval", "--model", CLM, "--device", "nonsense"], "device"),
        (["eval", "--model", CLM, "--path", "other.txt", "--split", "train"], "--split train does not go with --path"),
        (["eval", "--model", CLM, "--context", "0"], "--context must be at least 1"),
        (["eval", "--model", CLM, "--context", "49"], "--context must be 1 to the model's window (48 tokens)"),
        (["eval", "--model", CLM, "--context", "8", "--context-curve"], "do not go together"),
        (["eval", "--model", CLM, "--context", "8", "--schedule", "sliding"], "do not go with --schedule"),
        (["eval", "--model", CLM, "--plot", "x.png"], "--plot goes with --context-curve"),
        (["eval", "--model", CLM, "--context-curve", "--plot", "missing/x.png"], "'missing' of --plot does not exist"),
        (["eval", "--model", MLM, "--context", "8"], "for causal LMs"),
        (["eval", "--model", MLM, "--context-curve"], "for causal LMs"),
        (["eval", "--model", CLM, "--stride", "0"], "--stride must be at least 1"),
        (["eval", "--model", CLM, "--stride", "13"], "--stride must be 1 to 12 (the model's latents"),
        (["eval", "--model", CLM, "--context", "8", "--stride", "9"], "--stride must be 1 to 8"),
        (["eval", "--model", CLM, "--stride", "4", "--context-curve"], "--stride does not go with --context-curve"),
        (["eval", "--model", CLM, "--stride", "4", "--schedule", "sliding"], "--stride does not go with --schedule"),
        (["eval", "--model", MLM, "--stride", "4"], "for causal LMs"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(runs, capsys, args, message):
    status, out, err = run_cli(capsys, *args)
    assert_one_error(status, err, message, out)


def test_no_run_says_how_to_train_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_cli(capsys, "eval")
    assert status == 2
    assert "perceiver train --preset clm-small" in err and "perceiver train --preset mlm-small" in err
