"""Backend models (pure PyTorch) and their Lightning and Hugging Face wrappers.

Backend: `attention` (the one attention), `layers`, `adapters`, `common` (what the models share: config dicts,
initialisation, offloading, layout problems), `perceiver_io` and `perceiver_ar` (the generic cores), the task
packages `mlm` and `clm` (the language models; `clm` also holds the generation windows and the generation stepper),
`optim` (optimizers and schedules) and `saved_model` (what a saved model carries besides its weights). Wrappers,
above the backend: `lightning` (losses, logging), `mlm.positions` (which positions a masked LM decodes) and
`huggingface` (transformers classes and format conversions; importing it registers the causal LM with
transformers' Auto classes). This package imports nothing, so that `import perceiver_cli.models.mlm` stays cheap.
"""
