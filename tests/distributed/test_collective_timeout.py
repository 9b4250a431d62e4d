"""set_collective_timeout: after set-up, a rank that stops answering fails the others' next
collective within the training timeout instead of the (long) set-up one."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.train.utils import REPO

SCRIPT = """
import time, datetime
import torch, torch.distributed as dist
from titan_llava.distributed.utils import set_collective_timeout
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
x = torch.ones(1)
dist.all_reduce(x)  # both ranks are up
set_collective_timeout(1)
if dist.get_rank() == 1:
    time.sleep(6)  # a hung rank
t0 = time.monotonic()
try:
    dist.all_reduce(x)
    print("NO TIMEOUT", flush=True)
except Exception as e:
    print(f"timed out after {time.monotonic() - t0:.1f} s: {type(e).__name__}", flush=True)
import os
os._exit(0)
"""


def test_a_hung_rank_fails_the_others_within_the_training_timeout(tmp_path):
    script = tmp_path / "timeout.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert "NO TIMEOUT" not in out, out[-2000:]
    line = next(l for l in out.splitlines() if "timed out after" in l)
    assert float(line.split("timed out after ")[1].split(" s")[0]) < 5, line
    assert time.monotonic() - t0 < 100
