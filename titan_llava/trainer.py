"""The Trainer: config -> process group -> data -> meta model -> parallelize -> init/load weights
-> loop (data -> forward -> loss -> backward -> clip -> step -> log). The command-line entry point
is titan_llava.train.
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch
import torch.distributed as dist

from titan_llava.architecture import hf_dirs, resolve_model_args, save_run_config
from titan_llava.checkpoint import PREEMPTED_EXIT_CODE, TERMINATED_EXIT_CODE, CheckpointManager
from titan_llava.checkpoint_io import fault_point, load_model_weights, maybe_crash, maybe_sigterm
from titan_llava.config import JobConfig
from titan_llava.config_validate import validate_against_architecture
from titan_llava.data.batch import Batch
from titan_llava.data.dataset import LlavaDataset
from titan_llava.data.loader import build_data_loader, data_summary
from titan_llava.data.manifest import ManifestWriter
from titan_llava.data.tokenizer import Tokenizer
from titan_llava.data.wait_watch import WaitWatch
from titan_llava.distributed.parallel_dims import ParallelDims
from titan_llava.distributed.parallelize import broadcast_replicated_params, parallelize_llava
from titan_llava.distributed.utils import (
    all_reduce_counts,
    all_reduce_scalars,
    init_distributed,
    set_collective_timeout,
    set_determinism,
    set_matmul_precision,
    setup_logging,
)
from titan_llava.loss import cross_entropy_sum_at, global_valid_tokens, normalize_loss
from titan_llava.metrics import DeviceMemory, MetricsLogger, StepWindow, plan_line, step_counts
from titan_llava.models import attention, flash_impl
from titan_llava.models.llava import LlavaNext
from titan_llava.optim import build_lr_scheduler, build_optimizer, log_parameter_counts
from titan_llava.resume_step import find_resume_step
from titan_llava.step_check import StepCheck, StepRecord

logger = logging.getLogger("titan_llava")


class Trainer:
    """One training run. Build with a validated JobConfig; `train()` runs it to the last step."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.rank, self.world_size, self.device = init_distributed(cfg.parallelism.init_timeout_seconds)
        setup_logging(self.rank)
        # Config errors must surface before any work (and on every rank alike).
        cfg.validate(self.world_size)
        cfg.validate_paths()
        # Every rank's warnings also in <dump>/logs/rank<r>.log (run_train.sh shows rank 0 only).
        setup_logging(self.rank, log_dir=os.path.join(cfg.job.dump_folder, "logs"))
        self.dims = ParallelDims.from_config(cfg.parallelism, self.world_size)
        self.mesh = self.dims.build_mesh(self.device.type)
        # The mesh's (HSDP) sub-groups have the backend's default timeout: the set-up one too.
        set_collective_timeout(cfg.parallelism.init_timeout_seconds, self.mesh)
        set_determinism(cfg.job.seed)
        set_matmul_precision(self.device, cfg.training.mixed_precision_param)
        self.tokenizer = Tokenizer(cfg.model.tokenizer_path)
        self.model_args = resolve_model_args(cfg)
        validate_against_architecture(cfg, self.model_args, self.tokenizer.vocab_size)
        attention.check_backend(cfg.model.attn_backend, self.device)
        # The data index (a malformed file is a set-up error) and the run's length.
        self.dataset = LlavaDataset(cfg.data.path)
        self.total_steps = cfg.resolve_steps(len(self.dataset))

        # An opt-in flash implementation ("auto" resolved) is activated and checked first.
        self.flash_attention_impl = flash_impl.activate(
            cfg.model.flash_attention_impl, cfg.model.attn_backend, self.model_args.llm,
            self.device, getattr(torch, cfg.training.mixed_precision_param))

        # Meta model -> freeze/AC/compile/FSDP from outside -> real storage -> init -> weights.
        with torch.device("meta"):
            model = LlavaNext(self.model_args)
        parallelize_llava(model, self.mesh, cfg)
        model.to_empty(device=self.device)
        with torch.no_grad():
            model.init_weights()
        self.model = model
        self._load_initial_weights()
        log_parameter_counts(self.model, cfg.parallelism.replicate_frozen and self.mesh is not None)

        self.grad_accum = cfg.training.gradient_accumulation_steps(self.dims.dp_degree)
        self.data_loader = build_data_loader(
            cfg.data.path,
            cfg.data.image_folder,
            self.tokenizer,
            cfg.data.template,
            cfg.data.max_seq_len,
            cfg.training.local_batch_size,
            packing=cfg.data.packing,
            packing_row_len=cfg.packing_row_len(),
            packing_lookahead=cfg.data.packing_lookahead,
            shuffle=cfg.data.shuffle,
            seed=cfg.job.seed,
            group_by_modality_length=cfg.data.group_by_modality_length,
            global_batch_size=cfg.training.global_batch_size,
            modality_megabatch=(  # -1 = not set
                cfg.data.modality_megabatch if cfg.data.modality_megabatch > 0 else None
            ),
            image_aspect_ratio=self.model_args.image_aspect_ratio,
            grid_pinpoints=self.model_args.grid_pinpoints,
            image_size=self.model_args.vision.image_size,
            patch_size=self.model_args.vision.patch_size,
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            dp_rank=self.rank,
            dp_world_size=self.dims.dp_degree,
            strict=cfg.data.strict,
            dataset=self.dataset,
        )
        self.data_watch = WaitWatch(self.rank)  # warns while this rank waits long on its data
        self.optimizer = build_optimizer(self.model, cfg)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg, self.total_steps)
        self.step = 0
        # When each step's loss / grad norm / SIGTERM flag are read on the host: with fused AdamW
        # during the next step (no host sync per step), otherwise before the update.
        self.step_check = StepCheck(self.optimizer)
        self.window = StepWindow()
        self.device_memory = DeviceMemory(self.device)  # logs the allocator settings (CUDA)
        self.metrics = MetricsLogger.for_run(
            cfg, self.total_steps, self.rank, self.world_size, self.device
        )
        # A tile of zeros that keeps the vision tower's collectives in step on ranks whose
        # micro-batch has no image (FSDP all-gathers must be issued by every rank).
        v = self.model_args.vision
        self._dummy_tile = torch.zeros(1, 3, v.image_size, v.image_size, device=self.device)
        self.checkpointer = CheckpointManager(
            cfg, self.model, self.optimizer, self.lr_scheduler, self.data_loader,
            rank=self.rank, world_size=self.world_size, device=self.device,
        )
        self.step = self.checkpointer.maybe_resume()  # a checkpoint that cannot resume: set-up error
        self.metrics.resume(self.step)  # records of the steps to be replayed move aside
        if self.rank == 0:  # only a config that passed every check (the resume's too) is saved
            logger.info(save_run_config(cfg, self.model_args))
        self.checkpointer.install_sigterm_handler()
        self.manifest = None
        if cfg.data.manifest:
            path = os.path.join(cfg.job.dump_folder, "manifest", f"rank{self.rank}.jsonl")
            self.manifest = ManifestWriter(path, self.rank)
            self.manifest.resume(self.step)  # steps after the checkpoint are replayed: drop them

    # ----- set-up helpers -----
    def _load_initial_weights(self) -> None:
        ck = self.cfg.checkpoint
        if find_resume_step(self.cfg) is not None:
            logger.info("resuming from this run's checkpoint: initial weights not loaded")
            return
        if not ck.initial_load_path:
            logger.info("no checkpoint.initial_load_path: all weights from init_weights()")
            if self.cfg.parallelism.replicate_frozen:
                broadcast_replicated_params(self.model)  # random draws may differ per rank
            return
        if not ck.initial_load_in_hf:
            # Model-only: stage 1 -> stage 2. A full-state load happens in CheckpointManager.
            if ck.initial_load_model_only:
                load_model_weights(self.model, ck.initial_load_path)
            return
        from titan_llava.hf.loading import load_hf_weights

        report = load_hf_weights(self.model, **hf_dirs(ck.initial_load_path))
        logger.info(f"initial weights from {ck.initial_load_path}: {report.summary()}")
        if report.missing:
            logger.info(f"left at init (trained from scratch): {', '.join(report.missing)}")

    # ----- the step -----
    def _next_microbatches(self) -> tuple[list[Batch], float]:
        t0 = time.perf_counter()
        with self.data_watch.waiting(self.step):
            batches = [next(self._data_iter) for _ in range(self.grad_accum)]
        wait = time.perf_counter() - t0
        # Loss positions and (on CUDA, where packed rows run on a varlen kernel) the rows' document
        # boundaries, built on the host where they cost no device sync.
        batches = [b.with_loss_positions() for b in batches]
        if self.device.type == "cuda":
            batches = [b.with_document_bounds(pin=True) for b in batches]
        # Counted on the host copies, so the step never waits on the device for its statistics.
        self._counts = self._step_counts(batches)
        return [b.to(self.device, non_blocking=True, sizes_on_host=True) for b in batches], wait

    def forward_loss_sum(self, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token CEs, valid targets) of one micro-batch, with logits only where a target
        is."""
        return cross_entropy_sum_at(self.logits(mb, mb.loss_index), mb.loss_targets)

    def logits(self, mb: Batch, output_index: torch.Tensor | None) -> torch.Tensor:
        """The model's logits for one (device) micro-batch: [N, V] at the flat positions
        `output_index`, or [B, S, V] at every position when it is None."""
        pixel_values, image_sizes, keepalive = mb.pixel_values, mb.image_sizes, False
        if image_sizes is not None:
            # Python numbers: FSDP2's root module moves tensor arguments to the device, and the
            # model reads the sizes back on the host (a copy and a sync per forward).
            image_sizes = image_sizes.tolist()
        if pixel_values is None:
            pixel_values, keepalive = self._dummy_tile, True
        return self.model(
            mb.input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            positions=mb.positions,
            document_ids=mb.document_ids,
            vision_keepalive=keepalive,
            output_index=output_index,
            document_bounds=mb.document_bounds,  # varlen kernels' boundaries (host-built)
        )

    def train_step(self, microbatches: list[Batch], record: StepRecord) -> StepRecord:
        """Forward/backward every micro-batch, read the previous step's numbers if they were left
        pending (by now this step's work is queued behind them), then clip and update. Fills
        `record.stats`; `step_check.read` checks them (raising NonFiniteError), `_finish` logs
        them."""
        loss_total = self._forward_backward(microbatches)
        pending = self.step_check.take_pending()
        if pending is not None:
            self._finish(pending)
        self._update(loss_total, record)
        return record

    def _forward_backward(self, microbatches: list[Batch]) -> torch.Tensor:
        cfg = self.cfg
        mode = cfg.training.loss_normalization
        global_tokens = global_valid_tokens(
            [mb.labels for mb in microbatches], [mb.document_ids for mb in microbatches]
        )
        loss_total = torch.zeros((), device=self.device)
        for i, mb in enumerate(microbatches):
            # Reduce-scatter gradients only once, after the last micro-batch.
            self.model.set_requires_gradient_sync(i == len(microbatches) - 1)
            loss_sum, n_valid = self.forward_loss_sum(mb)
            loss = normalize_loss(
                loss_sum,
                n_valid,
                mode,
                global_tokens=global_tokens,
                grad_accum_steps=len(microbatches),
                dp_degree=self.dims.dp_degree,
            )
            loss.backward()
            loss_total += loss.detach()
            if i == 0:  # test hooks: a crash / preemption notice in the middle of accumulation
                maybe_crash("accum", self.step, self.rank)
                maybe_sigterm("accum", self.step, self.rank)
        if fault_point("nan_loss", self.step, self.rank):
            loss_total = loss_total + float("nan")
        return loss_total

    def _update(self, loss_total: torch.Tensor, record: StepRecord) -> None:
        """Gradient norm, the step's one small all-reduce (loss, and whether any rank got SIGTERM),
        clip, optimizer and scheduler step. A non-finite step is never applied: checked on the
        host before the update, or skipped on the device by fused AdamW (StepCheck)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in params if p.grad is not None], foreach=True
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        stop = torch.full((), 1.0 if self.checkpointer.sigterm_received else 0.0, device=self.device)
        reduced = torch.stack([loss_total, stop])
        if dist.is_initialized():
            dist.all_reduce(reduced)
            reduced[0] /= self.world_size
        norm = grad_norm.to(device=reduced.device, dtype=torch.float32)
        self.step_check.stage(record, reduced[0], reduced[1], norm)
        max_norm = self.cfg.training.max_norm
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, grad_norm, foreach=True)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _finish(self, record: StepRecord) -> None:
        """Check a step's numbers, then account for it: manifest, token count, metrics window,
        and the log line on log steps (whose records are finished in their own step)."""
        loss, _, grad_norm = self.step_check.read(record)
        if self.manifest is not None:
            self.manifest.write(record.step, record.sample_ids)
        self.checkpointer.add_tokens(record.counts["tokens"])
        w = self.window
        w.add(record.counts, record.data_wait_s)
        if record.step % self.cfg.metrics.log_freq == 0 or record.step == self.total_steps:
            memory_gib, retries = self.device_memory.interval()
            sums = dict(w.sums) if retries is None else {**w.sums, "alloc_retries": retries}
            totals = all_reduce_scalars(sums, self.device, op="sum")
            self.metrics.log(
                record.step,
                loss=loss,
                grad_norm=grad_norm,
                lr=record.lr,
                interval_s=w.elapsed_s(),
                steps_in_interval=w.steps,
                tokens=int(totals["tokens"]),
                text_tokens=int(totals["text_tokens"]),
                image_tokens=int(totals["image_tokens"]),
                samples=int(totals["samples"]),
                flops=totals["flops"],
                data_wait_s=totals["data_wait_s"] / self.world_size,
                **data_summary(all_reduce_counts(self.data_loader.counters())),  # all ranks
                memory_gib=memory_gib,  # this rank's peak
                alloc_retries=None if retries is None else int(totals["alloc_retries"]),  # all ranks
                epoch=record.epoch,  # rank 0's data
            )
            w.reset()

    def _step_counts(self, microbatches: list[Batch]) -> dict[str, float]:
        """Per-rank token/sample/FLOP counts of a step (summed over ranks when logged)."""
        return step_counts(
            microbatches, self.tokenizer.pad_id, self.model_args, self.cfg.training.trainable
        )

    def train(self) -> int:
        """Runs to the last step (returns 0) or to a SIGTERM (saves, returns PREEMPTED_EXIT_CODE;
        with checkpointing off returns TERMINATED_EXIT_CODE)."""
        cfg = self.cfg
        self.model.train()
        self._data_iter = iter(self.data_loader)
        dp, defer = self.dims.dp_degree, self.step_check.defer
        logger.info(plan_line(cfg, self.total_steps, dp, self.grad_accum, defer))
        self.window.reset()
        self.step_check.pending = None
        epoch, first_step = self.data_loader.epoch_progress(), self.step + 1
        while self.step < self.total_steps:
            self.step += 1
            microbatches, data_wait = self._next_microbatches()
            record = StepRecord(
                step=self.step,
                counts=self._counts,
                data_wait_s=data_wait,
                lr=self.lr_scheduler.get_last_lr()[0],
                sample_ids=(
                    [i for mb in microbatches for row in mb.sample_ids for i in row]
                    if self.manifest is not None
                    else []
                ),
                epoch=self.data_loader.epoch_progress(),
            )
            if math.ceil(record.epoch) > max(math.ceil(epoch), 1):  # samples of a new epoch
                new_epoch = math.ceil(record.epoch) - 1
                logger.info(f"data: this rank's epoch {new_epoch} began in step {self.step}")
            epoch = record.epoch
            self.train_step(microbatches, record)
            if self.step == first_step:  # set-up and the first compile are behind every rank
                set_collective_timeout(cfg.parallelism.train_timeout_seconds, self.mesh)
            # Read now (a host sync) where the host needs the numbers before going on: the log
            # line, a checkpoint (never of a step not yet checked), the end, a stop; otherwise
            # the next step reads them once its own work is queued.
            if (
                not self.step_check.defer
                or self.step_check.stop
                or self.step == self.total_steps
                or self.step % cfg.metrics.log_freq == 0
                or self.checkpointer.save_due(self.step)
            ):
                self._finish(record)
            else:
                self.step_check.pending = record
                continue
            preempted = self.step_check.stop  # all ranks agree: reduced with the step's loss
            self.checkpointer.maybe_save(
                self.step, force=preempted or self.step == self.total_steps
            )
            preempted = preempted or self.checkpointer.sigterm_during_save  # all ranks agree
            if preempted:
                self.checkpointer.finish()
                if not cfg.checkpoint.enable:
                    logger.warning(
                        f"SIGTERM: stopped after step {self.step}; checkpoint.enable is false, so "
                        f"nothing was saved (a rerun starts over); exiting with status "
                        f"{TERMINATED_EXIT_CODE}"
                    )
                    return TERMINATED_EXIT_CODE
                logger.warning(
                    f"SIGTERM: checkpoint of step {self.step} saved; exiting with status "
                    f"{PREEMPTED_EXIT_CODE} (run the same command to resume)"
                )
                return PREEMPTED_EXIT_CODE
        self.checkpointer.finish()
        logger.info(f"training done: {self.step} steps, {epoch:.4f} epochs of this rank's data")
        return 0

    def close(self) -> None:
        """Finish pending checkpoint writes, stop the data pipeline's threads, flush metrics."""
        if hasattr(self, "checkpointer"):
            self.checkpointer.close()
        self.data_loader.close()
        self.data_watch.close()
        if getattr(self, "manifest", None) is not None:
            self.manifest.close()
        self.metrics.close()
