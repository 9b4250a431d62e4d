"""Meta-device parameter counts of the 7B flavors, contract state_dict keys, meta -> to_empty ->
init_weights gives finite values and rebuilt RoPE tables.
"""

import copy

import torch
from transformers import CLIPVisionModel

from tests.models.hf_reference import clip_config
from titan_llava.models.args import CLIP_FLAVORS, LLAVA_FLAVORS, VICUNA_FLAVORS
from titan_llava.models.clip import CLIPVisionTower
from titan_llava.models.llava import LlavaNext
from titan_llava.models.projector import Projector
from titan_llava.models.vicuna import Vicuna, rope_tables


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_vicuna_7b_param_count() -> None:
    with torch.device("meta"):
        model = Vicuna(VICUNA_FLAVORS["vicuna-7b"])
    assert _count(model) == 6_738_415_616


def test_clip_l336_param_counts() -> None:
    args = CLIP_FLAVORS["clip-vit-l-14-336"]
    full_args = copy.deepcopy(args)
    full_args.select_layer = -1
    with torch.device("meta"):
        ours_23 = CLIPVisionTower(args)
        ours_24 = CLIPVisionTower(full_args)
        hf_full = CLIPVisionModel(clip_config(args))
    assert len(ours_23.layers) == 23 and len(ours_24.layers) == 24
    # HF's full tower = our 24 layers + post_layernorm (weight + bias), which LLaVA never uses.
    assert _count(hf_full) == 303_507_456
    assert _count(ours_24) == 303_507_456 - 2 * 1024
    assert _count(ours_23) == 290_909_184  # one 12,596,224-parameter layer less


def test_projector_and_llava_7b_param_counts() -> None:
    with torch.device("meta"):
        projector = Projector(1024, 4096)
        model = LlavaNext(copy.deepcopy(LLAVA_FLAVORS["llava-next-vicuna-7b"]))
    assert _count(projector) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096 == 20_979_712
    assert _count(model) == 6_738_415_616 + 290_909_184 + 20_979_712 + 4096


def test_state_dict_keys_follow_the_contract() -> None:
    args = copy.deepcopy(LLAVA_FLAVORS["debug"])
    with torch.device("meta"):
        keys = set(LlavaNext(args).state_dict())
    expected = {
        "language_model.tok_embeddings.weight", "language_model.norm.weight",
        "language_model.output.weight", "vision_tower.patch_embed.weight",
        "vision_tower.class_embedding", "vision_tower.position_embedding.weight",
        "vision_tower.pre_norm.weight", "vision_tower.pre_norm.bias",
        "projector.linear_1.weight", "projector.linear_1.bias",
        "projector.linear_2.weight", "projector.linear_2.bias", "image_newline",
    }
    for i in range(args.llm.n_layers):
        p = f"language_model.layers.{i}."
        expected |= {p + "attention_norm.weight", p + "ffn_norm.weight"}
        expected |= {p + f"attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        expected |= {p + f"feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
    for i in range(args.vision.n_built_layers):
        p = f"vision_tower.layers.{i}."
        for sub in ("norm1", "norm2", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj",
                    "mlp.fc1", "mlp.fc2"):
            expected |= {p + sub + ".weight", p + sub + ".bias"}
    assert keys == expected
    assert args.vision.n_built_layers == 2  # debug tower: 3 layers, select_layer -2


def test_meta_to_empty_init_weights() -> None:
    args = copy.deepcopy(LLAVA_FLAVORS["debug"])
    with torch.device("meta"):
        model = LlavaNext(args)
    model.to_empty(device="cpu")
    # to_empty leaves arbitrary memory; make it NaN so only a real rebuild passes.
    for t in (*model.parameters(), *model.buffers()):
        t.data.fill_(float("nan"))
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    lm = model.language_model
    cos, sin = rope_tables(args.llm.head_dim, args.llm.max_seq_len, args.llm.rope_theta)
    assert torch.equal(lm.rope_cos, cos) and torch.equal(lm.rope_sin, sin)
    assert torch.equal(lm.layers["0"].attention_norm.weight, torch.ones(args.llm.dim))
    assert abs(lm.layers["0"].feed_forward.w1.weight.std().item() - 0.02) < 0.002
    # Initialised model runs and is deterministic given the seed.
    ids = torch.randint(0, args.llm.vocab_size, (1, 9))
    assert torch.isfinite(model(ids)).all()
    torch.manual_seed(0)
    model.init_weights()
    first = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
