"""Bad samples through the whole pipeline: skipped (never substituted), counted, logged with the id;
counters survive resume; strict mode raises."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal

import pytest

from titan_llava.data.errors import BadSampleError
from titan_llava.data.loader import build_data_loader

ASSETS = os.path.join(os.path.dirname(__file__), "..", "assets")
TOKENIZER = os.path.join(ASSETS, "tokenizer", "tokenizer.model")
TILE = 56
PINPOINTS = [(56, 112), (112, 56), (112, 112), (168, 56), (56, 168)]


def _good(i: int) -> dict:
    return {
        "id": f"good-{i}",
        "image": "ok.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": f"Shapes number {i}."},
        ],
    }


def _turns(*pairs):
    return [{"from": r, "value": v} for r, v in pairs]


BAD = {
    "image_missing": {"image": "nope.jpg", "conversations": _turns(("human", "<image>\nHi"), ("gpt", "Yo"))},
    "image_corrupt": {"image": "corrupt.jpg", "conversations": _turns(("human", "<image>\nHi"), ("gpt", "Yo"))},
    "image_path_escape": {"image": "../outside.jpg", "conversations": _turns(("human", "<image>\nHi"), ("gpt", "Yo"))},
    "image_count_mismatch": {
        "image": "ok.jpg",
        "conversations": _turns(("human", "<image>\n<image>\nTwo?"), ("gpt", "One.")),
    },
    "bad_conversation": {"conversations": _turns(("human", "a"), ("human", "b"))},  # roles not alternating
    # Ends on a question: the reference would mask all of it (its length check fails).
    "dangling_human_turn": {"conversations": _turns(("human", "Hello?"), ("gpt", "Hi."), ("human", "And?"))},
    "malformed_record": {"image": 5, "conversations": _turns(("human", "<image>\nHi"), ("gpt", "Yo"))},
    # Valid JSON ("\ud800" escapes) but not valid Unicode: no tokenizer or file name takes it.
    "surrogate_text": {"conversations": _turns(("human", "Hi \ud800"), ("gpt", "Yo"))},
    "surrogate_path": {"image": "\ud800.jpg", "conversations": _turns(("human", "<image>\nHi"), ("gpt", "Yo"))},
    # A named pipe (opening it for reading would wait for a writer forever).
    "not_a_regular_file": {"image": "fifo.jpg", "conversations": _turns(("human", "<image>\nHi"), ("gpt", "Yo"))},
}
# A dangling human turn is a malformed conversation for the conversation module.
EXPECTED_REASON = {
    **{k: k for k in BAD}, "dangling_human_turn": "bad_conversation", "surrogate_text": "bad_conversation",
    "surrogate_path": "image_path_invalid", "not_a_regular_file": "image_unreadable",
}


def _make_dataset(tmp_path, kind: str) -> str:
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(os.path.join(ASSETS, "sample_data", "images", "img05.png"), folder / "ok.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 3)
    os.mkfifo(folder / "fifo.jpg")
    shutil.copy(os.path.join(ASSETS, "sample_data", "images", "img08.png"), tmp_path / "outside.jpg")
    records = [_good(0), _good(1), _good(2), {"id": f"bad-{kind}", **BAD[kind]}, _good(3), _good(4), _good(5)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


def _loader(path: str, folder: str, **kw):
    args = dict(
        path=path, image_folder=folder, tokenizer=TOKENIZER, template="vicuna_v1", max_seq_len=512,
        local_batch_size=2, shuffle=False, grid_pinpoints=PINPOINTS, image_size=TILE, prefetch=0,
    )
    args.update(kw)
    return build_data_loader(**args)


@pytest.fixture
def hang_guard():
    """Fail (not hang) a test whose main thread blocks for a minute, e.g. opening a FIFO."""
    def fail(signum, frame):
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_sample_is_skipped_counted_logged(tmp_path, caplog, hang_guard, kind: str) -> None:
    path = _make_dataset(tmp_path, kind)
    folder = str(tmp_path / "images")
    loader = _loader(path, folder)
    it = iter(loader)
    with caplog.at_level(logging.WARNING, logger="titan_llava.data"):
        batches = [next(it) for _ in range(3)]
    ids = [b.sample_ids for b in batches]
    # The bad sample (file index 3) is gone and nothing replaces it: the batch after it holds the
    # NEXT samples of the order, then the stream wraps into epoch 1.
    assert ids[0] == [["good-0"], ["good-1"]]
    assert ids[1] == [["good-2"], ["good-3"]]
    assert ids[2] == [["good-4"], ["good-5"]]
    reason = EXPECTED_REASON[kind]
    assert loader.skip_counts() == {reason: 1}
    assert any(f"bad-{kind}" in r.getMessage() and reason in r.getMessage() for r in caplog.records)

    # The counters are part of the state: a resumed loader continues counting from them.
    state = loader.state_dict()
    resumed = _loader(path, folder)
    resumed.load_state_dict(state)
    rit = iter(resumed)
    assert resumed.skip_counts() == {reason: 1}
    next(rit)  # epoch 1: good-0, good-1
    next(rit)  # good-2, (bad skipped again), good-3
    assert resumed.skip_counts() == {reason: 2}
    assert resumed.counters()["samples"] == 10


@pytest.mark.parametrize("kind", ["image_missing", "bad_conversation"])
def test_strict_mode_raises_with_sample_id(tmp_path, kind: str) -> None:
    path = _make_dataset(tmp_path, kind)
    loader = _loader(path, str(tmp_path / "images"), strict=True, prefetch=2)
    it = iter(loader)
    next(it)
    with pytest.raises(BadSampleError, match=f"bad-{kind}") as err:
        next(it)
    assert err.value.reason == EXPECTED_REASON[kind]
    assert err.value.sample_id == f"bad-{kind}"
    loader.close()


def test_truncation_inside_an_image_drops_the_image(tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(os.path.join(ASSETS, "sample_data", "images", "img00.jpg"), folder / "a.jpg")
    record = {
        "id": "long",
        "image": "a.jpg",
        "conversations": _turns(("human", "A fairly long question before the picture <image>"), ("gpt", "Ok.")),
    }
    path = tmp_path / "d.json"
    path.write_text(json.dumps([record]))
    full = next(iter(_loader(str(path), str(folder), local_batch_size=1, max_seq_len=4096)))
    start = int((full.input_ids[0] == -200).nonzero()[0])
    cut_inside = start + 5
    loader = _loader(str(path), str(folder), local_batch_size=1, max_seq_len=cut_inside)
    batch = next(iter(loader))
    # Cut moved back to the image start: the image and everything after it are gone.
    assert batch.input_ids.shape[1] == start
    assert batch.pixel_values is None and batch.image_sizes is None
    assert (batch.input_ids == -200).sum() == 0
    assert loader.counters()["truncated"] == 1 and loader.counters()["truncated_image_dropped"] == 1


def test_modality_grouped_batches_stay_single_modality_after_a_skip(tmp_path) -> None:
    """Unpacked modality grouping: the sampler deals single-modality batches; a skipped sample
    leaves its batch one row short rather than pulling in the next batch's first sample (which
    would shift every later batch and mix modalities). Resuming across the short batch is exact."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(os.path.join(ASSETS, "sample_data", "images", "img05.png"), folder / "ok.jpg")
    text = [{"id": f"text-{i}", "conversations": _turns(("human", "Say"), ("gpt", "word " * (1 + i % 5)))}
            for i in range(12)]
    images = [_good(i) for i in range(11)] + [{"id": "bad-image", **BAD["image_missing"]}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(images + text))
    kw = dict(shuffle=True, seed=1, group_by_modality_length=True, global_batch_size=4)
    loader = _loader(str(path), str(folder), **kw)
    it = iter(loader)
    batches, states = [], []
    for _ in range(24):  # two epochs of 12 batches: the bad sample is met twice
        batches.append(next(it))
        states.append(loader.state_dict())
    kinds = [{s.split("-")[0] for row in b.sample_ids for s in row} for b in batches]
    assert all(k in ({"good"}, {"text"}) for k in kinds), kinds
    short = [i for i, b in enumerate(batches) if len(b.sample_ids) == 1]
    assert len(short) == 2 and loader.skip_counts() == {"image_missing": 2}, short
    assert sum(len(b.sample_ids) for b in batches) == 46
    k = short[0]  # resume from the state before the short batch, and from the one after it
    assert k > 0
    for start in (k, k + 1):
        resumed = _loader(str(path), str(folder), **kw)
        resumed.load_state_dict(states[start - 1])
        rit = iter(resumed)
        for j in range(start, start + 3):
            assert next(rit).sample_ids == batches[j].sample_ids


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_dataset_with_no_usable_sample_is_an_error_not_an_endless_loop(tmp_path, hang_guard,
                                                                          num_workers) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": f"x{i}", **BAD["image_missing"]} for i in range(5)]))
    loader = _loader(str(path), str(folder), num_workers=num_workers)
    try:
        with pytest.raises(ValueError, match=r"none of the 5 samples in a row .* could be used; "
                                             r"skipped so far: \{'image_missing': 5\}"):
            next(iter(loader))
    finally:
        loader.close()
