"""Text -> token ids -> fixed-length chunks, with `datasets.map` so that both steps are cached on disk.

1. Tokenize each document without special tokens (special-token strings inside the text stay plain text) and
   append the EOS token so that the model sees where documents end (tokenizers without EOS, BERT-style, get their
   SEP token instead; with neither, documents are simply concatenated). Empty documents are dropped.
2. Concatenate the documents and cut the stream into chunks:
   - CLM: `max_seq_len + 1` tokens (inputs are chunk[:-1], labels chunk[1:]; the collator shifts).
   - MLM: `max_seq_len - 2` tokens wrapped as `[CLS] chunk [SEP]` when the tokenizer has CLS and SEP tokens (the
     Hugging Face fill-mask pipeline encodes text the same way, so training and inference agree), else
     `max_seq_len` tokens.
   Chunks do not span map batches (`CHUNK_BATCH_DOCS` documents each), so every batch ends with one short chunk
   that the collator pads; with thousands of chunks per batch that costs almost nothing and keeps memory bounded.
   A last CLM chunk of a single token is dropped: it has no next token to predict.

Only `input_ids` (int32) is stored. Cache entries are keyed by explicit fingerprints (input split, tokenizer
content, chunking settings and `PIPELINE_VERSION`) rather than by `datasets` hashing the map functions, because
tokenizer objects do not always hash the same way twice.
"""

from typing import TYPE_CHECKING

import numpy as np

from perceiver_cli.data.tokenizer import encode_text
from perceiver_cli.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

TASKS = ("clm", "mlm")
PIPELINE_VERSION = 3  # bump when the output of the map functions below changes
CHUNK_BATCH_DOCS = 10_000


def chunk_length(tokenizer, task: str, max_seq_len: int) -> int:
    """Number of corpus tokens per chunk (before MLM's [CLS]/[SEP] wrapping)."""
    if task == "clm":
        return max_seq_len + 1
    return max_seq_len - 2 if _wraps(tokenizer) else max_seq_len


def tokenize_and_chunk(
    splits: "DatasetDict", tokenizer, *, task: str, max_seq_len: int, num_proc: int | None = None
) -> "DatasetDict":
    """Tokenize every split of `splits` (a DatasetDict with a `text` column) and cut it into chunks for `task`
    ("clm" or "mlm"). Returns a DatasetDict with one column, `input_ids`."""
    from datasets import DatasetDict, Features, List, Value
    from datasets.fingerprint import Hasher

    chunker = make_chunker(tokenizer, task, max_seq_len)
    num_proc = num_proc if num_proc and num_proc > 1 else None
    features = Features({"input_ids": List(Value("int32"))})
    tokenizer_id = tokenizer_fingerprint(tokenizer)

    result = {}
    for split, dataset in splits.items():
        tokenized = dataset.map(
            _Tokenize(tokenizer),
            batched=True,
            remove_columns=dataset.column_names,
            features=features,
            num_proc=num_proc,
            new_fingerprint=Hasher.hash(["tokenize", PIPELINE_VERSION, dataset._fingerprint, tokenizer_id]),
            desc=f"Tokenizing {split}",
        )
        chunks = tokenized.with_format("arrow").map(
            chunker,
            batched=True,
            batch_size=CHUNK_BATCH_DOCS,
            features=features,
            num_proc=num_proc,
            new_fingerprint=Hasher.hash(["chunk", PIPELINE_VERSION, tokenized._fingerprint, vars(chunker)]),
            desc=f"Chunking {split}",
        )
        if chunks.num_rows == 0:
            raise UserError(f"the {split} split has no text: every document is empty; check the data source")
        result[split] = chunks.with_format(None)
    return DatasetDict(result)


def make_chunker(tokenizer, task: str, max_seq_len: int) -> "_Chunk":
    """The chunking rule for `task` (step 2 above), as a function of a table of tokenized documents."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: use 'clm' or 'mlm'")
    minimum = 3 if task == "mlm" and _wraps(tokenizer) else 1
    if max_seq_len < minimum:
        raise UserError(f"max_seq_len {max_seq_len} is too small for {task}: use at least {minimum}")
    wrap = (tokenizer.cls_token_id, tokenizer.sep_token_id) if task == "mlm" and _wraps(tokenizer) else None
    return _Chunk(chunk_length(tokenizer, task, max_seq_len), wrap, min_length=2 if task == "clm" else 1)


def chunk_texts(texts: list[str], tokenize: "_Tokenize", chunker: "_Chunk") -> list[np.ndarray]:
    """The chunks of one batch of documents, as `tokenize_and_chunk` cuts each batch of CHUNK_BATCH_DOCS documents
    (the streaming pipeline's one step, data/streaming.py): int32 arrays, in order."""
    import pyarrow as pa

    ids = tokenize({"text": texts})["input_ids"]
    table = pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32()))})
    chunks = chunker(table).column("input_ids").combine_chunks()
    offsets = chunks.offsets.to_numpy()
    values = np.array(chunks.values.to_numpy(zero_copy_only=False))  # a writable copy, for torch.as_tensor
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(chunks))]


def count_tokens(chunks: "Dataset") -> int:
    """Total number of token ids in a chunked split (read from the arrow offsets, no decoding)."""
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(chunks.data.column("input_ids"))).as_py() or 0)


def bytes_per_token(chunks: "Dataset", tokenizer, max_tokens: int = 1_000_000) -> float:
    """UTF-8 bytes per token of a chunked causal LM split, from its first `max_tokens` tokens or so: the bytes they
    decode to, each document separator counted as one byte (as `perceiver eval` counts it). It turns a mean loss per
    token into bits per byte; exact for byte-level tokenizers, close for others (whose decoding may respace)."""
    rows = max(1, max_tokens // max(1, len(chunks[0]["input_ids"])))
    ids = np.concatenate([np.asarray(row, dtype=np.int64) for row in chunks[:rows]["input_ids"]])
    if len(ids) == 0:
        return 1.0
    separator = _Tokenize(tokenizer).separator
    is_separator = ids == separator if separator is not None else np.zeros(len(ids), dtype=bool)
    # One decode of the whole stream, so that a character whose bytes two tokens share is not cut in two.
    text = tokenizer.decode(ids[~is_separator].tolist(), clean_up_tokenization_spaces=False)
    return (len(text.encode("utf-8")) + int(is_separator.sum())) / len(ids)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what determines the tokenizer's output: its class, vocabulary, special tokens and, for fast
    tokenizers, the full serialized pipeline (normalizer, pre-tokenizer, model)."""
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return Hasher.hash(
        [
            type(tokenizer).__name__,
            sorted(tokenizer.get_vocab().items()),
            sorted(tokenizer.special_tokens_map.items(), key=str),
            backend.to_str() if backend is not None else None,
        ]
    )


def _wraps(tokenizer) -> bool:
    return tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None


class _Tokenize:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

    def __call__(self, batch: dict) -> dict:
        texts = [text for text in batch["text"] if text and not text.isspace()]
        if not texts:
            return {"input_ids": []}
        ids = encode_text(self.tokenizer, texts)  # a literal "[MASK]" in the corpus is text, not a mask
        if self.separator is not None:
            ids = [doc + [self.separator] for doc in ids]
        return {"input_ids": ids}


class _Chunk:
    def __init__(self, length: int, wrap: tuple[int, int] | None, min_length: int):
        self.length = length
        self.wrap = wrap
        self.min_length = min_length

    def __call__(self, table):
        import pyarrow as pa
        import pyarrow.compute as pc

        stream = pc.list_flatten(table.column("input_ids")).to_numpy().astype(np.int32, copy=False)
        chunks = [stream[i : i + self.length] for i in range(0, len(stream), self.length)]
        if chunks and len(chunks[-1]) < self.min_length:
            chunks.pop()
        if self.wrap:
            cls, sep = self.wrap
            chunks = [np.concatenate(([cls], chunk, [sep])) for chunk in chunks]
        offsets = np.concatenate(([0], np.cumsum([len(chunk) for chunk in chunks], dtype=np.int64)))
        values = np.concatenate(chunks).astype(np.int32) if chunks else np.zeros(0, np.int32)
        return pa.table({"input_ids": pa.ListArray.from_arrays(offsets.astype(np.int32), values)})
