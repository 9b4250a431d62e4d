"""FLOP model of one training step of LLaVA-NeXT, counting what is really computed per stage
(frozen parts run forward only, or forward + input-gradient backward), and MFU's peak table.

Conventions: a matmul of [m, k] x [k, n] is 2*m*k*n FLOPs; its backward is 1x that for the input
gradient plus 1x for the weight gradient (each only when autograd needs it); the attention core
(QK^T and PV) has no weights and its backward is 2x its forward. Attention is counted over the
token pairs really attended: causal pairs L*(L+1)/2 per document (what flash kernels compute) unless
`causal_halved=False` (the PaLM convention, L^2). Activation-checkpoint recomputation is NOT counted
(model FLOPs, not hardware FLOPs). Norms, activations, RoPE, softmax and the embedding lookup are
ignored (< 1%).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from titan_llava.models.args import CLIPVisionArgs, LlavaNextArgs, VicunaArgs

# Dense bf16 peak per device (no sparsity), by substring of torch.cuda.get_device_name().
# First match wins: the specific variants come before the plain names.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
]


def peak_flops(device: torch.device | str) -> float | None:
    """bf16 dense peak FLOP/s of `device`; None on CPU or an unknown GPU (MFU is then not reported)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


def _mult(weights_trainable: bool, needs_input_grad: bool) -> int:
    """Forward + the backward matmuls autograd really runs for a weight matmul."""
    return 1 + int(needs_input_grad) + int(weights_trainable)


def llm_matmul_params(a: VicunaArgs) -> tuple[int, int]:
    """(matmul parameters of one block, of the output head)."""
    block = llm_qkv_params(a) + a.dim * a.dim + 3 * a.dim * a.hidden_dim  # + wo, w1, w2, w3
    return block, a.dim * a.vocab_size


def llm_qkv_params(a: VicunaArgs) -> int:
    """wq, wk, wv of one block: the part of the last block that runs on every position when the
    head runs on some only (the rest of that block runs on the head's positions)."""
    return a.dim * a.dim + 2 * a.dim * a.kv_heads * a.head_dim


def attention_flops(
    width: int, doc_lengths: Sequence[int], backward: bool, causal_halved: bool = True
) -> int:
    """One layer's attention core over documents of the given lengths: QK^T and PV, 2 FLOPs per
    multiply-add over `width` (n_heads * head_dim) for each attended pair (causal: L(L+1)/2 per
    document, else L^2); the backward (input gradients) twice the forward."""
    if causal_halved:
        pairs = sum(n * (n + 1) // 2 for n in doc_lengths)
    else:
        pairs = sum(n * n for n in doc_lengths)
    return 4 * width * pairs * (3 if backward else 1)


def llm_flops(
    a: VicunaArgs,
    doc_lengths: Sequence[int],
    trainable: bool,
    needs_input_grad: bool,
    causal_halved: bool = True,
    head_tokens: int | None = None,
) -> float:
    """LLM FLOPs over documents of the given lengths (tokens incl. image tokens). `head_tokens`:
    positions the output head runs on (the trainer: only those with a target), and with it the
    last block after its attention; None = all."""
    tokens = sum(doc_lengths)
    if tokens == 0:
        return 0.0
    block_params, head_params = llm_matmul_params(a)
    backward = trainable or needs_input_grad
    head = tokens if head_tokens is None else head_tokens
    qkv = llm_qkv_params(a)
    # Every block at every position, but the last block's wo and feed-forward at the head's only.
    per_token = tokens * ((a.n_layers - 1) * block_params + qkv)
    per_head = head * (block_params - qkv + head_params)
    weights = 2 * (per_token + per_head) * _mult(trainable, needs_input_grad)
    attention = a.n_layers * attention_flops(a.dim, doc_lengths, backward, causal_halved)
    return float(weights + attention)


def vision_flops(a: CLIPVisionArgs, num_tiles: int, trainable: bool) -> float:
    """CLIP tower FLOPs for `num_tiles` tiles, selected layers only. Nothing upstream of the tower
    trains, so a frozen tower runs forward only."""
    if num_tiles == 0:
        return 0.0
    mult = _mult(trainable, needs_input_grad=trainable)  # input grad only feeds its own weights
    patches = a.num_patches
    seq = patches + 1  # class token
    n = a.n_built_layers
    patch_embed = 2 * num_tiles * patches * (3 * a.patch_size**2 * a.dim)
    block = 2 * num_tiles * seq * (4 * a.dim * a.dim + 2 * a.dim * a.hidden_dim)
    attention = 4 * a.dim * seq * seq * num_tiles
    # The patch embedding's input is the pixels: no input gradient ever, only its weight grad.
    pe_mult = 1 + int(trainable)
    return float(patch_embed * pe_mult + n * (block * mult + attention * (3 if trainable else 1)))


def projector_flops(
    vision_dim: int, llm_dim: int, num_patches: int, num_tiles: int, trainable: bool,
    vision_trainable: bool,
) -> float:
    """mlp2x_gelu over every patch feature of every tile (unpadding happens after it)."""
    tokens = num_tiles * num_patches
    fc1 = 2 * tokens * vision_dim * llm_dim * _mult(trainable, needs_input_grad=vision_trainable)
    fc2 = 2 * tokens * llm_dim * llm_dim * _mult(trainable, trainable or vision_trainable)
    return float(fc1 + fc2)


@dataclass
class StepFlops:
    llm: float
    vision: float
    projector: float

    @property
    def total(self) -> float:
        return self.llm + self.vision + self.projector


def step_flops(
    args: LlavaNextArgs,
    doc_lengths: Sequence[int],
    num_tiles: int,
    trainable: Sequence[str],
    causal_halved: bool = True,
    head_tokens: int | None = None,
) -> StepFlops:
    """FLOPs of forward + backward over one rank's step (all its micro-batches).

    doc_lengths: length of every real document (sample) in tokens incl. image tokens, padding
    excluded; num_tiles: vision tiles of the step; head_tokens: positions the LLM head runs on
    (None = every document token). trainable: parts that train ("llm", "vision",
    "projector"). A frozen LLM still backpropagates (2x its weight FLOPs + attention backward) when
    a trainable part feeds its image features; stage 1 (projector only) thus costs the vision
    tower 1x, the projector ~3x, the LLM 2x weights + 3x attention."""
    bad = set(trainable) - {"llm", "vision", "projector"}
    assert not bad, f"unknown trainable parts {bad}"
    vis_t, proj_t, llm_t = "vision" in trainable, "projector" in trainable, "llm" in trainable
    # Inside the LLM every block needs its input gradient when the LLM itself trains (earlier
    # blocks and the embedding), or when image features from a trainable part enter it.
    llm_input_grad = llm_t or (num_tiles > 0 and (vis_t or proj_t))
    return StepFlops(
        llm=llm_flops(args.llm, doc_lengths, llm_t, llm_input_grad, causal_halved, head_tokens),
        vision=vision_flops(args.vision, num_tiles, vis_t),
        projector=projector_flops(
            args.vision.dim, args.llm.dim, args.vision.num_patches, num_tiles, proj_t, vis_t
        ),
    )


def document_lengths(
    input_ids_BS: torch.Tensor, pad_id: int, document_ids_BS: torch.Tensor | None = None
) -> list[int]:
    """Real document lengths of a micro-batch (host sync; call once per log interval or step).

    Unpacked rows: one document per row, right-padded with pad_id. Packed rows: runs of equal
    document_ids; runs made only of pad_id are padding and dropped."""
    ids = input_ids_BS.cpu()
    if document_ids_BS is None:
        real = ids != pad_id
        # Right padding: the length is one past the last real token.
        idx = torch.arange(ids.shape[1]).expand_as(ids)
        return [int(x) for x in torch.where(real, idx + 1, 0).amax(dim=1).tolist()]
    docs = document_ids_BS.cpu()
    lengths = []
    for row_ids, row_docs in zip(ids, docs):
        _, counts = torch.unique_consecutive(row_docs, return_counts=True)
        for seg_ids in torch.split(row_ids, counts.tolist()):
            if bool((seg_ids != pad_id).any()):
                lengths.append(int(seg_ids.numel()))
    return lengths
