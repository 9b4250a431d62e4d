"""Helpers for trainer tests: a tiny random HF LlavaNext matching the debug flavor, and running
`titan_llava.train` in fresh processes (torchrun for several ranks) with config overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEBUG_CONFIG = os.path.join(REPO, "train_configs", "debug_model.toml")
SAMPLE_DATA = os.path.join(REPO, "tests", "assets", "sample_data")
TOKENIZER = os.path.join(REPO, "tests", "assets", "tokenizer", "tokenizer.model")
# An id the shipped 1000-piece tokenizer never produces, inside the debug vocab (1024).
HF_IMAGE_TOKEN_ID = 1023

# Same shapes as the `debug` flavor (titan_llava/models/args.py), in transformers' words.
HF_TEXT_KW = dict(
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=1024,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
)
HF_VISION_KW = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=336,
    patch_size=14,
    projection_dim=16,
)


def make_hf_llava(directory: str, seed: int = 0) -> str:
    """Save a randomly initialised tiny LlavaNextForConditionalGeneration (safetensors)."""
    import transformers

    cfg = transformers.LlavaNextConfig(
        vision_config=HF_VISION_KW, text_config=HF_TEXT_KW, image_token_index=HF_IMAGE_TOKEN_ID
    )
    torch.manual_seed(seed)
    model = transformers.LlavaNextForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            # Random norms/biases too, so any mapping mistake changes the loss.
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def run_train(
    dump_folder: str,
    overrides: list[str] | None = None,
    nproc: int = 1,
    timeout: float = 240,
    config: str = DEBUG_CONFIG,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run the trainer in fresh processes (torchrun when nproc > 1) from the repository root."""
    args = ["--job.config_file", config, "--job.dump_folder", dump_folder, *(overrides or [])]
    if nproc == 1:
        cmd = [sys.executable, "-m", "titan_llava.train", *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), "-m", "titan_llava.train", *args,
        ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    proc = subprocess.run(
        cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"training failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def read_metrics(dump_folder: str) -> list[dict]:
    with open(os.path.join(dump_folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def hf_init(directory: str) -> list[str]:
    return ["--checkpoint.initial_load_path", directory, "--checkpoint.initial_load_in_hf", "true"]
