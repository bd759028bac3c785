"""Distillery: fine-tune, distill, tune and serve language models on Ray."""

__version__ = "0.1.0"
