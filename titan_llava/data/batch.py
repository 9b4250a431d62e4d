"""The Batch the data loader yields and the trainer consumes (see the data contract in DESIGN/README).

Image features are already accounted for in the text: every image-feature position holds
IMAGE_TOKEN_INDEX, so the model only scatters projected features into those positions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from titan_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from titan_llava.loss import loss_positions
from titan_llava.models.attention import VarlenInfo, varlen_info


@dataclass
class Batch:
    """One local micro-batch.

    input_ids: [B, S] int64; IMAGE_TOKEN_INDEX at every image-feature position, pad_id at padding.
    labels: [B, S] int64; IGNORE_INDEX where nothing is learned (padding, image positions, masks).
        Not shifted: the loss shifts (labels[:, 1:] against logits[:, :-1]) as the reference does.
    positions: [B, S] int64; position ids, restarting at 0 at the start of every packed document.
    document_ids: [B, S] int64 or None (packing off); ids are per row, and the padding at the end of
        a packed row has its own id, so no real token ever attends to padding.
    pixel_values: [T, 3, t, t] float32 or None; the tiles of every image, image after image in
        placeholder order (row 0 first, left to right), each image's tiles as AnyRes emits them.
    image_sizes: [N, 2] int64 or None; ORIGINAL (width, height) of each image, same order.
    sample_ids: per row, the ids of the samples it holds (in order).
    loss_index / loss_targets: [N] int64 or None; the flat positions (into B * S, row-major) that
        have a valid next-token target and those targets (`titan_llava.loss.loss_positions`), so
        the model computes logits only there. Derived from labels (+ document_ids) by the data
        pipeline; None = not computed (the trainer then derives them itself).
    document_bounds: VarlenInfo or None; `varlen_info(document_ids)` (cumulative document starts
        and the longest document) for the varlen attention kernels, built on the host by
        `with_document_bounds` so the forward needs no device sync to build it.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    document_ids: torch.Tensor | None
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None
    sample_ids: list[list[str]]
    loss_index: torch.Tensor | None = None
    loss_targets: torch.Tensor | None = None
    document_bounds: VarlenInfo | None = None

    def __post_init__(self) -> None:
        assert self.input_ids.dim() == 2 and self.input_ids.dtype == torch.long
        assert self.labels.shape == self.input_ids.shape and self.labels.dtype == torch.long
        assert self.positions.shape == self.input_ids.shape
        if self.document_ids is not None:
            assert self.document_ids.shape == self.input_ids.shape
        assert (self.pixel_values is None) == (self.image_sizes is None)
        assert len(self.sample_ids) == self.input_ids.shape[0]
        assert (self.loss_index is None) == (self.loss_targets is None)
        if self.loss_index is not None:
            assert self.loss_index.dim() == 1 and self.loss_index.shape == self.loss_targets.shape

    @property
    def num_images(self) -> int:
        return 0 if self.image_sizes is None else int(self.image_sizes.shape[0])

    @property
    def num_image_positions(self) -> int:
        return int((self.input_ids == IMAGE_TOKEN_INDEX).sum())

    @property
    def num_label_tokens(self) -> int:
        """Tokens that carry a loss (before the loss' shift, which drops no learned label)."""
        return int((self.labels != IGNORE_INDEX).sum())

    def _map(self, fn) -> "Batch":
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = fn(value)
            elif isinstance(value, VarlenInfo):
                value = VarlenInfo(cu_seqlens=fn(value.cu_seqlens), max_seqlen=value.max_seqlen)
            kwargs[f.name] = value
        return Batch(**kwargs)

    def to(
        self, device: torch.device | str, non_blocking: bool = False, sizes_on_host: bool = False
    ) -> "Batch":
        """The batch on `device`. sizes_on_host: leave `image_sizes` where it is (the model reads
        them as Python numbers, so a device copy would only cost a sync to read back)."""
        moved = self._map(lambda t: t.to(device, non_blocking=non_blocking))
        return replace(moved, image_sizes=self.image_sizes) if sizes_on_host else moved

    def with_loss_positions(self) -> "Batch":
        """This batch with loss_index / loss_targets (the data pipeline sets them; a batch built
        elsewhere may not have them). Call on the host copy."""
        if self.loss_index is not None:
            return self
        index, targets = loss_positions(self.labels, self.document_ids)
        return replace(self, loss_index=index, loss_targets=targets)

    def with_document_bounds(self, pin: bool = False) -> "Batch":
        """This batch with `document_bounds` (packed rows only; call on the host copy). pin: put
        the small boundary tensor in pinned memory, so the copy to the GPU does not block."""
        if self.document_ids is None or self.document_bounds is not None:
            return self
        info = varlen_info(self.document_ids, self.input_ids.shape[1])
        if pin:
            info = VarlenInfo(cu_seqlens=info.cu_seqlens.pin_memory(), max_seqlen=info.max_seqlen)
        return replace(self, document_bounds=info)

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())
