"""build_data_loader: the stateful torchdata.nodes pipeline from a LLaVA file to Batches.

sampler -> ParallelMapper(SampleProcessor) -> Packer -> [Prefetcher] -> [PinMemory] -> Loader.
The loader's state is the Packer's state as of the last batch handed out (no tensors), keyed by
DP rank as TorchTitan does, so DCP saves one entry per rank.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import multiprocessing.process
import queue
import threading
import time
from typing import Any, Iterator, Literal, Sequence

import torch
from torchdata.nodes import BaseNode, Loader, ParallelMapper, PinMemory, Prefetcher

from titan_llava.data.anyres import LLAVA_NEXT_GRID_PINPOINTS
from titan_llava.data.batch import Batch
from titan_llava.data.dataset import LlavaDataset
from titan_llava.data.errors import BadSampleError
from titan_llava.data.packing import Packer, skip_counts
from titan_llava.data.processing import ProcessingConfig, SampleProcessor
from titan_llava.data.sampler import DistributedSampleSampler
from titan_llava.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

WORLD_SIZE_KEY = "dp_world_size"
FRESH = (  # what a refused data resume can do instead
    "start a new run in a new job.dump_folder from the checkpoint's weights "
    "(checkpoint.initial_load_path = its step folder, checkpoint.initial_load_model_only = true), "
    "whose data order starts afresh"
)
_CLOSE_TIMEOUT_S = 120.0  # longest a worker may take to finish its current sample on close()


class LlavaDataLoader:
    """Stateful iterable of Batch (infinite; epochs wrap). Iterate once: `it = iter(loader)`.

    state_dict() -> {"dp_rank_<r>": bytes (JSON of the pipeline state), "dp_world_size": W}.
    load_state_dict() before iter() resumes exactly after the last batch of the saved run.
    counters() -> per-reason skip counts ("skipped/<reason>") and events ("truncated",
    "truncated_image_dropped", "tokenization_mismatch", "samples", "batches"), consistent with the
    batches handed out so far (they are part of the state, so they survive resume).
    """

    def __init__(
        self,
        root: BaseNode,
        packer: Packer,
        dp_rank: int,
        dp_world_size: int,
        fingerprint: dict[str, Any],
    ):
        self._loader = Loader(root, restart_on_stop_iteration=False)
        self._packer = packer
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.fingerprint = fingerprint
        self._state: dict[str, Any] | None = None  # pipeline state after the last handed-out batch
        self._iter: Iterator | None = None

    @property
    def _rank_key(self) -> str:
        return f"dp_rank_{self.dp_rank}"

    def __iter__(self) -> "LlavaDataLoader":
        if self._iter is None:
            self._packer.start_state = self._state
            self._iter = iter(self._loader)
            # The background threads must stop before interpreter shutdown: a daemon thread
            # stopped inside torch's C++ code at exit aborts the process (status 134), e.g. when
            # an error skips the trainer's close(). close() unregisters it.
            atexit.register(self.close)
        return self

    def __next__(self) -> Batch:
        if self._iter is None:
            iter(self)
        batch, state, error = next(self._iter)
        if error is not None:
            reason, detail, sample_id = error
            raise BadSampleError(reason, detail, sample_id)
        self._state = state
        return batch

    def pipeline_state(self) -> dict[str, Any]:
        """Plain-dict state (sampler position, buffered sample refs, counters, fingerprint)."""
        state = self._state
        if state is None:
            state = {"sampler": {"epoch": 0, "position": 0}, "buffer": [], "counters": {}}
        return {**state, "fingerprint": self.fingerprint}

    def epoch_progress(self) -> float:
        """Epochs of this rank's data used so far (1.5 = half-way through the second): samples
        taken from the sampler (used or skipped), less those waiting in the packing buffer, over
        the rank's samples per epoch."""
        state = self.pipeline_state()
        per_epoch = self._packer.sampler.samples_per_epoch()
        taken = state["sampler"]["epoch"] * per_epoch + state["sampler"]["position"]
        return (taken - len(state["buffer"])) / per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {
            self._rank_key: json.dumps(self.pipeline_state(), sort_keys=True).encode(),
            WORLD_SIZE_KEY: self.dp_world_size,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_world = state_dict.get(WORLD_SIZE_KEY)
        if saved_world != self.dp_world_size:
            raise ValueError(
                f"the dataloader state was saved with dp_world_size={saved_world}, this run has "
                f"dp_world_size={self.dp_world_size}: each DP rank's data position and packing buffer "
                "cannot be re-sharded exactly. Resume with the same data-parallel degree, or "
                f"{FRESH}."
            )
        if self._rank_key not in state_dict:
            raise ValueError(f"the dataloader state has no entry {self._rank_key!r}")
        raw = state_dict[self._rank_key]
        state = json.loads(bytes(raw).decode() if not isinstance(raw, str) else raw)
        saved = state.pop("fingerprint", {})
        if saved.get("packing") and "packing_lookahead" not in saved:
            # Saved before these settings existed: that packer was greedy in max_seq_len rows.
            saved = {**saved, "packing_lookahead": 1, "packing_row_len": saved.get("max_seq_len")}
        # Saved before each rank took a contiguous share of a packed megabatch: that sampler dealt
        # it one sample at a time. Such a run keeps that order (the only one its saved position
        # refers to) instead of being refused; applied below, once every check has passed.
        legacy = saved.get("modality_megabatch") and self.fingerprint.get("modality_megabatch") and (
            "megabatch_share" not in saved
        )
        fingerprint = self.fingerprint
        if legacy:
            old_dealing = {"megabatch_share": None, "rows_per_step": None}
            fingerprint = {**fingerprint, **old_dealing}
            saved = {**saved, **old_dealing}
        changed = {
            k: (saved.get(k), v)
            for k, v in fingerprint.items()
            if saved.get(k) != v and not (k.endswith("_digest") and k not in saved)  # older saves
        }
        if changed:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                f"the dataloader state does not match this data configuration ({detail}); the saved "
                f"position is meaningless for a different order. Restore the settings, or {FRESH}."
            )
        if self._iter is not None:
            raise RuntimeError("load_state_dict must be called before iterating the loader")
        if legacy:
            sampler = self._packer.sampler
            sampler.batch_size, sampler._indices, sampler._indices_epoch = 1, None, -1
            self.fingerprint = fingerprint
            logger.warning(
                "the dataloader state was saved before packed modality grouping gave each rank a "
                "contiguous share of a megabatch: this run keeps dealing it one sample at a time"
            )
        self._state = state

    def close(self) -> None:
        """Stop the background threads/processes now (from this thread), e.g. at the end of a run.

        Without it they stop when garbage collected, which may happen on one of their own threads.
        """
        atexit.unregister(self.close)
        node = self._loader.root
        threads: list[Any] = []
        while node is not None:
            it = getattr(node, "_it", None)
            for obj in (it, getattr(it, "_it", None)):
                if obj is not None and hasattr(obj, "_shutdown"):
                    obj._shutdown()
                    # torchdata's workers stop only once their input queue is empty: drop the
                    # samples still queued, so each worker stops after the one it is processing.
                    _drain(getattr(obj, "_in_q", None))
                    for name in ("_thread", "_read_thread", "_sort_thread", "_workers"):
                        t = getattr(obj, name, None)
                        threads += t if isinstance(t, list) else [t] if t is not None else []
            node = getattr(node, "source", None)
        # torchdata's _shutdown waits only ~0.5 s per thread; a worker still inside a slow sample
        # (a large image on a busy machine) would outlive it, and a daemon thread caught in C++
        # code at interpreter exit aborts the process ("terminate called ..."). Wait it out, with
        # one deadline for all of them (worker processes included).
        deadline = time.monotonic() + _CLOSE_TIMEOUT_S
        for t in threads:
            if isinstance(t, (threading.Thread, multiprocessing.process.BaseProcess)) and t.is_alive():
                t.join(timeout=max(deadline - time.monotonic(), 0.0))
                if t.is_alive():
                    logger.warning(f"data loader worker {t.name} still running after close()")

    def counters(self) -> dict[str, int]:
        return dict(self.pipeline_state()["counters"])

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples per reason (the "skipped/" counters without their prefix)."""
        return skip_counts(self.counters())


def _drain(q: Any) -> None:
    """Empty a queue.Queue / multiprocessing queue without blocking (best effort)."""
    if q is None:
        return
    try:
        while True:
            q.get_nowait()
    except (queue.Empty, OSError, ValueError):
        pass


DATA_EVENTS = ("tokenization_mismatch", "truncated", "truncated_image_dropped")
"""Counters of samples that were used but altered: masked whole (the reference's length check
failed), cut at data.max_seq_len, and of those, cut back to before an image."""


def data_summary(counters: dict[str, int]) -> dict[str, dict[str, int]]:
    """The metrics' view of the loader's counters: `skipped` samples by reason, and `data_events`."""
    return {"skipped": skip_counts(counters), "data_events": {k: counters.get(k, 0) for k in DATA_EVENTS}}


def build_data_loader(
    path: str,
    image_folder: str | None,
    tokenizer: Tokenizer | str,
    template: str,
    max_seq_len: int,
    local_batch_size: int,
    *,
    packing: bool = False,
    packing_row_len: int | None = None,
    packing_lookahead: int = 8,
    shuffle: bool = True,
    seed: int = 0,
    group_by_modality_length: bool = False,
    global_batch_size: int | None = None,
    modality_megabatch: int | None = None,
    image_aspect_ratio: str = "anyres",
    grid_pinpoints: Sequence[Sequence[int]] | None = None,
    image_size: int = 336,
    patch_size: int = 14,
    num_workers: int = 0,
    worker_method: Literal["thread", "process"] = "thread",
    prefetch: int = 2,
    pin_memory: bool = False,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    strict: bool = False,
    dataset: LlavaDataset | None = None,
) -> LlavaDataLoader:
    """The training data loader for one DP rank (see LlavaDataLoader for state and counters).

    `image_size`/`patch_size`: the vision tower's tile and patch (token counts depend on them).
    `global_batch_size` (samples per optimizer step over all ranks) sets the modality-grouping
    megabatch, as the reference does; default local_batch_size * dp_world_size. With packing,
    rows are not samples: `modality_megabatch` (samples) sets it instead, and each rank takes one
    contiguous, length-balanced share of every megabatch. `num_workers` 0
    processes samples in the loader's thread; otherwise in threads (default) or processes.
    `dataset` reuses an already built index of `path`. Packing: rows of up to `packing_row_len`
    tokens (default max_seq_len; samples are truncated at max_seq_len either way) planned with a
    best-fit look-ahead of `packing_lookahead` samples (see packing.best_fit_rows).
    """
    if max_seq_len <= 0 or local_batch_size <= 0:
        raise ValueError("data.max_seq_len and training.local_batch_size must be positive")
    row_len = max_seq_len if packing_row_len is None else packing_row_len
    if row_len < max_seq_len:
        raise ValueError(f"data.packing_row_len ({row_len}) must be >= data.max_seq_len ({max_seq_len})")
    if packing_lookahead < 1:
        raise ValueError(f"data.packing_lookahead must be >= 1, got {packing_lookahead}")
    if num_workers < 0 or prefetch < 0:
        raise ValueError("data.num_workers and prefetch must be >= 0")
    if isinstance(tokenizer, str):
        tokenizer = Tokenizer(tokenizer)
    if dataset is None:
        dataset = LlavaDataset(path)
    pinpoints = tuple(tuple(int(v) for v in p) for p in (grid_pinpoints or LLAVA_NEXT_GRID_PINPOINTS))
    config = ProcessingConfig(
        image_folder=image_folder,
        template=template,
        max_seq_len=max_seq_len,
        image_aspect_ratio=image_aspect_ratio,
        grid_pinpoints=pinpoints,
        tile_size=image_size,
        patch_size=patch_size,
    )
    processor = SampleProcessor(dataset, tokenizer, config)
    grouped_packing = packing and group_by_modality_length
    if grouped_packing and (not modality_megabatch or modality_megabatch % dp_world_size):
        raise ValueError(
            "data.group_by_modality_length with data.packing needs data.modality_megabatch "
            f"(samples per megabatch), a multiple of the {dp_world_size} data-parallel ranks; "
            f"got {modality_megabatch}"
        )
    sampler = DistributedSampleSampler(
        len(dataset),
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        shuffle=shuffle,
        seed=seed,
        modality_lengths=dataset.modality_lengths if group_by_modality_length else None,
        # Packed rows hold a varying number of samples: the grouping is in samples. Each rank takes
        # one contiguous share of every megabatch, the shares balanced by length as the reference
        # balances its per-device batches. (Dealt one sample at a time, rank 0 would get the
        # longest of every dp_world_size samples and fall behind the others step after step.)
        batch_size=modality_megabatch // dp_world_size if grouped_packing else local_batch_size,
        global_batch_size=modality_megabatch if grouped_packing else global_batch_size,
    )
    node: BaseNode = ParallelMapper(
        sampler, processor, num_workers=num_workers, in_order=True, method=worker_method
    )
    packer = Packer(
        node,
        sampler,
        processor,
        batch_size=local_batch_size,
        row_len=row_len,
        pad_id=tokenizer.pad_id,
        packing=packing,
        strict=strict,
        lookahead=packing_lookahead,
        sampler_batches=group_by_modality_length and not packing,
    )
    node = packer
    if prefetch > 0:
        node = Prefetcher(node, prefetch_factor=prefetch)
    if pin_memory and torch.cuda.is_available():
        node = PinMemory(node)
    fingerprint = {
        "num_samples": len(dataset),
        # Which record each index is (a reordered or replaced file of the same length would
        # otherwise resume at the same position of a different order), and, when grouping, the
        # lengths the grouped order is drawn from.
        "sample_ids_digest": dataset.ids_digest,
        "modality_lengths_digest": (
            hashlib.sha256(dataset.modality_lengths.tobytes()).hexdigest()[:16]
            if group_by_modality_length
            else None
        ),
        "seed": seed,
        "shuffle": shuffle,
        "group_by_modality_length": group_by_modality_length,
        "global_batch_size": sampler.global_batch_size,
        # None unless grouped packing, so the key cannot block other runs saved before it existed.
        "modality_megabatch": modality_megabatch if grouped_packing else None,
        # Each rank's contiguous share of a megabatch (runs saved before shares: one sample dealt
        # at a time, another order, so their position cannot be resumed exactly).
        "megabatch_share": modality_megabatch // dp_world_size if grouped_packing else None,
        # The rows a step takes (with grouped packing "global_batch_size" above is the megabatch).
        "rows_per_step": global_batch_size if grouped_packing else None,
        "local_batch_size": local_batch_size,
        "packing": packing,
        # Only packing reads it; None otherwise so the setting cannot block an unpacked resume.
        "packing_lookahead": packing_lookahead if packing else None,
        "packing_row_len": row_len if packing else None,
        "max_seq_len": max_seq_len,
    }
    return LlavaDataLoader(node, packer, dp_rank, dp_world_size, fingerprint)
