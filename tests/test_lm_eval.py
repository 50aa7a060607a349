"""lm-evaluation-harness on our causal LMs: an export under `lm_eval --model hf` with its defaults, in a process
without perceiver_cli, agrees with our own scoring; `perceiver eval --tasks` runs harness tasks (issue 18).

Skipped when the 'eval' extra is not installed (`pip install -e '.[eval]'`; `make venv` and CI install it)."""

import json

import pytest
import torch
from cli_runner import assert_one_error, run_cli
from isolated_python import run_isolated
from tiny_models import tiny_clm_config

pytest.importorskip(
    "lm_eval.models.huggingface", reason="lm-evaluation-harness is not installed: pip install -e '.[eval]'"
)

from perceiver_cli.checkpoints import write_checkpoint  # noqa: E402
from perceiver_cli.data.tokenizer import load_tokenizer  # noqa: E402
from perceiver_cli.evaluation import clm_token_stream, evaluate_clm  # noqa: E402
from perceiver_cli.models.clm import CausalLanguageModel  # noqa: E402

CONFIG = tiny_clm_config(cross_attention_dropout=0.0, init_scale=0.2)  # max_seq_len 48, max_latents 12
# Shorter than the window, so the harness (one rolling window per document) and we see the same context.
DOCUMENTS = ["The function returns the sum of its arguments.", "A cache, a window, and latents.", "Bytes: äöü!"]
TASK = """task: tiny_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
  - metric: byte_perplexity
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    model = CausalLanguageModel(CONFIG).eval()
    write_checkpoint(root / "clm.ckpt", "clm", model, CONFIG)
    (root / "task").mkdir()
    (root / "task" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    (root / "task" / "tiny_text.yaml").write_text(TASK.format(data=root / "task" / "docs.jsonl"))
    return root, model


def our_bits_per_byte(model) -> float:
    """`perceiver eval`'s scoring of each document after the separator, as the harness scores it: every byte of
    the document, not the separator after it."""
    tokenizer = load_tokenizer("utf8")
    bits, num_bytes = 0.0, 0
    for document in DOCUMENTS:
        stream, _ = clm_token_stream(tokenizer, [document])
        size = len(document.encode("utf-8"))
        bits += evaluate_clm(model, stream[:-1], size, batch_size=4)["bits_per_byte"] * size
        num_bytes += size
    return bits / num_bytes


def test_lm_eval_with_its_defaults_scores_an_export_as_we_do(setup, capsys):
    root, model = setup
    status, _, err = run_cli(
        capsys, "convert", "--to", "hf", "--remote-code", "--model", str(root / "clm.ckpt"), str(root / "hf")
    )
    assert status == 0, err
    script = f"""
import lm_eval
from lm_eval.tasks import TaskManager

results = lm_eval.simple_evaluate(
    model="hf", model_args={{"pretrained": {str(root / "hf")!r}, "trust_remote_code": True}}, tasks=["tiny_text"],
    task_manager=TaskManager(include_path={str(root / "task")!r}), device="cpu",
)
print(json.dumps(results["results"]["tiny_text"]))
"""
    result, isolation = run_isolated(script, cwd=root, timeout=600)
    assert isolation == {"perceiver_cli_imported": False, "perceiver_cli_importable": False}
    assert result["bits_per_byte,none"] == pytest.approx(our_bits_per_byte(model), rel=0.01)


def test_perceiver_eval_tasks_runs_a_local_task(setup, capsys):
    root, model = setup
    args = ["eval", "--model", str(root / "clm.ckpt"), "--tasks", "tiny_text", "--include-path", str(root / "task")]
    status, out, err = run_cli(capsys, *args, "--json")
    assert status == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])["tasks"]["tiny_text"]
    assert metrics["bits_per_byte,none"] == pytest.approx(our_bits_per_byte(model), rel=0.01)


def test_a_hub_task_without_the_hub_fails_at_once_with_what_to_do(setup, capsys):
    root, _ = setup  # the tests run with HF_HUB_OFFLINE=1
    status, out, err = run_cli(capsys, "eval", "--model", str(root / "clm.ckpt"), "--tasks", "lambada_openai")
    assert_one_error(status, err, "needs its data set from the Hugging Face Hub, which is not reachable", out)


def test_unknown_tasks_and_a_missing_harness_are_one_error_line(setup, capsys, monkeypatch):
    root, _ = setup
    model = ["--model", str(root / "clm.ckpt")]
    status, out, err = run_cli(capsys, "eval", *model, "--tasks", "no_such_task")
    assert_one_error(status, err, "unknown lm-evaluation-harness task(s): no_such_task", out)
    monkeypatch.setattr("perceiver_cli.harness.harness_available", lambda: False)
    status, out, err = run_cli(capsys, "eval", *model, "--tasks", "tiny_text")
    assert_one_error(status, err, "lm-evaluation-harness, which is not installed", out)
    assert "pip install" in err
