"""`perceiver tokenizer train`: a byte-level BPE trained on the run's training text, then a model trained with it,
generating and exported; bits per byte that do not depend on the tokenizer; and the mistakes (exit 2, one line)."""

import json
import math

import pytest

from cli_runner import assert_one_error, run_cli
from perceiver_cli.data.tokenizer import encode_text, load_tokenizer, min_bpe_vocab_size, vocab_size
from test_train import train

UNSEEN = "zyzzogeton"  # only in the validation file: the tokenizer must never learn it


def write_corpus(root):
    """A directory of .txt files: train.txt (about 14 KB) and validation.txt (its own split, by name)."""
    corpus = root / "corpus"
    corpus.mkdir()
    paragraphs = [
        f"Paragraph {i} tells of a river that ran past {i % 17} quiet houses, a mill and the old bridge. "
        f"The miller's {['daughter', 'son', 'dog'][i % 3]} counted {i * 7} boats."
        for i in range(120)
    ]
    (corpus / "train.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    (corpus / "validation.txt").write_text(
        "\n\n".join(f"A {UNSEEN} sat by the river {UNSEEN} and the mill, {i} times." for i in range(20)),
        encoding="utf-8",
    )
    return corpus


def train_tokenizer(capsys, corpus, output, *options: str):
    return run_cli(
        capsys, "tokenizer", "train", "--preset", "clm-small", "--set", "data.source=files",
        "--set", f"data.path={corpus}", "--output", str(output), *options,
    )


def test_train_a_tokenizer_then_a_model_then_generate_and_convert(capsys, tmp_path):
    corpus = write_corpus(tmp_path)
    tokenizer_dir = tmp_path / "bpe"
    code, out, err = train_tokenizer(capsys, corpus, tokenizer_dir, "--vocab-size", "400")
    assert code in (0, None), err
    assert f"wrote {tokenizer_dir}: 400 tokens" in out and f"data.tokenizer={tokenizer_dir}" in out

    # A Hugging Face tokenizer directory that data.tokenizer loads: the pipeline's special tokens, lossless bytes.
    assert (tokenizer_dir / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(str(tokenizer_dir), padding_side="left")
    assert vocab_size(tokenizer) == 400
    assert [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id] == [0, 1, 2]
    assert [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.bos_token_id] == [3, 4, 1]
    text = "The miller's daughter counted 42 boats.\n\nÜnïcödé € [MASK] 🙂"
    ids = encode_text(tokenizer, text)
    english = "The miller's daughter counted 42 boats."
    assert len(encode_text(tokenizer, english)) < len(english) / 3  # merges learnt: far fewer tokens than bytes
    assert tokenizer.decode(ids) == text  # byte-level: every text round-trips, nothing is unknown
    assert tokenizer.mask_token_id not in ids  # "[MASK]" in a text is text (as for training documents)
    assert tokenizer("a[MASK]")["input_ids"][0] == tokenizer.cls_token_id  # fill-mask's [CLS] ... [SEP]
    # Trained on the training split only: a word of the validation file alone is no token.
    assert not any("zyzz" in token for token in tokenizer.get_vocab())

    # A tiny causal LM on the same data with this tokenizer.
    runs = tmp_path / "runs"
    code, out, err = train(capsys, "clm", runs, "data.source=files", f"data.path={corpus}",
                           f"data.tokenizer={tokenizer_dir}")
    assert code in (0, None), err
    run = runs / "clm-small" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["val_loss"] > 0
    # A BPE token is several bytes: the summary's bits per byte is the loss in bits over the bytes per token of the
    # validation split (checked against `perceiver eval`'s count below), not the loss in bits.
    assert summary["val_bits_per_byte"] < summary["val_loss"] / math.log(2)

    # Bits per byte from `perceiver eval`: total NLL / ln 2 / UTF-8 bytes (plus one per document separator).
    code, out, err = run_cli(capsys, "eval", "--model", str(run), "--json")
    assert code in (0, None), err
    result = json.loads(out)
    documents = (corpus / "validation.txt").read_text(encoding="utf-8").split("\n\n")
    assert result["bytes"] == sum(len(d.encode("utf-8")) + 1 for d in documents)
    bytes_per_token = result["bytes"] / result["tokens"]  # the validation text over its tokens, separators included
    assert summary["val_bits_per_byte"] == pytest.approx(summary["val_loss"] / math.log(2) / bytes_per_token, rel=1e-3)
    assert result["tokens"] < 0.75 * result["bytes"]  # several bytes per token, yet the same bytes to divide by
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / result["bytes"])

    code, out, err = run_cli(capsys, "generate", "The miller", "--model", str(run), "--max-new-tokens", "6",
                             "--greedy", "--json")
    assert code in (0, None), err
    record = json.loads(out.splitlines()[-1])
    assert record["prompt_tokens"] == len(encode_text(tokenizer, "The miller")) and record["generated_tokens"] >= 1
    assert isinstance(record["text"], str)

    exported = tmp_path / "hf"
    code, out, err = run_cli(capsys, "convert", "--to", "hf", "--model", str(run), str(exported))
    assert code in (0, None), err
    assert (exported / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(exported))
    # The same ids, and no [CLS]/[SEP] around a causal LM's prompt ("[MASK]" in a text is the mask token to
    # transformers unless special tokens are split, as training splits them).
    assert hf_tokenizer(text, split_special_tokens=True)["input_ids"] == ids
    assert hf_tokenizer(english)["input_ids"] == encode_text(tokenizer, english)
    assert hf_tokenizer.padding_side == "left" and hf_tokenizer.eos_token_id == tokenizer.eos_token_id
    assert len(hf_tokenizer) == 400


def test_an_existing_output_directory_needs_force(capsys, tmp_path):
    corpus = write_corpus(tmp_path)
    output = tmp_path / "bpe"
    output.mkdir()  # empty: fine
    code, _, err = train_tokenizer(capsys, corpus, output, "--vocab-size", str(min_bpe_vocab_size()))
    assert code in (0, None), err
    assert vocab_size(load_tokenizer(str(output))) == min_bpe_vocab_size()  # no merges asked for: bytes only

    code, out, err = train_tokenizer(capsys, corpus, output, "--vocab-size", "300")
    assert_one_error(code, err, f"--output {output} already exists", out)
    code, _, err = train_tokenizer(capsys, corpus, output, "--vocab-size", "300", "--force")
    assert code in (0, None), err
    assert vocab_size(load_tokenizer(str(output))) == 300
    assert not list(tmp_path.glob(".bpe.*"))  # no staging directory left behind


@pytest.mark.parametrize("size", ["100", str(min_bpe_vocab_size() - 1)])
def test_a_vocabulary_smaller_than_the_byte_alphabet_is_refused(size, capsys, tmp_path):
    code, out, err = train_tokenizer(capsys, write_corpus(tmp_path), tmp_path / "bpe", "--vocab-size", size)
    assert_one_error(code, err, "smaller than the byte alphabet", out)
    assert f"at least {min_bpe_vocab_size()}" in err and not (tmp_path / "bpe").exists()


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("empty.txt", "", "no text found"),
        ("blank.txt", "\n\n   \n\n", "no text found"),
        ("empty.jsonl", '{"text": ""}\n{"text": "  "}\n{"text": ""}\n', "only empty documents"),
    ],
)
def test_an_empty_corpus_is_refused(name, content, fragment, capsys, tmp_path):
    corpus = tmp_path / name
    corpus.write_text(content, encoding="utf-8")
    code, out, err = train_tokenizer(capsys, corpus, tmp_path / "bpe")
    assert_one_error(code, err, fragment, out)
    assert not (tmp_path / "bpe").exists()


def test_bad_settings_are_reported_like_train_does(capsys, tmp_path):
    code, out, err = run_cli(capsys, "tokenizer", "train", "--output", str(tmp_path / "bpe"),
                             "--set", "data.source=files")
    assert_one_error(code, err, 'data.path: source = "files" needs a path', out)


def test_a_run_with_bpe_n_trains_its_tokenizer_on_the_training_split_and_keeps_it(capsys, tmp_path):
    from perceiver_cli.data.cache import cache_root

    corpus = write_corpus(tmp_path)
    runs = tmp_path / "runs"
    data = ["data.source=files", f"data.path={corpus}", "data.tokenizer=bpe:300"]
    code, out, err = train(capsys, "clm", runs, *data)
    assert code in (0, None), err
    assert "tokenizer bpe:300: a byte-level BPE trained on the training split" in out
    run = runs / "clm-small" / "version_0"
    kept = (run / "tokenizer").resolve()
    tokenizer = load_tokenizer(str(kept))
    assert vocab_size(tokenizer) == 300
    assert not any("zyzz" in token for token in tokenizer.get_vocab())  # the validation file was never read
    english = "The miller's daughter counted 42 boats."
    assert len(encode_text(tokenizer, english)) < 0.75 * len(english)  # merges learnt
    # The run's config and checkpoint name the run's own copy, so clearing the cache breaks nothing.
    assert f'tokenizer = "{kept}"' in (run / "config.toml").read_text()
    cached = list((cache_root() / "tokenizers").glob("bpe-300-*"))
    assert len(cached) == 1
    import shutil

    shutil.rmtree(cached[0])
    code, out, err = run_cli(capsys, "generate", "The miller", "--model", str(run), "--max-new-tokens", "4",
                             "--greedy", "--json")
    assert code in (0, None), err
    assert json.loads(out.splitlines()[-1])["prompt_tokens"] == len(encode_text(tokenizer, "The miller"))
    code, out, err = run_cli(capsys, "eval", "--model", str(run), "--json")
    assert code in (0, None), err
    assert json.loads(out)["tokens"] < 0.75 * json.loads(out)["bytes"]

    # The same data again: the same tokenizer (trained once more after the cache was cleared, then reused).
    for version in (1, 2):
        code, _, err = train(capsys, "clm", runs, *data)
        assert code in (0, None), err
        again = load_tokenizer(str(runs / "clm-small" / f"version_{version}" / "tokenizer"))
        assert again.get_vocab() == tokenizer.get_vocab()
    assert len(list((cache_root() / "tokenizers").glob("bpe-300-*"))) == 1


@pytest.mark.parametrize(
    "setting, fragment",
    [("data.tokenizer=bpe:100", "bpe:N with N at least"), ("data.tokenizer=bpe:many", "bpe:N with N at least")],
)
def test_a_bad_bpe_spec_is_refused_before_anything_runs(setting, fragment, capsys, tmp_path):
    code, out, err = train(capsys, "clm", tmp_path / "runs", setting)
    assert_one_error(code, err, fragment, out)
    assert not (tmp_path / "runs").exists()


def test_bpe_n_on_a_streamed_corpus_says_to_train_one_first(capsys, tmp_path):
    corpus = write_corpus(tmp_path)
    code, out, err = train(capsys, "clm", tmp_path / "runs", "data.source=files", f"data.path={corpus}",
                           "data.streaming=true", "data.tokenizer=bpe:300")
    assert_one_error(code, err, "a streamed corpus", out)
