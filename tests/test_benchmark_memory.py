"""benchmarks/activation_memory.py runs on the debug flavor and prints consistent figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_activation_memory_prints_frozen_below_trainable():
    proc = subprocess.run(
        [sys.executable, "benchmarks/activation_memory.py", "--flavor", "debug", "--tokens", "32",
         "--micro-batch-tokens", "1024"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_token = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^\s+(frozen|trainable)\s+[\d.]+ MiB saved =\s+([\d.]+) KiB per token", proc.stdout, re.M)
    }
    assert set(per_token) == {"frozen", "trainable"}
    # Frozen weights need no saved inputs for their own gradients: strictly less is kept.
    assert 0 < per_token["frozen"] < per_token["trainable"]
    assert re.search(r"1024 tokens/micro-batch, no AC: frozen\s+[\d.]+ GiB, trainable\s+[\d.]+ GiB; full AC", proc.stdout)
