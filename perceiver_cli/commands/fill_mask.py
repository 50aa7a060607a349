"""`perceiver fill-mask`: predict the tokens behind [MASK] with a Perceiver IO masked LM.

The text is tokenized as Hugging Face's fill-mask pipeline does (with the utf8 tokenizer: `[CLS] bytes [SEP]`, a
literal "[MASK]" becoming the mask token), and the candidates come in the pipeline's shape: for one mask a list of
`{score, token, token_str, sequence}`, for several masks one such list per mask. A model imported from
deepmind/language-perceiver therefore answers here as `pipeline("fill-mask")` does there.
"""

from typing import Annotated

import typer

from perceiver_cli.errors import UserError


def fill_mask(
    text: Annotated[
        str, typer.Argument(help="Text with one [MASK] per token to predict (utf8 tokenizer: one per byte).")
    ],
    model: Annotated[
        str | None,
        typer.Option(help="Run directory, checkpoint file or exported model (default: the most recent mlm run)."),
    ] = None,
    top_k: Annotated[int, typer.Option(help="Candidates per masked position.")] = 5,
    json_output: Annotated[bool, typer.Option("--json", help="Print the candidates as JSON (pipeline shape).")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
) -> None:
    """Fill in masked tokens with a Perceiver IO masked language model."""
    import json

    from perceiver_cli.data.tokenizer import load_tokenizer
    from perceiver_cli.model_choice import choose_model, resolve_device

    if not text:
        raise UserError("the text is empty: give a text with [MASK] where tokens should be predicted")
    if top_k < 1:
        raise UserError(f"top-k must be at least 1, got {top_k}")
    loaded = choose_model(model, "mlm", device=resolve_device(device))
    tokenizer = load_tokenizer(loaded.tokenizer, padding_side="right")
    candidates = predict_masks(loaded.model, tokenizer, text, top_k)

    if json_output:
        print(json.dumps(candidates[0] if len(candidates) == 1 else candidates, ensure_ascii=False, indent=2))
        return
    _print_table(candidates)
    if len(candidates) > 1:
        print(f"most likely filling: {best_filling(tokenizer, text, candidates)}")


def encode_with_masks(tokenizer, text: str, max_seq_len: int) -> list[int]:
    """Token ids of `text` as the fill-mask pipeline makes them (special tokens added, "[MASK]" is the mask
    token); a UserError if there is no mask or the text is longer than the model reads."""
    if tokenizer.mask_token_id is None:
        raise UserError("this model's tokenizer has no mask token, so it cannot fill masks")
    ids = tokenizer(text, verbose=False)["input_ids"]
    if tokenizer.mask_token_id not in ids:
        raise UserError(
            f"no {tokenizer.mask_token} in the text: put one {tokenizer.mask_token} where each token should be "
            "predicted (with the utf8 tokenizer, one per byte)"
        )
    if len(ids) > max_seq_len:
        raise UserError(f"the text has {len(ids)} tokens, more than the model's max_seq_len ({max_seq_len})")
    return ids


def predict_masks(model, tokenizer, text: str, top_k: int) -> list[list[dict]]:
    """For each [MASK] in `text`, the `top_k` most likely tokens with their probability, as the fill-mask pipeline
    reports them; the model decodes the masked positions only."""
    import torch

    ids = encode_with_masks(tokenizer, text, model.max_seq_len)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)  # (1, M)
    masked = (input_ids[0] == tokenizer.mask_token_id).nonzero()[:, 0]  # (K,)
    with torch.inference_mode():
        logits = model(input_ids, output_positions=masked)[0]  # (K, V)
    scores, tokens = logits.float().softmax(dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)  # (K, k) each

    single = len(masked) == 1
    candidates = []
    for position, row_scores, row_tokens in zip(masked.tolist(), scores.tolist(), tokens.tolist()):
        row = []
        for score, token in zip(row_scores, row_tokens):
            filled = list(ids)
            filled[position] = token
            filled = [i for i in filled if i != tokenizer.pad_token_id]
            row.append(
                {
                    "score": score,
                    "token": token,
                    "token_str": tokenizer.decode([token]),
                    # As in the pipeline: with several masks the special tokens stay, so the other masks show.
                    "sequence": tokenizer.decode(filled, skip_special_tokens=single),
                }
            )
        candidates.append(row)
    return candidates


def best_filling(tokenizer, text: str, candidates: list[list[dict]]) -> str:
    """The text with every mask replaced by its most likely token."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    best = iter(row[0]["token"] for row in candidates)
    filled = [next(best) if i == tokenizer.mask_token_id else i for i in ids]
    return tokenizer.decode(filled, skip_special_tokens=True)


def _print_table(candidates: list[list[dict]]) -> None:
    import json

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    single = len(candidates) == 1
    table = Table("mask", "score", "token", "text", *(["sequence"] if single else []), box=None, pad_edge=False)
    for mask, row in enumerate(candidates, start=1):
        for candidate in row:
            cells = [str(mask), f"{candidate['score']:.4f}", str(candidate["token"])]
            cells.append(json.dumps(candidate["token_str"], ensure_ascii=False))  # quoted: spaces and newlines show
            if single:
                cells.append(candidate["sequence"])
            table.add_row(*(Text(cell) for cell in cells))  # Text: "[b]" in a token is text, not rich markup
    Console(soft_wrap=True).print(table)
