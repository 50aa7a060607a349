"""Which positions a masked LM decodes: those with a label. Training (`LitMaskedLanguageModel.loss`) and evaluation
(`perceiver_cli.evaluation.evaluate_mlm`) both decode only the selected positions, since each decoder query is
independent; this is their one rule for choosing them.

It reads the labels the data collators write (`IGNORE_INDEX` where there is no loss), so it sits above the backend,
beside the Lightning wrapper.
"""

from __future__ import annotations

import torch

from perceiver_cli.data.masking import IGNORE_INDEX


def masked_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions (B, S) to decode for `labels` (B, M): each row's labelled positions first, in order, S the
    most any row has. The tail of a row with fewer points at positions whose label is IGNORE_INDEX, so that
    gathering the labels at these positions leaves them out of a loss (cross-entropy ignores IGNORE_INDEX)."""
    selected = labels != IGNORE_INDEX
    num_selected = int(selected.sum(dim=1).max())
    return torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)[:, :num_selected]
