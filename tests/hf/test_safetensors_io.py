"""Reading safetensors checkpoint directories: single file, sharded index, refusal of pickles."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from titan_llava.hf.safetensors_io import INDEX_FILE, SafetensorsCheckpoint, read_config


def test_single_and_sharded_hold_the_same_tensors(hf_dirs):
    single = SafetensorsCheckpoint(hf_dirs["llava"])
    sharded = SafetensorsCheckpoint(hf_dirs["llava_sharded"])
    assert os.path.isfile(os.path.join(hf_dirs["llava_sharded"], INDEX_FILE))
    with open(os.path.join(hf_dirs["llava_sharded"], INDEX_FILE)) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1  # really sharded
    assert sorted(single.keys()) == sorted(sharded.keys())
    with safe_open(os.path.join(hf_dirs["llava"], "model.safetensors"), "pt") as f:
        for key in f.keys():
            ref = f.get_tensor(key)
            assert torch.equal(single.get(key), ref)
            assert torch.equal(sharded.get(key), ref)
            assert sharded.shape(key) == tuple(ref.shape)
    rows = sharded.get_rows("language_model.lm_head.weight", 7)
    assert torch.equal(rows, single.get("language_model.lm_head.weight")[:7])
    assert dict(sharded.items()).keys() == set(sharded.keys())


def test_pickle_only_directory_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors"):
        SafetensorsCheckpoint(str(tmp_path))


def test_missing_things_raise(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        SafetensorsCheckpoint(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="neither"):
        SafetensorsCheckpoint(str(tmp_path))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(ValueError, match="shard-1.safetensors"):
        SafetensorsCheckpoint(str(tmp_path))
    with pytest.raises(ValueError, match="config.json"):
        read_config(str(tmp_path))


def test_unknown_key(hf_dirs):
    with pytest.raises(ValueError, match="not.a.key"):
        SafetensorsCheckpoint(hf_dirs["llama"]).get("not.a.key")
