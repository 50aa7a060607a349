"""`perceiver convert --to hf` for causal LMs: our transformers classes, `generate()` with and without the cache,
and the `--remote-code` export that loads without perceiver_cli."""

import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from cli_runner import run_cli
from isolated_python import run_isolated
from tiny_models import tiny_clm_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from perceiver_cli import cli
from perceiver_cli.checkpoints import load_model, write_checkpoint
from perceiver_cli.models.clm import CausalLanguageModel, CausalLanguageModelConfig, first_window, next_window

# Importing the package registers our model type with AutoConfig and AutoModelForCausalLM.
from perceiver_cli.models.huggingface import PerceiverARCausalLMConfig, PerceiverARForCausalLM

CONFIG = tiny_clm_config(cross_attention_dropout=0.0)  # max_seq_len 48, max_latents 12


def random_clm(config: CausalLanguageModelConfig) -> CausalLanguageModel:
    torch.manual_seed(0)
    model = CausalLanguageModel(config).eval()
    with torch.no_grad():  # LayerNorms away from the identity too
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


def convert(*args: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.run_app(cli.app, ["convert", *args])
    assert exit_.value.code == 0


@pytest.fixture(scope="module")
def backend():
    return random_clm(CONFIG)


@pytest.fixture(scope="module")
def exported(backend, tmp_path_factory):
    directory = tmp_path_factory.mktemp("clm")
    write_checkpoint(directory / "clm.ckpt", "clm", backend, CONFIG)
    convert("--to", "hf", "--model", str(directory / "clm.ckpt"), str(directory / "hf"))
    return directory / "hf"


@pytest.fixture(scope="module")
def hf_model(exported):
    return AutoModelForCausalLM.from_pretrained(exported).eval()


def reference_greedy(model: CausalLanguageModel, prompt: list[int], steps: int, num_latents: int | None):
    """Tokens and next-token logits of greedy decoding by the backend, one full forward pass per step over the
    windows of the generation protocol (`first_window`, `next_window`)."""
    tokens, logits = list(prompt), []
    window = first_window(len(tokens), model.config, num_latents)
    for step in range(steps):
        if step:
            window, _ = next_window(window, model.config)
        with torch.no_grad():
            step_logits = model(torch.tensor([tokens[-window.length :]]), window.prefix_len)[0, -1]
        logits.append(step_logits)
        tokens.append(int(step_logits.argmax()))
    return tokens[len(prompt) :], torch.stack(logits)


def hf_greedy(model, prompt: torch.Tensor, steps: int, use_cache: bool, **kwargs):
    with torch.no_grad():
        output = model.generate(
            prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, use_cache=use_cache,
            return_dict_in_generate=True, output_logits=True, **kwargs,
        )
    return output.sequences[:, prompt.shape[1] :], torch.stack(output.logits, dim=1)


def test_config_mirrors_the_backend_config():
    backend_fields = {f.name: f.default for f in dataclasses.fields(CausalLanguageModelConfig)}
    hf = PerceiverARCausalLMConfig()
    assert {name: getattr(hf, name) for name in backend_fields} == backend_fields
    assert PerceiverARCausalLMConfig.from_backend_config(CONFIG).backend_config() == CONFIG


def test_export_loads_with_auto_model_and_computes_the_backend_logits(backend, exported):
    assert {p.name for p in exported.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json"}
    model, info = AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert type(model) is PerceiverARForCausalLM
    assert all(not value for value in info.values()), info
    ours = backend.state_dict()
    theirs = model.state_dict()
    assert theirs.keys() == {f"model.{k}" for k in ours}
    assert all(torch.equal(theirs[f"model.{k}"], v) for k, v in ours.items())
    ids = torch.randint(6, 262, (2, 30))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids, num_latents=10).logits, backend(ids, 20))
    assert (model.generation_config.bos_token_id, model.generation_config.eos_token_id) == (2, 2)
    assert model.generation_config.pad_token_id == 0
    assert AutoTokenizer.from_pretrained(exported).padding_side == "left"


def test_greedy_generate_with_and_without_cache_agrees_while_latents_grow(backend, hf_model):
    # 6 prompt tokens, 2 of them latents, 10 new tokens: the latents grow to 11 of at most 12 (the exact regime).
    prompt = torch.randint(6, 262, (1, 6), generator=torch.Generator().manual_seed(2))
    expected_tokens, expected_logits = reference_greedy(backend, prompt[0].tolist(), 10, num_latents=2)
    for use_cache in (True, False):
        tokens, logits = hf_greedy(hf_model, prompt, 10, use_cache, num_latents=2)
        assert tokens[0].tolist() == expected_tokens, use_cache
        torch.testing.assert_close(logits[0], expected_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_cache", [False, True])
def test_generate_follows_the_protocol_past_the_window(backend, hf_model, use_cache):
    # 40 prompt tokens with as many latents as fit (12), 30 new tokens: latents join the prefix, then the window
    # (48) is full and its oldest tokens leave. Cached or not, every step equals the reference's full forward pass.
    prompt = torch.randint(6, 262, (1, 40), generator=torch.Generator().manual_seed(3))
    expected_tokens, expected_logits = reference_greedy(backend, prompt[0].tolist(), 30, num_latents=None)
    tokens, logits = hf_greedy(hf_model, prompt, 30, use_cache=use_cache)
    assert tokens[0].tolist() == expected_tokens
    torch.testing.assert_close(logits[0], expected_logits, atol=1e-5, rtol=0)


def test_cache_equals_a_fresh_pass_after_latents_join_the_prefix_and_tokens_leave():
    # After latents joined the prefix and the window filled up, the whole cache (absolute position embeddings and
    # all) equals a fresh forward pass over the final window. Row 1 is left-padded: it runs in a group of its own,
    # unpadded, with its own window.
    config = CONFIG
    model = PerceiverARForCausalLM(PerceiverARCausalLMConfig.from_backend_config(config)).eval()
    model.model.load_state_dict(random_clm(config).state_dict())
    prompt = torch.randint(6, 262, (2, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        output = model.generate(
            prompt, attention_mask=mask, max_new_tokens=15, min_new_tokens=15, do_sample=False,
            return_dict_in_generate=True, num_latents=4,
        )
    groups = output.cache.stepper.groups
    assert sorted(g.rows.tolist() for g in groups) == [[0], [1]]
    for group in groups:
        cache, row = group.cache, group.rows.item()
        window = len(cache)  # the last forward pass saw the window of all tokens but the last generated one
        ids = output.sequences[row : row + 1, -window - 1 : -1]
        assert output.sequences.shape[1] - 1 - mask[row].eq(0).sum() > window  # the window slid
        fresh = model.model.empty_cache()
        with torch.no_grad():
            model.model(ids, window - cache.num_latents, cache=fresh)
        for layer, (cached, recomputed) in enumerate(
            zip([cache.cross_attention, *cache.self_attention], [fresh.cross_attention, *fresh.self_attention])
        ):
            torch.testing.assert_close(cached.k, recomputed.k, atol=1e-5, rtol=0, msg=f"layer {layer}")
            torch.testing.assert_close(cached.v, recomputed.v, atol=1e-5, rtol=0, msg=f"layer {layer}")


def test_left_padded_batch_generates_what_each_prompt_generates_alone(hf_model):
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(6, 262, (1, n), generator=generator) for n in (9, 5)]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, -prompt.shape[1] :] = prompt[0]
        mask[row, -prompt.shape[1] :] = 1
    for use_cache in (True, False):
        tokens, _ = hf_greedy(hf_model, batch, 8, use_cache, attention_mask=mask, num_latents=2)
        for row, prompt in enumerate(prompts):
            alone, _ = hf_greedy(hf_model, prompt, 8, use_cache, num_latents=2)
            assert tokens[row].tolist() == alone[0].tolist(), (use_cache, row)


def test_beam_search_with_and_without_cache_agrees(hf_model):
    prompt = torch.randint(6, 262, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cached, full = (
            hf_model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, num_latents=2, use_cache=c)
            for c in (True, False)
        )
    assert torch.equal(cached, full)


def test_labels_give_the_next_token_loss_of_the_latents(backend, hf_model):
    ids = torch.randint(6, 262, (2, 20))
    with torch.no_grad():
        loss = hf_model(ids, num_latents=10, labels=ids).loss
        logits = backend(ids, 10)
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 11:].flatten()))


def test_round_trip_is_bit_exact(backend, exported, tmp_path, capsys):
    assert run_cli(capsys, "convert", "--from", "hf", str(exported), str(tmp_path / "back.ckpt"))[0] == 0
    loaded = load_model(tmp_path / "back.ckpt", task="clm")
    assert loaded.config == CONFIG and loaded.tokenizer == "utf8"
    state = loaded.model.state_dict()
    assert state.keys() == backend.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in backend.state_dict().items())


def test_a_directory_with_separate_projections_is_refused_naming_the_weights(backend, exported, tmp_path, capsys):
    # Our exports hold the fused projections; separate query/key/value weights are not of this format.
    from safetensors.torch import save_file

    from perceiver_cli.models.huggingface.state_dicts import unfused_state_dict

    older = tmp_path / "older"
    shutil.copytree(exported, older)
    save_file({f"model.{k}": v.contiguous() for k, v in unfused_state_dict(backend).items()}, str(older / "model.safetensors"))
    status, _, err = run_cli(capsys, "convert", "--from", "hf", str(older), str(tmp_path / "back.ckpt"))
    assert status == 2 and "missing" in err and "kv_proj" in err
    assert not (tmp_path / "back.ckpt").exists()


def test_remote_code_export_loads_and_generates_without_perceiver_cli(backend, tmp_path, capsys):
    write_checkpoint(tmp_path / "clm.ckpt", "clm", backend, CONFIG)
    status, out, err = run_cli(
        capsys, "convert", "--to", "hf", "--remote-code", "--model", str(tmp_path / "clm.ckpt"), str(tmp_path / "rc")
    )
    assert status == 0, err
    assert "trust_remote_code=True" in out
    assert json.loads((tmp_path / "rc" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_perceiver_ar.PerceiverARForCausalLM"
    )
    prompt = [72, 111, 115, 117, 38, 44]
    expected, _ = reference_greedy(backend, prompt, 10, num_latents=2)
    script = f"""
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("rc", trust_remote_code=True).eval()
prompt = torch.tensor([{prompt}])
runs = {{
    str(use_cache): model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, num_latents=2,
                                   use_cache=use_cache)[0, 6:].tolist()
    for use_cache in (True, False)
}}
# Assisted decoding and prompt lookup crop the cache (transformers 5.25 first calls activate_past_recording with an
# argument): both must still give the greedy tokens.
repeated = torch.cat([prompt, prompt], dim=1)
greedy = model.generate(repeated, max_new_tokens=10, do_sample=False)
runs["lookup"] = model.generate(repeated, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3).equal(greedy)
runs["assisted"] = model.generate(repeated, max_new_tokens=10, do_sample=False, assistant_model=model).equal(greedy)
print(json.dumps({{"module": type(model).__module__, "class": type(model).__name__, "tokens": runs}}))
"""
    result, isolation = run_isolated(script, cwd=tmp_path)
    assert isolation == {"perceiver_cli_imported": False, "perceiver_cli_importable": False}
    assert result["class"] == "PerceiverARForCausalLM"
    assert result["module"].startswith("transformers_modules.")
    assert result["tokens"] == {"True": expected, "False": expected, "lookup": True, "assisted": True}
