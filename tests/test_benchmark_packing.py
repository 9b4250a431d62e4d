"""benchmarks/packing_efficiency.py runs on a small length sample and prints every setting."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_packing_efficiency_prints_every_setting():
    proc = subprocess.run(
        [sys.executable, "benchmarks/packing_efficiency.py", "--samples", "300", "--stage", "1",
         "--rows", "4", "--lookahead", "1", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(.+?)\s+([\d.]+)%\s+([\d.]+)%\s+(\d+)\s+([\d.]+)x\s+([\d.]+)\s+(\d+)\s+([\d.]+)b$", line)
        if m:
            rows[m.group(1).strip()] = [float(g) for g in m.groups()[1:]]
    assert set(rows) == {
        "no packing, 4 rows (pad to longest row)",
        "greedy 4x4096, fixed width (before)",
        "packing 4x4096, lookahead 1",
        "packing 4x4096, lookahead 8",
        "packing 1x16384, lookahead 1",
        "packing 1x16384, lookahead 8",
    }
    assert rows["no packing, 4 rows (pad to longest row)"][3] == 1.0
    # One row per micro-batch padded to itself has no padding; fixed-width rows waste the most.
    assert rows["packing 1x16384, lookahead 8"][0] == 0.0
    assert rows["greedy 4x4096, fixed width (before)"][0] > rows["packing 4x4096, lookahead 1"][0]
