"""Byte-offset index over LLaVA JSON / JSONL: exact records, reference length stats, bad files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from titan_llava.data import dataset as dataset_mod
from titan_llava.data.dataset import LlavaDataset
from titan_llava.data.errors import BadSampleError

RECORDS = [
    {"id": "a", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\nHi  there"}]},
    {"id": 7, "conversations": [{"from": "human", "value": 'q with "quotes", [brackets] {braces} \\ ,'}]},
    {"conversations": [{"from": "gpt", "value": "ünïcödé 日本語 text \u2028 and emoji \U0001F600"}]},
    {"id": "d", "image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "]},{\"x\":"}]},
]


def _reference_modality_lengths(records: list[dict]) -> list[int]:
    """LLaVA's LazySupervisedDataset.modality_lengths, written as the reference does."""
    out = []
    for sample in records:
        cur_len = sum(len(conv["value"].split()) for conv in sample["conversations"])
        out.append(cur_len if "image" in sample else -cur_len)
    return out


@pytest.mark.parametrize("style", ["compact", "indent", "ascii", "bom"])
def test_json_list_index_roundtrip(tmp_path, style: str) -> None:
    path = tmp_path / "data.json"
    if style == "compact":
        text = json.dumps(RECORDS, ensure_ascii=False, separators=(",", ":"))
    elif style == "indent":
        text = json.dumps(RECORDS, ensure_ascii=False, indent=2)
    elif style == "ascii":
        text = json.dumps(RECORDS, ensure_ascii=True)
    else:
        text = "\ufeff  \n" + json.dumps(RECORDS, ensure_ascii=False) + "\n\n"
    path.write_text(text, encoding="utf-8")
    ds = LlavaDataset(str(path))
    assert len(ds) == len(RECORDS)
    assert [ds.read_record(i) for i in range(len(ds))] == RECORDS
    assert ds.modality_lengths.tolist() == _reference_modality_lengths(RECORDS)
    assert ds.has_image.tolist() == [True, False, False, True]
    assert ds.index_nbytes == 16 * len(RECORDS)
    assert [ds.sample_id(ds.read_record(i), i) for i in range(4)] == ["a", "7", "2", "d"]


def test_json_list_across_chunk_boundaries(tmp_path, monkeypatch) -> None:
    # Tiny chunks force every element, string and separator to straddle refills.
    monkeypatch.setattr(dataset_mod, "_CHUNK_BYTES", 7)
    records = RECORDS * 5 + [{"id": "big", "conversations": [{"from": "human", "value": "w " * 500}]}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    ds = LlavaDataset(str(path))
    assert [ds.read_record(i) for i in range(len(ds))] == records
    assert ds.modality_lengths.tolist() == _reference_modality_lengths(records)


@pytest.mark.parametrize("number", ["1.5", "-2.5e-3", "7E+2", "10"])
@pytest.mark.parametrize("chunk", [3, 4, 5, 6, 7, 8, 9, 10, 11, 13])
def test_number_elements_split_by_a_chunk_index_as_one_element(tmp_path, monkeypatch, number, chunk):
    """A (malformed) number element that a read chunk splits after a prefix that parses on its
    own ("1" | ".5", "-2.5" | "e-3") is still one element: json.load's count, whatever the offset."""
    monkeypatch.setattr(dataset_mod, "_CHUNK_BYTES", chunk)
    for pad in range(chunk):
        path = tmp_path / f"data{pad}.json"
        path.write_text("[" + " " * pad + number + ", {\"id\": \"a\"}, " + number + "]")
        ds = LlavaDataset(str(path))
        assert len(ds) == len(json.loads(path.read_text())) == 3, (pad, number)
        assert ds.read_record(1) == {"id": "a"}


def test_jsonl_index_and_malformed_line(tmp_path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS]
    lines.insert(2, "{not json")
    lines.insert(3, "")  # blank lines are not samples
    lines.append("[1, 2]")  # valid JSON, but not an object
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = LlavaDataset(str(path))
    assert len(ds) == 6
    assert ds.read_record(0) == RECORDS[0] and ds.read_record(3) == RECORDS[2]
    with pytest.raises(BadSampleError) as e:
        ds.read_record(2)
    assert e.value.reason == "malformed_record"
    with pytest.raises(BadSampleError, match="expected an object"):
        ds.read_record(5)
    assert ds.modality_lengths[2] == -1  # unparseable: no words, kept as text-only until processed


def test_malformed_json_list_names_file_and_offset(tmp_path) -> None:
    path = tmp_path / "bad.json"
    good = json.dumps(RECORDS[0])
    path.write_text(f"[{good}, {{\"id\": \"x\" \"oops\"}}]")
    with pytest.raises(ValueError, match=r"bad.json.*byte %d" % (len(good) + 3)):
        LlavaDataset(str(path))
    path.write_text(f"[{good}, {good}")
    with pytest.raises(ValueError, match="bad.json"):
        LlavaDataset(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        LlavaDataset(str(tmp_path / "missing.json"))


def test_shipped_sample_data(assets_dir) -> None:
    for name in ("pretrain.json", "finetune.json"):
        path = os.path.join(assets_dir, "sample_data", name)
        with open(path, encoding="utf-8") as fh:
            records = json.load(fh)
        ds = LlavaDataset(path)
        assert [ds.read_record(i) for i in range(len(ds))] == records
        assert ds.modality_lengths.tolist() == _reference_modality_lengths(records)
        assert np.all(ds.modality_lengths != 0)


def test_pickle_reopens_file(tmp_path) -> None:
    import pickle

    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS))
    ds = LlavaDataset(str(path))
    ds.read_record(0)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.read_record(3) == RECORDS[3]
