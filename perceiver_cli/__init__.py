"""Command-line toolkit to train, evaluate and run Perceiver IO and Perceiver AR language models."""

__version__ = "0.1.0"
