"""titan_llava: a TorchTitan-style, pure-PyTorch trainer for LLaVA-NeXT (LLaVA-1.6)."""

__version__ = "0.1.0"
