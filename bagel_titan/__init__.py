"""bagel-titan: a torchtitan-style trainer for BAGEL-style unified multimodal models."""

__version__ = "0.1.0"
