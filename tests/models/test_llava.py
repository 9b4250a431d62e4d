"""LlavaNext: AnyRes feature packing vs an independent from-spec implementation (REFERENCE.md), and
full-model logits vs transformers' LlavaNextForConditionalGeneration (fp32, tiny random configs).
"""

import copy

import pytest
import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from tests.models.hf_reference import clip_config, clip_key, llama_body_key, llama_config, randomize_
from titan_llava.constants import IMAGE_TOKEN_INDEX
from titan_llava.data.anyres import LLAVA_NEXT_GRID_PINPOINTS, num_image_tokens, num_tiles
from titan_llava.models.args import LLAVA_FLAVORS, CLIPVisionArgs, LlavaNextArgs, VicunaArgs
from titan_llava.models.llava import LlavaNext

PINPOINTS = list(LLAVA_NEXT_GRID_PINPOINTS)
SIZES = {  # (width, height)
    "wide": (1000, 300),
    "tall": (300, 1000),
    "square": (500, 500),
    "tiny": (10, 7),
    "vga": (640, 480),
    "near_square": (337, 335),
    **{f"pin{w}x{h}": (w, h) for w, h in PINPOINTS},
}


def _spec_pack(feats: torch.Tensor, size, pinpoints, newline: torch.Tensor) -> torch.Tensor:
    """REFERENCE.md "AnyRes feature packing", written from the text with explicit loops."""
    w, h = size
    best, best_eff, best_waste = None, -1, None
    for cw, ch in pinpoints:
        s = min(cw / w, ch / h)
        eff = min(int(w * s) * int(h * s), w * h)
        waste = cw * ch - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cw, ch), eff, waste
    cols, rows = best[0] // 336, best[1] // 336
    d = feats.shape[-1]
    fmap = torch.empty(d, rows * 24, cols * 24)
    for r in range(rows):
        for c in range(cols):
            tile = feats[1 + r * cols + c]  # tiles are row-major after the base
            for p in range(576):
                fmap[:, r * 24 + p // 24, c * 24 + p % 24] = tile[p]
    big_w, big_h = cols * 24, rows * 24
    if w / h > big_w / big_h:
        new_h = int(round(h * (big_w / w), 7))
        pad = (big_h - new_h) // 2
        fmap = fmap[:, pad : big_h - pad]
    else:
        new_w = int(round(w * (big_h / h), 7))
        pad = (big_w - new_w) // 2
        fmap = fmap[:, :, pad : big_w - pad]
    tokens = []
    for y in range(fmap.shape[1]):
        tokens.extend(fmap[:, y, x] for x in range(fmap.shape[2]))
        tokens.append(newline)
    return torch.cat([feats[0], torch.stack(tokens)])


@pytest.fixture(scope="module")
def debug_model() -> LlavaNext:
    model = LlavaNext(copy.deepcopy(LLAVA_FLAVORS["debug"]))
    model.init_weights()
    return model


def test_pack_matches_spec_for_many_sizes(debug_model: LlavaNext) -> None:
    sizes = list(SIZES.values())
    tiles = [num_tiles(s, PINPOINTS) for s in sizes]
    feats = torch.randn(sum(tiles), 576, debug_model.args.llm.dim)
    newline = debug_model.image_newline.detach()
    with torch.no_grad():
        packed = debug_model.pack_image_features(feats, torch.tensor(sizes))
    assert len(packed) == len(sizes)
    for j, (size, chunk) in enumerate(zip(sizes, torch.split(feats, tiles))):
        ref = _spec_pack(chunk, size, PINPOINTS, newline)
        assert packed[j].shape[0] == num_image_tokens(size, PINPOINTS), size
        assert torch.equal(packed[j], ref), size
    assert packed[sizes.index((640, 480))].shape[0] == 2340  # REFERENCE.md's worked example


def test_pack_pad_mode_and_tile_count_error(debug_model: LlavaNext) -> None:
    args = copy.deepcopy(LLAVA_FLAVORS["debug"])
    args.image_aspect_ratio = "pad"
    model = LlavaNext(args)
    feats = torch.randn(2, 576, args.llm.dim)
    packed = model.pack_image_features(feats, [(640, 480), (10, 7)])
    assert [torch.equal(p, f) for p, f in zip(packed, feats)] == [True, True]
    with pytest.raises(ValueError, match="tiles"):
        debug_model.pack_image_features(torch.randn(3, 576, 64), [(640, 480)])


# --- full model vs transformers -----------------------------------------------------------------

_HF_IMAGE_ID = 127


def _build_pair(pinpoints):
    vision = CLIPVisionArgs(dim=16, n_layers=3, n_heads=2, hidden_dim=32)
    llm = VicunaArgs(dim=32, n_layers=2, n_heads=4, vocab_size=128, hidden_dim=48, max_seq_len=8192)
    args = LlavaNextArgs(vision=vision, llm=llm, grid_pinpoints=pinpoints)
    cfg = LlavaNextConfig(
        vision_config=clip_config(vision).to_dict(),
        text_config=llama_config(llm).to_dict(),
        image_token_index=_HF_IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_grid_pinpoints=[[h, w] for w, h in pinpoints],  # HF lists (height, width)
    )
    hf = LlavaNextForConditionalGeneration(cfg).eval()
    # HF's sdpa path (6x faster here than eager on ~3k-token rows); attention math itself is
    # checked against HF eager in test_vicuna.py and an explicit softmax in test_attention.py.
    hf.set_attn_implementation("sdpa")
    randomize_(hf, std=0.2)
    ours = LlavaNext(args).eval()
    n_built = vision.n_built_layers
    converted = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight":
            key = "language_model.output.weight"
        elif k == "model.image_newline":
            key = "image_newline"
        elif k.startswith("model.multi_modal_projector."):
            key = "projector." + k.removeprefix("model.multi_modal_projector.")
        elif k.startswith("model.language_model."):
            key = "language_model." + llama_body_key(k.removeprefix("model.language_model."))
        elif k.startswith("model.vision_tower."):
            rest = clip_key(k.removeprefix("model.vision_tower.").removeprefix("vision_model."), n_built)
            key = None if rest is None else "vision_tower." + rest
        else:
            raise KeyError(k)
        if key is not None:
            converted[key] = v.clone()
    ours.load_state_dict(converted, strict=True)
    return ours, hf


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(3)
    return _build_pair(PINPOINTS)


def _row(parts) -> list[int]:
    """parts: ints (text ids) or ("img", n_tokens) placeholders, already expanded."""
    ids = []
    for p in parts:
        ids.extend([IMAGE_TOKEN_INDEX] * p[1] if isinstance(p, tuple) else [p])
    return ids


def _compare(ours, hf, rows: list[list[int]], sizes, pinpoints=PINPOINTS) -> float:
    ids = torch.tensor(rows)
    hf_ids = torch.where(ids == IMAGE_TOKEN_INDEX, _HF_IMAGE_ID, ids)
    if sizes:
        t = sum(num_tiles(s, pinpoints) for s in sizes)
        pixels = torch.randn(t, 3, 336, 336)
        ours_sizes = torch.tensor(sizes)  # (width, height)
        hf_sizes = ours_sizes.flip(-1)  # HF: (height, width)
    else:
        pixels = ours_sizes = hf_sizes = None
    with torch.no_grad():
        ref = hf(input_ids=hf_ids, pixel_values=pixels, image_sizes=hf_sizes).logits
        got = ours(ids, pixels, ours_sizes)
    assert got.shape == ref.shape
    return (got - ref).abs().max().item()


@pytest.mark.parametrize("name", ["wide", "tall", "square", "tiny", "near_square"] + [f"pin{w}x{h}" for w, h in PINPOINTS])
def test_logits_match_hf_one_image(pair, name: str) -> None:
    size = SIZES[name]
    row = _row([1, 5, 9, ("img", num_image_tokens(size, PINPOINTS)), 13, 2, 7])
    assert _compare(*pair, [row], [size]) <= 1e-4


def test_logits_match_hf_text_only(pair) -> None:
    assert _compare(*pair, [[1, 4, 8, 15, 16, 23, 42], [1, 2, 3, 4, 5, 6, 7]], []) <= 1e-4


def test_logits_match_hf_two_images_and_mixed_batch(pair) -> None:
    a, b = SIZES["wide"], SIZES["tiny"]
    na, nb = num_image_tokens(a, PINPOINTS), num_image_tokens(b, PINPOINTS)
    row0 = _row([1, 3, ("img", na), 4, 5, ("img", nb), 6])
    row1 = [1] + [int(x) for x in torch.randint(3, 120, (len(row0) - 1,))]  # text-only row
    assert _compare(*pair, [row0, row1], [a, b]) <= 1e-4


def test_logits_match_hf_asymmetric_pinpoints() -> None:
    # Non-symmetric pinpoints: swapping (width, height) anywhere would change the result.
    pins = [(336, 672), (1008, 336), (672, 672)]
    torch.manual_seed(4)
    ours, hf = _build_pair(pins)
    size = (700, 300)
    row = _row([1, ("img", num_image_tokens(size, pins)), 9])
    assert _compare(ours, hf, [row], [size], pins) <= 1e-4


def test_feature_count_mismatch_raises(pair) -> None:
    ours, _ = pair
    size = SIZES["square"]
    row = _row([1, ("img", num_image_tokens(size, PINPOINTS) - 1), 2])
    pixels = torch.randn(num_tiles(size, PINPOINTS), 3, 336, 336)
    with pytest.raises(ValueError, match=r"image features .*image_sizes tensor\(\[\[") as err:
        ours(torch.tensor([row]), pixels, torch.tensor([size]))
    # The device-side form of the check (torch._assert_async) takes messages under 255 chars.
    assert len(str(err.value).split(" (image_sizes")[0]) < 255
    with pytest.raises(ValueError, match="image features"):
        ours(torch.tensor([row]))


def test_vision_keepalive_contributes_exactly_zero(debug_model: LlavaNext) -> None:
    """A text-only micro-batch with stand-in tiles gives the text-only logits bit for bit, and
    the vision tower, projector and image_newline get gradients that are exactly zero."""
    model = copy.deepcopy(debug_model)
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        plain = model(ids)
    kept = model(ids, torch.randn(1, 3, 336, 336), vision_keepalive=True)
    assert torch.equal(kept, plain)
    kept.square().sum().backward()
    for name, p in model.named_parameters():
        if not name.startswith("language_model."):
            assert p.grad is not None and not p.grad.any(), name
