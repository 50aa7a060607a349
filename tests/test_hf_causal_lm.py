"""The exported causal LM as a Hugging Face causal LM: logits of every position, a tokenizer that adds nothing,
left-padded batches, and generation through the stepper `perceiver generate` runs (issue 18)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_clm_config
from transformers import AutoModelForCausalLM, AutoTokenizer, PerceiverTokenizer, pipeline

from perceiver_cli import cli
from perceiver_cli.checkpoints import write_checkpoint
from perceiver_cli.generation import GenerationSettings, generate_tokens
from perceiver_cli.models.clm import CausalLanguageModel

import perceiver_cli.models.huggingface  # noqa: F401  (registers the model type)

CONFIG = tiny_clm_config(cross_attention_dropout=0.0)  # max_seq_len 48, max_latents 12


@pytest.fixture(scope="module")
def backend():
    torch.manual_seed(0)
    model = CausalLanguageModel(tiny_clm_config(cross_attention_dropout=0.0, init_scale=0.2)).eval()
    return model


@pytest.fixture(scope="module")
def exported(backend, tmp_path_factory):
    directory = tmp_path_factory.mktemp("clm")
    write_checkpoint(directory / "clm.ckpt", "clm", backend, CONFIG)
    with pytest.raises(SystemExit) as exit_:
        cli.run_app(cli.app, ["convert", "--to", "hf", "--model", str(directory / "clm.ckpt"), str(directory / "hf")])
    assert exit_.value.code == 0
    return directory / "hf"


@pytest.fixture(scope="module")
def hf_model(exported):
    return AutoModelForCausalLM.from_pretrained(exported).eval()


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(6, 262, (1, n), generator=torch.Generator().manual_seed(seed))


def scored_by_windows(backend, ids: torch.Tensor) -> torch.Tensor:
    """The logits of every position, each from the latents of a window: chunks of max_latents from the end, each
    window reaching back max_seq_len tokens."""
    n, rows = ids.shape[1], []
    for hi in range(n, 0, -backend.max_latents):
        k = min(backend.max_latents, hi)
        window = ids[:, max(0, hi - backend.max_seq_len) : hi]
        with torch.no_grad():
            rows.insert(0, backend(window, window.shape[1] - k))
    return torch.cat(rows, dim=1)


# --- 1. logits of every position ------------------------------------------------------------------------------------


def test_forward_returns_logits_for_every_position(backend, hf_model):
    ids = ids_of(70)  # longer than the window (48) and several chunks of latents (12)
    with torch.no_grad():
        output = hf_model(ids, labels=ids)
    assert output.logits.shape == (1, 70, 262)
    torch.testing.assert_close(output.logits, scored_by_windows(backend, ids), atol=1e-5, rtol=0)
    # The loss of every Hugging Face causal LM: logits at i predict token i + 1.
    expected_loss = F.cross_entropy(output.logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(output.loss, expected_loss)


def test_the_last_row_is_what_generation_starts_from(backend, hf_model):
    ids = ids_of(30, seed=1)
    with torch.no_grad():
        logits = hf_model(ids).logits
        first = hf_model.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                  output_logits=True).logits[0]
    torch.testing.assert_close(logits[:, -1], first, atol=1e-5, rtol=0)


def test_logits_to_keep_and_num_latents_ask_for_fewer(backend, hf_model):
    ids = ids_of(40, seed=2)
    with torch.no_grad():
        full = hf_model(ids).logits
        torch.testing.assert_close(hf_model(ids, logits_to_keep=15).logits, full[:, -15:], atol=1e-6, rtol=0)
        assert torch.equal(hf_model(ids, num_latents=5).logits, backend(ids, 35))


def test_left_padding_changes_no_real_position(hf_model):
    long, short = ids_of(40, seed=3), ids_of(26, seed=4)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 14, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :14] = 0
    with torch.no_grad():
        together = hf_model(batch, attention_mask=mask).logits
        alone = hf_model(short).logits
    torch.testing.assert_close(together[0:1], hf_model(long).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[1:, 14:], alone, atol=1e-5, rtol=0)


# --- 2. the tokenizer -----------------------------------------------------------------------------------------------


def test_exported_tokenizer_adds_no_special_tokens_and_tells_the_window(exported):
    tokenizer = AutoTokenizer.from_pretrained(exported)
    text = "Grüße, [CLS] world\n"
    assert tokenizer(text)["input_ids"] == PerceiverTokenizer()(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.model_max_length == CONFIG.max_seq_len
    assert tokenizer.padding_side == "left"
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 2, 2)


def test_text_generation_pipeline_with_defaults_continues_the_prompt(backend, exported):
    prompt = "The meaning of"
    generator = pipeline("text-generation", model=str(exported), device="cpu")
    text = generator(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    ids = PerceiverTokenizer()(prompt, add_special_tokens=False)["input_ids"]
    settings = GenerationSettings(max_new_tokens=12, do_sample=False, stop_at_eos=False)
    expected = torch.stack(list(generate_tokens(backend, ids, settings)))[:, 0].tolist()
    assert text == prompt + PerceiverTokenizer().decode(expected)


# --- 3. left-padded batches -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_left_padded_row_generates_what_it_generates_alone_past_max_latents(hf_model, use_cache):
    # Row 1 has 14 pads; 40 new tokens take both rows past max_latents (12) and past the window (48).
    long, short = ids_of(20, seed=5), ids_of(6, seed=6)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 14, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :14] = 0

    def greedy(ids, **kwargs):
        with torch.no_grad():
            out = hf_model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, use_cache=use_cache,
                                    return_dict_in_generate=True, output_scores=True, **kwargs)
        return out.sequences[:, ids.shape[1] :], torch.stack(out.scores, dim=1)

    tokens, scores = greedy(batch, attention_mask=mask)
    for row, alone in enumerate((long, short)):
        alone_tokens, alone_scores = greedy(alone)
        assert tokens[row].tolist() == alone_tokens[0].tolist(), row
        torch.testing.assert_close(scores[row], alone_scores[0], atol=1e-4, rtol=0)


# --- 5. one stepper -------------------------------------------------------------------------------------------------


def test_cached_generate_steps_through_the_models_step(hf_model, monkeypatch):
    # While the latents grow, a cached step is one token through `CausalLanguageModel.step` (the fast path of
    # `perceiver generate`), not a forward pass.
    calls = []
    backend = hf_model.model
    forward, step = backend.forward, backend.step
    monkeypatch.setattr(backend, "forward", lambda *a, **k: calls.append("forward") or forward(*a, **k))
    monkeypatch.setattr(backend, "step", lambda *a, **k: calls.append("step") or step(*a, **k))
    with torch.no_grad():
        hf_model.generate(ids_of(4, seed=7), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert calls == ["forward"] + ["step"] * 5


def test_generate_and_perceiver_generate_give_the_same_tokens_past_the_window(backend, hf_model):
    ids = ids_of(30, seed=8)
    settings = GenerationSettings(max_new_tokens=50, do_sample=False, stop_at_eos=False)
    ours = torch.stack(list(generate_tokens(backend, ids[0].tolist(), settings)))[:, 0].tolist()
    with torch.no_grad():
        theirs = hf_model.generate(ids, max_new_tokens=50, min_new_tokens=50, do_sample=False)[0, 30:].tolist()
    assert theirs == ours


# --- 4. the standard API --------------------------------------------------------------------------------------------


def fresh_model(hf_model):
    """A copy of the exported model (and its config) that a test may change."""
    return copy.deepcopy(hf_model).eval()


def test_hidden_states_are_those_the_logits_come_from(hf_model):
    ids = ids_of(30, seed=9)
    with torch.no_grad():
        output = hf_model(ids, output_hidden_states=True)
    states = output.hidden_states
    assert len(states) == CONFIG.num_self_attention_layers + 1  # cross-attention, then each self-attention layer
    assert all(h.shape == (1, 30, CONFIG.num_channels) for h in states)
    backend = hf_model.model
    expected = F.linear(states[-1], backend.input_adapter.txt_embedding.weight, backend.output_bias)
    torch.testing.assert_close(expected, output.logits, atol=1e-5, rtol=0)


def test_return_dict_false_gives_the_tuple(hf_model):
    ids = ids_of(10, seed=10)
    with torch.no_grad():
        loss, logits = hf_model(ids, labels=ids, return_dict=False)
        assert torch.equal(logits, hf_model(ids).logits)
        assert torch.equal(loss, hf_model(ids, labels=ids).loss)


def test_embeddings_can_be_read_replaced_and_resized(hf_model):
    model = fresh_model(hf_model)
    assert model.get_input_embeddings() is model.model.input_adapter.txt_embedding
    ids = ids_of(16, seed=11)
    with torch.no_grad():
        before = model(ids).logits
        model.resize_token_embeddings(300)
        after = model(ids).logits
    assert after.shape == (1, 16, 300) and model.config.vocab_size == 300
    torch.testing.assert_close(after[..., :262], before, atol=1e-6, rtol=0)  # the old tokens keep their logits
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3)


def test_inputs_embeds_stand_in_for_input_ids(hf_model):
    ids = ids_of(30, seed=12)
    embeds = hf_model.get_input_embeddings()(ids)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(inputs_embeds=embeds).logits, hf_model(ids).logits, atol=1e-6, rtol=0)
        from_ids = hf_model.generate(ids, max_new_tokens=30, do_sample=False)[:, 30:]
        from_embeds = hf_model.generate(inputs_embeds=embeds, max_new_tokens=30, do_sample=False)
    assert torch.equal(from_ids, from_embeds)


def test_generation_kwargs_reach_forward_and_the_cache_is_a_transformers_cache(hf_model):
    from transformers.cache_utils import Cache

    ids = ids_of(8, seed=13)
    inputs = hf_model.prepare_inputs_for_generation(ids, num_latents=3, custom_flag=True)
    assert inputs["num_latents"] == 3 and inputs["custom_flag"] is True
    assert hf_model.config.use_cache is True
    with torch.no_grad():
        output = hf_model.generate(ids, max_new_tokens=3, return_dict_in_generate=True)
    assert isinstance(output.cache, Cache) and output.cache.get_seq_length() == 8 + 2


def test_assisted_decoding_and_prompt_lookup_give_greedy_tokens(hf_model):
    half = ids_of(20, seed=14)
    ids = torch.cat([half, half], dim=1)  # repetitive, so prompt lookup finds drafts
    with torch.no_grad():
        greedy = hf_model.generate(ids, max_new_tokens=30, do_sample=False)
        lookup = hf_model.generate(ids, max_new_tokens=30, do_sample=False, prompt_lookup_num_tokens=5)
        assisted = hf_model.generate(ids, max_new_tokens=30, do_sample=False, assistant_model=hf_model)
    assert torch.equal(lookup, greedy) and torch.equal(assisted, greedy)


def test_gradient_checkpointing_enable_recomputes_the_layers(hf_model, monkeypatch):
    import perceiver_cli.models.layers as layers

    model = fresh_model(hf_model).train()
    calls = []
    checkpoint = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    ids = ids_of(20, seed=15)
    model(ids, labels=ids).loss.backward()
    assert not calls
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    model(ids, labels=ids).loss.backward()
    assert calls  # the cross-attention and every self-attention layer of each window


# --- 6. the perceiver-io library's schedule -------------------------------------------------------------------------


def library_rule_greedy(backend, prompt: list[int], steps: int, num_latents: int):
    """Greedy decoding by the perceiver-io library's documented rule, one full pass per step: the window is the
    last max_seq_len tokens and its latents the last min(num_latents + step, max_latents) of them."""
    tokens, logits = list(prompt), []
    for step in range(steps):
        window = tokens[-backend.max_seq_len :]
        latents = min(num_latents + step, backend.max_latents, len(window))
        with torch.no_grad():
            step_logits = backend(torch.tensor([window]), len(window) - latents)[0, -1]
        logits.append(step_logits)
        tokens.append(int(step_logits.argmax()))
    return tokens[len(prompt) :], torch.stack(logits)


@pytest.mark.parametrize("use_cache", [True, False])
def test_the_sliding_schedule_is_the_perceiver_io_rule(backend, hf_model, use_cache):
    # 20 prompt tokens, 3 latents, 45 new tokens: the latents fill up (12), the prefix grows, the window slides.
    prompt = ids_of(20, seed=16)
    expected, expected_logits = library_rule_greedy(backend, prompt[0].tolist(), 45, num_latents=3)
    settings = GenerationSettings(max_new_tokens=45, do_sample=False, stop_at_eos=False, num_latents=3,
                                  use_cache=use_cache, schedule="sliding")
    ours = torch.stack(list(generate_tokens(backend, prompt[0].tolist(), settings)))[:, 0].tolist()
    assert ours == expected
    with torch.no_grad():  # the export: the generation config's window_schedule, or generate()'s argument
        out = hf_model.generate(prompt, max_new_tokens=45, min_new_tokens=45, do_sample=False, num_latents=3,
                                use_cache=use_cache, window_schedule="sliding", return_dict_in_generate=True,
                                output_logits=True)
    assert out.sequences[0, 20:].tolist() == expected
    torch.testing.assert_close(torch.stack(out.logits, dim=1)[0], expected_logits, atol=1e-5, rtol=0)
    chunked = GenerationSettings(max_new_tokens=45, do_sample=False, stop_at_eos=False, num_latents=3)
    assert torch.stack(list(generate_tokens(backend, prompt[0].tolist(), chunked)))[:, 0].tolist() != expected


def test_the_export_names_its_schedule_in_the_generation_config(exported):
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(exported).window_schedule == "chunked"


def test_perceiver_generate_takes_the_schedule(backend, tmp_path, capsys):
    from cli_runner import assert_one_error, run_cli

    write_checkpoint(tmp_path / "clm.ckpt", "clm", backend, CONFIG)
    args = ["generate", "Hello there", "--model", str(tmp_path / "clm.ckpt"), "--greedy", "--max-new-tokens", "40"]
    status, out, err = run_cli(capsys, *args, "--schedule", "sliding", "--json")
    assert status == 0, err
    ids = PerceiverTokenizer()("Hello there", add_special_tokens=False)["input_ids"]
    settings = GenerationSettings(max_new_tokens=40, do_sample=False, schedule="sliding")
    expected = torch.stack(list(generate_tokens(backend, ids, settings)))[:, 0].tolist()
    assert json.loads(out)["generated_tokens"] == len(expected)
    status, out, err = run_cli(capsys, *args, "--schedule", "fastest")
    assert_one_error(status, err, "unknown schedule 'fastest'", out)
