"""Lazy reading of Hugging Face safetensors checkpoint directories (single file or sharded index).

Tensors are read one at a time with `safe_open`, so loading a 7B checkpoint never holds more than
one tensor of it in memory. Pickled `.bin` checkpoints are refused (never `torch.load`).
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """Key -> file index of one checkpoint directory; tensors are read on demand."""

    def __init__(self, directory: str):
        self.directory = directory
        self._key_to_file = _index_directory(directory)
        self._handles: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def _handle(self, filename: str):
        if filename not in self._handles:
            self._handles[filename] = safe_open(
                os.path.join(self.directory, filename), framework="pt", device="cpu"
            )
        return self._handles[filename]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape without reading the data."""
        return tuple(self._handle(self._key_to_file[key]).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (CPU, checkpoint dtype)."""
        if key not in self._key_to_file:
            raise ValueError(f"key {key!r} is not in the checkpoint {self.directory}")
        return self._handle(self._key_to_file[key]).get_tensor(key)

    def get_rows(self, key: str, n_rows: int) -> torch.Tensor:
        """Read only the first `n_rows` rows of a tensor (for vocab-padded embeddings)."""
        return self._handle(self._key_to_file[key]).get_slice(key)[:n_rows]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) pairs, file by file, one tensor in memory at a time."""
        for key in self._key_to_file:
            yield key, self.get(key)

    def close(self) -> None:
        self._handles.clear()


def _index_directory(directory: str) -> dict[str, str]:
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint directory {directory!r} does not exist")
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index_path}: not a valid safetensors index ({e})") from e
        for filename in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(directory, filename)):
                raise ValueError(f"{index_path} names shard {filename!r}, which does not exist")
        return dict(weight_map)
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        with safe_open(single, framework="pt", device="cpu") as f:
            return {key: SINGLE_FILE for key in f.keys()}
    pickles = [n for n in sorted(os.listdir(directory)) if n.endswith((".bin", ".pt", ".pth"))]
    if pickles:
        raise ValueError(
            f"{directory} holds only pickled weights ({', '.join(pickles[:3])}); titan_llava reads "
            "safetensors only. Convert first, e.g. `AutoModel.from_pretrained(dir)."
            "save_pretrained(out, safe_serialization=True)` with transformers."
        )
    raise ValueError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def read_config(directory: str) -> dict:
    """The directory's config.json as a dict (ValueError naming the file if absent or invalid)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from e
