"""Backend models (pure PyTorch) and their Lightning and Hugging Face wrappers.

Backend: `attention` (the one attention), `layers`, `perceiver_io` and `perceiver_ar` (generic cores),
`mlm` and `clm` (the language models). Wrappers: `lightning`. Import what you need from those modules;
this package imports nothing so that `import perceiver_cli.models.mlm` stays cheap.
"""
