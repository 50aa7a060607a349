"""Model directories saved by the perceiver-io library (krasserm/perceiver-io, for example krasserm/perceiver-io-mlm
and krasserm/perceiver-ar-clm-base), so that its users can move over.

Such a directory's config.json has the model_type `perceiver-io-masked-language-model` or
`perceiver-ar-causal-language-model` and holds the library's backend config as a dict under `model_config`; its
weights are the backend's parameters prefixed by `backend_model.`. The backend has the same structure as ours under
other names: an attention layer is an `nn.Sequential` of the attention and the MLP, each wrapped in a residual module
(`.module`), the MLP an `nn.Sequential` (LayerNorm 0, Linear 1, GELU, Linear 3), and the masked LM an
`nn.Sequential` of encoder (0) and decoder (1).
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any, Callable

from perceiver_cli.errors import UserError
from perceiver_cli.models.clm.model import CausalLanguageModelConfig
from perceiver_cli.models.mlm.model import MaskedLanguageModelConfig, TextDecoderConfig, TextEncoderConfig

MLM_MODEL_TYPE = "perceiver-io-masked-language-model"
CLM_MODEL_TYPE = "perceiver-ar-causal-language-model"
PREFIX = "backend_model."
# Settings of the library that do not change what a saved model computes, dropped where our config lacks them.
IGNORED_SETTINGS = {
    "params": "a checkpoint to initialise the encoder from at training time",
    "max_heads_parallel": "how many attention heads run at once (memory only)",
}
# The rotary frequencies are a buffer in their checkpoints; we compute them from the config instead.
INV_FREQ = PREFIX + "input_adapter.frq_pos_encoding.inv_freq"

_MLM_PARAMETERS = {
    "encoder.latents": "0.latent_provider._query",
    "encoder.input_adapter.txt_embedding.weight": "0.input_adapter.txt_embedding.weight",
    "encoder.input_adapter.pos_embedding.weight": "0.input_adapter.pos_embedding.weight",
    "decoder.output_queries": "1.output_query_provider._query",
    "output_bias": "1.output_adapter.bias",
    "output_linear.weight": "1.output_adapter.linear.weight",
    "output_linear.bias": "1.output_adapter.linear.bias",
}
_MLP_PARTS = {"norm": "0", "fc1": "1", "fc2": "3"}


def _layer_part(part: str, attention_residual: bool = True) -> str:
    """Their name of `part` (e.g. `q_norm.weight`, `mlp.fc1.weight`) inside an attention layer."""
    if part.startswith("mlp."):
        sub, rest = part[len("mlp.") :].split(".", 1)
        return f"1.module.{_MLP_PARTS[sub]}.{rest}"
    # Without its residual connection, the attention is not wrapped (no `.module`).
    return ("0.module." if attention_residual else "0.") + part


def read_mlm(config_json: dict, tensors: dict) -> tuple[MaskedLanguageModelConfig, Callable[[str], str], set[str]]:
    values = _known_settings(_model_config(config_json), MaskedLanguageModelConfig)
    values["encoder"] = _known_settings(values.get("encoder", {}), TextEncoderConfig, "encoder")
    values["decoder"] = _known_settings(values.get("decoder", {}), TextDecoderConfig, "decoder")
    config = _parse(MaskedLanguageModelConfig.from_dict, values)
    decoder_residual = config.decoder.cross_attention_residual

    def name_of(name: str) -> str:
        if name in _MLM_PARAMETERS:
            return PREFIX + _MLM_PARAMETERS[name]
        for ours, theirs, residual in (
            ("encoder.cross_attn_1.", "0.cross_attn_1.", True),
            ("encoder.cross_attn_n.", "0.cross_attn_n.", True),
            ("decoder.cross_attn.", "1.cross_attn.", decoder_residual),
        ):
            if name.startswith(ours):
                return PREFIX + theirs + _layer_part(name[len(ours) :], residual)
        match = re.fullmatch(r"encoder\.self_attn_(1|n)\.layers\.(\d+)\.(.+)", name)
        if match is None:
            raise KeyError(f"{name} has no counterpart in the perceiver-io library's masked LM")
        return f"{PREFIX}0.self_attn_{match[1]}.{match[2]}.{_layer_part(match[3])}"

    return config, name_of, set()


def read_clm(config_json: dict, tensors: dict) -> tuple[CausalLanguageModelConfig, Callable[[str], str], set[str]]:
    values = _known_settings(_model_config(config_json), CausalLanguageModelConfig)
    config = _parse(CausalLanguageModelConfig.from_dict, values)
    checked = set()
    if INV_FREQ in tensors:
        _check_inv_freq(tensors[INV_FREQ], config.num_rotary_channels_per_head)
        checked.add(INV_FREQ)

    def name_of(name: str) -> str:
        if name == "output_bias":
            return PREFIX + "output_adapter.bias"
        if name.startswith("cross_attention."):
            return PREFIX + "cross_attention." + _layer_part(name[len("cross_attention.") :])
        match = re.fullmatch(r"self_attention\.layers\.(\d+)\.(.+)", name)
        if match:
            return f"{PREFIX}self_attention.{match[1]}.{_layer_part(match[2])}"
        return PREFIX + name  # input_adapter.*, out_norm.*: the same names

    return config, name_of, checked


def _model_config(config_json: dict) -> dict[str, Any]:
    values = config_json.get("model_config")
    if not isinstance(values, dict):
        raise UserError("config.json lacks the perceiver-io library's model_config")
    return values


def _known_settings(values: dict[str, Any], config_class: type, where: str = "") -> dict[str, Any]:
    """`values` without the ignorable settings that `config_class` does not have (unknown others stay, to be
    refused by its from_dict)."""
    if not isinstance(values, dict):
        raise UserError(f"model_config.{where} is not a dict")
    names = {f.name for f in fields(config_class)}
    return {k: v for k, v in values.items() if k in names or k not in IGNORED_SETTINGS}


def _parse(from_dict: Callable, values: dict[str, Any]):
    try:
        return from_dict(values)
    except (TypeError, ValueError) as err:
        raise UserError(f"unsupported perceiver-io model_config: {err}") from None


def _check_inv_freq(inv_freq, dim: int) -> None:
    """Their rotary frequencies must be the ones our config implies: 1 / 10000^(2i/dim), i < dim/2."""
    import torch

    expected = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if inv_freq.shape != expected.shape or not torch.allclose(inv_freq.double(), expected, rtol=1e-6, atol=0.0):
        raise UserError(
            f"the checkpoint's rotary frequencies (inv_freq, shape {tuple(inv_freq.shape)}) differ from those of "
            f"its model_config ({dim} rotated channels per head)"
        )
