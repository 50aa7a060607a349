"""Backend models (pure PyTorch) and their Lightning and Hugging Face wrappers.

Backend: `attention` (the one attention), `layers`, `adapters`, `perceiver_io` and `perceiver_ar` (the generic
cores), `mlm` and `clm` (the language models; `clm` also holds the generation windows). Wrappers, kept apart:
`lightning` (losses, optimizers) and `huggingface` (transformers classes and format conversions; importing it
registers the causal LM with transformers' Auto classes). This package imports nothing, so that
`import perceiver_cli.models.mlm` stays cheap.
"""
