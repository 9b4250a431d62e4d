"""Parallelism applied from outside the model: device meshes, FSDP2/HSDP, activation checkpointing, compile."""
