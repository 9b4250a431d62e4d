"""Stop a torchrun worker whose launcher died.

torchrun does not take its workers down when it is SIGKILLed (OOM killer, `kill -9`, a node agent
that skips the grace period): they are reparented to init and keep training, saving checkpoints and
appending metrics in the dump folder that the job's next start resumes from. Under torchrun, a
thread here watches the parent pid and, once it changes, sends this process SIGTERM: the usual
preemption path (checkpoint at the next step boundary, exit 75; during set-up, exit 75 at once).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

logger = logging.getLogger("titan_llava")


def watch_launcher(poll_s: float = 5.0) -> threading.Thread | None:
    """Start the watch (a daemon thread) when launched by torchrun; returns it, or None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None  # a plain `python -m` run may be nohup'ed: its parent's exit means nothing
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent or parent == 1:
                logger.warning(
                    f"the launcher (pid {parent}) is gone; stopping as for SIGTERM (checkpoint, "
                    "exit 75)"
                )
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(poll_s)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread
