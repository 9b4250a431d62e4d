"""LLaVA-NeXT: CLIP tower over all tiles of a micro-batch -> projector -> AnyRes packing (unpad +
newline column) -> scatter into the text embeddings at IMAGE_TOKEN_INDEX positions -> Vicuna.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from titan_llava.constants import IMAGE_TOKEN_INDEX
from titan_llava.data.anyres import anyres_grid_shape, num_tiles, unpadded_feature_shape
from titan_llava.models.args import LlavaNextArgs
from titan_llava.models.attention import VarlenInfo
from titan_llava.models.clip import CLIPVisionTower
from titan_llava.models.projector import Projector
from titan_llava.models.vicuna import Vicuna


def _check(condition: Tensor, message: str, detail: Callable[[], str] | None = None) -> None:
    """Raise ValueError(message + detail()) unless the boolean scalar tensor `condition` holds. On
    an accelerator the check is asynchronous (no host sync in the forward; a failure surfaces as a
    device-side assertion with `message` alone at the next synchronisation; the device assertion
    takes at most 254 characters, so `detail` (built only on failure) is left out there)."""
    if condition.device.type == "cpu":
        if not bool(condition):
            raise ValueError(message + (f" ({detail()})" if detail is not None else ""))
    else:
        torch._assert_async(condition, message[:250])


class LlavaNext(nn.Module):
    def __init__(self, args: LlavaNextArgs) -> None:
        super().__init__()
        self.args = args
        self.vision_tower = CLIPVisionTower(args.vision)
        self.projector = Projector(args.vision.dim, args.llm.dim)
        self.language_model = Vicuna(args.llm, args.attn_backend)
        self.image_newline = nn.Parameter(torch.empty(args.llm.dim))
        nn.init.normal_(self.image_newline, std=args.llm.dim**-0.5)

    def init_weights(self) -> None:
        """Initialise every parameter and rebuild the RoPE tables (use after `to_empty`)."""
        self.vision_tower.init_weights()
        self.projector.init_weights()
        self.language_model.init_weights()
        # The reference's randn(D) / sqrt(D).
        nn.init.normal_(self.image_newline, mean=0.0, std=self.args.llm.dim**-0.5)

    def _sizes(self, image_sizes: Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        if isinstance(image_sizes, Tensor):
            image_sizes = image_sizes.tolist()  # the geometry is Python (keep image_sizes on CPU: no sync)
        return [(int(w), int(h)) for w, h in image_sizes]

    def _tiles_per_image(self, sizes: list[tuple[int, int]]) -> list[int]:
        a = self.args
        return [
            num_tiles(s, a.grid_pinpoints, a.vision.image_size, a.image_aspect_ratio) for s in sizes
        ]

    def pack_image_features(
        self, features_TPD: Tensor, image_sizes: Tensor | Sequence[Sequence[int]]
    ) -> list[Tensor]:
        """Per image, its LLM-ready features [n_tokens_j, D] from all tiles' projected features.

        features_TPD: [T, P, D] for all tiles, image after image; image_sizes: (width, height)
        originals. anyres: base tile first, then the tile grid re-assembled into one feature map,
        unpadded, with `image_newline` appended to every row, flattened row-major. pad/resize: the
        single tile's P features as they are.
        """
        a = self.args
        sizes = self._sizes(image_sizes)
        tiles = self._tiles_per_image(sizes)
        if sum(tiles) != features_TPD.shape[0]:
            raise ValueError(
                f"image_sizes {sizes} need {sum(tiles)} tiles but got {features_TPD.shape[0]}"
            )
        side, dim = a.vision.patches_per_side, features_TPD.shape[-1]
        per_image = torch.split(features_TPD, tiles, dim=0)
        if a.image_aspect_ratio != "anyres":
            return [f[0] for f in per_image]
        newline_D = self.image_newline.to(features_TPD.dtype)
        packed = []
        for size, feats_NPD in zip(sizes, per_image):
            rows, cols = anyres_grid_shape(size, a.grid_pinpoints, a.vision.image_size)
            # (rows, cols, side, side, D) -> (rows*side, cols*side, D): one map of the whole canvas.
            grid_HWD = (
                feats_NPD[1:]
                .reshape(rows, cols, side, side, dim)
                .permute(0, 2, 1, 3, 4)
                .reshape(rows * side, cols * side, dim)
            )
            row_sl, col_sl = unpadded_feature_shape(size, rows * side, cols * side)
            grid_HWD = grid_HWD[row_sl, col_sl]
            newline_H1D = newline_D.expand(grid_HWD.shape[0], 1, dim)
            grid_HWD = torch.cat([grid_HWD, newline_H1D], dim=1)
            packed.append(torch.cat([feats_NPD[0], grid_HWD.reshape(-1, dim)], dim=0))
        return packed

    def encode_images(
        self, pixel_values: Tensor, image_sizes: Tensor | Sequence[Sequence[int]]
    ) -> Tensor:
        """All images' packed features concatenated, [sum_j n_tokens_j, llm_dim].

        One vision call over every tile of the micro-batch, then one projector call.
        """
        features_TPD = self.projector(self.vision_tower(pixel_values))
        return torch.cat(self.pack_image_features(features_TPD, image_sizes), dim=0)

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        image_sizes: Tensor | Sequence[Sequence[int]] | None = None,
        positions: Tensor | None = None,
        document_ids: Tensor | None = None,
        vision_keepalive: bool = False,
        output_index: Tensor | None = None,
        document_bounds: VarlenInfo | None = None,
    ) -> Tensor:
        """Logits [B, S, V]. Placeholders are already expanded: image j holds exactly
        num_image_tokens(image_sizes[j]) consecutive IMAGE_TOKEN_INDEX positions, in row-major order.

        output_index: flat indices into the B * S positions: logits [N, V] at those only (see
        Vicuna.forward); document_bounds: `varlen_info(document_ids)` built on the host (ditto).
        image_sizes may be a host tensor or a list of (width, height): the geometry is read on the
        host either way (pass a list under FSDP2, whose root module moves tensor arguments to the
        device, which would cost a copy and a read-back).

        vision_keepalive: `pixel_values` holds stand-in tiles for a micro-batch without images; the
        vision tower and projector still run (so a sharded run issues the same collectives on every
        rank, whatever the modality of each rank's micro-batch) but contribute exactly zero.
        """
        if vision_keepalive:
            assert image_sizes is None, "vision_keepalive takes stand-in tiles, not images"
            _check((input_ids != IMAGE_TOKEN_INDEX).all(), "a vision_keepalive batch has image positions")
            h_BSD = self.language_model.tok_embeddings(input_ids)
            unused_TPD = self.projector(self.vision_tower(pixel_values))
            # A zero-weighted term keeps the tower in the autograd graph (gradients exactly 0).
            keep = 0.0 * unused_TPD.sum().to(h_BSD.dtype)
            # image_newline only where a real image would use it too (anyres): in pad/resize mode
            # it gets no gradient on ranks with images, and FSDP2 must see the same set of
            # gradients on every rank (the root unit's reduce-scatter).
            if self.args.image_aspect_ratio == "anyres":
                keep = keep * self.image_newline[0].to(h_BSD.dtype)
            h_BSD = h_BSD + keep
        else:
            h_BSD = self._embed_with_images(input_ids, pixel_values, image_sizes)
        return self.language_model(
            h_BSD=h_BSD,
            positions=positions,
            document_ids=document_ids,
            output_index=output_index,
            document_bounds=document_bounds,
        )

    def _embed_with_images(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None,
        image_sizes: Tensor | Sequence[Sequence[int]] | None,
    ) -> Tensor:
        """Token embeddings [B, S, D] with the images' features at their IMAGE_TOKEN_INDEX positions."""
        image_mask_BS = input_ids == IMAGE_TOKEN_INDEX
        # Placeholders get a valid id for the lookup; their embeddings are overwritten below.
        tokens_BS = torch.where(image_mask_BS, torch.zeros_like(input_ids), input_ids)
        h_BSD = self.language_model.tok_embeddings(tokens_BS)
        has_pixels = pixel_values is not None and pixel_values.shape[0] > 0
        if has_pixels:
            if image_sizes is None:
                raise ValueError("pixel_values given without image_sizes")
            features_ND = self.encode_images(pixel_values, image_sizes).to(h_BSD.dtype)
            n_features = features_ND.shape[0]
        else:
            features_ND, n_features = None, 0
        _check(
            image_mask_BS.sum() == n_features,
            f"the number of IMAGE_TOKEN_INDEX positions in input_ids is not the {n_features} image "
            "features that image_sizes give",
            lambda: f"image_sizes {image_sizes!r}",
        )
        if features_ND is not None:
            # Image after image into the placeholder positions in row-major order (what
            # masked_scatter does). nonzero_static knows its size from the host (no sync), and
            # index_copy's backward is an index_select (masked_scatter's is a masked_select, which
            # synchronises to size its output).
            index = torch.nonzero_static(image_mask_BS.flatten(), size=n_features).squeeze(1)
            h_BSD = h_BSD.flatten(0, 1).index_copy(0, index, features_ND).view_as(h_BSD)
        return h_BSD
