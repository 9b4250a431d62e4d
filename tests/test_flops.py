"""FLOP model vs hand counts and vs torch's FlopCounterMode on the debug LLaVA (forward + backward
with each stage's frozen parts); MFU peak table; MetricsLogger records."""

import copy
import dataclasses
import io
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from titan_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from titan_llava.data.anyres import num_image_tokens, num_tiles
from titan_llava.flops import (
    document_lengths,
    llm_flops,
    peak_flops,
    projector_flops,
    step_flops,
    vision_flops,
)
from titan_llava.loss import loss_positions
from titan_llava.metrics import MetricsLogger
from titan_llava.models.args import LLAVA_FLAVORS, CLIPVisionArgs, VicunaArgs
from titan_llava.models.llava import LlavaNext
from titan_llava.optim import set_trainable


def test_llm_hand_count():
    a = VicunaArgs(dim=8, n_layers=1, n_heads=2, vocab_size=10, hidden_dim=12, max_seq_len=16)
    # block: wq, wk, wv, wo 4*64 + ffn 3*8*12 = 544; head 8*10 = 80; 5 tokens -> 2*5*624 = 6240.
    # causal pairs 3*4/2 + 2*3/2 = 9 -> attention 4*8*9 = 288 (full: 9 + 4 = 13 pairs -> 416).
    docs = [3, 2]
    assert llm_flops(a, docs, trainable=False, needs_input_grad=False) == 6240 + 288
    assert llm_flops(a, docs, trainable=False, needs_input_grad=True) == 2 * 6240 + 3 * 288
    assert llm_flops(a, docs, trainable=True, needs_input_grad=True) == 3 * 6240 + 3 * 288
    assert llm_flops(a, docs, False, False, causal_halved=False) == 6240 + 416
    assert llm_flops(a, [], True, True) == 0.0
    # The head on 2 positions only (the trainer's logits at loss positions), and with it the last
    # (here the only) block after attention: wq, wk, wv (3*64) at all 5 tokens, wo + ffn
    # (64 + 288) and the head (80) at 2: 2*(5*192 + 2*(352 + 80)) = 3648.
    assert llm_flops(a, docs, False, False, head_tokens=2) == 3648 + 288
    two = VicunaArgs(dim=8, n_layers=2, n_heads=2, vocab_size=10, hidden_dim=12, max_seq_len=16)
    # A second block runs in full: + 2*5*544.
    assert llm_flops(two, docs, False, False, head_tokens=2) == 3648 + 5440 + 2 * 288


def test_vision_and_projector_hand_count():
    v = CLIPVisionArgs(image_size=28, patch_size=14, dim=4, n_layers=3, n_heads=2, hidden_dim=8)
    # 2 built layers, 4 patches, 5 tokens. patch embed 2*4*(3*196*4) = 18816; block matmuls
    # 2*5*(4*16 + 2*4*8) = 1280; attention 4*4*25 = 400.
    assert vision_flops(v, 1, trainable=False) == 18816 + 2 * (1280 + 400)
    assert vision_flops(v, 1, trainable=True) == 2 * 18816 + 2 * 3 * (1280 + 400)
    assert vision_flops(v, 3, trainable=False) == 3 * (18816 + 2 * (1280 + 400))
    # fc1 2*4*4*8 = 256, fc2 2*4*8*8 = 512.
    assert projector_flops(4, 8, 4, 1, trainable=False, vision_trainable=False) == 768
    assert projector_flops(4, 8, 4, 1, trainable=True, vision_trainable=False) == 2 * 256 + 3 * 512
    assert projector_flops(4, 8, 4, 1, trainable=True, vision_trainable=True) == 3 * 768


def _measured(args, trainable, sizes, text_len=5):
    """FlopCounterMode total for forward + backward of one row (math SDPA so attention is counted;
    it computes the full L^2 causal scores -> compare with causal_halved=False)."""
    model = LlavaNext(args)
    set_trainable(model, trainable)
    ids = [1] + list(range(3, 3 + text_len))
    for s in sizes:
        ids += [IMAGE_TOKEN_INDEX] * num_image_tokens(s, args.grid_pinpoints,
                                                     aspect_ratio=args.image_aspect_ratio)
        ids += [7, 8]
    ids = torch.tensor([ids])
    labels = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
    n_tiles = sum(num_tiles(s, args.grid_pinpoints, aspect_ratio=args.image_aspect_ratio)
                  for s in sizes)
    pixels = torch.randn(n_tiles, 3, 336, 336) if sizes else None
    image_sizes = torch.tensor(sizes) if sizes else None
    index, targets = loss_positions(labels)  # the trainer's path: logits at loss positions only
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(ids, pixels, image_sizes, output_index=index)
        torch.nn.functional.cross_entropy(logits.float(), targets).backward()
    return counter.get_total_flops(), ids.shape[1], n_tiles, index.numel()


@pytest.mark.parametrize("trainable, sizes, aspect", [
    (["projector"], [(1000, 200)], "anyres"),  # stage 1: vision 1x, LLM backprop for activations
    (["projector", "llm", "vision"], [(200, 300), (336, 336)], "pad"),  # stage 2
    (["llm"], [(200, 300)], "pad"),
    (["vision"], [(200, 300)], "pad"),
    (["projector", "llm", "vision"], [], "pad"),  # text-only
    (["projector"], [], "pad"),  # text-only with a frozen LLM: nothing backpropagates
])
def test_matches_flop_counter(trainable, sizes, aspect):
    args = dataclasses.replace(copy.deepcopy(LLAVA_FLAVORS["debug"]), image_aspect_ratio=aspect)
    if not sizes and trainable == ["projector"]:
        # The loss then has no grad_fn at all: FLOPs are the forward only.
        model = LlavaNext(args)
        set_trainable(model, trainable)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(torch.tensor([[1, 5, 6, 7]]))
        measured, seq, n_tiles, head = counter.get_total_flops(), 4, 0, None
    else:
        measured, seq, n_tiles, head = _measured(args, trainable, sizes)
        assert 0 < head < seq  # the head ran on fewer positions than the row has
    model_flops = step_flops(args, [seq], n_tiles, trainable, causal_halved=False, head_tokens=head)
    assert model_flops.total == measured
    halved = step_flops(args, [seq], n_tiles, trainable, head_tokens=head)
    assert halved.llm < model_flops.llm and halved.vision == model_flops.vision


def test_document_lengths():
    ids = torch.tensor([[1, 5, -200, 6, 0, 0], [1, 2, 3, 4, 5, 6]])
    assert document_lengths(ids, pad_id=0) == [4, 6]
    docs = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]])
    ids = torch.tensor([[1, 5, 1, 6, 7, 0], [1, 2, 3, 4, 0, 0]])
    assert document_lengths(ids, 0, docs) == [2, 3, 4]  # pad-only documents dropped


def test_peak_flops_cpu_is_none():
    assert peak_flops("cpu") is None


def test_metrics_logger(tmp_path):
    out = io.StringIO()
    ml = MetricsLogger(str(tmp_path), total_steps=100, world_size=2, peak_flops_per_device=1e12,
                       stream=out)
    rec = ml.log(10, loss=2.5, grad_norm=1.5, lr=1e-3, interval_s=4.0, steps_in_interval=10,
                 tokens=8000, text_tokens=2000, image_tokens=6000, samples=40, flops=4e12,
                 data_wait_s=0.25, skipped={"image_missing": 2}, memory_gib=None,
                 data_events={"tokenization_mismatch": 3, "truncated": 1, "truncated_image_dropped": 0})
    ml.log(20, loss=2.0, grad_norm=1.0, lr=9e-4, interval_s=2.0, steps_in_interval=10, tokens=8000,
           text_tokens=2000, image_tokens=6000, samples=40, flops=4e12, data_wait_s=0.1)
    ml.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20]
    assert lines[0] == rec
    assert rec["tokens_per_sec"] == 2000 and rec["tokens_per_sec_per_device"] == 1000
    assert rec["text_tokens_per_sec"] == 500 and rec["image_tokens_per_sec"] == 1500
    assert rec["samples_per_sec"] == 10
    assert rec["mfu"] == 0.5  # 4e12 FLOPs / (4 s x 1e12 x 2 devices)
    assert rec["eta_s"] == pytest.approx(90 * 0.4)
    assert rec["skipped"] == {"image_missing": 2}
    assert rec["data_events"] == {"tokenization_mismatch": 3, "truncated": 1, "truncated_image_dropped": 0}
    assert lines[1]["data_events"] == {}
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_sec", "mfu", "memory_gib",
                "data_wait_s"):
        assert key in lines[1]
    text = out.getvalue().splitlines()
    assert len(text) == 2 and "step 10/100" in text[0] and "eta 0m36s" in text[0]
    assert "skipped 2" in text[0] and "mfu 50.0%" in text[0] and "masked (mismatch) 3" in text[0]
    assert "mismatch" not in text[1]
    # Other ranks write nothing.
    other = tmp_path / "rank1"
    MetricsLogger(str(other), total_steps=1, rank=1).log(
        1, loss=1.0, grad_norm=1.0, lr=1.0, interval_s=1.0, steps_in_interval=1, tokens=1,
        text_tokens=1, image_tokens=0, samples=1, flops=1.0, data_wait_s=0.0)
    assert not other.exists()


def _sample_batches(args, n: int, local_batch_size: int, **loader_kw) -> list:
    """The first `n` micro-batches of the test assets' sample data, in file order."""
    import os

    from titan_llava.data.loader import build_data_loader

    assets = os.path.join(os.path.dirname(__file__), "assets")
    loader = build_data_loader(
        os.path.join(assets, "sample_data", "finetune.json"), os.path.join(assets, "sample_data"),
        os.path.join(assets, "tokenizer", "tokenizer.model"), "vicuna_v1", 2048, local_batch_size,
        shuffle=False, image_size=args.vision.image_size, patch_size=args.vision.patch_size,
        prefetch=0, **loader_kw,
    )  # fmt: skip
    try:
        return [b for _, b in zip(range(n), loader)]
    finally:
        loader.close()


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L4", None),
])
def test_peak_flops_by_device_name(monkeypatch, name, peak):
    # Dense bf16 by NVIDIA's datasheets (the sparsity figures halved); NVL parts are not SXM's.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops("cuda") == peak


def test_step_counts_sum_the_micro_batches_each_by_its_own_rule():
    """Stage 1 (the projector trains): a micro-batch with images backpropagates through the frozen
    LLM, a text-only one does not (its stand-in tile is overhead, not model work). A step's count is
    the sum of its micro-batches' counts, so it does not depend on which micro-batches share a step
    or a rank."""
    from titan_llava.metrics import step_counts

    args = copy.deepcopy(LLAVA_FLAVORS["debug"])
    batches = _sample_batches(args, 20, local_batch_size=1)
    text = next(b for b in batches if b.pixel_values is None)
    image = next(b for b in batches if b.pixel_values is not None)
    pad = 0
    each = {id(b): step_counts([b], pad, args, ["projector"]) for b in (text, image)}
    both = step_counts([text, image], pad, args, ["projector"])
    assert both["flops"] == each[id(text)]["flops"] + each[id(image)]["flops"]
    assert both["tokens"] == each[id(text)]["tokens"] + each[id(image)]["tokens"]
    lengths = document_lengths(text.input_ids, pad, text.document_ids)
    forward_only = step_flops(args, lengths, 0, ["llm"], head_tokens=int(text.loss_index.shape[0]))
    # No tile, no trainable part before the LLM: its forward only (a third of training it).
    assert each[id(text)]["flops"] == pytest.approx(forward_only.llm / 3, rel=0.02)
    assert each[id(text)]["flops"] == step_flops(
        args, lengths, 0, ["projector"], head_tokens=int(text.loss_index.shape[0])
    ).total


@pytest.mark.parametrize("packing", [False, True])
def test_step_counts_count_documents_and_real_tokens_not_rows_or_padding(packing):
    """tokens = non-padding tokens (image tokens included), text_tokens = the rest after image
    tokens, samples = documents (a packed row holds several), over micro-batches with padding."""
    from titan_llava.metrics import step_counts

    args = copy.deepcopy(LLAVA_FLAVORS["debug"])
    batches = _sample_batches(
        args, 3, local_batch_size=2, packing=packing, packing_row_len=4096
    )
    counts = step_counts(batches, 0, args, ["projector"])
    real = sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches)  # a lower bound
    padded = sum(b.input_ids.numel() for b in batches)
    lengths = sum(sum(document_lengths(b.input_ids, 0, b.document_ids)) for b in batches)
    images = sum(int((b.input_ids == IMAGE_TOKEN_INDEX).sum()) for b in batches)
    samples = sum(len(ids) for b in batches for ids in b.sample_ids)
    rows = sum(len(b.sample_ids) for b in batches)
    assert real < counts["tokens"] == lengths < padded  # the micro-batches do hold padding
    assert counts["image_tokens"] == images > 0
    assert counts["text_tokens"] == lengths - images
    assert counts["samples"] == samples
    if packing:
        assert samples > rows
