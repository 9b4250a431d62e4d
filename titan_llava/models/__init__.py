"""Plain-PyTorch model modules (no torch.distributed here): Vicuna, CLIP-ViT, projector, LLaVA-NeXT."""
