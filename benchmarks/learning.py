"""The learning benchmark: time to quality of the default presets against the baselines a user would otherwise pick.

`python -m benchmarks --only learning` (or one row: `learning-mlm`, `learning-clm`, `learning-long`,
`learning-long-time`). The MLM and CLM
rows run on each of three corpora of different kinds (benchmarks/corpora.py: `--corpora prose code moby-dick`, the
default), with the train and validation splits the data pipeline makes of each and the UTF-8 byte ids of the `utf8`
tokenizer (vocabulary 262) on both sides:

- MLM: `mlm-small`, trained by the project's own training code (the builders `perceiver train` uses, with an extra
  callback that evaluates), then transformers' `BertForMaskedLM` (4 layers, its width chosen so that its parameter
  count is nearest to ours) in a loop of our own: the same training batches (the preset's data module: chunks,
  order, whole-word masks), so the same token budget (steps x batch x length); the same optimizer and schedule (the
  project's AdamW parameter groups and warmup-cosine schedule with the preset's settings) and gradient clipping.
  BERT runs without dropout, as `mlm-small` does. Both are scored on the whole validation split, masked once with
  the validation seed (`evaluate_mlm`, the code of `perceiver eval`; BERT behind a small adapter): masked-byte loss
  and accuracy; the final models also by word accuracy (`evaluate_word_fill`: validation words, each masked alone,
  filled exactly), which is what `perceiver fill-mask` shows a user.
- CLM: `clm-small` as above, against GPT-2 (transformers' `GPT2LMHeadModel`) with the recipe of nanoGPT's README
  CPU command: 4 layers, 4 heads, 128 wide, block 64, batch 12, 2,000 iterations, AdamW 1e-3 with 100 warmup steps
  then cosine to 1e-4, beta2 0.99, weight decay 0.1, gradient clipping 1.0, no dropout, random windows of the
  training stream. Both are scored by `evaluate_clm` (the code of `perceiver eval`) on the whole validation stream:
  strided windows that score every byte (and every end-of-text byte) exactly once. Perceiver AR's stride is its
  latent count (128 of 512); GPT's is a quarter of its block (16 of 64), so every scored byte sees at least three
  quarters of the window as context on both sides.
- Long context (`learning-long`, also `--only context`; benchmarks/context.py): on the embedded long-document
  corpus "code" (the standard library's .py files whole), Perceiver AR at windows of 256 to 16k tokens (the
  `clm-long` preset), clm-small, and the GPT recipe at blocks 64 to 1,024,
  every model given the same training time (`context_budget_s`: a short timed run of each sets its step count, so
  its cosine schedule ends at the budget, and training stops at the budget in any case); held-out bits per byte of
  each at its full window on the first `context_eval_bytes` bytes of the validation stream, Perceiver AR's context
  curves on the same bytes, and the time per token and peak memory of cached generation at contexts of 1k to 64k
  tokens (a random model with a 65,536-token window).
- Long against short window over training time (`learning-long-time`, benchmarks/context.py): `clm-long` and
  `clm-small` on the same corpus and bytes, after each training time of `context_time_budgets_s` (10, 30 and 60
  minutes; a fresh run per budget): where the long window starts to win.

Time is training time: wall time from the first step, less every evaluation (ours, and the preset's own validation
with its sample, which a plain `perceiver train` run also spends). Each run is evaluated at `evaluations` points
evenly spaced in steps (the last at its end); the run that comes second is also evaluated at the first step past the
first run's final training time, so that each row also compares both at equal time. The baselines run first for the
CLM rows, ours first for MLM (where ours is expected to be the faster one). The curves go to `learning-*.png`.

The runs follow each other on one machine: on a shared machine the load changes between them, and times with it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.corpora import CORPORA, DEFAULT_CORPORA

ROWS = ("learning-mlm", "learning-clm", "learning-long", "learning-long-time")


@dataclass
class GPTRecipe:
    """nanoGPT's README CPU command (config/train_shakespeare_char.py with its command-line overrides)."""

    layers: int = 4
    heads: int = 4
    width: int = 128
    block: int = 64
    batch: int = 12
    iterations: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass
class Settings:
    evaluations: int = 6  # validation points per run, evenly spaced in steps, the last at the end
    eval_batch_tokens: int = 8192  # tokens per forward pass when evaluating (16 windows or chunks of 512)
    mlm_overrides: list[str] = field(default_factory=list)  # --set style, on top of the preset
    clm_overrides: list[str] = field(default_factory=list)
    fill_words: int = 1000  # validation words, each masked alone, that the final MLMs fill
    bert_layers: int = 4
    bert_heads: int = 4
    bert_widths: tuple[int, ...] = (128, 160, 192, 224, 256)  # the one nearest to ours in parameters is used
    # BERT trains on mlm-small's batches until this many times ours' training time (None: as many steps as ours).
    # It is 5.6 times slower per token on the CPU: the same tokens would take it 25 minutes per corpus.
    bert_time_factor: float | None = 1.25
    gpt: GPTRecipe = field(default_factory=GPTRecipe)
    corpora: tuple[str, ...] = DEFAULT_CORPORA  # the MLM and CLM rows run on each (benchmarks/corpora.py)
    # The long-context row (learning-long, benchmarks/context.py): every model trains for context_budget_s seconds.
    # Perceiver AR's windows (data.max_seq_len) in tokens of clm-long's tokenizer (bpe:2048, about 3.2 bytes each on
    # the code corpus: 0.8 to 52 KB)
    context_windows: tuple[int, ...] = (256, 1024, 4096, 16384)
    context_latents: int | None = None  # every window's model.max_latents (at most the window); None: the preset's
    context_gpt_blocks: tuple[int, ...] = (64, 256, 1024)  # the GPT recipe's blocks
    context_budget_s: float = 600.0  # training seconds per model (clm-long's training time)
    context_eval_bytes: int = 200_000  # the first bytes of the validation stream, scored for every model
    context_evaluations: int = 1  # per run, the last at its end: at 32k a context curve takes minutes
    context_overrides: list[str] = field(default_factory=list)  # --set style, on top of the preset
    context_reference_overrides: list[str] = field(default_factory=list)  # on top of clm-small, the reference
    # The long-context time row (learning-long-time): clm-long against clm-small after each of these training times,
    # a fresh run per budget (600 s: the context row's runs), each with this many evaluations along its schedule.
    context_time_budgets_s: tuple[float, ...] = (600.0, 1800.0, 3600.0)
    context_time_evaluations: int = 4
    calibration_steps: int = 6  # timed steps (after 2 untimed, before 1 untimed) that set the long row's step counts
    generation_contexts: tuple[int, ...] = (1024, 4096, 16384, 65536)  # prompt bytes of cached generation
    generation_max_seq_len: int = 65536  # the window of the random model that generates
    generation_periods: int = 3  # timed cache cycles (max_latents // 2 + 1 tokens each), after one of warm-up
    generation_threads: int | None = 1  # torch threads of generation (None: torch's default), as perceiver serve's


def settings(quick: bool) -> Settings:
    if not quick:
        return Settings()
    # Toy sizes, seconds of training: the protocol runs end to end; the numbers mean nothing. The evaluations still
    # cover the whole validation split.
    tiny_mlm = ["data.max_seq_len=64", "model.num_latents=9", "model.encoder.num_self_attention_layers_per_block=1",
                "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
                "scheduler.warmup_steps=2"]
    tiny_clm = ["data.max_seq_len=64", "model.max_latents=32", "model.num_channels=32",
                "model.num_self_attention_layers=1", "trainer.max_steps=6", "trainer.val_check_interval=3",
                "trainer.limit_val_batches=2", "scheduler.warmup_steps=2", "output.sample_max_new_tokens=4"]
    return Settings(
        corpora=("prose",), evaluations=1, eval_batch_tokens=8192, bert_time_factor=None, mlm_overrides=tiny_mlm, clm_overrides=tiny_clm,
        fill_words=20,
        bert_layers=1, bert_widths=(32,),
        gpt=GPTRecipe(layers=1, width=32, block=32, iterations=6, warmup=2),
        context_windows=(64, 128), context_latents=16, context_gpt_blocks=(32,), context_budget_s=2.0,
        context_eval_bytes=4096,
        context_overrides=["model.num_channels=32", "model.num_self_attention_layers=1",
                           "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "scheduler.warmup_steps=2",
                           "output.sample_max_new_tokens=4", "data.short_seq_len=32", "data.short_latents=8"],
        context_reference_overrides=tiny_clm, context_time_budgets_s=(1.0, 2.0), context_time_evaluations=2,
        generation_contexts=(256, 1024), generation_max_seq_len=1024, generation_periods=1,
        calibration_steps=2,
    )


# ---------------------------------------------------------------------------------------------------------------
# Training time and learning curves
# ---------------------------------------------------------------------------------------------------------------


class TrainingClock:
    """Seconds of training: wall time since `start`, less the time between each `pause` and `resume` (evaluations)."""

    def __init__(self):
        self._start = time.perf_counter()
        self._excluded = 0.0
        self._paused_at: float | None = None

    def start(self) -> None:
        self._start, self._excluded = time.perf_counter(), 0.0

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._excluded += time.perf_counter() - self._paused_at
            self._paused_at = None

    @property
    def seconds(self) -> float:
        now = self._paused_at if self._paused_at is not None else time.perf_counter()
        return now - self._start - self._excluded

    @property
    def excluded(self) -> float:
        return self._excluded


@dataclass
class Run:
    """One side of a row: its learning curve (one dict per evaluation) and what it cost."""

    label: str
    parameters: int
    steps: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0  # ours: the benchmark's evaluations and the preset's own validation
    curve: list[dict] = field(default_factory=list)
    step_clock: list[float] = field(default_factory=list)  # training seconds after each step
    model: nn.Module | None = None  # the trained model, behind the interface the scorers take

    @property
    def final(self) -> dict:
        return self.curve[-1]

    def at(self, seconds: float) -> dict:
        """The evaluation at the first step past `seconds` of training (the final one if the run ended first)."""
        return next((point for point in self.curve if point["seconds"] >= seconds), self.final)


class Schedule:
    """When a run evaluates: at the given steps, once at the first step past `at_seconds`, and at its end. With a
    `budget_s`, the run is told to stop at the first step past that many training seconds."""

    def __init__(self, steps: list[int], at_seconds: float | None = None, budget_s: float | None = None):
        self.steps, self.at_seconds, self.budget_s = set(steps), at_seconds, budget_s

    def due(self, step: int, seconds: float, last: bool) -> bool:
        if self.at_seconds is not None and seconds >= self.at_seconds:
            self.at_seconds = None
            return True
        return last or step in self.steps or self.over_budget(seconds)

    def over_budget(self, seconds: float) -> bool:
        return self.budget_s is not None and seconds >= self.budget_s


def evenly(total_steps: int, count: int) -> list[int]:
    return sorted({max(1, round(total_steps * (i + 1) / count)) for i in range(count)})


def evaluate_into(run: Run, clock: TrainingClock, step: int, evaluate: Callable[[], dict]) -> None:
    """Evaluate with the clock paused and append the point to the run's curve."""
    clock.pause()
    started = time.perf_counter()
    metrics = evaluate()
    run.curve.append({"step": step, "seconds": round(clock.seconds, 2), **metrics})
    clock.resume()
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"    {run.label} step {step}, {clock.seconds:.1f} s: {shown} "
          f"(evaluated in {time.perf_counter() - started:.1f} s)", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Ours: a preset through the project's training code
# ---------------------------------------------------------------------------------------------------------------


def load_preset(preset: str, overrides: list[str], runs: Path):
    """The preset as `perceiver train` resolves it (a "bpe:N" tokenizer trained on the training split)."""
    from perceiver_cli.config import load_run_config
    from perceiver_cli.training.build import resolve_tokenizer

    cfg, name = load_run_config(preset, overrides)
    cfg.output.dir = str(runs)
    return resolve_tokenizer(cfg), name


def train_ours(cfg, name: str, datamodule, schedule: Schedule, evaluate: Callable[[nn.Module], dict],
               label: str) -> Run:
    """Train as `perceiver train` does (training/run.py's fit: seed, model, trainer, fit), with one more callback that
    evaluates on `schedule` and keeps the training clock."""
    from rich.console import Console

    from perceiver_cli.training.build import build_lit_model, build_trainer
    from perceiver_cli.training.run import bytes_per_token
    from perceiver_cli.training.run_dir import run_dir_for

    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    lit = build_lit_model(cfg, datamodule.vocab_size)
    run = Run(label, sum(p.numel() for p in lit.model.parameters()))
    run_dir = run_dir_for(Path(cfg.output.dir), name, None)
    trainer = build_trainer(cfg, run_dir, Console(quiet=True), bytes_per_token(datamodule))
    curve = LearningCurve(run, schedule, lambda: evaluate(lit.model))
    trainer.callbacks.append(curve)  # after the checkpoint and sample callbacks: their validation work is excluded
    trainer.fit(lit, datamodule=datamodule)
    run.model = lit.model
    return run


class LearningCurve(pl.Callback):
    """Keeps the training clock of a Lightning run (paused during validation) and evaluates on the schedule."""

    def __init__(self, run: Run, schedule: Schedule, evaluate: Callable[[], dict]):
        self.run, self.schedule, self.evaluate = run, schedule, evaluate
        self.clock = TrainingClock()
        self.last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.last_step:
            return  # a micro-batch of gradient accumulation: no optimizer step yet
        self.last_step = step
        self.run.step_clock.append(self.clock.seconds)
        if self.schedule.over_budget(self.clock.seconds):
            trainer.should_stop = True
        if self.schedule.due(step, self.clock.seconds, last=step >= trainer.max_steps):
            evaluate_into(self.run, self.clock, step, self.evaluate)
            pl_module.train()  # the evaluation left the model in eval mode

    def on_validation_start(self, trainer, pl_module) -> None:
        self.clock.pause()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.clock.resume()

    def on_train_end(self, trainer, pl_module) -> None:
        self.run.steps = trainer.global_step
        if not self.run.curve or self.run.curve[-1]["step"] != trainer.global_step:  # stopped early
            evaluate_into(self.run, self.clock, trainer.global_step, self.evaluate)
        self.run.train_seconds = self.run.curve[-1]["seconds"]
        self.run.eval_seconds = round(self.clock.excluded, 2)


# ---------------------------------------------------------------------------------------------------------------
# Scoring: the project's evaluation code for both sides, transformers' models behind small adapters
# ---------------------------------------------------------------------------------------------------------------


class CountedInputs(nn.Module):
    """Passes a masked LM's forward through and counts the text tokens it was given (not padding, [CLS] or [SEP]):
    the evidence that an evaluation covered the whole split."""

    def __init__(self, model: nn.Module, special_ids: tuple[int, ...]):
        super().__init__()
        self.model, self.special_ids, self.tokens = model, torch.tensor(special_ids), 0

    def forward(self, x, pad_mask=None, output_positions=None):
        text = ~torch.isin(x, self.special_ids)
        if pad_mask is not None:
            text &= ~pad_mask
        self.tokens += int(text.sum())
        return self.model(x, pad_mask, output_positions=output_positions)


class MaskedLMAtPositions(nn.Module):
    """transformers' masked LM with our masked LM's interface: logits at `output_positions` only."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, x, pad_mask=None, output_positions=None):
        attention_mask = None if pad_mask is None else (~pad_mask).long()
        logits = self.lm(input_ids=x, attention_mask=attention_mask).logits
        return logits.gather(1, output_positions[..., None].expand(-1, -1, logits.shape[-1]))


class CausalLMWindow(nn.Module):
    """transformers' causal LM with Perceiver AR's interface, which `evaluate_clm` scores: logits of the positions
    after `prefix_len`. `max_latents` is the evaluation stride: it scores the last `stride` positions of each
    window. Windows are left-padded: positions count real tokens only, as ours do."""

    def __init__(self, lm: nn.Module, window: int, stride: int):
        super().__init__()
        self.lm, self.max_seq_len, self.max_latents = lm, window, stride

    def forward(self, x, prefix_len, pad_mask=None):
        if pad_mask is None:
            return self.lm(input_ids=x).logits[:, prefix_len:]
        positions = ((~pad_mask).cumsum(dim=1) - 1).clamp(min=0)
        return self.lm(input_ids=x, attention_mask=(~pad_mask).long(), position_ids=positions).logits[:, prefix_len:]


def mlm_scorer(cfg, datamodule, batch_size: int) -> Callable[[nn.Module], dict]:
    """Masked-byte loss and accuracy of a model over the whole validation split, with the validation masks (drawn
    once from the seed and each chunk's index: the same for every model and every evaluation)."""
    from perceiver_cli.evaluation import evaluate_mlm

    tokenizer = datamodule.tokenizer
    special = tuple(i for i in (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id) if i is not None)

    def score(model: nn.Module) -> dict:
        counted = CountedInputs(model, special)
        result = evaluate_mlm(counted, tokenizer, datamodule.chunks["validation"], batch_size,
                              mask_prob=cfg.data.mask_prob, whole_word_masking=cfg.data.whole_word_masking,
                              seed=cfg.trainer.seed)
        return {"loss": result["loss"], "accuracy": result["accuracy"], "masked_tokens": result["masked_tokens"],
                "scored_tokens": counted.tokens}

    return score


def word_fill(model: nn.Module, cfg, datamodule, s: Settings) -> dict:
    """`evaluate_word_fill` (the word accuracy of `perceiver eval`) on the validation split."""
    from perceiver_cli.evaluation import evaluate_word_fill

    started = time.perf_counter()
    result = evaluate_word_fill(model, datamodule.tokenizer, datamodule.chunks["validation"], s.fill_words,
                                seed=cfg.trainer.seed)
    print(f"    words filled exactly: {result['word_accuracy']:.1%} of {result['words']} "
          f"(evaluated in {time.perf_counter() - started:.1f} s)", flush=True)
    return result


def clm_stream(texts: list[str], tokenizer=None) -> tuple[list[int], int]:
    """The token stream `perceiver eval` scores (`[EOS] doc1 [EOS] doc2 ...`) and its bytes; UTF-8 byte ids unless
    a tokenizer is given."""
    from perceiver_cli.data.tokenizer import load_tokenizer
    from perceiver_cli.evaluation import clm_token_stream

    return clm_token_stream(tokenizer or load_tokenizer("utf8", padding_side="left"), texts)


def clm_scorer(texts: list[str], batch_tokens: int, tokenizer=None) -> Callable[[nn.Module], dict]:
    """Bits per byte of a model over the whole stream of `texts`: every byte scored exactly once. A batch holds
    about `batch_tokens` tokens, whatever the model's window. With another tokenizer than UTF-8 bytes the loss of
    the stream's tokens is divided by the same bytes, so bits per byte stay comparable."""
    from perceiver_cli.evaluation import evaluate_clm

    stream, num_bytes = clm_stream(texts, tokenizer)

    def score(model: nn.Module) -> dict:
        result = evaluate_clm(model, stream, num_bytes, max(1, batch_tokens // model.max_seq_len))
        return {"bits_per_byte": result["bits_per_byte"], "scored_tokens": result["tokens"], "bytes": result["bytes"]}

    return score


# ---------------------------------------------------------------------------------------------------------------
# Baselines: transformers' models in training loops of our own
# ---------------------------------------------------------------------------------------------------------------


def bert_for(width: int, layers: int, heads: int, max_seq_len: int, vocab_size: int) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * width, max_position_embeddings=max_seq_len, type_vocab_size=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return BertForMaskedLM(config)


def matched_bert(cfg, s: Settings, target_parameters: int, vocab_size: int) -> nn.Module:
    """The BERT of `s.bert_widths` whose parameter count is nearest to `target_parameters`."""
    def count(width: int) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in bert_for(width, s.bert_layers, s.bert_heads, cfg.data.max_seq_len,
                                                   vocab_size).parameters())

    width = min(s.bert_widths, key=lambda w: abs(count(w) - target_parameters))
    torch.manual_seed(cfg.trainer.seed)
    return bert_for(width, s.bert_layers, s.bert_heads, cfg.data.max_seq_len, vocab_size)


def train_bert(bert: nn.Module, cfg, datamodule, schedule: Schedule, evaluate: Callable[[nn.Module], dict]) -> Run:
    """BERT on the preset's own training batches (same order, same masks), with the preset's optimizer, schedule,
    gradient clipping and step count."""
    from perceiver_cli.models.optim import build_optimizer, build_scheduler

    total = cfg.trainer.max_steps
    optimizer = build_optimizer(bert, **cfg.optimizer.model_dump(mode="json"))
    lr_schedule = build_scheduler(optimizer, total_steps=total, **cfg.scheduler.model_dump(mode="json"))
    h = bert.config
    run = Run(f"BERT ({h.num_hidden_layers} x {h.hidden_size})", sum(p.numel() for p in bert.parameters()))
    adapter = MaskedLMAtPositions(bert)
    loader = datamodule.train_dataloader()
    clock = TrainingClock()
    step, epoch = 0, 0
    while step < total and not schedule.over_budget(clock.seconds):
        loader.sampler.set_epoch(epoch)  # what Lightning does at each epoch: a new order, new masks
        for batch in loader:
            bert.train()
            loss = bert(input_ids=batch["input_ids"], attention_mask=(~batch["pad_mask"]).long(),
                        labels=batch["labels"]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.trainer.gradient_clip_val:
                torch.nn.utils.clip_grad_norm_(bert.parameters(), cfg.trainer.gradient_clip_val)
            optimizer.step()
            lr_schedule.step()
            step += 1
            if schedule.due(step, clock.seconds, last=step >= total):
                evaluate_into(run, clock, step, lambda: evaluate(adapter))
            if step >= total or schedule.over_budget(clock.seconds):
                break
        epoch += 1
    run.steps, run.train_seconds, run.eval_seconds = step, run.final["seconds"], round(clock.excluded, 2)
    run.model = adapter
    return run


def gpt_for(recipe: GPTRecipe, vocab_size: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=recipe.block, n_embd=recipe.width, n_layer=recipe.layers,
                        n_head=recipe.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        activation_function="gelu",  # nanoGPT's nn.GELU (GPT-2's default is the tanh form)
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config)


def train_gpt(recipe: GPTRecipe, train_stream: torch.Tensor, schedule: Schedule, evaluate: Callable[[nn.Module], dict],
              seed: int = 0, steps: int | None = None) -> Run:
    """nanoGPT's training loop, rewritten: random windows of block + 1 tokens of the training stream, AdamW with
    weight decay on matrices and embeddings only, warmup then cosine, clipping."""
    from perceiver_cli.models.optim import build_optimizer, build_scheduler

    total = steps or recipe.iterations
    torch.manual_seed(seed)
    gpt = gpt_for(recipe, 262)
    optimizer = build_optimizer(gpt, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, recipe.beta2))
    lr_schedule = build_scheduler(optimizer, "cosine", warmup_steps=min(recipe.warmup, total // 4), total_steps=total,
                                  min_lr_ratio=recipe.min_lr / recipe.lr)
    run = Run(f"GPT-2 ({recipe.layers} x {recipe.width}, block {recipe.block})", sum(p.numel() for p in gpt.parameters()))
    adapter = CausalLMWindow(gpt, recipe.block, max(1, recipe.block // 4))
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(recipe.block + 1)
    clock = TrainingClock()
    for step in range(1, total + 1):
        gpt.train()
        starts = torch.randint(len(train_stream) - recipe.block - 1, (recipe.batch, 1), generator=generator)
        window = train_stream[starts + offsets]
        logits = gpt(input_ids=window[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), recipe.grad_clip)
        optimizer.step()
        lr_schedule.step()
        run.step_clock.append(clock.seconds)
        if schedule.due(step, clock.seconds, last=step == total):  # due at the step past the budget too
            evaluate_into(run, clock, step, lambda: evaluate(adapter))
        if schedule.over_budget(clock.seconds):
            break
    run.steps, run.train_seconds, run.eval_seconds = run.final["step"], run.final["seconds"], round(clock.excluded, 2)
    return run


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


def on_every_corpus(s: Settings, out: Path, runs: Path, record, train_on, plot: tuple[str, str, str, str]) -> None:
    """`train_on(corpus, s, runs, record)` (the two sides of a row, recorded) on every corpus of `s.corpora`; one
    plot, a panel per corpus: `plot` is (file name, metric key, its label, title)."""
    panels = []
    for corpus in s.corpora:
        print(f"  corpus {corpus}", flush=True)
        panels.append((corpus, train_on(corpus, s, runs, record)))
    name, key, label, title = plot
    plot_corpora(out / name, panels, key, label, title)


def mlm_row(s: Settings, out: Path, runs: Path, record) -> None:
    on_every_corpus(s, out, runs, record, mlm_on, ("learning-mlm.png", "accuracy", "masked-byte accuracy",
                                                   "masked LM: mlm-small against BERT on the same batches"))


def mlm_on(corpus: str, s: Settings, runs: Path, record) -> list[Run]:
    from perceiver_cli.training.build import build_datamodule

    cfg, name = load_preset("mlm-small", CORPORA[corpus].overrides() + s.mlm_overrides, runs)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    score = mlm_scorer(cfg, datamodule, max(1, s.eval_batch_tokens // cfg.data.max_seq_len))
    total = cfg.trainer.max_steps
    ours = train_ours(cfg, name, datamodule, Schedule(evenly(total, s.evaluations)), score, name)
    bert = matched_bert(cfg, s, ours.parameters, datamodule.vocab_size)
    budget = None if s.bert_time_factor is None else s.bert_time_factor * ours.train_seconds
    theirs = train_bert(bert, cfg, datamodule, Schedule(evenly(total, s.evaluations), at_seconds=ours.train_seconds,
                                                        budget_s=budget), score)
    chunk = cfg.data.batch_size * cfg.data.max_seq_len
    words = {run.label: word_fill(run.model, cfg, datamodule, s) for run in (ours, theirs)}
    extra = {"corpus": corpus, "runs": runs_json(ours, theirs), "word_fill": words}
    print(f"  {ours.label}: {ours.parameters:,} parameters; {theirs.label}: {theirs.parameters:,}", flush=True)
    at = theirs.at(ours.train_seconds)
    equal_time = f"BERT at {at['seconds']:.0f} s (step {at['step']}), ours at its end ({ours.train_seconds:.0f} s)"
    record(f"learning ({corpus}): MLM masked-byte accuracy at equal time (mlm-small vs BERT)",
           100 * ours.final["accuracy"], 100 * at["accuracy"], "%", equal_time, extra=extra)
    record(f"learning ({corpus}): MLM masked-byte loss at equal time", ours.final["loss"], at["loss"], "nats",
           "whole validation split, fixed masks", higher_is_better=False)
    record(f"learning ({corpus}): MLM training tokens per second", ours.steps * chunk / ours.train_seconds,
           theirs.steps * chunk / theirs.train_seconds, "tok/s",
           f"the same batches; BERT stopped at {theirs.train_seconds:.0f} s, step {theirs.steps} of {total}")
    record(f"learning ({corpus}): MLM words filled exactly, each masked alone",
           100 * words[ours.label]["word_accuracy"], 100 * words[theirs.label]["word_accuracy"], "%",
           f"{words[ours.label]['words']} validation words, the final models (what `perceiver fill-mask` shows)")
    return [ours, theirs]


def clm_row(s: Settings, out: Path, runs: Path, record) -> None:
    on_every_corpus(s, out, runs, record, clm_on, ("learning-clm.png", "bits_per_byte", "validation bits per byte",
                                                   "causal LM: clm-small against the nanoGPT recipe"))


def clm_on(corpus: str, s: Settings, runs: Path, record) -> list[Run]:
    from perceiver_cli.data.sources import load_text_splits
    from perceiver_cli.training.build import build_datamodule

    cfg, name = load_preset("clm-small", CORPORA[corpus].overrides() + s.clm_overrides, runs)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    splits = load_text_splits(**datamodule.source_options)  # the documents the data module chunks: the same split
    validation = splits["validation"]["text"]
    train_stream = torch.tensor(clm_stream(splits["train"]["text"])[0])
    theirs = train_gpt(s.gpt, train_stream, Schedule(evenly(s.gpt.iterations, s.evaluations)),
                       clm_scorer(validation, s.eval_batch_tokens), seed=cfg.trainer.seed)
    total = cfg.trainer.max_steps
    ours = train_ours(cfg, name, datamodule, Schedule(evenly(total, s.evaluations), at_seconds=theirs.train_seconds),
                      clm_scorer(validation, s.eval_batch_tokens, datamodule.tokenizer), name)
    print(f"  {ours.label}: {ours.parameters:,} parameters; {theirs.label}: {theirs.parameters:,}", flush=True)
    at = ours.at(theirs.train_seconds)
    extra = {"corpus": corpus, "runs": runs_json(ours, theirs)}
    record(f"learning ({corpus}): CLM bits per byte at GPT's training time (clm-small vs nanoGPT recipe)",
           at["bits_per_byte"], theirs.final["bits_per_byte"], "bit/B",
           f"ours at {at['seconds']:.0f} s (step {at['step']}), GPT at its end ({theirs.train_seconds:.0f} s)",
           higher_is_better=False, extra=extra)
    record(f"learning ({corpus}): CLM bits per byte at the end", ours.final["bits_per_byte"],
           theirs.final["bits_per_byte"], "bit/B", f"{ours.steps} steps vs {theirs.steps}; whole validation split",
           higher_is_better=False)
    record(f"learning ({corpus}): CLM training time", ours.train_seconds, theirs.train_seconds, "s",
           "evaluation excluded", higher_is_better=False)
    return [ours, theirs]


def seconds_per_step(calibration: Run) -> float:
    """Seconds per step from the clock after each step, leaving out the first two (warm-up) and the last (ours
    saves its final checkpoint there)."""
    times = calibration.step_clock[1:-1]
    return (times[-1] - times[0]) / max(1, len(times) - 1)


def runs_json(*runs: Run) -> list[dict]:
    return [{"label": r.label, "parameters": r.parameters, "steps": r.steps, "train_seconds": r.train_seconds,
             "eval_seconds": r.eval_seconds, "curve": r.curve} for r in runs]


def plot_corpora(path: Path, panels: list[tuple[str, list[Run]]], key: str, label: str, title: str) -> None:
    """One panel per corpus: each run's `key` against training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (corpus, runs) in zip(axes[0], panels):
        for run, style in zip(runs, ("o-", "s--")):
            ax.plot([p["seconds"] for p in run.curve], [p[key] for p in run.curve], style,
                    label=f"{run.label}, {run.parameters / 1e6:.2f}M")
        ax.set(title=corpus, xlabel="training time (s, evaluation excluded)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def learning_rows(wanted: set[str], quick: bool, out: Path, record,
                  overrides: dict[str, list[str]] | None = None, corpora: list[str] | None = None) -> list[str]:
    """Run the rows of `wanted` (names of ROWS) and return the names of the plots they wrote into `out`.
    `record(name, ours, theirs, unit, note, higher_is_better=True, ratio=None, extra=None)` records one row of the
    table. `overrides`: preset name ("mlm-small", "clm-small", "clm-long") -> `--set` overrides added to its own
    (the long row takes clm-long's). `corpora`:
    the MLM and CLM rows' corpora (None: all three, or two with `quick`)."""
    from perceiver_cli.training.run import quiet_libraries

    from benchmarks.context import context_preset, context_row, time_row

    quiet_libraries(0)  # no progress bar per tokenized split, no Lightning banners
    s = settings(quick)
    if corpora:
        s.corpora = tuple(corpora)
    overrides = overrides or {}
    s.mlm_overrides += overrides.get("mlm-small", [])
    s.clm_overrides += overrides.get("clm-small", [])
    s.context_overrides += overrides.get(context_preset()[0], [])
    plots = []
    with tempfile.TemporaryDirectory() as runs:  # the training runs' checkpoints and logs are not results
        for name, make_row in (("learning-mlm", mlm_row), ("learning-clm", clm_row),
                               ("learning-long", context_row), ("learning-long-time", time_row)):
            if name in wanted:
                print(f"learning benchmark: {name.removeprefix('learning-')}", flush=True)
                make_row(s, out, Path(runs), record)
                plots.append(f"{name}.png")
    return plots
