"""Our masked LM <-> transformers' `PerceiverForMaskedLM` (for example deepmind/language-perceiver): configs and
parameter names. The two compute the same function with the same parameters, one to one, for the configurations
`PerceiverForMaskedLM` can express; `hf_name` maps the names of `state_dicts.unfused_state_dict` (separate query, key
and value projections, as transformers has them).

Its limits: the decoder has 8 heads, 256 query/key channels, value channels equal to the input channels, widening
factor 1, no query residual and logits tied to the token embedding; the encoder has one cross-attention layer, one
self-attention block applied `num_blocks` times, one `qk_channels`/`v_channels` pair for its cross- and
self-attention (defaults per transformers' rules), self-attention value channels equal to the latent channels, a
query residual in the cross-attention, GELU and one attention dropout probability. Settings of training only
(init_scale, freeze, activation checkpointing and offloading) are not carried.
"""

from __future__ import annotations

from typing import Callable

from perceiver_cli.errors import UserError
from perceiver_cli.models.attention import attention_channels
from perceiver_cli.models.mlm.model import MaskedLanguageModelConfig, TextDecoderConfig, TextEncoderConfig

ARCHITECTURE = "PerceiverForMaskedLM"
DECODER_HEADS, DECODER_QK_CHANNELS = 8, 256  # fixed in PerceiverForMaskedLM.__init__

# Whole parameters: ours -> transformers'.
_PARAMETERS = {
    "encoder.latents": "perceiver.embeddings.latents",
    "encoder.input_adapter.txt_embedding.weight": "perceiver.input_preprocessor.embeddings.weight",
    "encoder.input_adapter.pos_embedding.weight": "perceiver.input_preprocessor.position_embeddings.weight",
    "decoder.output_queries": "perceiver.decoder.output_position_encodings.position_embeddings",
    "output_bias": "embedding_decoder.bias",
}
# Attention layers: ours -> transformers' PerceiverLayer; self-attention layers are followed by their index.
_LAYERS = {
    "encoder.cross_attn_1.": "perceiver.encoder.cross_attention.",
    "encoder.self_attn_1.layers.": "perceiver.encoder.self_attends.",
    "decoder.cross_attn.": "perceiver.decoder.decoding_cross_attention.",
}
_LAYER_PARTS = {
    "q_norm.": "attention.self.layernorm1.",
    "norm.": "attention.self.layernorm1.",  # a self-attention layer's one norm
    "kv_norm.": "attention.self.layernorm2.",
    "attention.q_proj.": "attention.self.query.",
    "attention.k_proj.": "attention.self.key.",
    "attention.v_proj.": "attention.self.value.",
    "attention.o_proj.": "attention.output.dense.",
    "mlp.norm.": "layernorm.",
    "mlp.fc1.": "mlp.dense1.",
    "mlp.fc2.": "mlp.dense2.",
}


def hf_name(name: str) -> str:
    """transformers' name of one of our parameters in the separate-projection layout (of a model `config_to_hf`
    accepts)."""
    if name in _PARAMETERS:
        return _PARAMETERS[name]
    for ours, theirs in _LAYERS.items():
        if name.startswith(ours):
            rest = name[len(ours) :]
            if ours.endswith("layers."):
                index, rest = rest.split(".", 1)
                theirs = f"{theirs}{index}."
            for part, their_part in _LAYER_PARTS.items():
                if rest.startswith(part):
                    return theirs + their_part + rest[len(part) :]
    raise KeyError(f"{name} has no counterpart in {ARCHITECTURE}")


def hf_attention_channels(qk: int | None, v: int | None, shape: str, d_model: int, d_latents: int):
    """(cross qk, cross v, self qk, self v) channels of the encoder's attention, as transformers derives them from
    `qk_channels`, `v_channels` and `cross_attention_shape_for_attention` (see its PerceiverAttention)."""
    cross_qk = qk if qk is not None else (d_latents if shape == "q" else d_model)
    self_qk = qk if qk is not None else d_latents
    return cross_qk, v if v is not None else cross_qk, self_qk, v if v is not None else self_qk


def config_to_hf(config: MaskedLanguageModelConfig):
    """The `PerceiverConfig` of a model that `PerceiverForMaskedLM` can express; else a UserError listing every
    setting that differs from what it can express."""
    from transformers import PerceiverConfig

    enc, dec = config.encoder, config.decoder
    d_model, d_latents = enc.num_input_channels, config.num_latent_channels
    cross_qk, cross_v = attention_channels(
        d_latents, enc.num_cross_attention_qk_channels, enc.num_cross_attention_v_channels
    )
    self_qk, self_v = attention_channels(
        d_latents, enc.num_self_attention_qk_channels, enc.num_self_attention_v_channels
    )
    dec_qk, dec_v = attention_channels(
        config.output_query_channels, dec.num_cross_attention_qk_channels, dec.num_cross_attention_v_channels
    )
    ours = (cross_qk, cross_v, self_qk, self_v)
    # The first qk/v setting of transformers that yields our channels (its self-attention output keeps the value
    # channels, so those must equal the latent channels).
    settings = [(qk, v, shape) for qk in (self_qk, None) for v in (d_latents, None) for shape in ("kv", "q")]
    channels = next(
        (s for s in settings if hf_attention_channels(*s, d_model, d_latents) == ours and self_v == d_latents), None
    )

    differences = []
    if dec.num_output_query_channels is not None:
        differences.append(
            f"decoder.num_output_query_channels is {dec.num_output_query_channels} (untied output; "
            "PerceiverForMaskedLM's output queries have the input channels and its logits use the token embedding)"
        )
    if dec.num_cross_attention_heads != DECODER_HEADS:
        differences.append(f"decoder.num_cross_attention_heads is {dec.num_cross_attention_heads} (must be 8)")
    if dec_qk != DECODER_QK_CHANNELS:
        differences.append(f"decoder query/key channels are {dec_qk} (must be 256)")
    if dec_v != d_model:
        differences.append(f"decoder value channels are {dec_v} (must equal encoder.num_input_channels, {d_model})")
    if dec.cross_attention_widening_factor != 1:
        differences.append(
            f"decoder.cross_attention_widening_factor is {dec.cross_attention_widening_factor} (must be 1)"
        )
    if dec.cross_attention_residual:
        differences.append("decoder.cross_attention_residual is true (must be false)")
    if enc.num_cross_attention_layers != 1:
        differences.append(f"encoder.num_cross_attention_layers is {enc.num_cross_attention_layers} (must be 1)")
    if enc.num_self_attention_blocks > 1 and not enc.first_self_attention_block_shared:
        differences.append("encoder.first_self_attention_block_shared is false with several blocks (must be true)")
    if channels is None:
        differences.append(
            f"encoder attention channels (cross-attention query/key {cross_qk}, value {cross_v}; self-attention "
            f"query/key {self_qk}, value {self_v}) do not fit PerceiverForMaskedLM's one qk_channels/v_channels "
            f"pair, with self-attention value channels equal to num_latent_channels ({d_latents})"
        )
    for kind, heads in (("cross", enc.num_cross_attention_heads), ("self", enc.num_self_attention_heads)):
        if d_latents % heads:
            differences.append(f"num_latent_channels ({d_latents}) is not divisible by encoder {kind}-attention heads")
    if dec.dropout != enc.dropout:
        differences.append(f"decoder.dropout ({dec.dropout}) differs from encoder.dropout ({enc.dropout})")
    if differences:
        raise UserError(
            f"this masked LM cannot be exported as a transformers {ARCHITECTURE}: " + "; ".join(differences),
            hint="use --to safetensors to export its weights with our config",
        )

    qk_channels, v_channels, shape = channels
    return PerceiverConfig(
        architectures=[ARCHITECTURE],
        vocab_size=enc.vocab_size,
        max_position_embeddings=enc.max_seq_len,
        d_model=d_model,
        d_latents=d_latents,
        num_latents=config.num_latents,
        num_blocks=enc.num_self_attention_blocks,
        num_self_attends_per_block=enc.num_self_attention_layers_per_block,
        num_self_attention_heads=enc.num_self_attention_heads,
        num_cross_attention_heads=enc.num_cross_attention_heads,
        qk_channels=qk_channels,
        v_channels=v_channels,
        cross_attention_shape_for_attention=shape,
        self_attention_widening_factor=enc.self_attention_widening_factor,
        cross_attention_widening_factor=enc.cross_attention_widening_factor,
        hidden_act="gelu",
        attention_probs_dropout_prob=enc.dropout,
        initializer_range=enc.init_scale,
        use_query_residual=True,
    )


def read(config_json: dict, tensors: dict) -> tuple[MaskedLanguageModelConfig, Callable[[str], str], set[str]]:
    """Our config for a `PerceiverForMaskedLM` directory's config.json, and the source name of each parameter."""
    from transformers import PerceiverConfig

    architectures = config_json.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in architectures:
        raise UserError(
            f"this is a transformers Perceiver for {', '.join(architectures)}; only {ARCHITECTURE} converts"
        )
    try:
        hf = PerceiverConfig.from_dict(config_json)
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid PerceiverConfig: {err}") from None
    unsupported = []
    if hf.hidden_act != "gelu":
        unsupported.append(f"hidden_act is {hf.hidden_act!r} (only 'gelu')")
    if not hf.use_query_residual:
        unsupported.append("use_query_residual is false (the encoder's cross-attention always has the residual)")
    if unsupported:
        raise UserError(f"unsupported {ARCHITECTURE} settings: " + "; ".join(unsupported))

    cross_qk, cross_v, self_qk, self_v = hf_attention_channels(
        hf.qk_channels, hf.v_channels, hf.cross_attention_shape_for_attention, hf.d_model, hf.d_latents
    )
    encoder = TextEncoderConfig(
        vocab_size=hf.vocab_size,
        max_seq_len=hf.max_position_embeddings,
        num_input_channels=hf.d_model,
        num_cross_attention_heads=hf.num_cross_attention_heads,
        num_cross_attention_qk_channels=cross_qk,
        num_cross_attention_v_channels=cross_v,
        cross_attention_widening_factor=hf.cross_attention_widening_factor,
        num_self_attention_heads=hf.num_self_attention_heads,
        num_self_attention_qk_channels=self_qk,
        num_self_attention_v_channels=self_v,
        num_self_attention_layers_per_block=hf.num_self_attends_per_block,
        num_self_attention_blocks=hf.num_blocks,
        first_self_attention_block_shared=True,
        self_attention_widening_factor=hf.self_attention_widening_factor,
        dropout=hf.attention_probs_dropout_prob,
        init_scale=hf.initializer_range,
    )
    decoder = TextDecoderConfig(
        vocab_size=hf.vocab_size,
        max_seq_len=hf.max_position_embeddings,
        num_cross_attention_heads=DECODER_HEADS,
        num_cross_attention_qk_channels=DECODER_QK_CHANNELS,
        num_cross_attention_v_channels=hf.d_model,
        cross_attention_residual=False,
        dropout=hf.attention_probs_dropout_prob,
        init_scale=hf.initializer_range,
    )
    config = MaskedLanguageModelConfig(encoder, decoder, num_latents=hf.num_latents, num_latent_channels=hf.d_latents)
    return config, hf_name, set()
