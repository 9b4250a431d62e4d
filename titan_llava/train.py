"""Entry point of `python -m titan_llava.train` and of `run_train.sh` (torchrun): load the config,
build the Trainer (titan_llava.trainer), run it, and exit with a status the launcher passes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from titan_llava.checkpoint import (
    PREEMPTED_EXIT_CODE,
    TERMINATED_EXIT_CODE,
    SetupPreempted,
    install_early_sigterm_handler,
)
from titan_llava.checkpoint_io import complete_steps, maybe_crash, maybe_sigterm, step_dir_name
from titan_llava.config import JobConfig, load_config
from titan_llava.data.errors import BadSampleError
from titan_llava.distributed.utils import destroy_distributed
from titan_llava.launcher_watch import watch_launcher
from titan_llava.step_check import NonFiniteError
from titan_llava.trainer import Trainer

EXIT_CONFIG_ERROR = 2
# A step's loss or gradient norm was not finite: the step was not applied and the run stopped.
# Not "try again": an exact resume replays the same batches (requeueing would fail the same way).
EXIT_NON_FINITE = 3
USAGE = """usage: python -m titan_llava.train [--job.config_file FILE.toml] [--section.key value ...]
       NGPU=8 CONFIG_FILE=FILE.toml ./run_train.sh [--section.key value ...]   (torchrun)

Settings come from the defaults, then the TOML file, then the command line (--data.max_seq_len
4096, --training.trainable projector,llm; a bool key alone means true). Every key, with its
default and meaning, is documented in titan_llava/config.py; README.md's Configuration table
lists the most used. Exit status: 0 done, 2 a set-up error (one line naming the key, file or
sample; with data.strict also a bad sample met in training), 3 a non-finite loss or gradient
norm (the step was not applied; the message names the newest checkpoint), 75 preempted after
saving a checkpoint (run the same command to resume), 143 stopped by SIGTERM with checkpointing
off."""


@record  # under torchrun: the failing rank's traceback goes into torchrun's failure summary
def main(argv: list[str] | None = None) -> int:
    """`_run` with a marker run_train.sh can see while this worker lives (`_alive_marker`)."""
    if any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv)):
        print(USAGE)
        return 0
    marker = _alive_marker()
    try:
        return _run(argv)
    finally:
        if marker is not None:
            with contextlib.suppress(OSError):
                os.remove(marker)


def _alive_marker() -> str | None:
    """Under run_train.sh: an empty `<status file>.alive.<pid>` for as long as this worker runs.
    If torchrun is killed outright, its workers stop on their own (launcher_watch: checkpoint,
    status 75); the script waits while a marker's lock is held, so that it reports their status
    and a restarted job never overlaps with them. A SIGKILLed worker leaves its marker unlocked."""
    path = os.environ.get("TITAN_LLAVA_STATUS_FILE")
    if not path:
        return None
    marker = f"{path}.alive.{os.getpid()}"
    # An exclusive flock held for this process's lifetime: the kernel drops it when the process
    # dies however it dies (SIGKILL, abort), also while it is an unreaped zombie, and a later
    # process that reuses the pid does not hold it. Forked children (data workers) close it.
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.register_at_fork(after_in_child=lambda: _close_quietly(fd))
    return marker


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _run(argv: list[str] | None) -> int:
    """Exit codes: 0 done; 75 (PREEMPTED_EXIT_CODE) stopped by SIGTERM after saving a checkpoint;
    143 (TERMINATED_EXIT_CODE) stopped by SIGTERM with checkpointing off (nothing saved);
    2 a configuration or input error found during set-up (the message names the key, file or
    sample), or with data.strict a bad sample met in training; 3 (EXIT_NON_FINITE) a step's loss
    or gradient norm was not finite; anything else is a crash with its traceback."""
    trainer, finished, cfg, stopped = None, False, None, None
    install_early_sigterm_handler()
    watch_launcher()  # under torchrun: a SIGKILLed torchrun stops its workers as SIGTERM does
    try:
        try:
            cfg = load_config(argv)
            # Test hook (TITAN_LLAVA_FAULT=sigterm_setup@0): a preemption notice during set-up.
            maybe_sigterm("setup", 0, int(os.environ.get("RANK", "0")))
            trainer = Trainer(cfg)
        except ValueError as e:
            # User errors (ValueError by convention) before any training work: no traceback.
            print(f"titan_llava.train: error: {e}", file=sys.stderr)
            _report_status(EXIT_CONFIG_ERROR, f"error: {e}")
            return EXIT_CONFIG_ERROR
        except SetupPreempted:
            # Nothing trained yet: the newest checkpoint is this run's state; requeue resumes it.
            saving = cfg is None or cfg.checkpoint.enable
            status = PREEMPTED_EXIT_CODE if saving else TERMINATED_EXIT_CODE
            print(f"titan_llava.train: SIGTERM during set-up; exiting with status {status}",
                  file=sys.stderr)
            _report_status(status)
            return status
        try:
            status = trainer.train()
            finished = True
        except NonFiniteError as e:  # raised on every rank alike (the numbers are reduced)
            stopped = e
            # Every rank is here: publish an asynchronous save still in flight (a checked step's
            # state); close() below only waits for it, leaving it a .tmp folder.
            trainer.checkpointer.finish()
        except BadSampleError as e:  # data.strict: the rank that met the sample (others wait)
            stopped = e
    finally:
        if trainer is not None:
            trainer.close()
        # Only a run that ended normally on every rank can meet at a barrier.
        destroy_distributed(barrier=finished)
    if stopped is not None:
        if isinstance(stopped, NonFiniteError):
            status, prefix, what = EXIT_NON_FINITE, "", (
                "resuming it unchanged replays the same batches (exact resume) and likely fails "
                "the same way: see docs/checkpointing.md, 'A non-finite step'")
        else:
            status, prefix, what = EXIT_CONFIG_ERROR, "data.strict: ", (
                "resuming it meets the sample again: fix its files (same id), or resume with "
                "data.strict = false, which skips it (logged and counted)")
        message = f"{prefix}{stopped}. {_newest_checkpoint_hint(cfg, what)}"
        print(f"titan_llava.train: error: {message}", file=sys.stderr)
        _report_status(status, f"error: {message}")
        return status
    _report_status(status)
    # Test hook (TITAN_LLAVA_FAULT=exit@0[@rank]): a worker killed after the run completed.
    maybe_crash("exit", 0, int(os.environ.get("RANK", "0")))
    return status


def _newest_checkpoint_hint(cfg: JobConfig, what: str) -> str:
    """Where a stopped run stands: the newest complete checkpoint, and `what` resuming it means."""
    folder = os.path.join(cfg.job.dump_folder, cfg.checkpoint.folder)
    steps, _ = complete_steps(folder) if cfg.checkpoint.enable else ([], [])
    if not steps:
        return "No checkpoint of this run exists (a rerun starts over)"
    newest = os.path.join(folder, step_dir_name(steps[-1]))
    return f"The newest complete checkpoint is {newest}; {what}"


def _report_status(status: int, message: str | None = None) -> None:
    """torchrun turns any non-zero worker exit into 1; run_train.sh reads the real status (75 =
    preempted, checkpoint saved; 143 = SIGTERM with checkpointing off; 2 = config error; 3 = a
    non-finite step) from the
    first line of the file it names in TITAN_LLAVA_STATUS_FILE, and prints the rest (the error
    message) itself. Every rank writes it
    (they agree), because torchrun may stop the other ranks as soon as the first one exits: rank 0,
    the only rank whose output is shown, can be stopped before it prints its own message."""
    path = os.environ.get("TITAN_LLAVA_STATUS_FILE")
    if path:
        # Write-then-rename: a rank stopped mid-write never leaves the file empty.
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{status}\n")
            if message:
                f.write(f"{message}\n")
        os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
