"""Who started this process: torchrun, SLURM's srun, or the `perceiver` command itself.

Read from the environment in the order Lightning picks its cluster environment (torchrun before SLURM, since
torchrun also runs inside SLURM jobs), so that our idea of the ranks is Lightning's:
- "torchrun": TorchElastic started every rank (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, TORCHELASTIC_RUN_ID);
- "slurm": `srun` started every rank (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NNODES, SLURM_JOB_ID);
- "lightning": the `perceiver` command; with several devices its Trainer starts the other ranks of the machine by
  re-running the same command line with LOCAL_RANK set.
Only the standard library is imported here: the train command asks before anything heavy is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from perceiver_cli.errors import UserError

# torchrun's rendezvous id when none is given (a static rendezvous: --nnodes=N --master-addr=...): not unique.
TORCHRUN_DEFAULT_RUN_ID = "none"


@dataclass(frozen=True)
class Launch:
    launcher: str  # "torchrun", "slurm" or "lightning"
    rank: int  # global rank; under "lightning" the local rank (one machine, see check_layout)
    local_rank: int
    # What an external launcher started; None under "lightning", where the Trainer starts the ranks itself.
    devices: int | None = None  # processes per node
    num_nodes: int | None = None
    job: str | None = None  # names the run directory the ranks share: "torchrun-<rendezvous id>", "slurm-<job>.<step>"

    @property
    def external(self) -> bool:
        return self.launcher != "lightning"

    @property
    def world_size(self) -> int:
        """Processes started by an external launcher (1 under "lightning": the Trainer has not started any yet)."""
        return self.devices * self.num_nodes if self.external else 1


def detect_launch(env: Mapping[str, str] = os.environ) -> Launch:
    if "TORCHELASTIC_RUN_ID" in env:  # what torch.distributed.is_torchelastic_launched() checks
        world, per_node = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
        run_id = env["TORCHELASTIC_RUN_ID"]
        return Launch(
            "torchrun", int(env["RANK"]), int(env["LOCAL_RANK"]), per_node, world // per_node,
            job=None if run_id == TORCHRUN_DEFAULT_RUN_ID else f"torchrun-{run_id}",
        )
    # Lightning's SLURM test: any SLURM_NTASKS, unless the job is an interactive shell (there the user launches).
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        tasks, nodes = int(env["SLURM_NTASKS"]), int(env.get("SLURM_NNODES", 1))
        # The step keeps two `srun` runs of one job apart; a requeued job has the same job id and step again.
        step = f".{env['SLURM_STEP_ID']}" if "SLURM_STEP_ID" in env else ""
        return Launch(
            "slurm", int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
            int(env.get("SLURM_NTASKS_PER_NODE", tasks // nodes)), nodes, job=f"slurm-{env['SLURM_JOB_ID']}{step}",
        )
    local_rank = int(env.get("LOCAL_RANK", 0))
    return Launch("lightning", local_rank, local_rank)


def check_layout(trainer, launch: Launch):
    """`[trainer]` (a TrainerSection) with the `devices` and `num_nodes` of an external launcher: it has started
    the processes already, and Lightning refuses other numbers. Returns the section to train with (a copy; the
    validated config is never changed) and a note for the console when the preset said otherwise. Refuses several
    nodes without an external launcher."""
    if not launch.external:
        if trainer.num_nodes > 1:
            raise UserError(
                f"trainer.num_nodes = {trainer.num_nodes}: the perceiver command starts the processes of one machine",
                hint="start a multi-node run with srun (SLURM) or with torchrun on every node; see the README",
            )
        return trainer, None
    laid_out = trainer.model_copy(update={"devices": launch.devices, "num_nodes": launch.num_nodes})
    if trainer.num_nodes == launch.num_nodes and trainer.devices in ("auto", launch.devices):
        return laid_out, None
    return laid_out, (
        f"{launch.launcher} started {launch.num_nodes} node(s) x {launch.devices} process(es): trainer.devices = "
        f"{launch.devices}, trainer.num_nodes = {launch.num_nodes} (the preset said {trainer.devices} and "
        f"{trainer.num_nodes})"
    )
