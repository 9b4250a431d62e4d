"""benchmarks/fa4_site.sh install: unpacks an archive laid out as its build makes it and prints
exports under which both the folder's packages and the CuTe DSL's dsl_packages import (the wheel
adds the latter through a .pth file, which a PYTHONPATH folder never runs). The build needs the
network and is not run here."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "fa4_site.sh")


def _archive(path: str) -> None:
    files = {
        "flash_attn/__init__.py": "",
        "flash_attn/cute/__init__.py": "",
        "flash_attn/cute/interface.py": "import cutlass\nWHERE = 'site'\n",
        "nvidia_cutlass_dsl/dsl_packages/cutlass/__init__.py": "WHERE = 'dsl_packages'\n",
        "nvidia_cutlass_dsl_packages.pth": "import sys  # what a PYTHONPATH folder ignores\n",
    }
    with tarfile.open(path, "w:xz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_install_unpacks_and_exports_a_path_that_imports(tmp_path):
    os.makedirs(tmp_path / "fa4")
    _archive(str(tmp_path / "fa4" / "site.tar.xz"))
    target = tmp_path / "site"
    proc = subprocess.run(["bash", SCRIPT, "install", str(tmp_path / "fa4"), str(target)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"unpacked into {target}" in proc.stderr
    exports = proc.stdout.strip().splitlines()
    want = (f"export PYTHONPATH={target}:{target}/nvidia_cutlass_dsl/dsl_packages"
            "${PYTHONPATH:+:$PYTHONPATH}")
    assert exports == [want], exports
    code = ("import flash_attn.cute.interface as i, cutlass; "
            "print(i.WHERE, cutlass.WHERE)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = "/kept"
    shell = f'{exports[0]}; echo "$PYTHONPATH"; "{sys.executable}" -c "{code}"'
    run = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60,
                         env=env, check=False)
    assert run.returncode == 0, run.stderr
    path, imported = run.stdout.strip().splitlines()
    assert path.endswith(":/kept")  # an existing PYTHONPATH is kept, after the new folders
    assert imported == "site dsl_packages"


def test_usage_error():
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=30,
                          check=False)
    assert proc.returncode == 2 and "usage:" in proc.stderr
