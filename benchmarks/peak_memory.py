"""Peak memory of one CLM training step, in a process of its own: `python -m benchmarks.peak_memory ar|full N L`.

Prints the bytes by which the process's resident memory peaked above where it stood before the step: activations,
gradients and every temporary, as the operating system sees them. The step runs once before (gradients and optimizer
state then already exist), the kernel's high-water mark is reset (Linux `/proc/self/clear_refs`), and the step runs
again. Run it with `MALLOC_MMAP_THRESHOLD_=65536` (as `python -m benchmarks` does), so that freed tensors leave the
resident set at once instead of staying cached by malloc. Prints nothing where the kernel offers no such counters.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from benchmarks import models as bm

STATUS = Path("/proc/self/status")


def status_bytes(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE).group(1)) * 1024


def main() -> None:
    which, n, latents = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    ar, full = bm.clm_pair(n, latents)
    x = torch.randint(6, 262, (1, n + 1))
    step_ar, step_full = bm.clm_train_steps(ar, full, x, latents)
    step = {"ar": step_ar, "full": step_full}[which]
    step()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        return
    before = status_bytes("VmRSS")
    step()
    print(status_bytes("VmHWM") - before)


if __name__ == "__main__":
    main()
