"""WaitWatch: a warning, on the rank that waits, while the data pipeline keeps the trainer waiting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

from titan_llava.data.wait_watch import WaitWatch


def test_warns_after_the_threshold_then_at_each_doubling_and_when_the_data_comes() -> None:
    messages: list[str] = []
    lock = threading.Lock()

    def warn(msg: str) -> None:
        with lock:
            messages.append(msg)

    watch = WaitWatch(rank=3, first_s=0.2, poll_s=0.01, warn=warn)
    try:
        with watch.waiting(step=7):
            time.sleep(0.05)  # short: nothing said
        assert messages == []
        with watch.waiting(step=8):
            time.sleep(0.7)  # past 0.2 and 0.4, not 0.8
        assert len(messages) == 3, messages
        assert all(m.startswith("rank 3: waiting ") and "data of step 8" in m for m in messages[:2])
        assert messages[2].startswith("rank 3: the data for step 8 came after ")
        with watch.waiting(step=9):  # the threshold starts over for each wait
            time.sleep(0.3)
        assert len(messages) == 5 and "data of step 9" in messages[3], messages
    finally:
        watch.close()
    assert watch._thread is None


def test_the_trainer_warns_while_its_data_is_late(tmp_path) -> None:
    """The trainer's data wait goes through the watch: a batch held back 1.5 s in step 2 is
    reported on rank 0 with its step (thresholds lowered for the test)."""
    from tests.train.utils import DEBUG_CONFIG, REPO

    script = tmp_path / "run.py"
    script.write_text(
        "import time\n"
        "from titan_llava import trainer as trainer_mod\n"
        "from titan_llava.config import load_config\n"
        "from titan_llava.data.loader import LlavaDataLoader\n"
        "from titan_llava.data.wait_watch import WaitWatch\n"
        "trainer_mod.WaitWatch = lambda rank: WaitWatch(rank, first_s=0.5, poll_s=0.05)\n"
        "calls, plain_next = [0], LlavaDataLoader.__next__\n"
        "def late_next(self):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 3:  # step 2's first micro-batch (2 a step)\n"
        "        time.sleep(1.5)\n"
        "    return plain_next(self)\n"
        "LlavaDataLoader.__next__ = late_next\n"
        f"t = trainer_mod.Trainer(load_config(['--job.config_file', {DEBUG_CONFIG!r}, '--job.dump_folder', "
        f"{str(tmp_path / 'run')!r}, '--training.steps', '2', '--checkpoint.enable', 'false']))\n"
        "t.train()\n"
        "t.close()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert re.search(r"rank 0: waiting \d+ s for the data of step 2 ", log), log[-3000:]
    assert "rank 0: the data for step 2 came after" in log
    assert "data of step 1 " not in log
