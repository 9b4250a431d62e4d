"""Loss: token CE vs transformers' ForCausalLMLoss, step normalisation over micro-batches and
(simulated) DP ranks, and logits at the loss positions only vs all logits (values and gradients)."""

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from titan_llava.constants import IGNORE_INDEX
from titan_llava.loss import (
    count_valid_tokens,
    cross_entropy_sum,
    cross_entropy_sum_at,
    global_valid_tokens,
    loss_positions,
    normalize_loss,
)

V, D = 37, 8


def _labels(b, s, p_ignore=0.4):
    labels = torch.randint(0, V, (b, s))
    return labels.masked_fill(torch.rand(b, s) < p_ignore, IGNORE_INDEX)


def test_sum_and_mean_match_hf():
    logits = torch.randn(3, 11, V, dtype=torch.float64)
    labels = _labels(3, 11)
    s, n = cross_entropy_sum(logits, labels)
    hf_sum = ForCausalLMLoss(logits, labels, V, num_items_in_batch=torch.tensor(1.0))
    hf_mean = ForCausalLMLoss(logits, labels, V)
    assert n.item() == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert s.dtype == torch.float64  # fp32/fp64 logits keep their precision; HF computes in fp32
    torch.testing.assert_close(s, hf_sum.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s / n, hf_mean.double(), rtol=1e-6, atol=1e-6)
    # bf16 logits are upcast before the softmax, as HF does.
    s16, _ = cross_entropy_sum(logits.bfloat16(), labels)
    assert s16.dtype == torch.float32
    torch.testing.assert_close(s16, ForCausalLMLoss(logits.bfloat16(), labels, V,
                                                    num_items_in_batch=torch.tensor(1.0)))


def test_document_boundary_targets_ignored():
    labels = torch.tensor([[5, 6, 7, 8, 9, 10]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert count_valid_tokens(labels).item() == 5
    assert count_valid_tokens(labels, docs).item() == 3  # targets 8 and 10 start new documents
    logits = torch.randn(1, 6, V)
    s, n = cross_entropy_sum(logits, labels, docs)
    ref = sum(torch.nn.functional.cross_entropy(logits[0, i], labels[0, i + 1], reduction="sum")
              for i in (0, 1, 3))
    torch.testing.assert_close(s, ref)
    assert n.item() == 3


def _accumulated_grad(microbatches, mode, dp_degree=1, global_tokens=None):
    """Grad of W after running every micro-batch through logits = x @ W with normalize_loss."""
    w = torch.randn(D, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w.requires_grad_(True)
    for x, labels in microbatches:
        s, n = cross_entropy_sum(x @ w, labels)
        normalize_loss(s, n, mode, global_tokens=global_tokens,
                       grad_accum_steps=len(microbatches), dp_degree=dp_degree).backward()
    return w.grad


def _microbatches(k, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        s = 5 + 3 * i  # different lengths and valid counts per micro-batch
        labels = torch.randint(0, V, (2, s), generator=g)
        labels = labels.masked_fill(torch.rand(2, s, generator=g) < 0.2 * (i + 1), IGNORE_INDEX)
        out.append((torch.randn(2, s, D, dtype=torch.float64, generator=g), labels))
    return out


def _reference_grad(fn):
    w = torch.randn(D, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w.requires_grad_(True)
    fn(w).backward()
    return w.grad


def test_global_tokens_over_microbatches_and_ranks():
    ranks = [_microbatches(3, seed=10), _microbatches(3, seed=20)]
    total = sum(count_valid_tokens(lab) for mbs in ranks for _, lab in mbs)
    # Single process: global_valid_tokens is the plain sum over the micro-batches.
    assert global_valid_tokens([lab for _, lab in ranks[0]]) == sum(
        count_valid_tokens(lab) for _, lab in ranks[0])
    # Each rank backprops its own micro-batches; FSDP averages over the 2 ranks.
    grads = [_accumulated_grad(mbs, "global_tokens", dp_degree=2, global_tokens=total) for mbs in ranks]
    ours = (grads[0] + grads[1]) / 2

    def reference(w):  # HF ForCausalLMLoss with num_items_in_batch = all tokens of the step
        return sum(ForCausalLMLoss(x @ w, lab, V, num_items_in_batch=total)
                   for mbs in ranks for x, lab in mbs)

    torch.testing.assert_close(ours, _reference_grad(reference), rtol=1e-5, atol=1e-7)  # reference runs in fp32


def test_per_microbatch_is_hf_mean_of_means():
    ranks = [_microbatches(3, seed=30), _microbatches(3, seed=40)]
    grads = [_accumulated_grad(mbs, "per_microbatch", dp_degree=2) for mbs in ranks]
    ours = (grads[0] + grads[1]) / 2

    def reference(w):  # HF Trainer: loss / grad_accum per micro-batch, DDP mean over ranks
        per_rank = [sum(ForCausalLMLoss(x @ w, lab, V) / 3 for x, lab in mbs) for mbs in ranks]
        return sum(per_rank) / 2

    torch.testing.assert_close(ours, _reference_grad(reference), rtol=1e-5, atol=1e-7)  # reference runs in fp32


def test_logged_loss_is_the_step_loss():
    mbs = _microbatches(3, seed=50)
    total = global_valid_tokens([lab for _, lab in mbs])
    w = torch.randn(D, V, dtype=torch.float64)
    logged = sum(normalize_loss(*cross_entropy_sum(x @ w, lab), "global_tokens", global_tokens=total)
                 for x, lab in mbs)
    ref = sum(ForCausalLMLoss(x @ w, lab, V, num_items_in_batch=total) for x, lab in mbs)
    torch.testing.assert_close(logged, ref.double(), rtol=1e-6, atol=1e-6)


def _at_positions_vs_plain(b, s, docs=None, p_ignore=0.4, dtype=torch.float32):
    """Logits at loss_positions only (what the trainer computes) vs all logits + cross_entropy_sum:
    same sum, count and gradients."""
    h = torch.randn(b, s, D, dtype=dtype, requires_grad=True)
    w = torch.randn(V, D, dtype=dtype, requires_grad=True)
    labels = _labels(b, s, p_ignore)
    s1, n1 = cross_entropy_sum(h @ w.t(), labels, docs)
    g1 = torch.autograd.grad(s1, (h, w))
    index, targets = loss_positions(labels, docs)
    if docs is None:  # the selected positions are exactly those whose next label is learned
        next_labels = torch.cat([labels[:, 1:], torch.full((b, 1), IGNORE_INDEX)], dim=1).flatten()
        assert torch.equal(next_labels[index], targets)
        assert (next_labels[index] != IGNORE_INDEX).all() and index.numel() == (next_labels != IGNORE_INDEX).sum()
    s2, n2 = cross_entropy_sum_at(h.flatten(0, 1).index_select(0, index) @ w.t(), targets)
    g2 = torch.autograd.grad(s2, (h, w))
    assert n1.item() == n2.item() == index.numel()
    torch.testing.assert_close(s2, s1, rtol=1e-6, atol=1e-5)
    for a, b_ in zip(g2, g1):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-6)
    return s2


def test_logits_at_loss_positions_equal_plain():
    _at_positions_vs_plain(2, 33)
    _at_positions_vs_plain(3, 10, p_ignore=0.9)
    # Packed: targets across a document boundary are not learned, so those positions are skipped.
    docs = torch.tensor([[0] * 5 + [1] * 6 + [2] * 4])
    _at_positions_vs_plain(1, 15, docs=docs, p_ignore=0.0)
    labels = torch.arange(1, 16)[None]
    index, targets = loss_positions(labels, docs)
    assert index.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9, 11, 12, 13]
    assert targets.tolist() == [2, 3, 4, 5, 7, 8, 9, 10, 11, 13, 14, 15]


def test_logits_at_loss_positions_with_nothing_to_learn():
    s = _at_positions_vs_plain(2, 9, p_ignore=1.1)
    assert s.item() == 0.0


def test_microbatch_without_targets_contributes_zero():
    """normalize_loss' promise: no valid target -> 0 (not 0/0 = NaN), in both modes."""
    logits = torch.randn(0, V, requires_grad=True)
    s, n = cross_entropy_sum_at(logits, torch.zeros(0, dtype=torch.long))
    for mode in ("per_microbatch", "global_tokens"):
        loss = normalize_loss(s, n, mode, global_tokens=torch.tensor(0), grad_accum_steps=2)
        assert loss.item() == 0.0


def test_loss_at_positions_upcasts_half_precision_logits():
    """bf16 logits from the head (FSDP2 bf16 compute): the CE is taken in fp32, as HF does."""
    logits = (4 * torch.randn(64, V)).bfloat16()
    targets = torch.randint(0, V, (64,))
    s, n = cross_entropy_sum_at(logits, targets)
    assert s.dtype == torch.float32 and n.item() == 64
    assert torch.equal(s, torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))


def test_global_valid_tokens_honours_document_ids():
    """The step's denominator counts the same targets the packed rows' loss sums."""
    labels = torch.tensor([[5, 6, 7, 8, 9, 10]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert global_valid_tokens([labels, labels], [docs, None]).item() == 3 + 5
