"""Hugging Face model directories <-> our backend models.

Reading (`load_pretrained_directory`, which `checkpoints.load_model` calls for a directory with a config.json)
recognises a directory by its config.json's model_type: transformers' `PerceiverForMaskedLM` ("perceiver"), our
exported causal LM, or the perceiver-io library's two model types. Each format's module supplies our config and the
source name of each of our parameters; the weights must match exactly: no parameter missing, no source tensor unused.

Writing (`save_pretrained_directory`) makes a directory that loads in transformers: a masked LM as its own
`PerceiverForMaskedLM`, a causal LM with our classes (see `modeling_perceiver_ar.py`), optionally with their source
as remote code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from perceiver_cli.errors import UserError
from perceiver_cli.files import atomic_directory
from perceiver_cli.models.clm.windows import DEFAULT_SCHEDULE
from perceiver_cli.models.huggingface import perceiver_for_masked_lm, perceiver_io_library
from perceiver_cli.models.huggingface.files import (
    CONFIG_FILE,
    SAFETENSORS_FILE,
    read_config,
    read_weights,
    save_causal_lm_tokenizer,
    save_tokenizer,
    tokenizer_spec,
    write_weights,
)
from perceiver_cli.models.huggingface.modeling_perceiver_ar import PerceiverARCausalLMConfig, PerceiverARForCausalLM
from perceiver_cli.models.huggingface.remote_code import auto_map, write_modeling_file
from perceiver_cli.models.huggingface.state_dicts import fused_state_dict, unfused_state_dict
from perceiver_cli.models.saved_model import LoadedModel, build_backend_model

# A format's reader: (config.json, source tensors) -> (our config, the source name of each of our parameters, the
# source tensors it used otherwise, such as a buffer it checked against the config).
Reader = Callable[[dict, dict], tuple[Any, Callable[[str], str], set[str]]]


def _read_ours(config_json: dict, tensors: dict) -> tuple[Any, Callable[[str], str], set[str]]:
    try:
        config = PerceiverARCausalLMConfig.from_dict(config_json).backend_config()
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid {PerceiverARCausalLMConfig.model_type} config: {err}") from None
    return config, lambda name: f"{PerceiverARForCausalLM.base_model_prefix}.{name}", set()


# model_type -> (task, reader of its config and parameter names, whether those names are of the reference layout:
# separate query, key and value projections, see `state_dicts.unfused_state_dict`; ours has the fused ones)
READERS: dict[str, tuple[str, Reader, bool]] = {
    "perceiver": ("mlm", perceiver_for_masked_lm.read, True),
    PerceiverARCausalLMConfig.model_type: ("clm", _read_ours, False),
    perceiver_io_library.MLM_MODEL_TYPE: ("mlm", perceiver_io_library.read_mlm, True),
    perceiver_io_library.CLM_MODEL_TYPE: ("clm", perceiver_io_library.read_clm, True),
}


def load_pretrained_directory(path: Path) -> LoadedModel:
    """The backend model (in eval mode) of a Hugging Face model directory in one of the formats of `READERS`."""
    path = Path(path)
    config_json = read_config(path)
    model_type = config_json["model_type"]
    if model_type not in READERS:
        raise UserError(
            f"{path / CONFIG_FILE}: unknown model_type {model_type!r}; "
            f"supported: {', '.join(repr(t) for t in READERS)}"
        )
    tokenizer = tokenizer_spec(path)
    if tokenizer is None:
        raise UserError(
            f"{path} holds no tokenizer files",
            hint="save its tokenizer into it with save_pretrained (UTF-8 bytes: PerceiverTokenizer().save_pretrained)",
        )
    task, reader, separate_projections = READERS[model_type]
    tensors = read_weights(path)
    try:
        config, name_of, checked = reader(config_json, tensors)
        model, config = build_backend_model(task, config.to_dict())
    except UserError as err:
        raise UserError(f"{path}: {err.message}", err.hint) from None
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: invalid model config: {err}") from None
    _load_exactly(model, tensors, name_of, checked, path, separate_projections)
    return LoadedModel(task, model.eval(), config, tokenizer, run_config=None, source=path)


def _load_exactly(
    model, tensors: dict, name_of: Callable[[str], str], checked: set[str], path: Path, separate_projections: bool
) -> None:
    """Load `tensors` (source names) into `model`, refusing any parameter missing, tensor unused or shape wrong.
    `name_of` maps the names of `unfused_state_dict(model)` if `separate_projections`, else of its state dict."""
    expected = unfused_state_dict(model) if separate_projections else model.state_dict()
    names = {name: name_of(name) for name in expected}
    missing = [source for source in names.values() if source not in tensors]
    unused = sorted(set(tensors) - set(names.values()) - checked)
    wrong_shape = [
        f"{source} {tuple(tensors[source].shape)} (expected {tuple(expected[name].shape)})"
        for name, source in names.items()
        if source in tensors and tensors[source].shape != expected[name].shape
    ]
    problems = [
        f"{len(items)} {what}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
        for what, items in (("missing", missing), ("unused", unused), ("of the wrong shape", wrong_shape))
        if items
    ]
    if problems:
        raise UserError(f"{path}: the weights do not match its config: " + "; ".join(problems))
    model.load_state_dict(fused_state_dict(model, {name: tensors[source] for name, source in names.items()}))


def save_pretrained_directory(loaded: LoadedModel, out_dir: Path, remote_code: bool = False, force: bool = False):
    """Write `loaded` as a directory that transformers loads: config.json, model.safetensors, the tokenizer files
    and, for a causal LM, generation_config.json (and with `remote_code` the modeling file). Atomic: `out_dir`
    appears complete or not at all, and an existing one is replaced only with `force`."""
    if loaded.task == "mlm":
        if remote_code:
            raise UserError(
                "--remote-code is for causal LMs: a masked LM exports to transformers' own PerceiverForMaskedLM"
            )
        _save_masked_lm(loaded, out_dir, force)
    else:
        _save_causal_lm(loaded, out_dir, remote_code, force)


def _save_masked_lm(loaded: LoadedModel, out_dir: Path, force: bool) -> None:
    hf_config = perceiver_for_masked_lm.config_to_hf(loaded.config)  # refuses before anything is written
    with atomic_directory(out_dir, force) as staging:
        hf_config.save_pretrained(str(staging))
        weights = {perceiver_for_masked_lm.hf_name(k): v for k, v in unfused_state_dict(loaded.model).items()}
        write_weights(staging / SAFETENSORS_FILE, weights)
        save_tokenizer(loaded.tokenizer, staging, "right", model_max_length=loaded.config.encoder.max_seq_len)


def _save_causal_lm(loaded: LoadedModel, out_dir: Path, remote_code: bool, force: bool) -> None:
    from transformers import GenerationConfig

    extra = {"auto_map": auto_map()} if remote_code else {}
    config = PerceiverARCausalLMConfig.from_backend_config(
        loaded.config, architectures=[PerceiverARForCausalLM.__name__], **extra
    )
    prefix = PerceiverARForCausalLM.base_model_prefix
    with atomic_directory(out_dir, force) as staging:
        tokenizer = save_causal_lm_tokenizer(loaded.tokenizer, staging, model_max_length=loaded.config.max_seq_len)
        # All fields, not only those that differ from the class defaults, so that the file alone defines the model.
        config.to_json_file(str(staging / CONFIG_FILE), use_diff=False)
        weights = {f"{prefix}.{k}": v for k, v in loaded.model.state_dict().items()}
        write_weights(staging / SAFETENSORS_FILE, weights)
        special = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
        GenerationConfig(**special, window_schedule=DEFAULT_SCHEDULE).save_pretrained(str(staging))
        if remote_code:
            write_modeling_file(staging)
