"""EleutherAI's lm-evaluation-harness on our causal LMs (`perceiver eval --tasks`), as litgpt's `eval` runs it.

The model goes to the harness as the Hugging Face causal LM that `perceiver convert --to hf` exports (the same
class, its weights shared, not copied) with the exported tokenizer, so a task scores exactly what an exported
directory scores under `lm_eval --model hf`. Tasks are the harness's own, or YAML task directories of
`--include-path`. Tasks whose data set lives on the Hugging Face Hub need the Hub: when it is not reachable (or
HF_HUB_OFFLINE is set), the first such task fails at once with a message saying so, instead of the minutes of
retries of an unreachable Hub.

The harness is an optional extra: `pip install 'perceiver-cli[eval]'`.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from urllib.parse import urlparse

from perceiver_cli.errors import UserError, first_line

HUB_PROBE_SECONDS = 3.0
INSTALL_HINT = "install the extra: pip install 'perceiver-cli[eval]' (in a checkout: pip install -e '.[eval]')"


def harness_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def run_tasks(load_model, tasks: list[str], include_path: str | None, limit: int | None, batch_size: int) -> dict:
    """Results of lm-evaluation-harness `tasks` on the causal LM that `load_model()` returns (called once the
    tasks are known to exist): the loaded model and {task: {metric: value, ...}}."""
    if not harness_available():
        raise UserError("--tasks runs lm-evaluation-harness, which is not installed", hint=INSTALL_HINT)
    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"--include-path {include_path} is not a directory of task YAML files")
    _go_offline_unless_the_hub_answers()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"unknown lm-evaluation-harness task(s): {', '.join(unknown)}",
            hint="name a task of `lm_eval ls tasks`, or a task of a local directory given with --include-path",
        )
    loaded = load_model()
    if loaded.task != "clm":
        raise UserError("lm-evaluation-harness tasks need a causal LM; this model is a masked LM")
    model, tokenizer = _hugging_face_model(loaded)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit)
    except (ConnectionError, OSError) as err:
        if _offline():
            raise UserError(
                f"a task needs its data set from the Hugging Face Hub, which is not reachable ({first_line(err)})",
                hint="run where the Hub is reachable, or use a local task directory with --include-path",
            ) from None
        raise
    return loaded, {
        task: {k: v for k, v in metrics.items() if k != "alias" and isinstance(v, (int, float))}
        for task, metrics in results["results"].items()
    }


def _hugging_face_model(loaded):
    """The exported model class around `loaded.model` (shared weights) and the exported tokenizer."""
    import torch

    from perceiver_cli.data.tokenizer import causal_lm_tokenizer
    from perceiver_cli.models.huggingface import PerceiverARCausalLMConfig, PerceiverARForCausalLM

    tokenizer = causal_lm_tokenizer(loaded.tokenizer, model_max_length=loaded.config.max_seq_len)
    config = PerceiverARCausalLMConfig.from_backend_config(
        loaded.config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device("meta"):  # the backend below replaces the parameters: build none
        model = PerceiverARForCausalLM(config)
    model.model = loaded.model
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
    return model.eval(), tokenizer


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "") not in (
        "",
        "0",
    )


def _go_offline_unless_the_hub_answers() -> None:
    """Probe the Hub for a few seconds; if it does not answer, make this process offline (before datasets is
    imported), so that a Hub data set fails at once instead of retrying for minutes."""
    if _offline():
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    answered = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS).close()
            answered.set()
        except OSError:
            pass

    # A thread, because name resolution has no timeout of its own.
    threading.Thread(target=probe, daemon=True).start()
    if not answered.wait(HUB_PROBE_SECONDS):
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        if "datasets" in sys.modules:  # it read the variable when imported
            sys.modules["datasets"].config.HF_HUB_OFFLINE = True
