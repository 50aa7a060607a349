"""Generation with Perceiver AR: the key/value cache against full forward passes, sampling, stop strings, streaming
UTF-8 decoding, and the `perceiver generate` command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perceiver_cli.data.tokenizer import load_tokenizer
from perceiver_cli.generation import (
    ContinuousBatch,
    GenerationSettings,
    SequenceText,
    generate,
    generate_tokens,
    initial_num_latents,
    process_logits,
)
from perceiver_cli.models.clm import CausalLanguageModel, Window
from perceiver_cli.models.clm.decoding import WindowStepper
from perceiver_cli.models.mlm import MaskedLanguageModel
from tiny_models import tiny_clm_config, tiny_mlm_config
from cli_runner import assert_one_error, run_cli, write_run


def clm(**overrides) -> CausalLanguageModel:
    """A tiny random causal LM; init_scale 0.2 spreads its logits, so that greedy choices are clear-cut."""
    torch.manual_seed(0)
    values = dict(cross_attention_dropout=0.0, init_scale=0.2) | overrides
    return CausalLanguageModel(tiny_clm_config(**values)).eval()


class PerceiverARDecoder:
    """The stepper on copies of one prompt, with what these tests inspect: the window, its tokens, the cache."""

    def __init__(self, model, prompt, num_latents, batch_size, use_cache):
        self.stepper = WindowStepper(model, use_cache=use_cache)
        self.prompt, self.num_latents, self.batch_size = prompt, num_latents, batch_size

    def start(self):
        with torch.inference_mode():
            logits = self.stepper.start(self.prompt[None], num_latents=self.num_latents)
            self.stepper.repeat_interleave(self.batch_size)
        return logits.expand(self.batch_size, -1)

    def step(self, tokens):
        with torch.inference_mode():
            return self.stepper.step(tokens)

    @property
    def window(self):
        return self.stepper.groups[0].window

    @property
    def prefix_len(self):
        return self.window.prefix_len

    @property
    def tokens(self):
        return self.stepper.groups[0].tokens[:, -self.window.length :]

    @property
    def cache(self):
        return self.stepper.groups[0].cache


def prompt_of(n: int) -> list[int]:
    return torch.randint(6, 262, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def greedy(max_new_tokens: int, num_latents: int | None = None, use_cache: bool = True) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=max_new_tokens, do_sample=False, num_latents=num_latents, use_cache=use_cache, stop_at_eos=False
    )


# --- the key/value cache -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt_len, num_latents",
    [(1, None), (1, 8), (5, 8), (8, 8), (8, None), (20, 8), (20, 1)],
    ids=["one-token", "one-token-8", "shorter", "equal", "equal-default", "longer", "prefix-one-latent"],
)
def test_greedy_with_and_without_cache_agree_while_latents_grow(prompt_len, num_latents):
    # max_latents 24 > num_latents + max_new_tokens: every step adds a latent, the phase where the cache is exact.
    model = clm(max_latents=24)
    prompt = torch.tensor(prompt_of(prompt_len))
    latents = min(prompt_len, num_latents or 24)
    cached = PerceiverARDecoder(model, prompt, latents, batch_size=1, use_cache=True)
    full = PerceiverARDecoder(model, prompt, latents, batch_size=1, use_cache=False)
    a, b = cached.start(), full.start()
    tokens = []
    for _ in range(12):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        token = b.argmax(dim=-1)
        assert torch.equal(a.argmax(dim=-1), token)
        tokens.append(token.item())
        a, b = cached.step(token), full.step(token)
    assert cached.prefix_len == full.prefix_len == prompt_len - latents  # the prefix never moved

    settings = greedy(13, num_latents)
    with_cache = torch.stack(list(generate_tokens(model, prompt.tolist(), settings)))[:, 0].tolist()
    settings.use_cache = False
    without_cache = torch.stack(list(generate_tokens(model, prompt.tolist(), settings)))[:, 0].tolist()
    assert with_cache == without_cache == tokens + [a.argmax().item()]


@pytest.mark.parametrize("abs_pos_emb", [True, False])
def test_cache_is_exact_in_every_phase(abs_pos_emb):
    # 20-token prompt, 5 latents, 60 steps: the latents fill up (max 12), join the prefix, the window (48) slides.
    # After every step the whole cache equals a fresh pass over the current window, and the logits equal those of
    # decoding without the cache.
    model = clm(abs_pos_emb=abs_pos_emb)
    prompt = torch.tensor(prompt_of(20))
    cached = PerceiverARDecoder(model, prompt, 5, batch_size=1, use_cache=True)
    full = PerceiverARDecoder(model, prompt, 5, batch_size=1, use_cache=False)
    a, b = cached.start(), full.start()
    prefix_lens, lengths = set(), set()
    for _ in range(60):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        token = b.argmax(dim=-1)
        a, b = cached.step(token), full.step(token)
        assert torch.equal(cached.tokens, full.tokens) and cached.window == full.window
        prefix_lens.add(cached.prefix_len)
        lengths.add(cached.window.length)
        fresh = model.empty_cache()
        with torch.inference_mode():
            model(cached.tokens[:, :-1], cached.prefix_len, cache=fresh)  # the cache holds all but the newest token
            model(cached.tokens[:, -1:], 0, cache=fresh)
        for mine, recomputed in zip([cached.cache.cross_attention, *cached.cache.self_attention],
                                    [fresh.cross_attention, *fresh.self_attention]):
            torch.testing.assert_close(mine.k, recomputed.k, rtol=0, atol=1e-5)
            torch.testing.assert_close(mine.v, recomputed.v, rtol=0, atol=1e-5)
    assert max(prefix_lens) > 15 and max(lengths) == 48  # latents joined the prefix and the window filled up


@pytest.mark.parametrize("abs_pos_emb, rotary_layers", [(True, 1), (False, -1), (True, 0)])
def test_a_cached_step_computes_what_the_forward_pass_computes(abs_pos_emb, rotary_layers):
    # `step` is the forward pass of one new latent per sequence with the general case's masks and reshapes left
    # out: three different sequences at once, several steps, the same logits and the same caches.
    model = clm(abs_pos_emb=abs_pos_emb, num_self_attention_rotary_layers=rotary_layers)
    prompts = torch.stack([torch.tensor(prompt_of(n)[:14]) for n in (14, 15, 16)])  # (3, 14)
    by_step, by_forward = model.empty_cache(), model.empty_cache()
    with torch.inference_mode():
        model(prompts, 10, cache=by_step)  # 10 prefix positions, 4 latents
        model(prompts, 10, cache=by_forward)
        tokens = prompts[:, -1]
        for _ in range(8):  # up to the 12 latents of the model
            expected = model(tokens[:, None], 0, cache=by_forward)[:, -1]
            logits = model.step(tokens, by_step)
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
            tokens = logits.argmax(dim=-1)
        for mine, theirs in zip([by_step.cross_attention, *by_step.self_attention],
                                [by_forward.cross_attention, *by_forward.self_attention], strict=True):
            torch.testing.assert_close(mine.k, theirs.k, rtol=0, atol=1e-6)
            torch.testing.assert_close(mine.v, theirs.v, rtol=0, atol=1e-6)
        assert len(by_step) == 14 + 8 and by_step.num_latents == 12
        with pytest.raises(ValueError, match="13 latents exceed max_latents 12"):
            model.step(tokens, by_step)


def test_a_rebuild_recomputes_only_what_moved(monkeypatch):
    # Latents joining the prefix of a window that grows in place keep the older prefix's keys and values: the
    # rebuild runs over the latents and the tokens that joined the prefix. Once the window slides, every position
    # moved and the rebuild runs over the whole window. Every other step is one token through `step`. (That the
    # rebuilt cache is exact is the test above.)
    model = clm()  # max_seq_len 48, max_latents 12
    fed = []  # tokens fed by each call: a full pass (`forward`) or one token per sequence (`step`)
    forward, step = model.forward, model.step
    monkeypatch.setattr(model, "forward", lambda x, *args, **kwargs: fed.append(("forward", x.shape[1]))
                        or forward(x, *args, **kwargs))
    monkeypatch.setattr(model, "step", lambda tokens, cache: fed.append(("step", 1)) or step(tokens, cache))
    decoder = PerceiverARDecoder(model, torch.tensor(prompt_of(20)), 12, batch_size=1, use_cache=True)
    logits = decoder.start()
    rebuilds, steps = [], 0
    for _ in range(60):
        before = decoder.window
        fed.clear()
        logits = decoder.step(logits.argmax(dim=-1))
        (kind, n), = fed  # one call per step
        if kind == "forward":
            rebuilds.append((before, decoder.window, n))
        else:
            steps += 1
            assert decoder.window == Window(before.length + 1, before.num_latents + 1)
    in_place = [n for old, new, n in rebuilds if new.length == old.length + 1]
    slid = [(new.length, n) for old, new, n in rebuilds if new.length <= old.length]
    assert in_place and all(n == 12 + 1 for n in in_place)  # the 12 latents before, plus the new token
    assert slid and all(n == length for length, n in slid)
    assert steps == 60 - len(rebuilds) and steps > 40


def test_fp32_cpu_decoding_runs_without_onednn_and_restores_the_flag(monkeypatch):
    # oneDNN's per-call set-up dominates one-token steps on the CPU; generation switches it off for its own calls
    # only: the global flag is back as it was after every step, and between steps.
    model = clm()
    during = []
    forward, step = model.forward, model.step
    monkeypatch.setattr(model, "forward", lambda *a, **k: during.append(torch.backends.mkldnn.enabled) or forward(*a,
                                                                                                              **k))
    monkeypatch.setattr(model, "step", lambda *a: during.append(torch.backends.mkldnn.enabled) or step(*a))
    assert torch.backends.mkldnn.enabled
    between = [torch.backends.mkldnn.enabled for _ in generate_tokens(model, prompt_of(5), greedy(4))]
    assert during == [False] * 4 and between == [True] * 4 and torch.backends.mkldnn.enabled


@pytest.mark.parametrize("max_latents", [12, 48])  # 48: no prefix at all, the window of latents slides
def test_cache_stays_bounded_and_generation_runs_past_max_seq_len(max_latents):
    model = clm(max_latents=max_latents)  # max_seq_len 48
    num_latents = initial_num_latents(10, model.config, 4)  # 4, or all 10 when there is no prefix
    decoder = PerceiverARDecoder(model, torch.tensor(prompt_of(10)), num_latents, batch_size=2, use_cache=True)
    logits = decoder.start()
    for _ in range(100):
        logits = decoder.step(logits.argmax(dim=-1))
        assert len(decoder.cache) == decoder.tokens.shape[1] <= 48
        num_latents = decoder.tokens.shape[1] - decoder.prefix_len
        assert all(len(kv) == num_latents <= max_latents for kv in decoder.cache.self_attention)
        assert decoder.prefix_len <= 48 - max_latents
    assert torch.isfinite(logits).all()


def test_prompt_longer_than_max_seq_len_keeps_its_end():
    model = clm()
    prompt = prompt_of(60)
    settings = greedy(3)
    assert list(generate_tokens(model, prompt, settings)) == list(generate_tokens(model, prompt[-48:], settings))


# --- sampling --------------------------------------------------------------------------------------------------------


def sample(model, seed: int, num_return_sequences: int = 1) -> list[list[int]]:
    settings = GenerationSettings(max_new_tokens=20, seed=seed, num_return_sequences=num_return_sequences)
    return torch.stack(list(generate_tokens(model, prompt_of(5), settings)), dim=1).tolist()


def test_sampling_with_a_seed_is_reproducible_and_seeds_differ():
    model = clm()
    assert sample(model, seed=1) == sample(model, seed=1)
    assert sample(model, seed=1) != sample(model, seed=2)


def test_several_sequences_are_sampled_in_one_batch():
    sequences = sample(clm(), seed=1, num_return_sequences=3)
    assert len(sequences) == 3 and all(len(s) == 20 for s in sequences)
    assert len({tuple(s) for s in sequences}) == 3


def test_logits_processing_matches_hugging_face():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    history = torch.randint(0, 50, (3, 7))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, history, True)
    settings = GenerationSettings(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        expected = warper(history, expected)
    torch.testing.assert_close(process_logits(logits, seen, settings), expected)


def test_greedy_applies_only_the_repetition_penalty():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    settings = GenerationSettings(do_sample=False, temperature=0.1, top_k=1, repetition_penalty=2.0)
    torch.testing.assert_close(process_logits(logits, seen, settings), torch.tensor([[1.0, 1.9, -1.0]]))


# --- text: stop strings, end of text, streaming UTF-8 ---------------------------------------------------------------


def byte_ids(data: bytes) -> list[int]:
    return [b + 6 for b in data]  # the utf8 tokenizer: byte b has id b + 6


def stream(tokens: list[int], stop: tuple[str, ...] = (), eos: int | None = 2) -> tuple[list[str], SequenceText]:
    """Feed tokens one by one; return the released pieces (the last from finish()) and the sequence."""
    text = SequenceText(load_tokenizer("utf8"), stop, eos)
    pieces = [text.add(token) for token in tokens]
    pieces.append(text.finish())
    return pieces, text


def test_stop_string_ends_the_text_before_it_and_is_never_released():
    pieces, text = stream(byte_ids(b"one two, three"), stop=(", ", "xyz"))
    assert text.text == "one two" and text.finish_reason == "stop"
    assert "".join(pieces) == "one two"
    assert text.num_tokens == len("one two, ")  # tokens after the stop string are not taken


def test_text_that_only_looks_like_a_stop_string_is_released():
    pieces, text = stream(byte_ids(b"a, b"), stop=(", c",))
    assert pieces[:2] == ["a", ""]  # ", " might begin the stop string: held back ...
    assert "".join(pieces) == "a, b" and text.finish_reason == "length"  # ... until it does not


def test_end_of_text_token_ends_the_sequence():
    pieces, text = stream(byte_ids(b"hi") + [2] + byte_ids(b"more"))
    assert text.text == "hi" and text.finish_reason == "eos" and text.num_tokens == 3


def test_utf8_decoding_of_split_characters_invalid_bytes_and_special_tokens():
    data = "é€😀".encode()
    pieces, text = stream(byte_ids(data))
    # Nothing is released until a character is complete.
    assert pieces[:-1] == ["", "é", "", "", "€", "", "", "", "😀"]
    invalid = byte_ids(b"a\xffb\xc3(") + [4, 5] + byte_ids(b"\xe2\x82")  # 0xff invalid; 0xc3 then '(' invalid
    _, text = stream(invalid)
    assert text.text == "a\ufffdb\ufffd(\ufffd"  # special tokens 4, 5 give no text; a cut character ends as U+FFFD


def test_other_tokenizers_release_the_new_end_of_the_decoded_text():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, héllo wörld"] * 4, vocab_size=280, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    ids = tokenizer("héllo € world", add_special_tokens=False)["input_ids"]  # "€" is three byte tokens
    text = SequenceText(tokenizer)
    pieces = [text.add(i) for i in ids] + [text.finish()]
    assert "".join(pieces) == "héllo € world"
    assert all("\ufffd" not in piece for piece in pieces)  # the partial "€" was held back, not shown broken


@pytest.mark.parametrize(
    "prompt_len, requested, expected",
    [(5, None, 5), (30, None, 12), (30, 4, 4), (3, 8, 3), (48, 4, 12), (100, 4, 12), (40, 1, 4)],
)
def test_initial_latents_fit_the_prompt_and_the_prefix(prompt_len, requested, expected):
    # max_seq_len 48, max_latents 12: the prefix holds at most 36 tokens.
    assert initial_num_latents(prompt_len, tiny_clm_config(), requested) == expected


# --- generate(): everything together -------------------------------------------------------------------------------


def test_streamed_pieces_add_up_to_the_returned_text():
    pieces = []
    settings = GenerationSettings(max_new_tokens=30, seed=3, stop=("zz",), stop_at_eos=False)
    [result] = generate(clm(), load_tokenizer("utf8"), prompt_of(5), settings, on_text=lambda i, t: pieces.append(t))
    assert "".join(pieces) == result.text
    assert result.num_tokens <= 30 and result.finish_reason in ("length", "stop")


def test_the_end_of_text_token_ends_a_sequence_unless_told_to_go_on():
    model = clm()
    with torch.no_grad():
        model.output_bias[2] = 1e4  # the utf8 tokenizer's end-of-text token wins every step
    tokenizer = load_tokenizer("utf8")
    [ended] = generate(model, tokenizer, prompt_of(5), GenerationSettings(max_new_tokens=10, seed=0))
    assert ended.finish_reason == "eos" and ended.num_tokens == 1 and ended.text == ""
    settings = GenerationSettings(max_new_tokens=10, seed=0, stop_at_eos=False)
    [going_on] = generate(model, tokenizer, prompt_of(5), settings)
    assert going_on.finish_reason == "length" and going_on.num_tokens == 10


# --- the command ---------------------------------------------------------------------------------------------------


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A working directory with a clm run and an mlm run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PERCEIVER_DEBUG", "0")
    model = clm()
    write_run(tmp_path, "clm-tiny", "clm", model, model.config)
    torch.manual_seed(0)
    mlm_config = tiny_mlm_config()
    write_run(tmp_path, "mlm-tiny", "mlm", MaskedLanguageModel(mlm_config), mlm_config)
    return tmp_path


def test_generate_streams_text_and_reports_timing_on_stderr(runs, capsys):
    status, out, err = run_cli(capsys, "generate", "Hello", "--max-new-tokens", "16", "--seed", "1")
    assert status == 0
    assert "using runs/clm-tiny/version_0 (most recent clm run)" in err
    assert "5 prompt tokens" in err and "tokens/s" in err
    status, again, _ = run_cli(capsys, "generate", "Hello", "--max-new-tokens", "16", "--seed", "1")
    assert again == out  # same seed, same text


def test_generate_json_has_one_object_per_sequence(runs, capsys):
    status, out, _ = run_cli(
        capsys, "generate", "Hello", "--json", "--num-return-sequences", "2", "--max-new-tokens", "8", "--seed", "0"
    )
    assert status == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 2
    keys = {"prompt", "text", "prompt_tokens", "generated_tokens", "finish_reason", "seconds", "tokens_per_second"}
    for record in records:
        assert set(record) == keys
        assert record["prompt"] == "Hello" and record["prompt_tokens"] == 5
        assert 1 <= record["generated_tokens"] <= 8


def test_generate_greedy_without_cache_prints_the_same(runs, capsys):
    args = ["generate", "Hi", "--greedy", "--max-new-tokens", "10", "--json"]
    _, cached, _ = run_cli(capsys, *args)
    _, full, _ = run_cli(capsys, *args, "--no-cache")
    assert json.loads(cached)["text"] == json.loads(full)["text"]


def test_generate_reads_the_prompt_from_a_file_or_stdin(runs, capsys, monkeypatch):
    Path("prompt.txt").write_text("Hello\n", encoding="utf-8")
    args = ["--json", "--greedy", "--max-new-tokens", "4"]
    _, from_argument, _ = run_cli(capsys, "generate", "Hello", *args)
    _, from_file, _ = run_cli(capsys, "generate", "--file", "prompt.txt", *args)
    _, from_stdin, _ = run_cli(capsys, "generate", *args, stdin=b"Hello\n", monkeypatch=monkeypatch)
    texts = {json.loads(output)["text"] for output in (from_argument, from_file, from_stdin)}
    prompts = {json.loads(output)["prompt"] for output in (from_argument, from_file, from_stdin)}
    assert len(texts) == 1 and prompts == {"Hello"}  # the trailing newline of the file and of stdin is dropped


def test_generate_warns_about_a_prompt_longer_than_max_seq_len(runs, capsys):
    status, _, err = run_cli(capsys, "generate", "x" * 60, "--max-new-tokens", "2")
    assert status == 0
    assert "warning: the prompt has 60 tokens, more than the model's max_seq_len (48): using its last 48" in err


def test_generate_several_sequences_are_printed_one_after_another(runs, capsys):
    status, out, _ = run_cli(capsys, "generate", "Hi", "--num-return-sequences", "2", "--max-new-tokens", "4")
    assert status == 0
    assert "--- sequence 1/2 ---" in out and "--- sequence 2/2 ---" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", ""], "the prompt is empty"),
        (["generate", "x", "--top-p", "1.5"], "top-p must be greater than 0 and at most 1"),
        (["generate", "x", "--top-p", "0"], "top-p"),
        (["generate", "x", "--temperature", "-1"], "temperature must be greater than 0"),
        (["generate", "x", "--top-k", "-1"], "top-k"),
        (["generate", "x", "--repetition-penalty", "0"], "repetition-penalty"),
        (["generate", "x", "--max-new-tokens", "0"], "max-new-tokens"),
        (["generate", "x", "--num-return-sequences", "0"], "num-return-sequences"),
        (["generate", "x", "--greedy", "--num-return-sequences", "2"], "greedy decoding"),
        (["generate", "x", "--stop", ""], "stop strings must not be empty"),
        (["generate", "x", "--num-latents", "0"], "num-latents must be at least 1"),
        (["generate", "x", "--num-latents", "13"], "at most the model's max_latents (12)"),
        (["generate", "--file", "missing.txt"], "prompt file not found"),
        (["generate", "x", "--file", "prompt.txt"], "not both"),
        (["generate", "--file", "latin1.txt"], "not UTF-8"),
        (["generate", "-"], "the prompt is empty"),  # stdin holds only a newline
        (["generate", "x", "--model", "runs/mlm-tiny/version_0"], "but this command needs a causal language model"),
        (["generate", "x", "--model", "nowhere"], "model not found"),
        (["generate", "x", "--device", "tpu"], "device"),
        (["generate", "x", "--model", "empty-runs"], "holds no checkpoint"),
    ],
)
def test_generate_bad_input_is_one_error_line_and_exit_2(runs, capsys, monkeypatch, args, message):
    Path("prompt.txt").write_text("x", encoding="utf-8")
    Path("latin1.txt").write_bytes("café".encode("latin-1"))
    Path("empty-runs").mkdir()
    status, out, err = run_cli(capsys, *args, stdin=b"\n", monkeypatch=monkeypatch)
    assert_one_error(status, err, message, out)


def test_generate_without_any_run_says_how_to_train_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_cli(capsys, "generate", "x")
    assert status == 2
    assert "no trained causal language model" in err and "perceiver train --preset clm-small" in err


def test_generate_bad_input_in_a_real_process(runs):
    result = subprocess.run(
        [sys.executable, "-m", "perceiver_cli", "generate", "x", "--top-p", "1.5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == "error: top-p must be greater than 0 and at most 1, got 1.5\n"


# --- continuous batching (the server's) -----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["chunked", "sliding"])
def test_prompts_that_join_and_leave_a_running_batch_generate_what_generate_does(schedule):
    # Prompts join every third step, each with its own settings and seed, one (of 2 copies) ends early, and one leaves
    # mid-way: every other one gets `generate`'s sequences exactly (each is added alone, so it runs as it runs alone),
    # through the cache's rebuilds and the window's slide (60 + 70 tokens > max_seq_len 48).
    model, tokenizer = clm(), load_tokenizer("utf8", padding_side="left")
    cases = [
        (prompt_of(5), GenerationSettings(max_new_tokens=30, seed=1, schedule=schedule)),
        (prompt_of(20), GenerationSettings(max_new_tokens=70, seed=2, temperature=0.7, top_p=0.9, schedule=schedule)),
        (prompt_of(2), GenerationSettings(max_new_tokens=20, seed=3, num_return_sequences=3, top_k=20,
                                          repetition_penalty=1.3, schedule=schedule)),
        (prompt_of(60), GenerationSettings(max_new_tokens=25, do_sample=False, schedule=schedule)),
        (prompt_of(5), GenerationSettings(max_new_tokens=40, seed=4, schedule=schedule)),  # leaves after 10 steps
    ]
    free = generate(model, tokenizer, cases[0][0], cases[0][1])[0].text  # a stop string the first one reaches
    cases[0][1].stop = (free[12:14],)
    expected = [generate(model, tokenizer, ids, settings) for ids, settings in cases]
    assert expected[0][0].finish_reason == "stop"

    batch, members, results, step = ContinuousBatch(model, tokenizer, schedule), [], {}, 0
    with torch.inference_mode():
        while step < 3 * len(cases) or batch.members:
            if step % 3 == 0 and step // 3 < len(cases):
                ids, settings = cases[step // 3]
                members += batch.add([(ids, settings, step // 3)])
            if step == 12 + 10:
                assert batch.end(members[4]) == [] and members[4].done
            for update in batch.step():
                results.setdefault(update.member.key, []).append(update)
            step += 1
    for i, member in enumerate(members[:4]):
        assert member.done and member.results() == expected[i], i
        for row, sequence in enumerate(expected[i]):  # the updates spell out the text, and end with its reason
            updates = [u for u in results[i] if u.index == row]
            assert "".join(u.text for u in updates) == sequence.text
            assert [u.finish_reason for u in updates if u.finish_reason] == [sequence.finish_reason]
    assert batch.num_rows == 0 and batch.stepper.batch_size == 0


def test_prompts_of_one_length_added_together_share_a_pass():
    model, tokenizer = clm(), load_tokenizer("utf8", padding_side="left")
    batch = ContinuousBatch(model, tokenizer)
    settings = [GenerationSettings(max_new_tokens=5, seed=i, stop_at_eos=False) for i in range(4)]
    with torch.inference_mode():
        batch.add([(prompt_of(7), settings[0], 0), (prompt_of(9), settings[1], 1), (prompt_of(7)[::-1], settings[2],
                                                                                     2)])
        assert batch.num_rows == 3 and len(batch.stepper.groups) == 2  # lengths 7 and 9
        batch.step()
        batch.add([(prompt_of(7), settings[3], 3)])  # the same length, a step later: a window of its own
        assert len(batch.stepper.groups) == 3
        while batch.members:
            batch.step()
    assert batch.stepper.groups == []
