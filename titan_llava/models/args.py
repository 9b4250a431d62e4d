"""Model arguments (one dataclass per module) and the named flavors: `debug` (tiny, CPU-fast) and the
exact LLaVA-NeXT-Vicuna-7B shapes (Vicuna-7B-v1.5, CLIP ViT-L/14-336, mlp2x_gelu projector).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from titan_llava.data.anyres import LLAVA_NEXT_GRID_PINPOINTS

ATTN_BACKENDS = ("sdpa", "flex", "flash")
IMAGE_ASPECT_RATIOS = ("anyres", "pad", "resize")
VISION_ACTS = ("quick_gelu", "gelu")


@dataclass
class VicunaArgs:
    """Llama-2 architecture (Vicuna-7B-v1.5 defaults)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = no grouped-query attention (Vicuna-7B)
    vocab_size: int = 32000
    hidden_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096  # length of the RoPE tables; positions must stay below it

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"llm dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"llm head_dim {self.dim // self.n_heads} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"llm n_heads {self.n_heads} not divisible by n_kv_heads {self.kv_heads}")
        for name in ("n_layers", "vocab_size", "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"llm {name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


@dataclass
class CLIPVisionArgs:
    """Vision half of CLIP ViT (ViT-L/14-336 defaults). `n_layers` counts the pretrained tower."""

    image_size: int = 336
    patch_size: int = 14
    dim: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    hidden_dim: int = 4096
    norm_eps: float = 1e-5
    select_layer: int = -2  # HF hidden_states index: -2 = second-to-last layer (LLaVA)
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.dim % self.n_heads:
            raise ValueError(f"vision dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.hidden_act not in VISION_ACTS:
            raise ValueError(f"vision hidden_act must be one of {VISION_ACTS}, got {self.hidden_act!r}")
        if not 0 < self.n_built_layers <= self.n_layers:
            raise ValueError(
                f"vision select_layer {self.select_layer} is out of range for {self.n_layers} layers"
            )

    @property
    def n_built_layers(self) -> int:
        """Encoder layers actually run: HF hidden_states[k] is the output of layer k (1-based)."""
        if self.select_layer < 0:
            return self.n_layers + 1 + self.select_layer
        return self.select_layer

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2


@dataclass
class LlavaNextArgs:
    """LLaVA-NeXT: vision tower -> mlp2x_gelu projector -> AnyRes packing -> Vicuna."""

    vision: CLIPVisionArgs = field(default_factory=CLIPVisionArgs)
    llm: VicunaArgs = field(default_factory=VicunaArgs)
    projector_hidden_act: str = "gelu"
    image_aspect_ratio: str = "anyres"
    grid_pinpoints: list[tuple[int, int]] = field(
        default_factory=lambda: list(LLAVA_NEXT_GRID_PINPOINTS)
    )  # (width, height) pairs
    attn_backend: str = "sdpa"

    def __post_init__(self) -> None:
        if self.projector_hidden_act != "gelu":
            raise ValueError(
                f"projector_hidden_act must be 'gelu' (mlp2x_gelu), got {self.projector_hidden_act!r}"
            )
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(
                f"image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, got {self.image_aspect_ratio!r}"
            )
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        self.grid_pinpoints = [(int(w), int(h)) for w, h in self.grid_pinpoints]
        if self.image_aspect_ratio == "anyres":
            if not self.grid_pinpoints:
                raise ValueError("grid_pinpoints must not be empty for image_aspect_ratio 'anyres'")
            tile = self.vision.image_size
            for w, h in self.grid_pinpoints:
                if w <= 0 or h <= 0 or w % tile or h % tile:
                    raise ValueError(
                        f"grid_pinpoints entry {(w, h)} is not a positive multiple of the tile {tile}"
                    )


def llava_args_to_dict(args: LlavaNextArgs) -> dict:
    """Plain JSON-able form of the architecture (what a run records in its dump folder)."""
    d = dataclasses.asdict(args)
    d["grid_pinpoints"] = [list(p) for p in args.grid_pinpoints]
    return d


def llava_args_from_dict(d: dict, where: str = "model_args") -> LlavaNextArgs:
    """Inverse of llava_args_to_dict; unknown or missing fields are a ValueError naming `where`."""
    try:
        return LlavaNextArgs(
            vision=CLIPVisionArgs(**d["vision"]),
            llm=VicunaArgs(**d["llm"]),
            **{k: v for k, v in d.items() if k not in ("vision", "llm")},
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a LlavaNextArgs record ({e})") from None


VICUNA_FLAVORS: dict[str, VicunaArgs] = {
    "debug": VicunaArgs(
        dim=64, n_layers=2, n_heads=4, vocab_size=1024, hidden_dim=172
    ),
    "vicuna-7b": VicunaArgs(),
}

CLIP_FLAVORS: dict[str, CLIPVisionArgs] = {
    # Real tile/patch geometry (336/14 -> 24x24 patches) so AnyRes token counts are the real ones.
    "debug": CLIPVisionArgs(dim=32, n_layers=3, n_heads=4, hidden_dim=64),
    "clip-vit-l-14-336": CLIPVisionArgs(),
}

LLAVA_FLAVORS: dict[str, LlavaNextArgs] = {
    "debug": LlavaNextArgs(
        vision=copy.deepcopy(CLIP_FLAVORS["debug"]), llm=copy.deepcopy(VICUNA_FLAVORS["debug"])
    ),
    "llava-next-vicuna-7b": LlavaNextArgs(
        vision=copy.deepcopy(CLIP_FLAVORS["clip-vit-l-14-336"]),
        llm=copy.deepcopy(VICUNA_FLAVORS["vicuna-7b"]),
    ),
}
