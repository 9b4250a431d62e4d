"""The export's parity gate: one image + one vicuna_v1 prompt through our model and through
transformers' LlavaNextForConditionalGeneration loaded from the exported directory; image-token
count, prompt ids, max logit difference and greedy continuation must all agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from titan_llava.constants import IMAGE_TOKEN_INDEX
from titan_llava.data.anyres import num_image_tokens, process_anyres_image
from titan_llava.data.conversation import encode_with_images
from titan_llava.data.tokenizer import Tokenizer


@dataclass
class ParityResult:
    image_tokens_ours: int = 0
    image_tokens_hf: int = 0
    ids_equal: bool = False
    max_abs_diff: float = float("inf")
    atol: float = 0.0
    greedy_ours: list[int] = field(default_factory=list)
    greedy_hf: list[int] = field(default_factory=list)
    text_ours: str = ""
    text_hf: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.image_tokens_ours == self.image_tokens_hf
            and self.ids_equal
            and self.max_abs_diff <= self.atol
            and self.greedy_ours == self.greedy_hf
        )

    def summary(self) -> str:
        return "\n".join(
            [
                f"parity gate: {'PASS' if self.ok else 'FAIL'}",
                f"  image tokens: ours {self.image_tokens_ours}, transformers {self.image_tokens_hf}",
                f"  prompt ids equal: {self.ids_equal}",
                f"  max |logit diff|: {self.max_abs_diff:.3e} (tolerance {self.atol:.1e})",
                f"  greedy ours:         {self.greedy_ours} {self.text_ours!r}",
                f"  greedy transformers: {self.greedy_hf} {self.text_hf!r}",
            ]
        )


def synthetic_image(width: int = 500, height: int = 300) -> Image.Image:
    """A deterministic, non-square test picture (so the AnyRes grid and unpadding are exercised)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [(x * 255) // width, (y * 255) // height, ((x + y) * 7) % 256], axis=-1
    )
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


@torch.no_grad()
def _greedy(
    step: Callable[[torch.Tensor], torch.Tensor], ids_1S: torch.Tensor, n: int, eos: int
):
    out: list[int] = []
    for _ in range(n):
        token = int(step(ids_1S)[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
        ids_1S = torch.cat([ids_1S, torch.tensor([[token]])], dim=1)
    return out


def load_processor(out_dir: str):
    """The exported LlavaNextProcessor with the PIL image backend, the one that reproduces
    titan_llava's tiles bit for bit. transformers >= 5 picks its torchvision backend whenever
    torchvision is installed (no config key can pin it), whose bicubic resize differs from PIL's."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    kw = {"backend": "pil"} if major >= 5 else {"use_fast": False}
    return transformers.LlavaNextProcessor.from_pretrained(out_dir, **kw)


@torch.no_grad()
def verify_export(
    out_dir: str,
    build_ours: Callable[[torch.dtype], torch.nn.Module],
    tokenizer_path: str,
    export_dtype: torch.dtype = torch.float32,
    image_path: str | None = None,
    prompt: str = "Describe this image.",
    atol: float = 1e-4,
    max_new_tokens: int = 6,
) -> ParityResult:
    """Compare our model (`build_ours(torch.float32)`, weights rounded through `export_dtype` as
    the export stored them) with transformers on `out_dir`, both in float32 on CPU."""
    import transformers  # the package's only use of transformers: optional, here only

    hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(
        out_dir, dtype=torch.float32, use_safetensors=True
    ).eval()
    processor = load_processor(out_dir)
    ours = build_ours(torch.float32)
    for p in ours.parameters():
        p.copy_(p.to(export_dtype).float())
    args = ours.args
    image = Image.open(image_path).convert("RGB") if image_path else synthetic_image()

    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": prompt}],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    # The template renders the BOS itself: tokenise without adding another.
    hf_inputs = processor(
        images=image, text=text, return_tensors="pt", add_special_tokens=False
    )
    text = text.removeprefix(processor.tokenizer.bos_token)  # ours adds its BOS itself
    image_token_id = hf.config.image_token_index

    # Ours, from our own pipeline pieces: tokenizer, AnyRes tiles, token count.
    tok = Tokenizer(tokenizer_path)
    n_img = num_image_tokens(image.size, args.grid_pinpoints, args.vision.image_size)
    ids: list[int] = []
    for t in encode_with_images(text, tok):
        ids.extend([IMAGE_TOKEN_INDEX] * n_img if t == IMAGE_TOKEN_INDEX else [t])
    ours_ids_1S = torch.tensor([ids])
    pixels = process_anyres_image(
        image, args.grid_pinpoints, tile_size=args.vision.image_size
    )
    sizes = torch.tensor([image.size])

    result = ParityResult(atol=atol, image_tokens_ours=n_img)
    hf_ids_1S = hf_inputs["input_ids"]
    result.image_tokens_hf = int((hf_ids_1S == image_token_id).sum())
    mapped_1S = torch.where(
        ours_ids_1S == IMAGE_TOKEN_INDEX, image_token_id, ours_ids_1S
    )
    result.ids_equal = mapped_1S.shape == hf_ids_1S.shape and bool(
        (mapped_1S == hf_ids_1S).all()
    )
    if not result.ids_equal or result.image_tokens_hf != n_img:
        return result

    ours_logits = ours(ours_ids_1S, pixel_values=pixels, image_sizes=sizes)
    hf_logits = hf(**hf_inputs).logits
    vocab = ours_logits.shape[-1]
    result.max_abs_diff = float((ours_logits - hf_logits[..., :vocab]).abs().max())

    eos = tok.eos_id
    result.greedy_ours = _greedy(
        lambda x: ours(x, pixel_values=pixels, image_sizes=sizes),
        ours_ids_1S,
        max_new_tokens,
        eos,
    )
    gen = hf.generate(**hf_inputs, max_new_tokens=max_new_tokens, do_sample=False)
    result.greedy_hf = gen[0, hf_ids_1S.shape[1] :].tolist()
    result.text_ours = tok.decode([t for t in result.greedy_ours if t < tok.vocab_size])
    result.text_hf = tok.decode([t for t in result.greedy_hf if t < tok.vocab_size])
    return result
