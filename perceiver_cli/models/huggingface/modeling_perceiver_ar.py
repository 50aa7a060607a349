"""Hugging Face classes for the Perceiver AR causal LM (transformers has none): a config, a `Cache` and a
`PreTrainedModel` that `AutoModelForCausalLM` loads and that behaves as transformers' causal LMs do.

`forward(input_ids)` returns one row of logits per input position (`sequence_logits`: each position scored at a
latent of its own window, ceil(N / max_latents) windows batched); `logits_to_keep=k` computes the last k only, and
`num_latents=k` runs the single window whose last k positions are latents (the model's raw forward pass).
`labels` give the usual shifted next-token loss.

Generation runs `WindowStepper` (`perceiver_cli.models.clm.decoding`), the stepper `perceiver generate` runs: with
the cache it lives in a `PerceiverARGenerationCache`, without it in the model kwargs (`decoding_state`), so both
follow the same windows and give the same logits. The window schedule is the generation config's
`window_schedule` ("chunked" or "sliding"), the first window's latents the `num_latents` argument of `generate()`.

This module imports only the backend and transformers: `remote_code.py` concatenates it with the backend modules
into the self-contained modeling file of `perceiver convert --to hf --remote-code`. It registers nothing; see
`perceiver_cli.models.huggingface`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from perceiver_cli.models.clm.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_cli.models.clm.decoding import WindowStepper, sequence_outputs
from perceiver_cli.models.clm.windows import DEFAULT_SCHEDULE


@dataclass
class PerceiverARCausalLMOutput(CausalLMOutputWithPast):
    """Adds the generation state of `generate(use_cache=False)`, which carries the windows from step to step."""

    decoding_state: WindowStepper | None = None


class PerceiverARGenerationCache(Cache):
    """The generation state as a transformers `Cache`: a `WindowStepper` with its key/value caches, the tokens of
    each row's window and the windows themselves (Perceiver AR rebuilds its cache from those tokens when latents
    join the prefix, so the cache must hold them). Beam search, copies and cropping (assisted decoding) work on it."""

    def __init__(self, stepper: WindowStepper):
        super().__init__(layers=[])
        self.stepper = stepper

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.stepper.seq_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # the window slides: no maximum

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.stepper.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.stepper.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.stepper.repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes minus the number of tokens to remove")
        self.stepper.crop(-tokens_to_remove)

    def reset(self) -> None:
        self.stepper.reset()

    # Assisted decoding asks the cache to record its past before it crops it: transformers 5.24 calls this with no
    # argument, 5.25 with `recurrent_states_to_keep` (for linear-attention layers). The stepper keeps its windows'
    # history anyway, so both are accepted and nothing is recorded; no recurrent state is ever kept.
    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        pass

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0  # transformers 5.25's base class takes the max over `layers`, which is empty here

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.stepper.started

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def batch_size(self) -> int:
        return self.stepper.batch_size if self.stepper.started else -1

    @property
    def is_sliding(self) -> list[bool]:
        return []


class PerceiverARCausalLMConfig(PreTrainedConfig):
    """The fields of `CausalLanguageModelConfig`, with the same names, types and defaults, plus transformers'
    `use_cache`."""

    model_type = "perceiver-cli-causal-lm"  # krasserm/perceiver-io's own is "perceiver-ar-causal-language-model"
    # No max_position_embeddings: generation slides the window, so sequences may grow past max_seq_len.
    attribute_map = {
        "hidden_size": "num_channels",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_self_attention_layers",
    }

    # Declared from the backend dataclass, so that the two cannot drift apart: transformers makes a dataclass of
    # each config class, and these annotated defaults become its fields.
    __annotations__.update({f.name: f.type for f in fields(CausalLanguageModelConfig)})
    vars().update({f.name: f.default for f in fields(CausalLanguageModelConfig)})
    use_cache: bool = True  # generate() with the key/value cache by default (transformers' field; not the backend's)

    @classmethod
    def from_backend_config(cls, config: CausalLanguageModelConfig, **kwargs) -> "PerceiverARCausalLMConfig":
        return cls(**config.to_dict(), **kwargs)

    def backend_config(self) -> CausalLanguageModelConfig:
        return CausalLanguageModelConfig(**{f.name: getattr(self, f.name) for f in fields(CausalLanguageModelConfig)})


@dataclass
class _ForwardCall:
    """What one call of `PerceiverARForCausalLM.forward` asks for, as its modes read it. `stepper` and `cache` are
    the generation state; a mode that starts a new one (`make_cache`) sets both."""

    inputs: torch.Tensor  # input_ids (B, N) or inputs_embeds (B, N, C)
    attention_mask: torch.Tensor | None
    logits_to_keep: int
    num_latents: int | None
    output_hidden_states: bool
    stepper: WindowStepper | None
    cache: PerceiverARGenerationCache | None
    make_cache: bool  # use_cache=True without labels and without a generation state: make one on this input


class PerceiverARForCausalLM(PreTrainedModel, GenerationMixin):
    """`self.model` is the backend `CausalLanguageModel`, so the weights are its parameters prefixed by `model.`."""

    config_class = PerceiverARCausalLMConfig
    base_model_prefix = "model"

    def __init__(self, config: PerceiverARCausalLMConfig):
        super().__init__(config)
        self.model = CausalLanguageModel(config.backend_config())
        self.gradient_checkpointing = config.activation_checkpointing  # transformers' flag; the backend's does it
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The backend's initialisation (normal(0, init_scale), zero biases), for weights a checkpoint does not set.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.init_scale)
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
            init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
        if isinstance(module, CausalLanguageModel) and module.output_bias is not None:
            init.zeros_(module.output_bias)

    # -----------------------------------------------------------------------------------------------------------
    # The standard model API
    # -----------------------------------------------------------------------------------------------------------

    supports_gradient_checkpointing = True

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.input_adapter.txt_embedding

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        """Replace the token embedding (the logits are tied to it); the output bias follows its vocabulary size."""
        self.model.input_adapter.txt_embedding = embedding
        vocab_size = embedding.num_embeddings
        bias = self.model.output_bias
        if bias is not None and bias.shape[0] != vocab_size:
            resized = bias.new_zeros(vocab_size)
            resized[: min(vocab_size, bias.shape[0])] = bias.data[:vocab_size]
            self.model.output_bias = nn.Parameter(resized)
        self.model.config.vocab_size = self.config.vocab_size = vocab_size

    def get_output_embeddings(self) -> None:
        return None  # tied: the logits are the hidden states times the token embedding

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs) -> None:
        # The backend checkpoints its own layers (torch.utils.checkpoint, non-reentrant).
        self.gradient_checkpointing = enable
        self.model.activation_checkpointing = self.model.self_attention.activation_checkpointing = enable
        self.config.activation_checkpointing = self.model.config.activation_checkpointing = enable

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: PerceiverARGenerationCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        num_latents: int | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        decoding_state: WindowStepper | None = None,
        past_key_values: PerceiverARGenerationCache | None = None,
        **kwargs,
    ) -> PerceiverARCausalLMOutput | tuple:
        """Logits (B, N, V) of the positions of `input_ids` (B, N) or `inputs_embeds` (B, N, C), or of the last
        `logits_to_keep` (> 0) only. `attention_mask` (1 = token, 0 = left padding) covers the cached positions
        followed by the new ones. `num_latents=k`: the logits (B, k, V) of a single window over the last
        max_seq_len positions, of which the last k are latents. `labels` (B, N), usually `input_ids`, give the
        next-token loss (-100: ignored). `output_hidden_states`: the latent stack's states at the same positions,
        the cross-attention's output and each self-attention layer's (num_self_attention_layers + 1 tensors).

        With a started `cache` (or `decoding_state`, generation without the cache), the input is the new tokens
        (B, t) and the logits (B, t, V) are those of generation steps (see the module docstring). A cache is made
        when `use_cache=True` is passed: it costs one more pass over the last window."""
        cache = cache if cache is not None else past_key_values  # the keyword of transformers before 5.40
        use_cache = bool(use_cache) or cache is not None
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass either input_ids or inputs_embeds")
        call = _ForwardCall(
            inputs=input_ids if inputs_embeds is None else inputs_embeds,
            attention_mask=attention_mask,
            logits_to_keep=logits_to_keep,
            num_latents=num_latents,
            output_hidden_states=bool(output_hidden_states),
            stepper=cache.stepper if cache is not None else decoding_state,
            cache=cache,
            make_cache=cache is None and decoding_state is None and use_cache and labels is None,
        )
        logits, hidden_states = self._mode(call)(call)
        output = PerceiverARCausalLMOutput(
            loss=None if labels is None else self._loss(logits, labels),
            logits=logits,
            cache=call.cache if use_cache else None,
            hidden_states=hidden_states,
            decoding_state=decoding_state if call.cache is None else None,
        )
        return output if return_dict else output.to_tuple()

    # -----------------------------------------------------------------------------------------------------------
    # The modes of `forward`: `_mode` picks one per call, each returns (logits, hidden states or None)
    # -----------------------------------------------------------------------------------------------------------

    def _mode(self, call: _ForwardCall) -> Callable[[_ForwardCall], tuple]:
        """The method that answers `call`:

        - `_generation_steps`: a started generation state (a cache, or `decoding_state` without one): the input
          is the new tokens, each one generation step;
        - `_one_window`: `num_latents` given: the model's raw forward pass over the last window;
        - `_assisted_decoding_start`: a fresh generation state and `logits_to_keep > 1` (assisted decoding's first
          pass): the prompt starts generation, the draft tokens are generation steps;
        - `_generation_start`: a fresh generation state and `logits_to_keep == 1` (generate()'s first pass): the
          stepper's first window gives the logits;
        - `_all_positions`: the logits of every position (or of the last `logits_to_keep`), each scored at a latent
          of its own window.

        A fresh generation state (and, with `use_cache=True`, a new cache) starts on the input in every mode that
        does not step."""
        stepper, plain = call.stepper, not call.output_hidden_states
        if stepper is not None and stepper.started:
            return self._generation_steps
        if call.num_latents is not None:
            return self._one_window
        if stepper is not None and plain and call.logits_to_keep > 1:
            return self._assisted_decoding_start
        if stepper is not None and plain and call.logits_to_keep == 1:
            return self._generation_start
        return self._all_positions

    def _generation_steps(self, call: _ForwardCall) -> tuple:
        """Logits (B, t, V) of t generation steps over the new tokens of the input and, if asked, hidden states: of
        the new positions from their generation windows, and without the cache (the whole sequence comes each step)
        those of the older positions too, as a full pass of transformers' models gives them."""
        state, inputs, attention_mask, output_hidden_states = (
            call.stepper, call.inputs, call.attention_mask, call.output_hidden_states
        )
        everything = inputs
        whole_sequence = call.cache is None
        if whole_sequence:  # without the cache the whole sequence comes each step, reordered by beam search
            inputs = state.take_new_tokens(inputs)
        steps = []
        after_step = (lambda: steps.append(self._hidden_states_of_windows(state))) if output_hidden_states else None
        logits = state.extend(inputs, after_step)
        if not output_hidden_states:
            return logits, None
        hidden_states = tuple(torch.cat(layer, dim=1) for layer in zip(*steps))
        if whole_sequence and not everything.is_floating_point() and everything.shape[1] > inputs.shape[1]:
            t = inputs.shape[1]
            mask = None if attention_mask is None else attention_mask[:, :-t]
            _, older = self._sequence(everything[:, :-t], mask, 0, True)
            hidden_states = tuple(torch.cat([old, new], dim=1) for old, new in zip(older, hidden_states))
        return logits, hidden_states

    def _one_window(self, call: _ForwardCall) -> tuple:
        """The logits (B, k, V) of the single window over the last max_seq_len positions whose last k =
        `num_latents` positions are latents."""
        window = call.inputs[:, -self.config.max_seq_len :]
        mask = None if call.attention_mask is None else call.attention_mask[:, -window.shape[1] :] == 0
        logits, *hidden_states = self._run(window, window.shape[1] - call.num_latents, mask, call.output_hidden_states)
        self._start_generation(call)
        return logits, tuple(hidden_states) or None

    def _assisted_decoding_start(self, call: _ForwardCall) -> tuple:
        """Assisted decoding's first pass: the prompt, then draft tokens that must be generation steps (they are
        verified against them, and crop() may undo them)."""
        split = call.inputs.shape[1] - call.logits_to_keep + 1
        mask = None if call.attention_mask is None else call.attention_mask[:, :split]
        first = call.stepper.start(call.inputs[:, :split], mask, call.num_latents)[:, None]
        return torch.cat([first, call.stepper.extend(call.inputs[:, split:])], dim=1), None

    def _generation_start(self, call: _ForwardCall) -> tuple:
        """generate()'s first pass: the logits (B, 1, V) of the stepper's first window."""
        return self._start_generation(call), None

    def _all_positions(self, call: _ForwardCall) -> tuple:
        logits, hidden_states = self._sequence(
            call.inputs, call.attention_mask, call.logits_to_keep, call.output_hidden_states
        )
        self._start_generation(call)
        return logits, hidden_states

    # -----------------------------------------------------------------------------------------------------------
    # What the modes share
    # -----------------------------------------------------------------------------------------------------------

    def _start_generation(self, call: _ForwardCall) -> torch.Tensor | None:
        """Start the call's fresh generation state on its input (first making one, with its cache, if it asks for a
        cache), and return its first logits (B, 1, V); None without a generation state. It costs one more pass over
        the last window in the modes that computed their own logits."""
        if call.stepper is None and call.make_cache:
            schedule = getattr(self.generation_config, "window_schedule", None) or DEFAULT_SCHEDULE
            call.stepper = WindowStepper(self.model, schedule, use_cache=True)
            call.cache = PerceiverARGenerationCache(call.stepper)
        if call.stepper is None:
            return None
        return call.stepper.start(call.inputs, call.attention_mask, call.num_latents)[:, None]

    @staticmethod
    def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The usual causal LM loss: the logits at position i predict token i + 1. Labels of -100 are left out:
        transformers' convention, and torch's default `ignore_index` (`perceiver_cli.data.masking.IGNORE_INDEX`)."""
        n = logits.shape[1]
        targets = labels[:, -n:][:, 1:]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())

    def _sequence(self, inputs, attention_mask, logits_to_keep: int, output_hidden_states: bool):
        """Logits of the last `logits_to_keep` positions (0: all) and, if asked, the hidden states of all."""
        keep = 0 if output_hidden_states else logits_to_keep
        run = lambda x, prefix_len, pad_mask: self._run(x, prefix_len, pad_mask, output_hidden_states)  # noqa: E731
        logits, *hidden_states = sequence_outputs(self.model, inputs, attention_mask, keep, run)
        if keep != logits_to_keep and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        return logits, tuple(hidden_states) or None

    def _run(self, x, prefix_len, pad_mask, output_hidden_states: bool) -> tuple[torch.Tensor, ...]:
        """One pass of the backend: the latents' logits and, if asked, their hidden states (see `forward`)."""
        if not output_hidden_states:
            return (self.model(x, prefix_len, pad_mask=pad_mask),)
        states = []
        layers = [self.model.cross_attention, *self.model.self_attention.layers]
        hooks = [layer.register_forward_hook(lambda _, __, out: states.append(out)) for layer in layers]
        try:
            logits = self.model(x, prefix_len, pad_mask=pad_mask)
        finally:
            for hook in hooks:
                hook.remove()
        return (logits, *states[: len(layers)])

    def _hidden_states_of_windows(self, state: WindowStepper) -> tuple[torch.Tensor, ...]:
        """The hidden states (B, 1, C) of each row's newest position, from one more pass over its window: a cached
        step computes no full layer outputs."""
        per_group = [(rows, self._run(tokens, prefix_len, None, True)[1:]) for rows, tokens, prefix_len in
                     state.window_inputs()]
        layers = []
        for i in range(len(per_group[0][1])):
            layer = per_group[0][1][i].new_empty(state.batch_size, 1, self.config.num_channels)
            for rows, states in per_group:
                layer[rows] = states[i][:, -1:]
            layers.append(layer)
        return tuple(layers)

    # -----------------------------------------------------------------------------------------------------------
    # generate()
    # -----------------------------------------------------------------------------------------------------------

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        """One `WindowStepper` per `generate()` call, with the call's window schedule: in a cache of ours, or, with
        use_cache=False, in the model kwargs (transformers' DynamicCache cannot hold Perceiver AR's state)."""
        if model_kwargs.get("cache") is not None:
            if not isinstance(model_kwargs["cache"], PerceiverARGenerationCache):
                raise ValueError("Perceiver AR generates with its own cache: pass no cache, or the one it returned")
            return
        if not generation_config.use_cache and generation_config.num_beams > 1 and "inputs_embeds" in model_kwargs:
            raise ValueError("beam search from inputs_embeds needs the cache: generate with use_cache=True")
        schedule = getattr(generation_config, "window_schedule", None) or DEFAULT_SCHEDULE
        stepper = WindowStepper(self.model, schedule, use_cache=bool(generation_config.use_cache))
        if generation_config.use_cache:
            model_kwargs["cache"] = PerceiverARGenerationCache(stepper)
        else:
            model_kwargs["decoding_state"] = stepper

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if outputs.decoding_state is not None:
            model_kwargs["decoding_state"] = outputs.decoding_state
        return model_kwargs
