"""Streaming writer of our LlavaNext tensors as llava-hf safetensors shards (+ index): key mapping,
vocab padding of the embedding / LM head, and the CLIP tensors our model never builds.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from collections.abc import Iterable, Mapping

import torch
from safetensors.torch import save_file

from titan_llava.hf.safetensors_io import INDEX_FILE, SafetensorsCheckpoint
from titan_llava.hf.state_dict_adapter import (
    CLIP_LAYER_KEYS,
    LAYOUTS,
    OUR_LLM,
    detect_layout,
    ours_to_hf,
)
from titan_llava.models.args import CLIPVisionArgs, LlavaNextArgs

EXPORT_LAYOUT = "llava_hf"
VOCAB_KEYS = (OUR_LLM + "tok_embeddings.weight", OUR_LLM + "output.weight")
POST_LAYERNORM_KEYS = ("post_layernorm.weight", "post_layernorm.bias")
_HF_CLIP_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def expected_extra_vision_keys(vision: CLIPVisionArgs) -> list[str]:
    """CLIP keys (relative to `vision_model.`) that HF needs but our tower does not build: the
    layers after the selected one and the post-layernorm head."""
    keys = [
        f"encoder.layers.{i}.{hf}"
        for i in range(vision.n_built_layers, vision.n_layers)
        for hf in CLIP_LAYER_KEYS.values()
    ]
    return keys + list(POST_LAYERNORM_KEYS)


def extra_vision_from_hf(
    directory: str, vision: CLIPVisionArgs
) -> dict[str, torch.Tensor]:
    """The unbuilt CLIP tensors, unchanged, from an HF CLIP or LLaVA-NeXT safetensors directory."""
    ckpt = SafetensorsCheckpoint(directory)
    layout = LAYOUTS[detect_layout(ckpt.keys())]
    if layout.vision is None:
        raise ValueError(
            f"{directory}: a {layout.name!r} checkpoint has no vision tower"
        )
    prefixes = sorted((layout.vision, *layout.vision_alt), key=len, reverse=True)
    wanted = set(expected_extra_vision_keys(vision))
    found: dict[str, torch.Tensor] = {}
    for key in ckpt.keys():
        for prefix in prefixes:  # longest first: "vision_model." wins over ""
            rest = key[len(prefix) :] if key.startswith(prefix) else None
            if rest in wanted and rest not in found:
                found[rest] = ckpt.get(key)
                break
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(
            f"{directory}: the vision tower lacks {len(missing)} tensors the export needs, e.g. "
            f"{missing[:3]} (is it the {vision.n_layers}-layer tower the run started from?)"
        )
    return found


def extra_vision_from_init(
    vision: CLIPVisionArgs, seed: int
) -> dict[str, torch.Tensor]:
    """Deterministic stand-ins for a run that started from random init: our own CLIP init of a
    full-depth tower (seeded), its last layers, and a LayerNorm head (weight 1, bias 0). LLaVA never
    runs these tensors; they exist only so that HF finds every key."""
    from titan_llava.models.clip import CLIPVisionTower

    full = CLIPVisionArgs(**{**vision.__dict__, "select_layer": vision.n_layers})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = CLIPVisionTower(full)
        tower.init_weights()
    out: dict[str, torch.Tensor] = {}
    for i in range(vision.n_built_layers, vision.n_layers):
        for ours, hf in CLIP_LAYER_KEYS.items():
            out[f"encoder.layers.{i}.{hf}"] = tower.state_dict()[
                f"layers.{i}.{ours}"
            ].detach()
    out["post_layernorm.weight"] = torch.ones(vision.dim)
    out["post_layernorm.bias"] = torch.zeros(vision.dim)
    return out


def pad_vocab_rows(weight_VD: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight_VD` with rows appended up to `rows`, each the mean of the existing rows.

    As the reference does for `<pad>`: a new input embedding is the average token, and a new LM-head
    row's logit is the mean of the existing logits, so it can never win a greedy argmax.
    """
    extra = rows - weight_VD.shape[0]
    assert extra >= 0, (weight_VD.shape, rows)
    if extra == 0:
        return weight_VD
    mean_1D = weight_VD.float().mean(dim=0, keepdim=True).to(weight_VD.dtype)
    return torch.cat([weight_VD, mean_1D.expand(extra, -1)], dim=0)


@dataclass
class ExportReport:
    tensors: int = 0
    bytes: int = 0
    shards: list[str] = field(default_factory=list)
    vocab_rows: tuple[int, int] = (0, 0)  # (model rows, exported rows)
    extra_vision_source: str = ""
    notes: list[str] = field(default_factory=list)


_SHARD_NAME_RE = re.compile(r"model-(\d{5}-of-\d{5}|tmp-\d{5})\.safetensors")


class ShardWriter:
    """Buffers tensors up to `max_shard_bytes`, then writes one safetensors shard; `close()` names
    them model-0000i-of-0000n.safetensors and writes the index (HF's sharded format)."""

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._tmp_files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self.removed: list[str] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        assert key not in self._buffer, key
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[key] = tensor.contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        name = f"model-tmp-{len(self._tmp_files):05d}.safetensors"
        save_file(
            self._buffer, os.path.join(self.out_dir, name), metadata={"format": "pt"}
        )
        self._tmp_files.append((name, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        if self._buffer or not self._tmp_files:
            self._flush()
        n = len(self._tmp_files)
        weight_map: dict[str, str] = {}
        names = []
        # safetensors writes its files 0600; the shards get the mode of the export's other files
        # (0666 less the umask), so that whoever may read the config can read the weights.
        umask = os.umask(0)
        os.umask(umask)
        for i, (tmp, keys) in enumerate(self._tmp_files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.chmod(os.path.join(self.out_dir, tmp), 0o666 & ~umask)
            os.replace(
                os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, name)
            )
            weight_map.update(dict.fromkeys(keys, name))
            names.append(name)
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        self.removed = self._remove_stale_shards(set(names))
        return names

    def _remove_stale_shards(self, keep: set[str]) -> list[str]:
        """Delete shards an earlier export left (another shard count, or an interrupted export's
        temporaries): the new index no longer names them, and loaders that glob `*.safetensors`
        would read them. Only this writer's own file names are touched."""
        removed = []
        for name in sorted(os.listdir(self.out_dir)):
            if _SHARD_NAME_RE.fullmatch(name) and name not in keep:
                os.remove(os.path.join(self.out_dir, name))
                removed.append(name)
        return removed


def expected_our_shapes(args: LlavaNextArgs) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of LlavaNext(args), from a meta-device build (no memory)."""
    from titan_llava.models.llava import LlavaNext

    with torch.device("meta"):
        model = LlavaNext(args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_weights(
    our_tensors: Iterable[tuple[str, torch.Tensor]],
    args: LlavaNextArgs,
    out_dir: str,
    dtype: torch.dtype,
    padded_vocab: int,
    extra_vision: Mapping[str, torch.Tensor],
    max_shard_bytes: int,
) -> ExportReport:
    """Map, cast and write every tensor (streamed: one shard buffer in memory at a time)."""
    expected = expected_our_shapes(args)
    report = ExportReport(vocab_rows=(args.llm.vocab_size, padded_vocab))
    writer = ShardWriter(out_dir, max_shard_bytes)
    seen: set[str] = set()
    for key, tensor in our_tensors:
        if key not in expected:
            raise ValueError(
                f"checkpoint tensor {key!r} is not a LlavaNext parameter of these args"
            )
        if key in seen:
            raise ValueError(f"checkpoint tensor {key!r} appears twice")
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {list(tensor.shape)}, the model args give "
                f"{list(expected[key])}"
            )
        seen.add(key)
        tensor = tensor.detach().to(device="cpu", dtype=dtype)
        if key in VOCAB_KEYS:
            tensor = pad_vocab_rows(tensor, padded_vocab)
        writer.add(ours_to_hf(key, EXPORT_LAYOUT), tensor)
        report.tensors += 1
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(
            f"{len(missing)} model tensors missing from the checkpoint, e.g. {missing[:3]}"
        )
    wanted = expected_extra_vision_keys(args.vision)
    if sorted(extra_vision) != sorted(wanted):
        raise ValueError(
            f"extra vision tensors: expected {sorted(wanted)[:4]}..., got {sorted(extra_vision)[:4]}..."
        )
    # Every CLIP layer has the shapes of our layer 0; the head is a LayerNorm over dim.
    hf_to_layer0 = {
        hf: f"vision_tower.layers.0.{ours}" for ours, hf in CLIP_LAYER_KEYS.items()
    }
    vision_prefix = LAYOUTS[EXPORT_LAYOUT].vision
    for rest in wanted:
        tensor = extra_vision[rest]
        m = _HF_CLIP_LAYER_RE.match(rest)
        shape = expected[hf_to_layer0[m.group(2)]] if m else (args.vision.dim,)
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"extra vision tensor {rest!r} has shape {list(tensor.shape)}, expected {list(shape)}"
            )
        writer.add(vision_prefix + rest, tensor.detach().to(device="cpu", dtype=dtype))
        report.tensors += 1
    report.shards = writer.close()
    if writer.removed:
        report.notes.append(
            f"removed {len(writer.removed)} shard(s) of an earlier export in {out_dir}: "
            + ", ".join(writer.removed)
        )
    report.bytes = writer.total_bytes
    return report
