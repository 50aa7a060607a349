"""The preset schema: what a TOML preset may say, validated by pydantic, with every error reported at once.

A preset has the sections [model], [data], [optimizer], [scheduler], [trainer] and [output]. The model section's
fields come from the backend's config dataclasses (the single source of model fields), less `vocab_size` and
`max_seq_len`, which the data section and its tokenizer decide so that model and data can never disagree.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from perceiver_cli.errors import UserError
from perceiver_cli.models.clm.model import CausalLanguageModelConfig
from perceiver_cli.models.clm.model import layout_problems as clm_layout_problems
from perceiver_cli.models.mlm.model import MaskedLanguageModelConfig, TextDecoderConfig, TextEncoderConfig
from perceiver_cli.models.mlm.model import layout_problems as mlm_layout_problems
from perceiver_cli.models.optim import OPTIMIZERS, SCHEDULERS

LINKED_FIELDS = ("vocab_size", "max_seq_len")  # set from [data], never in [model]
UTF8_VOCAB_SIZE = 262


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def section_from_dataclass(name: str, cls: type, exclude: tuple[str, ...] = (), **extra: Any) -> type[BaseModel]:
    """A pydantic section with the fields, types and defaults of a config dataclass, less the linked fields."""
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(cls)
        if f.name not in LINKED_FIELDS + exclude
    }
    return create_model(name, __base__=Section, **fields, **extra)


EncoderSection = section_from_dataclass("EncoderSection", TextEncoderConfig)
DecoderSection = section_from_dataclass("DecoderSection", TextDecoderConfig)
MLMModelSection = section_from_dataclass(
    "MLMModelSection",
    MaskedLanguageModelConfig,
    exclude=("encoder", "decoder"),
    task=(Literal["mlm"], ...),
    init_from=(str | None, None),  # a checkpoint, run directory or exported model to start from
    encoder=(EncoderSection, Field(default_factory=EncoderSection)),
    decoder=(DecoderSection, Field(default_factory=DecoderSection)),
)
CLMModelSection = section_from_dataclass(
    "CLMModelSection", CausalLanguageModelConfig, task=(Literal["clm"], ...), init_from=(str | None, None)
)

ModelSection = Annotated[MLMModelSection | CLMModelSection, Field(discriminator="task")]  # type: ignore[valid-type]


class DataSection(Section):
    source: Literal["embedded", "files", "hub"] = "embedded"
    path: str | None = None  # files: a file, a directory or a glob
    name: str | None = None  # hub: dataset name, e.g. "wikitext"; embedded: "prose" (unset), "modules" or "code"
    config_name: str | None = None  # hub: dataset configuration, e.g. "wikitext-103-raw-v1"
    text_column: str = "text"
    document: Literal["paragraph", "line", "file"] = "paragraph"  # files: what one document of a .txt file is
    # "utf8" (UTF-8 bytes, vocab 262), "bpe:N" (a byte-level BPE of N tokens trained on the training split when the
    # run starts: data/run_tokenizer.py) or a local Hugging Face tokenizer directory
    tokenizer: str = "utf8"
    vocab_size: int | None = Field(default=None, gt=0)  # only when the tokenizer cannot be read (dry runs)
    max_seq_len: int = Field(default=512, gt=0)
    batch_size: int = Field(default=8, gt=0)
    num_workers: int = Field(default=0, ge=0)
    padding_side: Literal["left", "right"] | None = None  # default: left for clm, right for mlm
    random_shift: bool = False  # clm: vary chunk boundaries between epochs
    random_truncation: bool = False  # clm: train on random lengths, so that short prompts are in distribution
    min_seq_len: int = Field(default=16, gt=0)  # clm: the shortest random truncation
    # clm, a window curriculum (the models/lightning.py `short_windows`): the first `short_fraction` of
    # trainer.max_steps train on each batch's windows cut into pieces of `short_seq_len` tokens (every token kept),
    # each predicting its last `short_latents` (unset: max_latents' share of max_seq_len); then whole windows.
    # short_fraction = 0 turns it off.
    short_seq_len: int | None = Field(default=None, gt=0)
    short_latents: int | None = Field(default=None, gt=0)
    short_fraction: float = Field(default=0.8, ge=0.0, le=1.0)
    mask_prob: float = Field(default=0.15, gt=0.0, lt=1.0)
    whole_word_masking: bool = True
    static_masking: bool = False
    validation_fraction: float = Field(default=0.05, gt=0.0, lt=1.0)
    # Streaming (sources "files" and "hub"): documents are read, tokenized and chunked as training goes, with nothing
    # prepared or cached beforehand (data/streaming.py). Chunks pass through a shuffle buffer of `shuffle_buffer`
    # chunks. Without a validation split, the first documents are set aside for validation: validation_fraction of
    # them, at most `validation_documents`.
    streaming: bool = False
    shuffle_buffer: int = Field(default=10_000, gt=0)
    validation_documents: int = Field(default=1_000, gt=0)

    @field_validator("tokenizer")
    @classmethod
    def _bpe_size(cls, value: str) -> str:
        from perceiver_cli.data.run_tokenizer import bpe_vocab_size

        try:
            bpe_vocab_size(value)
        except UserError as err:
            raise ValueError(err.message) from None
        return value


class OptimizerSection(Section):
    name: Literal[OPTIMIZERS] = "adamw"  # type: ignore[valid-type]
    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0.0)
    # name = "muon" only: Muon's lr and momentum for the hidden weight matrices (unset: 0.02 and 0.95, the published
    # recipe's); lr, betas and eps are then AdamW's, for embeddings, norms and biases (models/optim.py).
    muon_lr: float | None = Field(default=None, gt=0.0)
    muon_momentum: float | None = Field(default=None, ge=0.0, lt=1.0)


class SchedulerSection(Section):
    name: Literal[SCHEDULERS] = "constant"  # type: ignore[valid-type]
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    decay_fraction: float = Field(default=0.2, gt=0.0, le=1.0)  # "wsd": the last steps' share, decayed linearly


class FSDPSection(Section):
    """[trainer.fsdp]: with strategy = "fsdp"; every attention layer is one sharded unit."""

    sharding: Literal["full_shard", "shard_grad_op", "no_shard", "hybrid_shard"] = "full_shard"  # torch's names
    activation_checkpointing: bool = False  # recompute each attention layer's activations in the backward pass


class TrainerSection(Section):
    max_steps: int = Field(default=-1, ge=-1)  # -1: no step limit
    max_epochs: int | None = Field(default=None, gt=0)
    max_time: str | None = None  # "DD:HH:MM:SS"
    val_check_interval: int | float = Field(default=1.0, gt=0)  # int: every N training steps; float: epoch fraction
    limit_val_batches: int | float = Field(default=1.0, ge=0)
    accumulate_grad_batches: int = Field(default=1, gt=0)
    gradient_clip_val: float | None = Field(default=1.0, gt=0.0)
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | Literal["auto"] = "auto"
    num_nodes: int = Field(default=1, gt=0)
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    fsdp: FSDPSection | None = None
    # Seconds a rank may wait in one collective of the training (the gradient all-reduce, a barrier, a broadcast)
    # before the run ends with an error naming it: a dead or stuck rank must not leave the others waiting forever. It
    # must exceed the longest work one rank does alone (a validation sample, writing a checkpoint). Setting up, before
    # the first step, may take up to 30 minutes or this, if longer.
    collective_timeout: float = Field(default=600.0, gt=0.0)
    seed: int = 0
    deterministic: bool = False
    compile: bool = False  # torch.compile the backend model
    log_every_n_steps: int = Field(default=10, gt=0)

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: Any) -> Any:
        # `precision = 32` (a TOML integer, as Lightning also takes it, and what `--set trainer.precision=32` parses
        # to) means "32".
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class OutputSection(Section):
    dir: str = "runs"
    name: str | None = None  # default: the preset's name
    sample_prompt: str | None = None  # clm: generate from this prompt at each validation
    sample_max_new_tokens: int = Field(default=64, gt=0)
    # Experiment trackers, through Lightning's loggers (training/loggers.py): "tensorboard", "csv", "wandb", "mlflow"
    # (the last two are optional extras: pip install 'perceiver-cli[wandb]' or 'perceiver-cli[mlflow]').
    loggers: list[Literal["tensorboard", "csv", "wandb", "mlflow"]] = ["tensorboard", "csv"]


class RunConfig(Section):
    model: ModelSection
    data: DataSection = Field(default_factory=DataSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @property
    def task(self) -> str:
        return self.model.task

    def source_options(self) -> dict:
        """The arguments of `load_text_splits` for these data: the splits the data module reads."""
        d = self.data
        return dict(source=d.source, path=d.path, name=d.name, config=d.config_name, text_column=d.text_column,
                    document=d.document, validation_fraction=d.validation_fraction, seed=self.trainer.seed)

    def vocab_size(self) -> int:
        """The vocabulary the model is built for: the tokenizer's. A declared `data.vocab_size` stands in for a
        tokenizer that is not on disk (a dry run on another machine) and must agree with one that is."""
        tokenizer = self.data.tokenizer
        from perceiver_cli.data.run_tokenizer import bpe_vocab_size

        if bpe_vocab_size(tokenizer) is not None:  # trained when the run starts: at most this many (a dry run)
            return self.data.vocab_size or bpe_vocab_size(tokenizer)
        utf8 = tokenizer.strip().lower() in ("utf8", "utf-8")
        if not utf8 and not Path(tokenizer).expanduser().is_dir() and self.data.vocab_size is not None:
            return self.data.vocab_size
        if utf8:
            actual = UTF8_VOCAB_SIZE
        else:
            from perceiver_cli.data.tokenizer import load_tokenizer, vocab_size

            actual = vocab_size(load_tokenizer(tokenizer))
        self.check_vocab_size(actual)
        return actual

    def check_vocab_size(self, actual: int) -> None:
        """Refuse a declared `data.vocab_size` that differs from the tokenizer's `actual` one."""
        declared = self.data.vocab_size
        if declared is not None and declared != actual:
            raise UserError(
                f"data.vocab_size = {declared:,}, but tokenizer {self.data.tokenizer} has {actual:,} tokens",
                hint=f"set data.vocab_size = {actual} or remove it: it only stands in for a tokenizer not on disk",
            )

    def short_windows(self) -> dict | None:
        """The window curriculum's settings for the Lightning model (`seq_len`, `latents`, `steps`), or None."""
        d = self.data
        if d.short_seq_len is None or d.short_fraction == 0 or self.task != "clm":
            return None
        latents = d.short_latents or max(1, self.model.max_latents * d.short_seq_len // d.max_seq_len)
        return {"seq_len": d.short_seq_len, "latents": latents,
                "steps": round(d.short_fraction * max(self.trainer.max_steps, 0))}

    def backend_config(self, vocab_size: int):
        """The backend model config: the [model] fields plus the linked data fields."""
        linked = {"vocab_size": vocab_size, "max_seq_len": self.data.max_seq_len}
        fields = self.model.model_dump(exclude={"task", "init_from"})
        if self.task == "clm":
            return CausalLanguageModelConfig(**fields, **linked)
        encoder = TextEncoderConfig(**fields.pop("encoder"), **linked)
        decoder = TextDecoderConfig(**fields.pop("decoder"), **linked)
        return MaskedLanguageModelConfig(encoder, decoder, **fields)


# ---------------------------------------------------------------------------------------------------------------
# Cross-field checks: each returns (key path, message) pairs so all of them are reported together
# ---------------------------------------------------------------------------------------------------------------


def _preset_name(path: str) -> str:
    """A model config field's name in a preset: the linked fields are [data]'s, the others [model]'s."""
    field = path.split(".")[-1]
    return f"data.{field}" if field in LINKED_FIELDS else f"model.{path}"


def _check_layout(cfg: RunConfig) -> list[tuple[str, str]]:
    """The model's own layout checks (the ones its constructor raises), under the preset's names. The vocabulary
    does not matter to the layout."""
    problems = clm_layout_problems if cfg.task == "clm" else mlm_layout_problems
    return problems(cfg.backend_config(UTF8_VOCAB_SIZE), _preset_name)


def _check_clm(m: Any, data: DataSection) -> list[tuple[str, str]]:
    errors = []
    for key in ("cross_attention_dropout", "post_attention_dropout", "residual_dropout"):
        if not 0.0 <= getattr(m, key) < 1.0:
            errors.append((f"model.{key}", "must be in [0, 1)"))
    if m.init_scale <= 0:
        errors.append(("model.init_scale", "must be positive"))
    if data.padding_side == "right":
        errors.append(("data.padding_side", "Perceiver AR needs left padding: use \"left\" or leave it unset"))
    return errors


def _check_mlm(m: Any, data: DataSection) -> list[tuple[str, str]]:
    errors = []
    for path, value in (("model.encoder.dropout", m.encoder.dropout), ("model.decoder.dropout", m.decoder.dropout)):
        if not 0.0 <= value < 1.0:
            errors.append((path, "must be in [0, 1)"))
    if data.padding_side == "left":
        errors.append(("data.padding_side", "the masked LM pads on the right: use \"right\" or leave it unset"))
    return errors


def _check_run(cfg: RunConfig) -> list[tuple[str, str]]:
    errors = _check_layout(cfg)
    errors += _check_clm(cfg.model, cfg.data) if cfg.task == "clm" else _check_mlm(cfg.model, cfg.data)
    if cfg.data.source == "files" and not cfg.data.path:
        errors.append(("data.path", "source = \"files\" needs a path (a file, a directory or a glob)"))
    if cfg.data.source == "hub" and not cfg.data.name:
        errors.append(("data.name", "source = \"hub\" needs a dataset name, e.g. \"wikitext\""))
    errors += _check_data_document(cfg.data)
    t = cfg.trainer
    if t.max_steps == -1 and t.max_epochs is None and t.max_time is None:
        errors.append(("trainer.max_steps", "set max_steps, max_epochs or max_time, or the run never ends"))
    if t.max_time is not None:
        parts = t.max_time.split(":")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            errors.append(("trainer.max_time", f"expected DD:HH:MM:SS, got {t.max_time!r}"))
    if isinstance(t.val_check_interval, float) and t.val_check_interval > 1.0:
        errors.append(("trainer.val_check_interval", "a fraction of an epoch must be at most 1.0; use an int for steps"))
    if len(set(cfg.output.loggers)) < len(cfg.output.loggers):
        errors.append(("output.loggers", "names a logger more than once"))
    return errors + _check_optimizer(cfg) + _check_fsdp(cfg) + _check_streaming(cfg) + _check_short_windows(cfg)


def _check_short_windows(cfg: RunConfig) -> list[tuple[str, str]]:
    d = cfg.data
    if d.short_seq_len is None or d.short_fraction == 0:
        if d.short_seq_len is None and d.short_latents is not None:
            return [("data.short_latents", "applies with data.short_seq_len (the window curriculum): set both")]
        return []
    if cfg.task != "clm":
        return [("data.short_seq_len", "the window curriculum is for causal LMs (task = \"clm\"): remove it")]
    errors = []
    if d.short_seq_len >= d.max_seq_len:
        errors.append(("data.short_seq_len", f"must be below data.max_seq_len ({d.max_seq_len}), the long window"))
    if d.short_latents is not None and d.short_latents > min(d.short_seq_len, cfg.model.max_latents):
        errors.append(("data.short_latents", f"must be at most data.short_seq_len ({d.short_seq_len}) and "
                                             f"model.max_latents ({cfg.model.max_latents})"))
    if cfg.trainer.max_steps <= 0:
        errors.append(("trainer.max_steps", "the window curriculum trains short windows for a share of max_steps: "
                                            "set max_steps"))
    return errors


def _check_streaming(cfg: RunConfig) -> list[tuple[str, str]]:
    d, t = cfg.data, cfg.trainer
    if not d.streaming:
        return []  # shuffle_buffer and validation_documents are inert then
    errors = []
    if d.source == "embedded":
        errors.append(("data.streaming", 'applies to source = "files" or "hub": the embedded corpus is prepared in '
                                         'seconds; leave it unset'))
    # A stream has no known length, so Lightning takes no fraction of one.
    for key in ("val_check_interval", "limit_val_batches"):
        value = getattr(t, key)
        if isinstance(value, float) and value != 1.0:
            errors.append((f"trainer.{key}", "a streamed corpus has no known length: use a number of batches (an "
                                             "int) or 1.0"))
    return errors


def _check_optimizer(cfg: RunConfig) -> list[tuple[str, str]]:
    o = cfg.optimizer
    if o.name == "muon":
        if cfg.trainer.strategy == "fsdp":  # FSDP hands the optimizer flat 1-d shards; Muon needs whole matrices
            return [("optimizer.name", 'Muon needs whole weight matrices, which strategy "fsdp" shards: use "ddp" '
                                       'or another optimizer')]
        return []
    return [(f"optimizer.{key}", f'applies to name = "muon" only (the optimizer is "{o.name}"): leave it unset')
            for key in ("muon_lr", "muon_momentum") if getattr(o, key) is not None]


def _check_data_document(data: DataSection) -> list[tuple[str, str]]:
    from perceiver_cli.data.corpus import CORPORA
    from perceiver_cli.data.sources import BUILDERS

    errors = []
    if data.source == "embedded" and data.name is not None and data.name not in CORPORA:
        errors.append(("data.name", f"unknown embedded corpus {data.name!r}: use one of {', '.join(CORPORA)} "
                                    "or leave it unset"))
    if data.document != "paragraph":
        suffix = Path(data.path or "").suffix.lower()  # of a file or a glob; a directory has none
        if data.source != "files":
            errors.append(("data.document", f"applies to .txt files of source = \"files\", not to source = "
                                            f"\"{data.source}\": leave it unset"))
        elif suffix in BUILDERS and suffix != ".txt":
            errors.append(("data.document", f"applies to .txt files, not to {suffix} files (each row already is "
                                            "one document): leave it unset"))
    return errors


def _check_fsdp(cfg: RunConfig) -> list[tuple[str, str]]:
    t = cfg.trainer
    if t.strategy != "fsdp":
        return []  # [trainer.fsdp] is inert then, so that a run saved with it can resume on one device
    errors = []
    if t.accelerator in ("cpu", "mps"):
        errors.append(("trainer.accelerator", 'strategy "fsdp" needs CUDA GPUs: use "gpu" (or "ddp" on the CPU)'))
    if cfg.model.activation_checkpointing:
        # The model's own checkpointing would wrap the sharded layers from outside; FSDP's goes inside each one.
        errors.append(("model.activation_checkpointing",
                       'with strategy "fsdp" set trainer.fsdp.activation_checkpointing = true instead'))
    if cfg.task == "clm" and cfg.output.sample_prompt:
        # Generating on rank 0 alone would need the other ranks' shards of the weights.
        errors.append(("output.sample_prompt", 'validation samples are not generated with strategy "fsdp": leave it '
                                               'unset (generate from a checkpoint with `perceiver generate`)'))
    if t.fsdp is not None and t.fsdp.sharding == "hybrid_shard" and t.devices == "auto":
        errors.append(("trainer.devices", 'sharding "hybrid_shard" needs the number of devices per node'))
    return errors


# ---------------------------------------------------------------------------------------------------------------
# Loading: TOML text + --set overrides -> RunConfig, or one UserError listing every problem
# ---------------------------------------------------------------------------------------------------------------


def _format_pydantic_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        # Drop the discriminator tag pydantic puts in the location of union members ("model.clm.x" -> "model.x").
        loc = [str(p) for i, p in enumerate(e["loc"]) if not (i == 1 and e["loc"][0] == "model" and p in ("clm", "mlm"))]
        path = ".".join(loc) or "(preset)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key")
        elif e["type"] == "union_tag_invalid":
            lines.append(f"{path}: task must be \"clm\" or \"mlm\", got {e['input'].get('task')!r}")
        elif e["type"] == "union_tag_not_found":
            lines.append(f"{path}.task: missing; set task = \"clm\" or task = \"mlm\"")
        else:
            lines.append(f"{path}: {e['msg']} (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict)
                         else f"{path}: {e['msg']}")
    return lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """`key.path=value` -> (["key", "path"], value); the value is read as TOML where it is one, else a string."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key.path=value, e.g. --set trainer.max_steps=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {text!r}: the key path is empty or malformed")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `key.path=value` in a copy of the nested dict `values` (unknown keys surface in validation)."""
    import copy

    values = copy.deepcopy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return values


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{source}: invalid TOML: {err}") from None


def validate(values: dict[str, Any], source: str) -> RunConfig:
    """Validate a preset dict; raise one UserError that lists every problem with its key path."""
    try:
        cfg = RunConfig.model_validate(values)
    except ValidationError as err:
        problems = _format_pydantic_errors(err)
    else:
        problems = [f"{path}: {message}" for path, message in _check_run(cfg)]
        if not problems:
            return cfg
    noun = "problem" if len(problems) == 1 else "problems"
    raise UserError(
        f"{source}: {len(problems)} {noun}:\n  " + "\n  ".join(problems),
        hint="fix the preset or the --set overrides; `perceiver presets show NAME` prints a valid example",
    )


def load_run_config(
    preset: str, overrides: list[str] | None = None, output_dir: Path | None = None
) -> tuple[RunConfig, str]:
    """Resolve a preset name or path, apply overrides (and `output_dir`, the train command's --output), validate.
    Returns the config and the preset's name; nothing changes the config after validation."""
    from perceiver_cli.presets import read_preset_text, resolve_preset

    path = resolve_preset(preset)
    values = apply_overrides(parse_toml(read_preset_text(preset), str(path)), overrides or [])
    if output_dir is not None and isinstance(values.setdefault("output", {}), dict):
        values["output"]["dir"] = str(output_dir)
    return validate(values, f"preset {Path(path).name}"), Path(path).stem


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML (None values are left out: TOML has no null)."""
    import tomli_w

    return tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True))
