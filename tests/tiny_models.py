"""Tiny model configurations shared by the tests: every code path, no waiting."""

from perceiver_cli.models.clm import CausalLanguageModelConfig
from perceiver_cli.models.mlm import MaskedLanguageModelConfig, TextDecoderConfig, TextEncoderConfig


def tiny_mlm_config(max_seq_len: int = 32, **overrides) -> MaskedLanguageModelConfig:
    encoder = TextEncoderConfig(
        vocab_size=262,
        max_seq_len=max_seq_len,
        num_input_channels=32,
        num_cross_attention_heads=2,
        num_cross_attention_qk_channels=16,
        num_cross_attention_v_channels=48,
        num_self_attention_heads=4,
        num_self_attention_qk_channels=16,
        num_self_attention_v_channels=48,
        num_self_attention_layers_per_block=2,
        num_self_attention_blocks=2,
        self_attention_widening_factor=2,
    )
    decoder = TextDecoderConfig(
        vocab_size=262,
        max_seq_len=max_seq_len,
        num_cross_attention_heads=4,
        num_cross_attention_qk_channels=16,
        num_cross_attention_v_channels=32,
        cross_attention_residual=False,
    )
    return MaskedLanguageModelConfig(encoder, decoder, num_latents=8, num_latent_channels=48, **overrides)


def tiny_clm_config(**overrides) -> CausalLanguageModelConfig:
    values = dict(
        vocab_size=262,
        max_seq_len=48,
        max_latents=12,
        num_channels=32,
        num_heads=4,
        num_self_attention_layers=2,
        num_self_attention_rotary_layers=1,
        cross_attention_dropout=0.5,
    )
    return CausalLanguageModelConfig(**(values | overrides))
