"""Optimizer groups vs HF Trainer's weight-decay rule, freezing, per-part lr, and the LR schedule vs
transformers.get_cosine_schedule_with_warmup (exact)."""

import copy

import pytest
import torch
from transformers import Trainer, get_cosine_schedule_with_warmup

from titan_llava.config import load_config
from titan_llava.models.args import LLAVA_FLAVORS
from titan_llava.models.llava import LlavaNext
from titan_llava.optim import (
    build_lr_scheduler,
    build_optimizer,
    count_parameters,
    no_decay_parameter_names,
    part_of,
    set_trainable,
)


@pytest.fixture(scope="module")
def model():
    return LlavaNext(copy.deepcopy(LLAVA_FLAVORS["debug"]))


def _cfg(*argv):
    cfg = load_config(list(argv))
    cfg.validate()
    return cfg


def test_no_decay_matches_hf_trainer(model):
    names = {n for n, _ in model.named_parameters()}
    hf_decay = set(Trainer.get_decay_parameter_names(None, model))
    assert no_decay_parameter_names(model) == names - hf_decay
    # Sanity on what the rule means for this model: norms and biases only.
    nd = no_decay_parameter_names(model)
    assert "language_model.norm.weight" in nd and "vision_tower.pre_norm.bias" in nd
    assert "vision_tower.layers.0.norm1.weight" in nd
    assert "projector.linear_1.bias" in nd
    for decayed in ("vision_tower.class_embedding", "image_newline",
                    "language_model.tok_embeddings.weight", "vision_tower.position_embedding.weight"):
        assert decayed not in nd


def test_groups_per_part_lr_and_decay(model):
    m = copy.deepcopy(model)
    set_trainable(m, ["projector", "llm", "vision"])
    cfg = _cfg("--optimizer.lr", "1e-3", "--optimizer.vision_lr", "2e-6",
               "--optimizer.llm_lr", "2e-5", "--optimizer.weight_decay", "0.1")
    opt = build_optimizer(m, cfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"llm", "llm_no_decay", "vision", "vision_no_decay",
                            "projector", "projector_no_decay"}
    assert by_name["vision"]["lr"] == 2e-6 and by_name["llm"]["lr"] == 2e-5
    assert by_name["projector"]["lr"] == 1e-3
    assert by_name["llm"]["weight_decay"] == 0.1 and by_name["llm_no_decay"]["weight_decay"] == 0.0
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in m.parameters()}  # every parameter exactly once
    assert sum(len(g["params"]) for g in opt.param_groups) == len(ids)
    names = {id(p): n for n, p in m.named_parameters()}
    for g in opt.param_groups:
        part = g["name"].removesuffix("_no_decay")
        assert all(part_of(names[id(p)]) == part for p in g["params"])
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]  # CPU: foreach


def test_frozen_parts_get_no_group_and_no_state(model):
    m = copy.deepcopy(model)
    set_trainable(m, ["projector"])
    opt = build_optimizer(m, _cfg())
    assert {g["name"] for g in opt.param_groups} == {"projector", "projector_no_decay"}
    counts = count_parameters(m)
    assert counts["llm"]["trainable"] == counts["vision"]["trainable"] == counts["projector"]["frozen"] == 0
    assert counts["projector"]["trainable"] == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert counts["llm"]["frozen"] == sum(p.numel() for p in m.language_model.parameters())
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"projector.linear_1.weight", "projector.linear_1.bias",
                         "projector.linear_2.weight", "projector.linear_2.bias", "image_newline"}
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.step()
    stateful = {n for n, p in m.named_parameters() if p in opt.state}
    assert stateful == trainable


@pytest.mark.parametrize("steps, argv", [
    (2181, ["--lr_scheduler.warmup_ratio", "0.03"]),
    (100, ["--lr_scheduler.warmup_ratio", "0.03"]),
    (7, ["--lr_scheduler.warmup_ratio", "0.0"]),
    (10, ["--lr_scheduler.warmup_steps", "10"]),
    (33, ["--lr_scheduler.warmup_steps", "5"]),
])
def test_schedule_matches_hf_exactly(steps, argv):
    cfg = _cfg("--training.steps", str(steps), "--optimizer.lr", "2e-5",
               "--optimizer.vision_lr", "2e-6", *argv)
    warmup = cfg.warmup_steps()
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    ours_opt = torch.optim.AdamW([{"params": [p1], "lr": 2e-5}, {"params": [p2], "lr": 2e-6}])
    hf_opt = torch.optim.AdamW([{"params": [p1], "lr": 2e-5}, {"params": [p2], "lr": 2e-6}])
    ours = build_lr_scheduler(ours_opt, cfg)
    hf = get_cosine_schedule_with_warmup(hf_opt, warmup, steps)
    for _ in range(steps + 2):
        assert ours.get_last_lr() == hf.get_last_lr()  # exact float equality
        ours_opt.step(), hf_opt.step()
        ours.step(), hf.step()


def test_schedule_min_lr_and_resume():
    cfg = _cfg("--training.steps", "20", "--lr_scheduler.warmup_steps", "4",
               "--lr_scheduler.min_lr_ratio", "0.1", "--optimizer.lr", "1.0")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_lr_scheduler(opt, cfg)
    lrs = []
    for _ in range(21):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[4] == 1.0 and abs(lrs[20] - 0.1) < 1e-12
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone decay after warmup
    # Resume: a fresh scheduler loading step-7 state continues identically.
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s1 = build_lr_scheduler(opt2, cfg)
    for _ in range(7):
        opt2.step()
        s1.step()
    state = s1.state_dict()
    opt3 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s2 = build_lr_scheduler(opt3, cfg)
    s2.load_state_dict(state)
    opt3.load_state_dict(opt2.state_dict())
    for i in range(7, 21):
        assert s2.get_last_lr()[0] == lrs[i]
        opt3.step()
        s2.step()


def test_min_lr_schedule_matches_hf_exactly():
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    steps, warmup, ratio = 30, 4, 0.1
    cfg = _cfg("--training.steps", str(steps), "--lr_scheduler.warmup_steps", str(warmup),
               "--lr_scheduler.min_lr_ratio", str(ratio), "--optimizer.lr", "2e-5")
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    ours_opt = torch.optim.AdamW([p1], lr=2e-5)
    hf_opt = torch.optim.AdamW([p2], lr=2e-5)
    ours = build_lr_scheduler(ours_opt, cfg)
    hf = get_cosine_with_min_lr_schedule_with_warmup(hf_opt, warmup, steps, min_lr_rate=ratio)
    for _ in range(steps + 1):
        assert ours.get_last_lr() == pytest.approx(hf.get_last_lr(), rel=1e-12, abs=0)
        ours_opt.step(), hf_opt.step()
        ours.step(), hf.step()


def test_optimizer_uses_configured_betas_and_eps(model):
    m = copy.deepcopy(model)
    set_trainable(m, ["projector"])
    opt = build_optimizer(m, _cfg("--optimizer.betas", "0.8,0.95", "--optimizer.eps", "1e-6"))
    for g in opt.param_groups:
        assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6


def test_warmup_ratio_rounds_up_like_hf_trainer():
    # HF Trainer.get_warmup_steps: ceil(warmup_ratio * steps); 0.03 * 2181 = 65.43 -> 66.
    assert _cfg("--training.steps", "2181", "--lr_scheduler.warmup_ratio", "0.03").warmup_steps() == 66


@pytest.mark.parametrize("max_norm", [0.5, 0.0])
def test_trainer_update_clips_to_max_norm(max_norm):
    """Trainer._update: the optimizer sees gradients clipped to training.max_norm (0: not
    clipped); the logged norm is the norm before clipping."""
    from types import SimpleNamespace

    from titan_llava.trainer import Trainer

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5
    opt = torch.optim.SGD([p], lr=1.0)
    staged = {}
    stub = SimpleNamespace(
        optimizer=opt,
        lr_scheduler=SimpleNamespace(step=lambda: None),
        checkpointer=SimpleNamespace(sigterm_received=False),
        device=torch.device("cpu"),
        world_size=1,
        cfg=SimpleNamespace(training=SimpleNamespace(max_norm=max_norm)),
        step_check=SimpleNamespace(stage=lambda record, loss, stop, norm: staged.update(norm=norm)),
    )
    Trainer._update(stub, torch.tensor(1.0), None)
    assert staged["norm"].item() == pytest.approx(5.0)
    expected = 0.5 if max_norm > 0 else 5.0
    assert p.detach().norm().item() == pytest.approx(expected, rel=1e-5)
