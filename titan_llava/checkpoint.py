"""DCP checkpoints with exact resume: `<dump_folder>/<checkpoint.folder>/step-N/` holds the model,
optimizer, LR schedule, data-loader state and train state (step, tokens seen, RNG of every rank),
written atomically (temporary name + completion marker + rename), plus SIGTERM preemption."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from titan_llava.checkpoint_io import (
    COMPLETE_MARKER,
    TensorOnlyLoadPlanner,
    alloc_like,
    blob_to_json,
    bytes_to_blob,
    complete_steps,
    discard_step_dir,
    json_to_blob,
    load_plain,
    maybe_crash,
    maybe_sigterm,
    read_metadata,
    resolve_step_dir,
    safe_reader,
    step_dir_name,
    tmp_dir_name,
)
from titan_llava.distributed.utils import all_reduce_max, is_distributed
from titan_llava.resume_step import find_resume_step

logger = logging.getLogger("titan_llava")

# Exit status of a run stopped by SIGTERM after it saved a checkpoint (EX_TEMPFAIL: "try again";
# restart the same command to resume). A finished run exits 0, a failed one non-zero otherwise.
PREEMPTED_EXIT_CODE = 75
# Exit status of a run stopped by SIGTERM with checkpointing off: nothing was saved, so a rerun
# starts over; 128 + SIGTERM, what a shell reports for a process the signal killed (not "try again").
TERMINATED_EXIT_CODE = 143


class SetupPreempted(BaseException):  # not caught by set-up code's `except Exception`
    """SIGTERM during set-up. Nothing has trained since the checkpoint being resumed (or since
    nothing), so the run stops at once with PREEMPTED_EXIT_CODE: set-up + a first step + a save of
    a 7B run do not fit torchrun's grace period, and a SIGKILL there exits 1 (never requeued)."""


def install_early_sigterm_handler() -> None:
    """From the first line of main() until the trainer's own handler replaces it."""

    def handler(signum, frame):
        raise SetupPreempted()

    signal.signal(signal.SIGTERM, handler)


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


class CheckpointManager:
    """Saves and restores everything a run needs to continue bit-identically.

    Use: `maybe_resume()` before iterating the data loader (returns the restored step or 0),
    `add_tokens(n)` every step, `maybe_save(step, force=...)` after every step,
    `sigterm_received` (reduced over ranks by the trainer) at every step, `finish()` at the end,
    `close()` always."""

    def __init__(
        self,
        cfg,
        model,
        optimizer,
        lr_scheduler,
        data_loader,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.ck = cfg.checkpoint
        self.model, self.optimizer = model, optimizer
        self.lr_scheduler, self.data_loader = lr_scheduler, data_loader
        self.rank, self.world_size, self.device = rank, world_size, device
        self.folder = os.path.join(cfg.job.dump_folder, self.ck.folder)
        self.tokens_seen = 0
        self._pending_tokens = 0
        self._last_saved_step: int | None = None
        self._inflight: tuple[int, Future] | None = None
        self._sigterm = False
        self.sigterm_during_save = False  # some rank got SIGTERM while the last save ran
        self._async_pg = None
        self._poll_pg = None
        if self.ck.enable and self.ck.async_mode == "async" and is_distributed():
            # The upload thread's collectives must not interleave with the training ones.
            self._async_pg = dist.new_group(backend="gloo")
            # Whether every rank's upload is done: a group of its own, never the upload's (whose
            # last collectives may still be queued on a rank whose main thread asks).
            self._poll_pg = dist.new_group(backend="gloo")

    # ----- preemption -----
    def install_sigterm_handler(self) -> None:
        def handler(signum, frame):  # only sets a flag: the save happens at a step boundary
            self._sigterm = True

        signal.signal(signal.SIGTERM, handler)

    @property
    def sigterm_received(self) -> bool:
        """This rank got SIGTERM. Local: the trainer reduces it over ranks with the step's loss, so
        that every rank stops after the same step."""
        return self._sigterm

    def add_tokens(self, local_tokens: int) -> None:
        self._pending_tokens += int(local_tokens)

    # ----- the state -----
    def _rank_entries(self) -> dict[str, torch.Tensor]:
        rng = {"python": random.getstate()}
        entries = {
            f"rank_{self.rank}.cpu_rng": torch.get_rng_state(),
            f"rank_{self.rank}.python_rng": json_to_blob(rng),
        }
        if self.device.type == "cuda":
            entries[f"rank_{self.rank}.cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return entries

    def _state_dict(self, for_save: bool) -> dict[str, Any]:
        """The flat-ish dict given to DCP: tensors (DTensors for sharded state) only."""
        osd = get_optimizer_state_dict(self.model, self.optimizer)
        sched = {k: v for k, v in self.lr_scheduler.state_dict().items() if k != "lr_lambdas"}
        groups = [{k: g[k] for k in ("lr", "initial_lr") if k in g} for g in osd["param_groups"]]
        sd: dict[str, Any] = {
            "model": get_model_state_dict(self.model),
            "optimizer": {"state": osd["state"], "param_groups": json_to_blob(groups)},
            "lr_scheduler": json_to_blob(sched),
            "train_state": {"tokens_seen": torch.tensor(self.tokens_seen, dtype=torch.int64)},
        }
        if for_save:
            dl = self.data_loader.state_dict()
            sd["dataloader"] = {
                k: (bytes_to_blob(v) if isinstance(v, bytes) else torch.tensor(v))
                for k, v in dl.items()
            }
            sd["train_state"].update(self._rank_entries())
        return sd

    # ----- save -----
    def save_due(self, step: int) -> bool:
        """maybe_save(step) will save without being forced."""
        return self.ck.enable and self._last_saved_step != step and step % self.ck.interval == 0

    def maybe_save(self, step: int, force: bool = False) -> None:
        """Save at every checkpoint.interval-th step, or when forced (last step, preemption)."""
        if not self.ck.enable:
            return
        self._poll_inflight()
        if self._last_saved_step == step:
            return
        if force or self.save_due(step):
            self.save(step)
            if not force:  # a SIGTERM that came during the save: stop now, with this checkpoint
                flag = torch.tensor([int(self._sigterm)], device=self.device)
                self.sigterm_during_save = bool(all_reduce_max(flag).item())  # any rank

    def save(self, step: int) -> None:
        self._finalize_inflight()
        tokens = torch.tensor([self._pending_tokens], dtype=torch.int64, device=self.device)
        if is_distributed():
            dist.all_reduce(tokens)
        self.tokens_seen += int(tokens.item())
        self._pending_tokens = 0
        tmp = os.path.join(self.folder, tmp_dir_name(step))
        if self.rank == 0:
            # A stale temporary folder of this step (a save that crashed) is never reused.
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        sd = self._state_dict(for_save=True)
        sd["train_state"]["step"] = torch.tensor(step, dtype=torch.int64)
        maybe_crash("save_begin", step, self.rank)
        if self._async_pg is not None or (self.ck.async_mode == "async" and not is_distributed()):
            fut = dcp.async_save(sd, checkpoint_id=tmp, process_group=self._async_pg)
            fut = getattr(fut, "upload_completion", fut)
            self._inflight = (step, fut)
            logger.info(f"checkpoint step {step}: asynchronous save started")
        else:
            dcp.save(sd, checkpoint_id=tmp)
            self._inflight = (step, None)
            self._finalize_inflight()
        self._last_saved_step = step

    def _poll_inflight(self) -> None:
        """Publish an asynchronous save as soon as every rank's upload is done (collective, on
        a gloo group of its own), not only when the next save starts: otherwise a crash in the
        interval after a fully written checkpoint still resumes from the one before it."""
        if self._inflight is None or self._inflight[1] is None:
            return
        done = torch.tensor([1 if self._inflight[1].done() else 0], dtype=torch.int64)
        if is_distributed():
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._poll_pg)
        if int(done.item()):
            self._finalize_inflight()

    def _finalize_inflight(self) -> None:
        """Wait for the in-flight save, then make it visible: marker, rename, prune (collective)."""
        if self._inflight is None:
            return
        step, fut = self._inflight
        self._inflight = None
        if fut is not None:
            fut.result()
        maybe_crash("shards_written", step, self.rank)
        maybe_sigterm("save", step, self.rank)  # test hook: a preemption notice during a save
        _barrier()  # every rank's shards (and rank 0's metadata) are on disk
        if self.rank == 0:
            tmp = os.path.join(self.folder, tmp_dir_name(step))
            final = os.path.join(self.folder, step_dir_name(step))
            with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
                json.dump({"step": step, "world_size": self.world_size}, f)
                f.flush()
                os.fsync(f.fileno())
            maybe_crash("before_rename", step, self.rank)
            if os.path.exists(final):  # an older save of the same step (e.g. after a resume)
                discard_step_dir(final)
            os.rename(tmp, final)
            logger.info(f"checkpoint saved: {final}")
            self._prune()
        _barrier()
        maybe_crash("saved", step, self.rank)

    def _prune(self) -> None:
        steps, incomplete = complete_steps(self.folder)
        for name in incomplete:  # leftovers of crashed saves (nothing is in flight here)
            discard_step_dir(os.path.join(self.folder, name))
        k = self.ck.keep_latest_k
        if k > 0:
            for old in steps[:-k]:
                discard_step_dir(os.path.join(self.folder, step_dir_name(old)))

    def finish(self) -> None:
        """End of a run (all ranks): wait for and publish an in-flight asynchronous save."""
        self._finalize_inflight()

    def close(self) -> None:
        """Always (also on errors): wait for this rank's upload without publishing it, so an
        aborted run never leaves a folder that looks complete."""
        if self._inflight is not None and self._inflight[1] is not None:
            try:
                self._inflight[1].result()
            except Exception as e:  # noqa: BLE001 (already failing: report, don't mask)
                logger.warning(f"asynchronous checkpoint upload failed: {e}")
        self._inflight = None

    # ----- load -----
    def maybe_resume(self) -> int:
        """Restore the newest complete checkpoint of this run (or checkpoint.load_step); with none,
        a full-state initial_load_path (initial_load_model_only = false). Returns the step (0)."""
        step = find_resume_step(self.cfg)
        if step is not None:
            return self.load(os.path.join(self.folder, step_dir_name(step)), "checkpoint.load_step")
        ck = self.ck
        if ck.initial_load_path and not ck.initial_load_in_hf and not ck.initial_load_model_only:
            path = resolve_step_dir(ck.initial_load_path, "checkpoint.initial_load_path")
            return self.load(path, "checkpoint.initial_load_path")
        return 0

    def load(self, step_dir: str, key: str, data: bool = True) -> int:
        """Restore a step folder into this run. data=False restores everything but the data
        loader (whose per-rank state cannot move to another data-parallel degree)."""
        meta = read_metadata(step_dir, key).state_dict_metadata
        saved_dp = int(load_plain(step_dir, "dataloader.dp_world_size", meta, key))
        dp = self.data_loader.dp_world_size
        if data and saved_dp != dp:
            raise ValueError(
                f"{step_dir} was saved with {saved_dp} data-parallel ranks, this run has {dp}: the "
                "model and optimizer would reshard, but each rank's data position cannot. Resume "
                f"with {saved_dp} data-parallel ranks, or start a new run (new job.dump_folder) from "
                f"these weights with --checkpoint.initial_load_path {step_dir} "
                "--checkpoint.initial_load_model_only true (fresh optimizer, schedule and data order)."
            )
        sd = self._state_dict(for_save=False)
        rank_key = f"dataloader.dp_rank_{self.data_loader.dp_rank}"
        sd["dataloader"] = {rank_key.split(".", 1)[1]: alloc_like(meta, rank_key)} if data else {}
        sd["optimizer"]["param_groups"] = alloc_like(meta, "optimizer.param_groups")
        sd["lr_scheduler"] = alloc_like(meta, "lr_scheduler")
        sd["train_state"]["step"] = torch.zeros((), dtype=torch.int64)
        rng_keys = [k for k in self._rank_entries() if f"train_state.{k}" in meta]
        for k in rng_keys:
            sd["train_state"][k] = alloc_like(meta, f"train_state.{k}")
        have = {
            fqn for fqn, st in sd["optimizer"]["state"].items()
            if all(f"optimizer.state.{fqn}.{name}" in meta for name in st)
        }
        # A part that trains here but has no state at all did not train in the saved run.
        groups_now = get_optimizer_state_dict(self.model, self.optimizer)["param_groups"]
        untrained = [g.get("name", "?") for g in groups_now if not any(f in have for f in g["params"])]
        if untrained:
            raise ValueError(
                f"{key}: {step_dir} has no optimizer state for the parameter groups "
                f"{', '.join(untrained)}, which train here: training.trainable differs from the "
                "saved run's. Restore it, or start a new run from these weights with "
                f"--checkpoint.initial_load_path {step_dir} --checkpoint.initial_load_model_only true"
            )
        # A single parameter without state never had a gradient in the saved run (image_newline
        # under image_aspect_ratio pad/resize): AdamW left it stateless, and so does the resume.
        for fqn in [f for f in sd["optimizer"]["state"] if f not in have]:
            del sd["optimizer"]["state"][fqn]
        dcp.load(sd, storage_reader=safe_reader(step_dir, key), planner=TensorOnlyLoadPlanner())

        set_model_state_dict(self.model, sd["model"])
        fresh = get_optimizer_state_dict(self.model, self.optimizer)
        groups = blob_to_json(sd["optimizer"]["param_groups"])
        if len(groups) != len(fresh["param_groups"]):
            raise ValueError(
                f"{key}: {step_dir} has {len(groups)} optimizer parameter groups, this run "
                f"{len(fresh['param_groups'])}: training.trainable differs from the saved run's"
            )
        for g, saved in zip(fresh["param_groups"], groups):
            g.update(saved)
        set_optimizer_state_dict(
            self.model,
            self.optimizer,
            {"state": sd["optimizer"]["state"], "param_groups": fresh["param_groups"]},
            # parameters that never had a gradient (above) stay without state
            options=StateDictOptions(strict=False),
        )
        sched = self.lr_scheduler.state_dict()
        config_lrs = list(self.lr_scheduler.base_lrs)  # this run's optimizer.*lr
        saved_sched = blob_to_json(sd["lr_scheduler"])
        sched.update(saved_sched)
        self.lr_scheduler.load_state_dict(sched)
        # The schedule continues as this run's config defines it (training.steps, warmup,
        # optimizer lrs) from the restored step: the restored group lrs were computed by the saved
        # run's schedule (an extended run would take its first step at the old final lr, 0 for a
        # cosine to 0), and base_lrs would silently keep the saved run's optimizer.lr. With an
        # unchanged config this recomputes the saved values bit for bit.
        if saved_sched.get("base_lrs", config_lrs) != config_lrs:
            logger.warning(
                f"optimizer learning rates {config_lrs} differ from the checkpoint's "
                f"{saved_sched['base_lrs']}: the schedule continues with this run's"
            )
        sch = self.lr_scheduler
        sch.base_lrs = config_lrs
        for g, base, fn in zip(self.optimizer.param_groups, config_lrs, sch.lr_lambdas):
            g["initial_lr"] = base
            g["lr"] = base * fn(sch.last_epoch)
        sch._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        saved_last = saved_sched.get("_last_lr")
        if saved_sched.get("base_lrs", config_lrs) == config_lrs and saved_last not in (None, sch._last_lr):
            logger.warning(
                f"the learning rates at step {sch.last_epoch} differ from the checkpoint's "
                f"({saved_last} saved, {sch._last_lr} now): the schedule changed (training.steps, "
                "warmup, decay or min_lr_ratio), and it continues as this run's config defines it"
            )
        if data:
            entry = rank_key.split(".", 1)[1]
            self.data_loader.load_state_dict(
                {"dp_world_size": saved_dp, entry: bytes(sd["dataloader"][entry].tolist())}
            )
        self._restore_rng(sd["train_state"], rng_keys)
        self.tokens_seen = int(sd["train_state"]["tokens_seen"])
        step = int(sd["train_state"]["step"])
        self._last_saved_step = step
        logger.info(f"resumed from {step_dir} (step {step}, {self.tokens_seen:,} tokens seen)")
        return step

    def _restore_rng(self, ts: dict[str, torch.Tensor], keys: list[str]) -> None:
        if not keys:
            logger.warning(
                f"rank {self.rank}: no saved RNG state for this rank; RNG left as seeded"
            )
            return
        for k in keys:
            if k.endswith(".cpu_rng"):
                torch.set_rng_state(ts[k])
            elif k.endswith(".cuda_rng"):
                torch.cuda.set_rng_state(ts[k], self.device)
            elif k.endswith(".python_rng"):
                state = blob_to_json(ts[k])["python"]
                random.setstate((state[0], tuple(state[1]), state[2]))
