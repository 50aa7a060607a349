"""Benchmarks of the perceiver toolkit: `python -m benchmarks` (see __main__.py); `gpu_check.py` for CUDA."""
