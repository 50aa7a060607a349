"""`perceiver train` with strategy "fsdp" on the CPU (for tests; the product runs FSDP on CUDA only).

    python tests/fsdp_cpu_train.py REPORT_JSON train --preset ... [--set ...]

trains with `[trainer.fsdp] activation_checkpointing = true` and has rank 0 write REPORT_JSON: the layers that
became FSDP units ("sharded") and those whose activations are recomputed ("checkpointed"), by class name.

Three things stand between FSDP and the CPU, and this script works around each: Lightning accepts its FSDPStrategy
only with a CUDA accelerator (it tests the exact class, so a subclass passes); torch's FSDP needs the CPU named as
its device (Lightning passes the device's index, None for the CPU); and gathering the full state dict with
`offload_to_cpu=True`, which Lightning always asks for, crashes (SIGSEGV) when the shards already live on the CPU,
so it is gathered without offloading. The preset is validated as given (strategy "ddp"), then switched to "fsdp",
so that config validation's CUDA check does not stop it either. Everything else is the `perceiver train` flow.
Lightning's launcher re-runs this script for the other ranks.
"""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import pytorch_lightning.strategies.fsdp
import torch
import torch.distributed.fsdp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType

from perceiver_cli import cli
from perceiver_cli.config import FSDPSection
from perceiver_cli.training import build, distributed, run

FSDP = torch.distributed.fsdp.FullyShardedDataParallel


class CPUFSDPStrategy(pytorch_lightning.strategies.fsdp.FSDPStrategy):
    pass


class CPUFullyShardedDataParallel(FSDP):
    def __init__(self, module, *args, device_id=None, **kwargs):
        super().__init__(module, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)


def full_state_dict_without_offloading(module, world_size: int, rank0_only: bool = True):
    return FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


class ReportWrapping(pl.Callback):
    def __init__(self, report: Path):
        self.report = report

    def on_train_start(self, trainer, pl_module) -> None:
        root = trainer.strategy.model

        def unwrapped(module):
            return module._checkpoint_wrapped_module if isinstance(module, CheckpointWrapper) else module

        units = [m for m in root.modules() if isinstance(m, FSDP) and m is not root]
        checkpointed = [m for m in root.modules() if isinstance(m, CheckpointWrapper)]
        if trainer.global_rank == 0:
            self.report.write_text(json.dumps({
                "root": type(root.module).__name__,
                "sharded": sorted(type(unwrapped(m.module)).__name__ for m in units),
                "checkpointed": sorted(type(unwrapped(m)).__name__ for m in checkpointed),
            }))


def main() -> None:
    report, args = Path(sys.argv[1]), sys.argv[2:]
    distributed.FSDPStrategy = CPUFSDPStrategy
    torch.distributed.fsdp.FullyShardedDataParallel = CPUFullyShardedDataParallel
    pytorch_lightning.strategies.fsdp._get_full_state_dict_context = full_state_dict_without_offloading
    resolve, build_trainer = run.resolve, build.build_trainer

    def resolve_as_fsdp(*a, **kw):
        cfg, name, checkpoint = resolve(*a, **kw)
        cfg.trainer.strategy = "fsdp"
        cfg.trainer.fsdp = FSDPSection(activation_checkpointing=True)
        return cfg, name, checkpoint

    def reporting_trainer(*a, **kw):
        trainer = build_trainer(*a, **kw)
        trainer.callbacks.append(ReportWrapping(report))
        return trainer

    run.resolve, build.build_trainer = resolve_as_fsdp, reporting_trainer
    cli.main(args)


if __name__ == "__main__":
    main()
