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


def test_the_parity_gate_without_transformers_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """The gate is on by default and needs transformers: without it the export stops at once
    (status 2, the remedy named) instead of failing with a traceback after writing 14 GB."""
    import importlib.util

    from titan_llava.hf import export

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    rc = export.main(["--checkpoint", str(tmp_path / "step-3"), "--output", str(tmp_path / "out")])
    assert rc == 2
    assert "--no-verify" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
