"""The private Lightning and torch attributes of `perceiver_cli.training.lightning_compat` are there and work as it
uses them: this fails when an upgrade removes or changes one (see the module for the versions it was checked on)."""

import importlib
import inspect
import subprocess
import sys
import traceback

import pytest
import pytorch_lightning as pl
import torch

from perceiver_cli.training import lightning_compat
from perceiver_cli.training.lightning_compat import (
    INSTANCE_ATTRIBUTES,
    RELIED_ON,
    ObservedSubprocessLauncher,
    failed_collective,
    is_torch_frame,
    observe_launched_ranks,
    skip_sigterm_broadcast,
)


def resolve(module: str, path: str):
    value = importlib.import_module(module)
    for part in path.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("module, path", list(RELIED_ON), ids=[f"{m}.{p}" for m, p in RELIED_ON])
def test_every_private_name_relied_on_exists(module, path):
    assert resolve(module, path) is not None, RELIED_ON[(module, path)]


def test_the_launcher_copied_takes_what_it_is_given():
    # ObservedSubprocessLauncher.launch is Lightning's launch() with the observer replaced: the signatures and the
    # calls it copies must still be Lightning's.
    from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

    launch = inspect.signature(_SubprocessScriptLauncher.launch)
    assert list(launch.parameters) == ["self", "function", "args", "trainer", "kwargs"]
    source = inspect.getsource(_SubprocessScriptLauncher.launch)
    for call in ("validate_settings(", "creates_processes_externally", "self._call_children_scripts()",
                 "_launch_process_observer(self.procs)", "_set_num_threads_if_needed(", "function(*args, **kwargs)"):
        assert call in source, f"Lightning's launch() no longer makes {call!r}: compare ObservedSubprocessLauncher"


@pytest.fixture
def ddp_trainer():
    # Several CPU processes through Lightning's own launcher; nothing starts before fit().
    return pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)


def test_instance_attributes_are_set_by_the_constructors(ddp_trainer):
    instances = {
        "pytorch_lightning.strategies.launchers._SubprocessScriptLauncher": ddp_trainer.strategy.launcher,
        "pytorch_lightning.strategies.Strategy": ddp_trainer.strategy,
    }
    for cls, attributes in INSTANCE_ATTRIBUTES.items():
        module, name = cls.rsplit(".", 1)
        assert isinstance(instances[cls], resolve(module, name))
        for attribute in attributes:
            assert hasattr(instances[cls], attribute), f"{cls}.{attribute}"


def test_the_ranks_lightning_starts_get_our_watcher(ddp_trainer):
    lightning_launcher = ddp_trainer.strategy.launcher
    watch = lambda procs: None  # noqa: E731
    assert observe_launched_ranks(ddp_trainer.strategy, watch)
    launcher = ddp_trainer.strategy.launcher
    assert isinstance(launcher, ObservedSubprocessLauncher) and launcher.watch is watch
    assert (launcher.cluster_environment, launcher.num_processes, launcher.num_nodes) == (
        lightning_launcher.cluster_environment, 2, 1)
    assert not observe_launched_ranks(ddp_trainer.strategy, watch)  # ours already: left alone


def test_one_process_has_no_launcher_to_replace():
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    assert not observe_launched_ranks(trainer.strategy, lambda procs: None)


def test_the_sigterm_broadcast_is_skipped_and_a_missing_one_is_an_error(ddp_trainer, monkeypatch):
    loop = ddp_trainer.fit_loop.epoch_loop
    assert inspect.ismethod(loop._broadcast_sigterm_tensor)  # Lightning's, before
    assert "_broadcast_sigterm_tensor()" in inspect.getsource(type(loop).advance)  # and still called per step
    skip_sigterm_broadcast(ddp_trainer)
    assert loop._broadcast_sigterm_tensor() is None
    monkeypatch.delattr(type(loop), "_broadcast_sigterm_tensor")
    del loop._broadcast_sigterm_tensor
    with pytest.raises(RuntimeError, match=r"_broadcast_sigterm_tensor is gone.*pytorch-lightning 2\.6\.6"):
        skip_sigterm_broadcast(ddp_trainer)


def test_the_process_group_timeout_can_be_set(tmp_path):
    # In a process of its own (a process group per process); warnings are errors: torch only warns when it finds no
    # backend whose timeout it can set.
    code = (
        "import sys, torch, torch.distributed as dist\n"
        "from perceiver_cli.training.lightning_compat import set_collective_timeout\n"
        "dist.init_process_group('gloo', init_method='file://' + sys.argv[1], rank=0, world_size=1)\n"
        "set_collective_timeout(7)\n"
        "print(dist.distributed_c10d._get_default_group()._get_backend(torch.device('cpu')).options._timeout)\n"
        "dist.destroy_process_group()\n"
    )
    result = subprocess.run([sys.executable, "-W", "error", "-c", code, str(tmp_path / "store")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0:00:07"


def test_a_failed_collective_is_found_in_its_traceback():
    with pytest.raises(Exception) as failure:  # no process group: the collective fails inside torch
        torch.distributed.barrier()
    frames = traceback.extract_tb(failure.value.__traceback__)
    collective = failed_collective(frames)
    assert collective is not None and collective.filename.endswith("distributed_c10d.py")
    assert all(is_torch_frame(f) for f in frames[1:])  # below this test's own frame, all torch
    assert not is_torch_frame(frames[0]) and failed_collective(frames[:1]) is None


def test_the_module_says_which_versions_it_was_checked_on():
    assert set(lightning_compat.CHECKED_ON) == {"pytorch-lightning", "torch"}
