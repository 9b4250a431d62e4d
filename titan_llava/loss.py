"""Next-token cross-entropy (HF shift: logits[:, :-1] predict labels[:, 1:]), its normalisation over
an optimizer step ("global_tokens" or HF Trainer's "per_microbatch"), and a memory-lean chunked
variant that never materialises the full fp32 logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

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


def _chunk_ce_sum(h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor) -> Tensor:
    logits_NV = _upcast(h_ND @ weight_VD.t())
    return F.cross_entropy(logits_NV, targets_N, reduction="sum")


def chunked_cross_entropy_sum(
    h_BSD: Tensor,
    weight_VD: Tensor,
    labels_BS: Tensor,
    document_ids: Tensor | None = None,
    chunk_size: int = 2048,
) -> tuple[Tensor, Tensor]:
    """Same result as cross_entropy_sum(h_BSD @ weight_VD.T, labels) from the final-norm hidden
    states and the output-projection weight, without the [B, S, V] fp32 logits.

    Only positions with a valid target are projected (image and prompt tokens never reach the
    vocabulary matmul), `chunk_size` tokens at a time; each chunk is checkpointed so its logits are
    recomputed in backward rather than kept. Returns (fp32 sum, number of valid targets)."""
    targets_BS1 = shift_labels(labels_BS, document_ids)
    valid_BS1 = targets_BS1 != IGNORE_INDEX
    # Boolean indexing syncs with the host once per micro-batch; the savings dwarf it.
    h_ND = h_BSD[:, :-1][valid_BS1]
    targets_N = targets_BS1[valid_BS1]
    total = h_BSD.new_zeros((), dtype=_upcast(h_BSD[:0]).dtype)
    if h_ND.shape[0] == 0:
        # Keep the graph connected so backward works on a micro-batch with nothing to learn.
        return total + 0.0 * h_BSD.sum() + 0.0 * weight_VD.sum(), valid_BS1.sum()
    for start in range(0, h_ND.shape[0], chunk_size):
        stop = start + chunk_size
        total = total + checkpoint(
            _chunk_ce_sum, h_ND[start:stop], weight_VD, targets_N[start:stop], use_reentrant=False
        )
    return total, valid_BS1.sum()


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
