"""The Perceiver IO masked language model, in one package:

- `model`: the backend (pure PyTorch): `TextEncoderConfig`, `TextDecoderConfig`, `MaskedLanguageModelConfig` and
  `MaskedLanguageModel`;
- `LitMaskedLanguageModel`, the Lightning wrapper (`perceiver_cli.models.lightning`), imported only when asked for,
  so that importing the backend never imports Lightning.

Modules of this package import from `model` directly; the names here are for users
(`from perceiver_cli.models.mlm import MaskedLanguageModel, LitMaskedLanguageModel`).
"""

from perceiver_cli.models.mlm.model import (
    MaskedLanguageModel,
    MaskedLanguageModelConfig,
    TextDecoderConfig,
    TextEncoderConfig,
)

__all__ = [
    "LitMaskedLanguageModel",
    "MaskedLanguageModel",
    "MaskedLanguageModelConfig",
    "TextDecoderConfig",
    "TextEncoderConfig",
]


def __getattr__(name: str):
    if name == "LitMaskedLanguageModel":
        from perceiver_cli.models.lightning import LitMaskedLanguageModel

        return LitMaskedLanguageModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
