"""The seed's model-construction guide (shared/seed/model-construction.md) is a contract: its Python API code blocks
run as written, with only the import path changed, and build models of exactly its parameter counts.

Large configurations are built on the `meta` device: shapes and parameter counts without memory or time.
"""

import textwrap

import torch

SEED_MLM_BACKEND = """
from perceiver_cli.models.mlm import MaskedLanguageModel, MaskedLanguageModelConfig, TextEncoderConfig, TextDecoderConfig

vocab_size = 262  # E
max_seq_len = 2048  # M, O
num_latents = 256  # N
num_latent_channels = 1280  # D
num_input_channels = 768  # C, F (weight tying)
num_qk_channels = 256

encoder_config = TextEncoderConfig(
    vocab_size=vocab_size,
    max_seq_len=max_seq_len,
    num_input_channels=num_input_channels,
    num_cross_attention_qk_channels=num_qk_channels,
    num_cross_attention_v_channels=num_latent_channels,
    num_cross_attention_heads=8,
    num_self_attention_qk_channels=num_qk_channels,
    num_self_attention_v_channels=num_latent_channels,
    num_self_attention_heads=8,
    num_self_attention_layers_per_block=26,
    num_self_attention_blocks=1,
    dropout=0.1,
)

decoder_config = TextDecoderConfig(
    vocab_size=vocab_size,
    max_seq_len=max_seq_len,
    num_cross_attention_qk_channels=num_qk_channels,
    num_cross_attention_v_channels=num_input_channels,
    num_cross_attention_heads=8,
    cross_attention_residual=False,
    dropout=0.1,
)

config = MaskedLanguageModelConfig(
    encoder_config,
    decoder_config,
    num_latents=num_latents,
    num_latent_channels=num_latent_channels,
)

# PyTorch model
backend_model = MaskedLanguageModel(config)
"""

SEED_MLM_LIGHTNING = """
from perceiver_cli.models.mlm import LitMaskedLanguageModel

config = ...

# PyTorch Lightning model
lit_model = LitMaskedLanguageModel.create(config)

# Wrapped backend model
backend_model = lit_model.backend_model
"""

SEED_CLM_BACKEND = """
from perceiver_cli.models.clm import CausalLanguageModel, CausalLanguageModelConfig

config = CausalLanguageModelConfig(
    vocab_size=262,
    max_seq_len=4096,
    max_latents=512,
    num_channels=512,
    num_self_attention_layers=8,
    cross_attention_dropout=0.5,
)

# PyTorch model
backend_model = CausalLanguageModel(config)
"""

SEED_CLM_LIGHTNING = """
from perceiver_cli.models.clm import LitCausalLanguageModel

config = ...

# PyTorch Lightning model
lit_model = LitCausalLanguageModel.create(config)

# Wrapped backend model
backend_model = lit_model.backend_model
"""


def run_blocks(*blocks: str) -> dict:
    """Run code blocks in one namespace, as a reader would in one session. `config = ...` is the guide's
    placeholder for "the config from the block above", so it keeps the existing value."""
    namespace: dict = {}
    with torch.device("meta"):
        for block in blocks:
            code = "\n".join(line for line in textwrap.dedent(block).splitlines() if line.strip() != "config = ...")
            exec(compile(code, "<seed>", "exec"), namespace)
    return namespace


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_seed_mlm_blocks_build_the_201m_model():
    ns = run_blocks(SEED_MLM_BACKEND, SEED_MLM_LIGHTNING)
    model = ns["backend_model"]
    assert model is ns["lit_model"].model
    assert num_params(model) == 201_108_230

    enc = model.encoder
    assert enc.latents.numel() == 327_680
    assert num_params(enc.input_adapter) == 1_774_080
    assert num_params(enc.cross_attn_1) == 6_434_816
    assert len(enc.self_attn_1.layers) == 26
    assert all(num_params(layer) == 7_219_712 for layer in enc.self_attn_1.layers)
    assert model.decoder.output_queries.numel() == 1_572_864
    assert num_params(model.decoder.cross_attn) == 3_286_016
    assert model.output_bias.numel() == 262


def test_seed_clm_blocks_build_the_30m_model():
    ns = run_blocks(SEED_CLM_BACKEND, SEED_CLM_LIGHTNING)
    model = ns["backend_model"]
    assert model is ns["lit_model"].model
    assert num_params(model) == 30_563_078

    assert model.input_adapter.txt_embedding.weight.numel() == 134_144
    assert model.input_adapter.pos_embedding.weight.numel() == 2_097_152
    ca = model.cross_attention
    assert num_params(ca) - num_params(ca.mlp) == 1_051_136
    assert num_params(ca.mlp) == 2_098_176
    assert len(model.self_attention.layers) == 8
    assert all(num_params(layer) == 3_147_776 for layer in model.self_attention.layers)
    assert model.output_bias.numel() == 262


def test_seed_configs_keep_the_seed_values():
    ns = run_blocks(SEED_MLM_BACKEND)
    config = ns["config"]
    assert config.encoder.dropout == 0.1 and config.decoder.cross_attention_residual is False
    assert config.num_latents == 256 and config.num_latent_channels == 1280
    ns = run_blocks(SEED_CLM_BACKEND)
    assert ns["config"].cross_attention_dropout == 0.5 and ns["config"].max_prefix_len == 4096 - 512


def test_backend_modules_import_no_lightning_or_huggingface():
    import subprocess
    import sys

    modules = [
        "attention", "layers", "adapters", "common", "perceiver_io", "perceiver_ar", "mlm", "clm"
    ]
    code = (
        "import sys\n"
        + "".join(f"import perceiver_cli.models.{m}\n" for m in modules)
        + "print([m for m in ('pytorch_lightning', 'lightning', 'transformers', 'typer', 'datasets') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
