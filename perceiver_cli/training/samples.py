"""A text sample at every validation of a causal LM run, so a user can watch the model learn to write."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console


class ValidationSample(pl.Callback):
    """Continue a fixed prompt after each validation (seeded sampling, top-k 10: varied but readable); print it
    and log it to TensorBoard as text."""

    def __init__(self, prompt: str, max_new_tokens: int, console: Console, seed: int = 0):
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.console = console
        self.seed = seed

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        from perceiver_cli.generation import GenerationSettings, generate

        from perceiver_cli.data.tokenizer import encode_text

        tokenizer = trainer.datamodule.tokenizer
        prompt_ids = encode_text(tokenizer, self.prompt)  # as training reads its documents
        settings = GenerationSettings(max_new_tokens=self.max_new_tokens, top_k=10, seed=self.seed)
        text = generate(pl_module.model, tokenizer, prompt_ids, settings)[0].text
        shown = "".join(c if c.isprintable() or c == "\n" else " " for c in text)
        self.console.print(f"[dim]sample @ step {trainer.global_step}:[/] {self.prompt}[italic]{shown}[/]",
                           highlight=False, soft_wrap=True)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("sample", f"**{self.prompt}**{shown}", trainer.global_step)
