"""Vicuna logits vs transformers' LlamaForCausalLM (fp32, tiny random configs)."""

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tests.models.hf_reference import convert, llama_body_key, llama_config, randomize_
from titan_llava.models.args import VicunaArgs
from titan_llava.models.vicuna import Vicuna, apply_rope


def _pair(args: VicunaArgs) -> tuple[Vicuna, LlamaForCausalLM]:
    hf = LlamaForCausalLM(llama_config(args)).eval()
    hf.config._attn_implementation = "eager"  # the plain-math reference path
    randomize_(hf)
    ours = Vicuna(args)
    sd = convert(
        hf.state_dict(),
        lambda k: "output.weight" if k == "lm_head.weight" else llama_body_key(k.removeprefix("model.")),
    )
    missing, unexpected = ours.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return ours.eval(), hf


@pytest.mark.parametrize(
    "args",
    [
        VicunaArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, hidden_dim=172, max_seq_len=256),
        # GQA and a non-default theta/eps, so neither can be silently hard-coded.
        VicunaArgs(
            dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=96,
            norm_eps=1e-6, rope_theta=5000.0, max_seq_len=256,
        ),
    ],
    ids=["mha", "gqa"],
)
def test_logits_match_llama(args: VicunaArgs) -> None:
    ours, hf = _pair(args)
    tokens = torch.randint(0, args.vocab_size, (2, 37))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        got = ours(tokens)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    # From embeddings is the same computation.
    with torch.no_grad():
        got_h = ours(h_BSD=ours.tok_embeddings(tokens))
    assert torch.equal(got_h, got)


def test_logits_match_llama_with_positions() -> None:
    args = VicunaArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, hidden_dim=172, max_seq_len=256)
    ours, hf = _pair(args)
    tokens = torch.randint(0, args.vocab_size, (2, 30))
    # Row 0: offset positions; row 1: restarts (as in a packed row, but plain causal attention).
    positions = torch.stack(
        [torch.arange(30) + 101, torch.cat([torch.arange(12), torch.arange(18)])]
    )
    with torch.no_grad():
        ref = hf(input_ids=tokens, position_ids=positions).logits
        got = ours(tokens, positions=positions)
        default = ours(tokens)
    assert (got - ref).abs().max().item() <= 1e-4
    assert (got - default).abs().max().item() > 1e-3  # positions really reach RoPE


def test_logits_at_selected_positions_match_llama() -> None:
    """output_index (the trainer's loss positions) gives transformers' logits at those positions."""
    args = VicunaArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, hidden_dim=172, max_seq_len=256)
    ours, hf = _pair(args)
    tokens = torch.randint(0, args.vocab_size, (2, 30))
    index = torch.tensor([0, 7, 29, 30, 45, 59])  # flat positions, both rows
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits.flatten(0, 1)[index]
        got = ours(tokens, output_index=index)
        none = ours(tokens, output_index=index[:0])
    assert got.shape == (6, args.vocab_size) and none.shape == (0, args.vocab_size)
    assert (got - ref).abs().max().item() <= 1e-4


def test_gradients_at_selected_positions_match_llama() -> None:
    """With output_index the last block runs after attention on those rows only: the loss and
    every gradient still match transformers' full model indexed at the same positions (the
    embeddings', a first-block weight's, and the last block's partly skipped weights)."""
    args = VicunaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=172,
                      max_seq_len=256)
    ours, hf = _pair(args)
    tokens = torch.randint(0, args.vocab_size, (2, 30))
    index = torch.tensor([3, 7, 29, 31, 45, 59])
    targets = torch.randint(0, args.vocab_size, (6,))
    ours_loss = torch.nn.functional.cross_entropy(ours(tokens, output_index=index), targets)
    hf_logits = hf(input_ids=tokens).logits.flatten(0, 1)[index]
    hf_loss = torch.nn.functional.cross_entropy(hf_logits, targets)
    ours_loss.backward()
    hf_loss.backward()
    assert abs(ours_loss.item() - hf_loss.item()) <= 1e-5
    hf_params = dict(hf.named_parameters())
    pairs = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "layers.0.attention.wq.weight": "model.layers.0.self_attn.q_proj.weight",
        "layers.1.attention.wq.weight": "model.layers.1.self_attn.q_proj.weight",
        "layers.1.attention.wk.weight": "model.layers.1.self_attn.k_proj.weight",
        "layers.1.attention.wo.weight": "model.layers.1.self_attn.o_proj.weight",
        "layers.1.feed_forward.w2.weight": "model.layers.1.mlp.down_proj.weight",
        "layers.1.ffn_norm.weight": "model.layers.1.post_attention_layernorm.weight",
        "output.weight": "lm_head.weight",
    }
    ours_params = dict(ours.named_parameters())
    for mine, theirs in pairs.items():
        g, ref = ours_params[mine].grad, hf_params[theirs].grad
        assert ref.abs().max() > 0, theirs
        assert (g - ref).abs().max().item() <= 1e-5, mine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_llamas_bit_for_bit(dtype: torch.dtype) -> None:
    """Our RoPE (the model's tables gathered by position, rotate-half form) against transformers'
    rotary embedding and apply_rotary_pos_emb: the same forward and the same eager gradient, bit
    for bit, in fp32 and bf16."""
    args = VicunaArgs(dim=64, n_layers=1, n_heads=4, vocab_size=16, hidden_dim=32,
                      rope_theta=5000.0, max_seq_len=4096)
    ours = Vicuna(args)
    # Packed-row restarts and positions far into the table.
    positions = torch.stack([torch.cat([torch.arange(20), torch.arange(27)]), torch.arange(47) + 3000])
    q = torch.randn(2, 47, args.n_heads, args.head_dim, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 47, args.n_heads, args.head_dim, dtype=dtype, requires_grad=True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    cos, sin = LlamaRotaryEmbedding(llama_config(args))(q, positions)  # [B, S, D] in q's dtype
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    ref_q, ref_k = ref_q.transpose(1, 2), ref_k.transpose(1, 2)
    ref_grads = torch.autograd.grad((ref_q, ref_k), (q, k), (gq, gk))

    cos_ours, sin_ours = ours.rope_cos[positions], ours.rope_sin[positions]
    got_q, got_k = apply_rope(q, cos_ours, sin_ours), apply_rope(k, cos_ours, sin_ours)
    got_grads = torch.autograd.grad((got_q, got_k), (q, k), (gq, gk))
    assert not torch.equal(got_q, q)  # it rotates
    assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)
    for got, ref in zip(got_grads, ref_grads):
        assert torch.equal(got, ref)


def test_forward_argument_errors() -> None:
    ours = Vicuna(VicunaArgs(dim=32, n_layers=1, n_heads=2, vocab_size=16, hidden_dim=32))
    with pytest.raises(ValueError, match="exactly one"):
        ours()
    with pytest.raises(ValueError, match="exactly one"):
        ours(torch.zeros(1, 2, dtype=torch.long), h_BSD=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="attn_backend"):
        Vicuna(VicunaArgs(dim=32, n_layers=1, n_heads=2, vocab_size=16, hidden_dim=32), "xformers")


def test_bad_args_raise() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        VicunaArgs(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        VicunaArgs(dim=64, n_heads=4, n_kv_heads=3)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_half_precision_is_llamas_bit_for_bit(weight_dtype: torch.dtype) -> None:
    """bf16 activations with fp32 weights (eager) or bf16 weights (FSDP2 bf16 compute): the same
    output and dtype as transformers' LlamaRMSNorm (normalise in fp32, cast, then the weight)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from titan_llava.models.vicuna import RMSNorm

    ours, ref = RMSNorm(64, 1e-5), LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        w = 1.0 + 0.3 * torch.randn(64)
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    ours.to(weight_dtype), ref.to(weight_dtype)
    x = (3 * torch.randn(4, 33, 64)).bfloat16()
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
