"""The Perceiver AR causal language model, in one package:

- `model`: the backend (pure PyTorch): `CausalLanguageModelConfig` and `CausalLanguageModel`;
- `windows`: which tokens a pass sees and predicts from: the windows of scoring a text and of generation (the
  schedules), and the left padding that batches windows of different lengths;
- `decoding`: inference over sequences of any length: logits for every position, and `WindowStepper`, the one
  generation stepper (`perceiver generate` and the Hugging Face `generate()` both run it);
- `LitCausalLanguageModel`, the Lightning wrapper (`perceiver_cli.models.lightning`), imported only when asked for,
  so that importing the backend never imports Lightning.

Modules of this package import from `model`, `windows` and `decoding` directly; the names here are for users
(`from perceiver_cli.models.clm import CausalLanguageModel, LitCausalLanguageModel`).
"""

from perceiver_cli.models.clm.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_cli.models.clm.windows import Window, first_window, next_window

__all__ = [
    "CausalLanguageModel",
    "CausalLanguageModelConfig",
    "LitCausalLanguageModel",
    "Window",
    "first_window",
    "next_window",
]


def __getattr__(name: str):
    if name == "LitCausalLanguageModel":
        from perceiver_cli.models.lightning import LitCausalLanguageModel

        return LitCausalLanguageModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
