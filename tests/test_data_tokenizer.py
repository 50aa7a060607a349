"""The tokenizer entry point: the built-in UTF-8 tokenizer's ids, local directories, and clear errors."""

import subprocess
import sys

import pytest

from perceiver_cli.data.tokenizer import load_tokenizer, vocab_size
from perceiver_cli.errors import UserError


def test_utf8_tokenizer_ids_and_vocab_size():
    tokenizer = load_tokenizer("utf8")
    special = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id]
    assert special == [0, 1, 2, 3]
    assert [tokenizer.cls_token_id, tokenizer.sep_token_id] == [4, 5]
    # byte b -> b + 6, multi-byte characters as their UTF-8 bytes
    assert tokenizer("aé", add_special_tokens=False)["input_ids"] == [ord("a") + 6, 0xC3 + 6, 0xA9 + 6]
    assert vocab_size(tokenizer) == 262  # tokenizer.vocab_size says 256: it leaves out the special tokens
    assert tokenizer.padding_side == "right"


def test_padding_side_is_set_and_checked():
    assert load_tokenizer("utf8", padding_side="left").padding_side == "left"
    with pytest.raises(UserError, match="padding side"):
        load_tokenizer("utf8", padding_side="middle")


def test_local_tokenizer_directory_loads(tmp_path):
    load_tokenizer().save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path), padding_side="left")
    assert vocab_size(tokenizer) == 262
    assert tokenizer.padding_side == "left"
    assert tokenizer("hi", add_special_tokens=False)["input_ids"] == [ord("h") + 6, ord("i") + 6]


@pytest.mark.parametrize("spec", ["/no/such/tokenizer", "bert-base-uncased", "deepmind/language-perceiver"])
def test_unknown_tokenizer_is_a_user_error(spec):
    with pytest.raises(UserError, match=r"tokenizer .* not found: use 'utf8' or a path"):
        load_tokenizer(spec)


def test_directory_without_tokenizer_is_a_user_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(UserError, match="without tokenizer files"):
        load_tokenizer(str(tmp_path))


def test_broken_tokenizer_directory_is_a_user_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(UserError, match="could not be loaded"):
        load_tokenizer(str(tmp_path))


def test_package_import_is_light():
    # `perceiver --help` imports the package; the heavy libraries must wait until a submodule is used.
    code = (
        "import sys, perceiver_cli.data as d; "
        "heavy = [m for m in ('torch', 'datasets', 'transformers', 'pytorch_lightning') if m in sys.modules]; "
        "assert not heavy, heavy; assert callable(d.load_tokenizer)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
