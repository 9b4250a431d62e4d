"""CLIP tower selected-layer features vs transformers' CLIPVisionModel hidden_states (fp32)."""

import pytest
import torch
from transformers import CLIPVisionModel

from tests.models.hf_reference import clip_config, clip_key, convert, randomize_
from titan_llava.models.args import CLIPVisionArgs
from titan_llava.models.clip import CLIPVisionTower

_BASE = dict(image_size=336, patch_size=14, dim=32, n_layers=4, n_heads=4, hidden_dim=64)


@pytest.fixture(scope="module")
def hf_model() -> CLIPVisionModel:
    torch.manual_seed(1)
    hf = CLIPVisionModel(clip_config(CLIPVisionArgs(**_BASE))).eval()
    hf.config._attn_implementation = "eager"
    randomize_(hf)
    return hf


@pytest.mark.parametrize("select_layer,hf_index,n_built", [(-2, -2, 3), (-1, -1, 4), (2, 2, 2)])
def test_selected_layer_matches_hf(hf_model, select_layer: int, hf_index: int, n_built: int) -> None:
    args = CLIPVisionArgs(**_BASE, select_layer=select_layer)
    assert args.n_built_layers == n_built
    ours = CLIPVisionTower(args).eval()
    sd = convert(hf_model.state_dict(), lambda k: clip_key(k.removeprefix("vision_model."), n_built))
    ours.load_state_dict(sd, strict=True)
    assert len(ours.layers) == n_built
    pixels = torch.randn(3, 3, 336, 336)
    with torch.no_grad():
        ref = hf_model(pixel_values=pixels, output_hidden_states=True).hidden_states[hf_index][:, 1:]
        got = ours(pixels)
    assert got.shape == (3, 576, 32)
    assert (got - ref).abs().max().item() <= 1e-4


def test_bad_args_raise() -> None:
    with pytest.raises(ValueError, match="select_layer"):
        CLIPVisionArgs(**_BASE, select_layer=-6)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPVisionArgs(**_BASE, hidden_act="relu")
    tower = CLIPVisionTower(CLIPVisionArgs(**_BASE))
    with pytest.raises(ValueError, match="pixel_values"):
        tower(torch.randn(1, 3, 224, 224))
