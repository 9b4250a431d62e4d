"""From disk: tiny HF LLaVA-NeXT checkpoint -> our loader -> logits equal transformers'."""

from __future__ import annotations

import torch

from tests.hf.conftest import IMAGE_TOKEN_ID, load_hf
from titan_llava.constants import IMAGE_TOKEN_INDEX
from titan_llava.data.anyres import num_image_tokens, num_tiles
from titan_llava.hf.loading import args_from_hf, load_hf_weights
from titan_llava.models.llava import LlavaNext


def test_logits_match_transformers(hf_dirs):
    directory = hf_dirs["llava_sharded"]
    args = args_from_hf(llava_dir=directory)
    with torch.device("meta"):
        model = LlavaNext(args)
    model.to_empty(device="cpu")
    model.init_weights()
    load_hf_weights(model, llava_dir=directory)
    model.eval()
    hf = load_hf("llava", directory)

    size_wh = (500, 300)  # a 2x1 grid with unpadding: exercises the (w, h) <-> (h, w) boundary
    n_img = num_image_tokens(size_wh, args.grid_pinpoints)
    n_tiles = num_tiles(size_wh, args.grid_pinpoints)
    assert n_tiles == 3 and n_img != 576 + 2 * 24 * 25  # some rows really were unpadded
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(n_tiles, 3, 336, 336, generator=g)
    text = torch.randint(3, 500, (12,), generator=g)
    ours_ids = torch.cat([torch.tensor([1]), torch.full((n_img,), IMAGE_TOKEN_INDEX), text])[None]
    hf_ids = torch.where(ours_ids == IMAGE_TOKEN_INDEX, IMAGE_TOKEN_ID, ours_ids)

    with torch.no_grad():
        ref = hf(
            input_ids=hf_ids,
            pixel_values=pixels[None],
            image_sizes=torch.tensor([[size_wh[1], size_wh[0]]]),  # HF: (height, width)
        ).logits
        out = model(ours_ids, pixel_values=pixels, image_sizes=torch.tensor([size_wh]))
    assert out.shape == ref.shape == (1, ours_ids.shape[1], 512)
    diff = (out - ref).abs().max().item()
    print(f"max |logit diff| = {diff:.3e}")
    assert diff <= 1e-4
    # The comparison is sensitive: a tiny change in one loaded image-path tensor shows up.
    with torch.no_grad():
        model.image_newline.add_(1e-3)
        out2 = model(ours_ids, pixel_values=pixels, image_sizes=torch.tensor([size_wh]))
    assert (out2 - ref).abs().max().item() > 1e-4
