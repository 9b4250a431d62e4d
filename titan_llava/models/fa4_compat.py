"""flash-attention 4's kernels with the return values torch's FA4 glue unpacks.

torch's FA4 route (`torch.nn.attention._fa4`, torch 2.11 to 2.13 at least) imports a module and
calls its `_flash_attn_fwd` / `_flash_attn_bwd`, unpacking exactly `out, lse` and `dq, dk, dv`.
flash-attention 4 (PyPI `flash-attn-4`, module `flash_attn.cute.interface`) returned those two
up to 4.0.0b18, four values from 4.0.0b19 and five from 4.0.0b33 (out and lse first each time);
its backward returns a fourth value (the sink's gradient) when a learnable sink is given. With
a newer release torch's own route fails on its first call ("too many values to unpack").

`flash_impl.activate` hands torch this module in place of `flash_attn.cute.interface`: the same
kernels, called with the same arguments, keeping the values torch expects. Importing it imports
flash-attention 4, so a missing package fails at activation, where the trainer reports it.
"""

from __future__ import annotations

from flash_attn.cute import interface as _fa4

# What torch's FA4 glue unpacks from each call.
FWD_VALUES = ("out", "lse")
BWD_VALUES = ("dq", "dk", "dv")


def _first(result, names: tuple[str, ...], fn: str):
    if not isinstance(result, tuple) or len(result) < len(names):
        got = len(result) if isinstance(result, tuple) else type(result).__name__
        raise RuntimeError(f"flash_attn.cute.interface.{fn} returned {got}, expected at least "
                           f"{len(names)} values ({', '.join(names)} first)")
    return result[: len(names)]


def _flash_attn_fwd(*args, **kwargs):
    return _first(_fa4._flash_attn_fwd(*args, **kwargs), FWD_VALUES, "_flash_attn_fwd")


def _flash_attn_bwd(*args, **kwargs):
    return _first(_fa4._flash_attn_bwd(*args, **kwargs), BWD_VALUES, "_flash_attn_bwd")
