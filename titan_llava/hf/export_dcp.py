"""The export's inputs from a training run: the run's saved config (found from the checkpoint path),
the architecture and the pretrained CLIP it started from (followed through stage-1 -> stage-2
chains), and the model tensors of a sharded DCP step folder, streamed on one process.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from collections.abc import Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titan_llava.checkpoint_io import (
    SafeFileSystemReader,
    find_run_file,
    TensorOnlyLoadPlanner,
    read_metadata,
    resolve_step_dir,
)
from titan_llava.config import JobConfig
from titan_llava.config_parse import load_config_file
from titan_llava.models.args import LlavaNextArgs, llava_args_from_dict

MODEL_PREFIX = "model."  # the checkpoint's "model" entry, flattened by DCP
CONFIG_FILE = "config.json"
_MAX_CHAIN = 8  # runs initialised from runs initialised from ... (stage 1 -> 2 -> more)
_READ_BATCH_BYTES = (
    1 << 30
)  # tensors read per dcp.load call (bounds the reader's memory)


def find_run_config(step_dir: str) -> str:
    """The run's resolved config.json: the first one found walking up from the step folder
    (DUMP/checkpoint/step-N -> DUMP/config.json; checkpoint.folder may nest deeper)."""
    here = os.path.abspath(step_dir)
    for _ in range(4):
        here = os.path.dirname(here)
        path = os.path.join(here, CONFIG_FILE)
        if os.path.isfile(path):
            return path
    raise ValueError(
        f"--checkpoint {step_dir}: no {CONFIG_FILE} of the run found above it; pass --config "
        "(the run's TOML or its dumped config.json)"
    )


def load_run_config(path: str) -> JobConfig:
    return JobConfig.from_dict(load_config_file(path), source=path)


@dataclass
class RunInfo:
    config_path: str
    cfg: JobConfig
    args: LlavaNextArgs
    arch_source: str
    tokenizer_path: str
    vision_source: (
        str | None
    )  # HF directory holding the pretrained CLIP tower; None = random init
    seed: int


def _pretrained_vision_dir(cfg: JobConfig, config_path: str) -> str | None:
    """Where the run's vision tower came from, following DCP initial loads back to an HF start."""
    from titan_llava.architecture import hf_dirs

    seen = [config_path]
    for _ in range(_MAX_CHAIN):
        ck = cfg.checkpoint
        if not ck.initial_load_path:
            return None
        if ck.initial_load_in_hf:
            dirs = hf_dirs(ck.initial_load_path)
            return dirs.get("llava_dir") or dirs["clip_dir"]
        # A DCP step folder (or a checkpoint folder) of an earlier run: ask that run.
        step_dir = resolve_step_dir(
            ck.initial_load_path, f"{seen[-1]}: checkpoint.initial_load_path"
        )
        path = find_run_config(step_dir)
        if path in seen:
            raise ValueError(
                f"checkpoint.initial_load_path chain loops: {' -> '.join(seen + [path])}"
            )
        seen.append(path)
        cfg = load_run_config(path)
    raise ValueError(
        f"checkpoint.initial_load_path chain longer than {_MAX_CHAIN}: {seen}"
    )


def resolve_run(
    checkpoint: str, config_path: str | None = None, tokenizer_path: str | None = None
) -> RunInfo:
    """Everything the export needs besides the tensors, from the run that wrote `checkpoint`."""
    from titan_llava.architecture import MODEL_ARGS_FILE, earlier_run_model_args, resolve_model_args

    step_dir = resolve_step_dir(checkpoint, "--checkpoint")
    explicit_config = config_path is not None
    config_path = config_path or find_run_config(step_dir)
    cfg = load_run_config(config_path)
    ck = cfg.checkpoint
    recorded = None if explicit_config else find_run_file(step_dir, MODEL_ARGS_FILE)
    if recorded is not None:
        # The architecture the run actually built (needs none of its input directories).
        with open(recorded) as f:
            args = llava_args_from_dict(json.load(f), where=recorded)
        arch = recorded
    else:
        args = resolve_model_args(cfg)
        earlier = earlier_run_model_args(cfg)  # what resolve_model_args took, when it exists
        if ck.initial_load_in_hf:
            arch = f"Hugging Face config.json in {ck.initial_load_path}"
        elif earlier is not None:
            arch = f"{earlier[1]} (the run this one started from)"
        else:
            arch = f"flavor {cfg.model.flavor!r}"
    return RunInfo(
        config_path=config_path,
        cfg=cfg,
        args=args,
        arch_source=arch,
        tokenizer_path=tokenizer_path or cfg.model.tokenizer_path,
        vision_source=_pretrained_vision_dir(cfg, config_path),
        seed=cfg.job.seed,
    )


class DcpModelReader:
    """Reads the "model" entry of a DCP step folder tensor by tensor, on one process, whatever the
    number of ranks that wrote it (DCP reassembles each full tensor from its shards)."""

    def __init__(self, checkpoint: str):
        self.step_dir = resolve_step_dir(checkpoint, "--checkpoint")
        meta = read_metadata(self.step_dir, "--checkpoint")
        self._entries: dict[str, TensorStorageMetadata] = {
            fqn[len(MODEL_PREFIX) :]: m
            for fqn, m in meta.state_dict_metadata.items()
            if fqn.startswith(MODEL_PREFIX) and isinstance(m, TensorStorageMetadata)
        }
        if not self._entries:
            raise ValueError(
                f"--checkpoint {self.step_dir}: no model tensors in the checkpoint"
            )

    def keys(self) -> list[str]:
        return list(self._entries)

    def _read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        state = {
            k: torch.empty(
                tuple(self._entries[k].size), dtype=self._entries[k].properties.dtype
            )
            for k in keys
        }
        with (
            warnings.catch_warnings()
        ):  # one process without a process group is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                {"model": state},
                storage_reader=SafeFileSystemReader(self.step_dir),
                planner=TensorOnlyLoadPlanner(),
                no_dist=True,
            )
        return state

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(our key, full tensor) pairs; at most ~1 GiB of them held at a time."""
        batch: list[str] = []
        batch_bytes = 0
        for key, m in self._entries.items():
            nbytes = m.size.numel() * m.properties.dtype.itemsize
            if batch and batch_bytes + nbytes > _READ_BATCH_BYTES:
                yield from self._read(batch).items()
                batch, batch_bytes = [], 0
            batch.append(key)
            batch_bytes += nbytes
        if batch:
            yield from self._read(batch).items()

    @torch.no_grad()
    def build_model(self, args: LlavaNextArgs, dtype: torch.dtype = torch.float32):
        """A LlavaNext on CPU holding the checkpoint's weights (for the parity gate)."""
        from titan_llava.models.llava import LlavaNext

        with torch.device("meta"):
            model = LlavaNext(args)
        model.to_empty(device="cpu")
        model.init_weights()  # RoPE tables; every parameter is overwritten below
        params = model.state_dict()
        loaded = set()
        for key, tensor in self.tensors():
            if key not in params:
                raise ValueError(
                    f"checkpoint tensor {key!r} is not a LlavaNext parameter"
                )
            params[key].copy_(tensor)
            loaded.add(key)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(
                f"{self.step_dir}: model tensors missing, e.g. {missing[:3]}"
            )
        return model.to(dtype).eval()
