"""Process-group setup (nccl on CUDA, gloo otherwise), device selection, rank-0 logging, small
all-reduce helpers, and seeding for reproducible runs."""

from __future__ import annotations

import gc
import logging
import os
import random
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger("titan_llava")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int = 1800) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) after initialising the default process group. Under torchrun
    the environment says who we are; a plain `python -m` run becomes a world of one, so a single
    process takes the same FSDP / DTensor / DCP code path as a multi-GPU run."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return dist.get_rank(), dist.get_world_size(), device


def set_collective_timeout(timeout_s: int, mesh=None) -> None:
    """Change the timeout of the default process group and of `mesh`'s groups (after set-up)."""
    if not is_distributed():
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout

    groups = [None]
    if mesh is not None:
        groups += [mesh.get_group(i) for i in range(mesh.ndim)]
    for group in groups:
        _set_pg_timeout(timedelta(seconds=timeout_s), group)


def destroy_distributed(barrier: bool = True) -> None:
    """Tear the process groups down while the interpreter is fully alive.

    The barrier (gloo's waits for every outstanding operation first) leaves no collective in
    flight; otherwise a backend thread can still hold work with tensors when Python finalises, and
    freeing them then aborts the process ("terminate called without an active exception"). Objects
    such as device meshes keep a group alive past destroy_process_group, hence the collect.
    Pass barrier=False when leaving on an error that other ranks may not share.
    """
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    gc.collect()


def setup_logging(rank: int, level: int = logging.INFO, log_dir: str | None = None) -> None:
    """INFO logs on rank 0 only; other ranks log warnings and errors (prefixed by their rank).
    log_dir: also write them to <log_dir>/rank<r>.log. run_train.sh (torchrun
    --local-ranks-filter) shows rank 0's output only, so another rank's warnings (skipped samples
    by id and reason) would otherwise be in torchrun's temporary folder, unnamed."""
    fmt = f"[rank{rank}] %(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(format=fmt, level=level if rank == 0 else logging.WARNING, force=True)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(log_dir, f"rank{rank}.log"))
        handler.setFormatter(logging.Formatter(fmt))
        logging.getLogger().addHandler(handler)


def set_determinism(seed: int, rank: int = 0, deterministic: bool = False) -> None:
    """Seed Python, and torch (CPU + CUDA). Every rank gets the SAME torch seed so that model
    initialisation is identical before sharding; data order is seeded separately by the sampler.
    deterministic=True also asks for deterministic kernels (slower; for debugging)."""
    del rank  # same seed on every rank, kept in the signature so callers state the intent
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def set_matmul_precision(device: torch.device, param_dtype: str) -> bool:
    """The recipe's tf32: on CUDA, fp32 matmuls of a mixed-precision run (e.g. parts kept in fp32)
    run on TF32 tensor cores. A float32 run stays exact fp32. Returns whether TF32 was enabled."""
    if device.type != "cuda" or param_dtype == "float32":
        return False
    torch.set_float32_matmul_precision("high")
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum over ranks (a copy; a no-op without a process group)."""
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_reduce_mean(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean over ranks (float)."""
    x = all_reduce_sum(x.float(), group)
    return x / (dist.get_world_size(group) if is_distributed() else 1)


def all_reduce_max(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def all_reduce_scalars(values: dict[str, float], device: torch.device, op: str = "sum") -> dict:
    """All-reduce several Python numbers in ONE collective (one host sync for a whole log line)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if op == "sum":
        t = all_reduce_sum(t)
    elif op == "mean":
        t = all_reduce_mean(t)
    elif op == "max":
        t = all_reduce_max(t)
    else:
        raise AssertionError(f"unknown op {op}")
    return dict(zip(keys, t.tolist()))


def all_reduce_counts(counts: dict[str, int]) -> dict[str, int]:
    """Sum per-key counters over ranks whose key sets may differ (e.g. skipped samples by reason)."""
    if not is_distributed():
        return dict(counts)
    per_rank: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, counts)
    total: dict[str, int] = {}
    for rank_counts in per_rank:
        for key, n in (rank_counts or {}).items():
            total[key] = total.get(key, 0) + n
    return total
