"""Hugging Face interoperability: read model directories saved by transformers or by the perceiver-io library, and
write directories that stock transformers loads (`perceiver convert`).

Importing this package registers the Perceiver AR causal LM classes with transformers' auto classes:

    import perceiver_cli.models.huggingface  # registers the "perceiver-cli-causal-lm" model type
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exported-clm-dir")

`import perceiver_cli` alone does not register them: the package root stays free of torch and transformers so that
the command line starts fast, and transformers offers no hook to register a model type lazily. Masked LMs export
to transformers' own `PerceiverForMaskedLM` and need no registration; `--remote-code` exports need none either.

Modules: `pretrained` (directories <-> backend models), `files` (config, weights, tokenizer, atomic writes),
`perceiver_for_masked_lm` and `perceiver_io_library` (the foreign formats), `state_dicts` (our fused attention
projections <-> their separate ones), `modeling_perceiver_ar` (our transformers classes for the causal LM) and
`remote_code` (its self-contained modeling file).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from perceiver_cli.models.huggingface.modeling_perceiver_ar import PerceiverARCausalLMConfig, PerceiverARForCausalLM
from perceiver_cli.models.huggingface.pretrained import load_pretrained_directory, save_pretrained_directory

AutoConfig.register(PerceiverARCausalLMConfig.model_type, PerceiverARCausalLMConfig)
AutoModelForCausalLM.register(PerceiverARCausalLMConfig, PerceiverARForCausalLM)

__all__ = [
    "PerceiverARCausalLMConfig",
    "PerceiverARForCausalLM",
    "load_pretrained_directory",
    "save_pretrained_directory",
]
