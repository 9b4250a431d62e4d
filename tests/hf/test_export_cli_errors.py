"""The export command reports user errors in one line with exit status 2 (no traceback)."""

from __future__ import annotations

import subprocess
import sys

from tests.train.utils import REPO


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "titan_llava.hf.export", "--checkpoint", str(tmp_path / "step-3"),
         "--output", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "--checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
