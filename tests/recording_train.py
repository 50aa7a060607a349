"""`perceiver train` that also records which examples each rank trains on (for tests).

    python tests/recording_train.py RECORD_DIR train --preset ... [--set ...]

runs the `perceiver` command with the arguments after RECORD_DIR; each rank writes RECORD_DIR/rank-<rank>.json:
{"steps": [[example index, ...] per training batch, in order], "examples": the size of the training set}.
Lightning's launcher re-runs this same script for the other ranks, so they record too. The collators leave the
examples' `index` out of the batch; the recording collator here puts it in, and a callback collects it.
"""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from perceiver_cli import cli
from perceiver_cli.data.datamodule import TextDataModule
from perceiver_cli.training import build


class RecordSamples(pl.Callback):
    def __init__(self, record_dir: Path):
        self.record_dir = record_dir
        self.steps: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(batch["index"].tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        path = self.record_dir / f"rank-{trainer.global_rank}.json"
        path.write_text(json.dumps({"steps": self.steps, "examples": len(trainer.train_dataloader.dataset)}))


def recording_collator(collator):
    def collate(examples: list[dict]) -> dict:
        batch = collator(examples)
        batch["index"] = torch.tensor([int(example["index"]) for example in examples])
        return batch

    return collate


def main() -> None:
    record_dir, args = Path(sys.argv[1]), sys.argv[2:]
    make_collator = TextDataModule._collator
    TextDataModule._collator = lambda self, train: recording_collator(make_collator(self, train))
    build_trainer = build.build_trainer

    def recording_trainer(*a, **kw):
        trainer = build_trainer(*a, **kw)
        trainer.callbacks.append(RecordSamples(record_dir))
        return trainer

    build.build_trainer = recording_trainer
    cli.main(args)


if __name__ == "__main__":
    main()
