"""fmstack: a PyTorch-native foundation-model stack for LLaMA-family models."""

__version__ = "0.1.0"
