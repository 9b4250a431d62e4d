"""Next-token cross-entropy (HF shift: logits[:, :-1] predict labels[:, 1:]) and its normalisation
over an optimizer step ("global_tokens" or HF Trainer's "per_microbatch"). The trainer computes
logits only at the positions that have a target (`loss_positions`, `cross_entropy_sum_at`): in
LLaVA data most positions are image or prompt tokens, so the LLM head and the fp32 logits never
cover them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from titan_llava.constants import IGNORE_INDEX


def shift_labels(labels_BS: Tensor, document_ids: Tensor | None = None) -> Tensor:
    """Targets aligned with logits[:, :-1]: labels[:, 1:], IGNORE_INDEX where not learned.

    In a packed row, a target in another document than its predicting position is ignored too
    (the reference masks every BOS anyway, so this only guards against data that does not)."""
    targets_BS1 = labels_BS[:, 1:]
    if document_ids is not None:
        crosses = document_ids[:, 1:] != document_ids[:, :-1]
        targets_BS1 = targets_BS1.masked_fill(crosses, IGNORE_INDEX)
    return targets_BS1


def count_valid_tokens(labels_BS: Tensor, document_ids: Tensor | None = None) -> Tensor:
    """Number of learned (shifted) targets in a micro-batch, int64 scalar on labels' device."""
    return (shift_labels(labels_BS, document_ids) != IGNORE_INDEX).sum()


def cross_entropy_sum(
    logits_BSV: Tensor, labels_BS: Tensor, document_ids: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(sum of token CEs in fp32, number of valid targets) for one micro-batch.

    Low-precision logits are upcast to fp32 before the softmax, as HF does."""
    targets = shift_labels(labels_BS, document_ids)
    logits = _upcast(logits_BSV[:, :-1])
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, (targets != IGNORE_INDEX).sum()


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def loss_positions(labels_BS: Tensor, document_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(flat indices into the [B * S] positions whose logits the loss needs, their targets): the
    positions with a valid shifted target, row-major. Computed where the labels live (the data
    pipeline, on CPU), so the number of positions is known without a device sync."""
    targets_BS1 = shift_labels(labels_BS, document_ids)
    b, s = labels_BS.shape
    valid_BS = torch.zeros((b, s), dtype=torch.bool, device=labels_BS.device)
    valid_BS[:, :-1] = targets_BS1 != IGNORE_INDEX
    index_N = valid_BS.flatten().nonzero().squeeze(1)
    return index_N, targets_BS1[valid_BS[:, :-1]]


def cross_entropy_sum_at(logits_NV: Tensor, targets_N: Tensor) -> tuple[Tensor, Tensor]:
    """cross_entropy_sum for logits computed only at `loss_positions` (the LLM head ran on those
    positions alone, so neither the head matmul nor fp32 logits cover image or prompt tokens):
    (fp32 sum of token CEs, number of targets)."""
    loss_sum = F.cross_entropy(_upcast(logits_NV), targets_N, reduction="sum")
    # A fill on the device, not a host-to-device copy (which would wait for the stream).
    return loss_sum, torch.full((), targets_N.shape[0], dtype=torch.int64, device=targets_N.device)


def global_valid_tokens(
    labels_per_microbatch: list[Tensor],
    document_ids_per_microbatch: list[Tensor | None] | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Valid targets of the whole optimizer step: all micro-batches of this rank, all-reduced
    (sum) over the data-parallel group when torch.distributed is initialised. Call once per step
    BEFORE the first backward (the denominator must be known up front)."""
    docs = document_ids_per_microbatch or [None] * len(labels_per_microbatch)
    count = sum(count_valid_tokens(lab, d) for lab, d in zip(labels_per_microbatch, docs))
    count = torch.as_tensor(count, dtype=torch.int64, device=labels_per_microbatch[0].device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count


def normalize_loss(
    loss_sum: Tensor,
    num_valid: Tensor,
    mode: str,
    *,
    global_tokens: Tensor | None = None,
    grad_accum_steps: int = 1,
    dp_degree: int = 1,
) -> Tensor:
    """The scalar to call backward() on for one micro-batch.

    Assumes the gradient reduction AVERAGES over the dp_degree ranks (FSDP2's default), so that the
    accumulated, reduced gradient is exactly the gradient of:
    - "global_tokens": sum of all token CEs of the step / global_tokens (all micro-batches, ranks);
    - "per_microbatch": the mean over micro-batches and ranks of each micro-batch's mean token CE
      (HF Trainer with gradient accumulation under DDP). A micro-batch without valid targets
      contributes 0 (HF would produce NaN).
    Summing the returned values over micro-batches and all-reducing the mean over ranks gives the
    step's loss for logging in both modes."""
    if mode == "global_tokens":
        assert global_tokens is not None, "global_tokens mode needs global_valid_tokens(...)"
        return loss_sum * dp_degree / global_tokens.clamp(min=1).to(loss_sum.dtype)
    if mode == "per_microbatch":
        return loss_sum / num_valid.clamp(min=1).to(loss_sum.dtype) / grad_accum_steps
    raise ValueError(f"training.loss_normalization must be global_tokens|per_microbatch, got {mode!r}")
