"""Workbench for quantizing video diffusion transformers."""

__version__ = "0.1.0"
