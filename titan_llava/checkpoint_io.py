"""Checkpoint folder layout and safe reading: step-N / .step-N.tmp names, the completion marker,
JSON blobs stored as uint8 tensors, a DCP reader whose metadata unpickler only admits DCP's own
classes, a planner that refuses pickled (non-tensor) entries, model-weights-only loading, step
folder deletion that unmarks first, and the test fault hooks."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import shutil
import signal
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

COMPLETE_MARKER = ".complete"
METADATA_FILE = ".metadata"
FAULT_ENV = "TITAN_LLAVA_FAULT"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_RE = re.compile(r"^\.step-(\d+)\.tmp$")
logger = logging.getLogger("titan_llava")


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def tmp_dir_name(step: int) -> str:
    return f".step-{step}.tmp"


def is_complete(step_dir: str) -> bool:
    """Written to the end: DCP metadata present and the marker written after it."""
    return os.path.isfile(os.path.join(step_dir, COMPLETE_MARKER)) and os.path.isfile(
        os.path.join(step_dir, METADATA_FILE)
    )


def complete_steps(folder: str) -> tuple[list[int], list[str]]:
    """(sorted steps of complete step-N folders, names of incomplete/temporary ones)."""
    if not os.path.isdir(folder):
        return [], []
    steps, incomplete = [], []
    for name in sorted(os.listdir(folder)):
        m = _STEP_RE.match(name)
        if m and is_complete(os.path.join(folder, name)):
            steps.append(int(m.group(1)))
        elif m or _TMP_RE.match(name):
            incomplete.append(name)
    return sorted(steps), incomplete


def resolve_step_dir(path: str, key: str) -> str:
    """A complete step folder: `path` itself, or the newest complete step-N inside `path`."""
    if is_complete(path):
        return path
    steps, _ = complete_steps(path)
    if steps:
        return os.path.join(path, step_dir_name(steps[-1]))
    raise ValueError(
        f"{key}: {path} is neither a complete checkpoint step folder (DCP {METADATA_FILE} + "
        f"{COMPLETE_MARKER}) nor a folder holding one"
    )


def find_run_file(path: str, filename: str) -> str | None:
    """`filename` of the run that wrote the checkpoint at `path` (a step folder or a checkpoint
    folder): the first one found walking up (DUMP/checkpoint/step-N -> DUMP/filename)."""
    here = os.path.abspath(path)
    for _ in range(4):
        here = os.path.dirname(here)
        candidate = os.path.join(here, filename)
        if os.path.isfile(candidate):
            return candidate
    return None


# ----- plain state as tensors (no pickles inside the checkpoint) -----
def json_to_blob(obj: Any) -> torch.Tensor:
    data = json.dumps(obj, sort_keys=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def blob_to_json(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.tolist()).decode())


# ----- safe reading -----
class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle; admit only the classes DCP itself writes there."""

    _ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)
    _ALLOWED = frozenset(
        {
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
            ("torch", "Size"),
            ("collections", "OrderedDict"),
            ("builtins", "set"),
            ("builtins", "frozenset"),
            ("builtins", "slice"),
            ("torch.serialization", "_get_layout"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        dtypes = {str(d).split(".")[-1] for d in vars(torch).values() if isinstance(d, torch.dtype)}
        if (
            (module, name) in self._ALLOWED
            or module in self._ALLOWED_MODULES
            or (module == "torch" and name in dtypes)
            or (
                module == "torch"
                and name
                in (
                    "strided",
                    "sparse_coo",
                    "contiguous_format",
                    "preserve_format",
                    "channels_last",
                )
            )
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}: refused")


def read_metadata(step_dir: str, key: str) -> Metadata:
    path = os.path.join(step_dir, METADATA_FILE)
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(io.BytesIO(f.read())).load()
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{key}: cannot read checkpoint metadata {path}: {e}") from e
    if not isinstance(meta, Metadata):
        raise ValueError(f"{key}: {path} is not DCP metadata")  # noqa: TRY004 (a user input)
    return meta


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        meta = read_metadata(str(self.path), "checkpoint")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """Our checkpoints hold tensors only; a pickled entry would be torch.load-ed, so refuse it."""

    def load_bytes(self, read_item, value) -> None:
        raise ValueError(
            f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object, not a tensor: refused"
        )


# ----- reading and discarding step folders -----
def load_model_weights(model: torch.nn.Module, path: str) -> None:
    """Model weights only from a DCP step folder (or the newest complete one under a checkpoint
    folder): stage 1 -> stage 2. The folder must hold every parameter of `model`."""
    step_dir = resolve_step_dir(path, "checkpoint.initial_load_path")
    msd = get_model_state_dict(model)
    dcp.load(
        {"model": msd},
        storage_reader=safe_reader(step_dir, "checkpoint.initial_load_path"),
        planner=TensorOnlyLoadPlanner(),
    )
    set_model_state_dict(model, msd)
    logger.info(f"model weights loaded from {step_dir}")


def safe_reader(step_dir: str, key: str) -> SafeFileSystemReader:
    """A DCP reader for `step_dir`, its metadata first validated by the restricted unpickler."""
    read_metadata(step_dir, key)
    return SafeFileSystemReader(step_dir)


def discard_step_dir(path: str) -> None:
    """Delete a step folder so that no crash midway leaves it looking complete: the marker goes
    first (rmtree deletes in directory order, shards before .complete/.metadata on ext4)."""
    marker = os.path.join(path, COMPLETE_MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    shutil.rmtree(path, ignore_errors=True)


def bytes_to_blob(b: bytes) -> torch.Tensor:
    """Raw bytes (a data-loader state entry) as a uint8 tensor, as json_to_blob stores JSON."""
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()


def alloc_like(meta: dict, fqn: str) -> torch.Tensor:
    """An empty tensor shaped like the saved entry `fqn` (per-rank blobs differ in length)."""
    m = meta[fqn]
    return torch.empty(tuple(m.size), dtype=m.properties.dtype)


def load_plain(step_dir: str, fqn: str, meta: dict, key: str) -> torch.Tensor:
    """One entry of a full checkpoint, read without a process group (e.g. before set-up)."""
    if fqn not in meta:
        raise ValueError(f"{key}: {step_dir} is not a full titan_llava checkpoint (no {fqn!r})")
    t = alloc_like(meta, fqn)
    dcp.load(
        {fqn: t},
        storage_reader=safe_reader(step_dir, key),
        planner=TensorOnlyLoadPlanner(),
        no_dist=True,
    )
    return t


# ----- fault injection for tests: TITAN_LLAVA_FAULT="point@step[@rank],..." -----
def fault_point(point: str, step: int, rank: int) -> bool:
    spec = os.environ.get(FAULT_ENV, "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split("@")
        if parts[0] != point or int(parts[1]) != step:
            continue
        if len(parts) < 3 or int(parts[2]) == rank:
            return True
    return False


def maybe_crash(point: str, step: int, rank: int) -> None:
    """SIGKILL this process at a named point (a hard crash: no handlers, no cleanup)."""
    if fault_point(point, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_sigterm(point: str, step: int, rank: int) -> None:
    """Deliver SIGTERM to this process at a named point (a preemption notice)."""
    if fault_point("sigterm_" + point, step, rank):
        os.kill(os.getpid(), signal.SIGTERM)
