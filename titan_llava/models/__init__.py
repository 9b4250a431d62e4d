"""Plain-PyTorch model modules (parallelism is applied from outside, never here): Vicuna, CLIP-ViT,
projector, LLaVA-NeXT."""
