"""Loader: exact resume (packing on/off, workers 0/2, 2 DP ranks, epoch wrap, partly filled buffer),
content against the data contract functions, and state validation."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from titan_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from titan_llava.data.anyres import num_image_tokens, process_image
from titan_llava.data.batch import Batch
from titan_llava.data.conversation import tokenize_conversation
from titan_llava.data.dataset import LlavaDataset
from titan_llava.data.images import load_image
from titan_llava.data.loader import build_data_loader
from titan_llava.data.tokenizer import Tokenizer

ASSETS = os.path.join(os.path.dirname(__file__), "..", "assets")
DATA = os.path.join(ASSETS, "sample_data")
TOKENIZER = os.path.join(ASSETS, "tokenizer", "tokenizer.model")
# A 56-pixel tile (4x4 patches) keeps the real AnyRes geometry at 1/6 scale, so tests stay fast.
TILE = 56
PINPOINTS = [(w * TILE // 336, h * TILE // 336) for w, h in [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]]


_OPEN = []


@pytest.fixture(autouse=True)
def _close_loaders():
    yield
    while _OPEN:
        _OPEN.pop().close()


def make_loader(**overrides):
    kwargs = dict(
        path=os.path.join(DATA, "finetune.json"),
        image_folder=DATA,
        tokenizer=TOKENIZER,
        template="vicuna_v1",
        max_seq_len=400,
        local_batch_size=2,
        seed=3,
        grid_pinpoints=PINPOINTS,
        image_size=TILE,
        prefetch=2,
    )
    kwargs.update(overrides)
    loader = build_data_loader(**kwargs)
    _OPEN.append(loader)
    return loader


def assert_batches_equal(a: Batch, b: Batch) -> None:
    assert a.sample_ids == b.sample_ids
    for name in ("input_ids", "labels", "positions", "document_ids", "pixel_values", "image_sizes"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name


# Packing: greedy 400-token rows, and best-fit rows of 600 tokens (a bigger buffer, out of order).
_PACKING = {"none": {}, "greedy": dict(packing=True, packing_lookahead=1), "best-fit": dict(packing=True, packing_lookahead=4, packing_row_len=600)}


@pytest.mark.parametrize("mode", list(_PACKING))
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact(mode: str, num_workers: int) -> None:
    num_batches = 8
    opts = _PACKING[mode]
    packing = bool(opts)
    for rank in range(2):  # two simulated DP ranks
        ref_loader = make_loader(**opts, num_workers=num_workers, dp_rank=rank, dp_world_size=2)
        it = iter(ref_loader)
        batches, states = [], []
        for _ in range(num_batches):
            batches.append(next(it))
            states.append(ref_loader.state_dict())
        decoded = [json.loads(s[f"dp_rank_{rank}"]) for s in states]
        # The run crosses an epoch wrap, and (packing) stops with samples held in the buffer.
        assert decoded[-1]["sampler"]["epoch"] >= 1
        if packing:
            assert any(d["buffer"] for d in decoded[:-2])
        for k in range(1, num_batches - 1):
            resumed = make_loader(**opts, num_workers=num_workers, dp_rank=rank, dp_world_size=2)
            resumed.load_state_dict(states[k - 1])
            rit = iter(resumed)
            for j in range(k, min(k + 2, num_batches)):
                assert_batches_equal(next(rit), batches[j])
            assert resumed.counters()["batches"] == min(k + 2, num_batches)
        assert ref_loader.counters()["batches"] == num_batches


def test_ranks_see_disjoint_samples() -> None:
    ids = []
    for rank in range(2):
        it = iter(make_loader(dp_rank=rank, dp_world_size=2, local_batch_size=5, prefetch=0))
        ids.append([i for row in next(it).sample_ids + next(it).sample_ids for i in row])
    assert not set(ids[0]) & set(ids[1])
    assert len(set(ids[0]) | set(ids[1])) == 20  # one full epoch of the 20 samples


# At shutdown torchdata's sort thread may still unpickle a tensor whose worker process has exited.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_process_workers_match_inline() -> None:
    a = iter(make_loader(packing=True, num_workers=0))
    b = iter(make_loader(packing=True, num_workers=2, worker_method="process"))
    for _ in range(3):
        assert_batches_equal(next(a), next(b))


def test_batch_content_matches_contract_functions() -> None:
    """Each row equals tokenize_conversation + <image> expansion + AnyRes tiles, computed directly."""
    tok = Tokenizer(TOKENIZER)
    ds = LlavaDataset(os.path.join(DATA, "finetune.json"))
    by_id = {ds.sample_id(ds.read_record(i), i): ds.read_record(i) for i in range(len(ds))}
    it = iter(make_loader(max_seq_len=4096, local_batch_size=4, shuffle=False, prefetch=0))
    seen = 0
    for _ in range(5):  # the whole file, unshuffled
        batch = next(it)
        tiles, sizes, row_lengths = [], [], []
        for r, (sid,) in enumerate(batch.sample_ids):
            record = by_id[sid]
            paths = record.get("image") or []
            paths = [paths] if isinstance(paths, str) else paths
            ids, labels = tokenize_conversation(record["conversations"], tok, "vicuna_v1", bool(paths))
            exp_ids, exp_labels = [], []
            k = 0
            for t, lab in zip(ids, labels):
                if t == IMAGE_TOKEN_INDEX:
                    image = load_image(DATA, paths[k])
                    n = num_image_tokens(image.size, PINPOINTS, TILE)
                    exp_ids += [IMAGE_TOKEN_INDEX] * n
                    exp_labels += [IGNORE_INDEX] * n
                    tiles.append(process_image(image, "anyres", PINPOINTS, TILE))
                    sizes.append(image.size)
                    k += 1
                else:
                    exp_ids.append(t)
                    exp_labels.append(lab)
            n = len(exp_ids)
            row_lengths.append(n)
            assert batch.input_ids[r, :n].tolist() == exp_ids
            assert batch.labels[r, :n].tolist() == exp_labels
            assert batch.positions[r].tolist() == list(range(batch.input_ids.shape[1]))
            assert (batch.input_ids[r, n:] == tok.pad_id).all() and (batch.labels[r, n:] == IGNORE_INDEX).all()
            seen += 1
        assert batch.input_ids.shape[1] == max(row_lengths)  # padded to the longest row
        if tiles:
            assert torch.equal(batch.pixel_values, torch.cat(tiles))
            assert batch.image_sizes.tolist() == [list(s) for s in sizes]
        else:
            assert batch.pixel_values is None and batch.image_sizes is None
        assert batch.num_image_positions == sum(
            num_image_tokens(tuple(s), PINPOINTS, TILE) for s in sizes
        )
    assert seen == 20


def test_world_size_change_and_config_change_raise() -> None:
    loader = make_loader(dp_rank=0, dp_world_size=2)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="dp_world_size=2.*dp_world_size=1"):
        make_loader().load_state_dict(state)
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        make_loader(dp_rank=0, dp_world_size=2, seed=4).load_state_dict(state)


@pytest.mark.parametrize("change, key", [
    (dict(shuffle=False), "shuffle"),
    (dict(local_batch_size=3), "local_batch_size"),
    (dict(max_seq_len=500), "max_seq_len"),
    (dict(group_by_modality_length=True), "modality_lengths_digest"),
])
def test_every_setting_of_the_order_is_refused_when_it_changes(change, key) -> None:
    """Each setting the saved position depends on is named when it differs on resume."""
    loader = make_loader()
    next(iter(loader))
    with pytest.raises(ValueError, match=f"{key}: saved "):
        make_loader(**change).load_state_dict(loader.state_dict())


def test_the_same_records_in_another_order_or_with_other_lengths_are_refused(tmp_path) -> None:
    """A data file of the same length whose records are reordered (the ids digest), or, when
    grouping, whose texts changed length (the grouped order is drawn from the lengths)."""
    with open(os.path.join(DATA, "finetune.json")) as fh:
        records = json.load(fh)
    grouped = dict(group_by_modality_length=True, global_batch_size=2)
    paths = {}
    for name, recs in (("orig", records), ("reversed", records[::-1]),
                       ("longer", [{**r, "conversations": [dict(t) for t in r["conversations"]]} for r in records])):
        paths[name] = tmp_path / f"{name}.json"
        if name == "longer":
            recs[5]["conversations"][-1]["value"] += " and some more words"
        paths[name].write_text(json.dumps(recs))
    loader = make_loader(path=str(paths["orig"]), **grouped)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="sample_ids_digest: saved "):
        make_loader(path=str(paths["reversed"]), **grouped).load_state_dict(state)
    with pytest.raises(ValueError, match="modality_lengths_digest: saved "):
        make_loader(path=str(paths["longer"]), **grouped).load_state_dict(state)
    make_loader(path=str(paths["orig"]), **grouped).load_state_dict(state)  # unchanged: accepted


def test_load_state_dict_after_iterating_is_refused() -> None:
    loader = make_loader()
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(RuntimeError, match="before iterating"):
        loader.load_state_dict(state)


def test_pin_memory_flag_runs_on_cpu() -> None:
    batch = next(iter(make_loader(pin_memory=True)))
    assert batch.input_ids.shape[0] == 2
    if not torch.cuda.is_available():
        assert not batch.input_ids.is_pinned()



def test_packed_rows_longer_than_max_seq_len_hold_the_unpacked_samples() -> None:
    """Best-fit rows of up to 500 tokens with samples truncated at 200: every document equals the
    same sample's unpacked row, positions restart per document, tiles follow document order, each
    batch is padded to its longest row only, and every sample is emitted exactly once."""
    common = dict(max_seq_len=200, shuffle=False, prefetch=0)
    alone: dict[str, Batch] = {}
    it = iter(make_loader(local_batch_size=1, **common))
    for _ in range(20):  # the whole file, one sample per batch (no padding at all)
        batch = next(it)
        alone[batch.sample_ids[0][0]] = batch
    longest_sample = max(b.input_ids.shape[1] for b in alone.values())
    assert 150 < longest_sample <= 200  # some samples are truncated at max_seq_len (256 tokens)

    loader = make_loader(local_batch_size=2, packing=True, packing_row_len=500, packing_lookahead=4, **common)
    packed = iter(loader)
    emitted: list[str] = []
    multi_document_rows = long_rows = 0
    while len(emitted) < 20:
        batch = next(packed)
        width = batch.input_ids.shape[1]
        row_ends, tiles = [], []
        for r, sids in enumerate(batch.sample_ids):
            offset = 0
            for d, sid in enumerate(sids):
                ref = alone[sid]
                n = ref.input_ids.shape[1]
                assert torch.equal(batch.input_ids[r, offset : offset + n], ref.input_ids[0])
                assert torch.equal(batch.labels[r, offset : offset + n], ref.labels[0])
                assert batch.positions[r, offset : offset + n].tolist() == list(range(n))
                assert (batch.document_ids[r, offset : offset + n] == d).all()
                if ref.pixel_values is not None:
                    tiles.append(ref.pixel_values)
                offset += n
            assert offset <= 500
            row_ends.append(offset)
            # Padding: its own document, no labels.
            assert (batch.labels[r, offset:] == IGNORE_INDEX).all()
            assert (batch.document_ids[r, offset:] == len(sids)).all()
            multi_document_rows += len(sids) > 1
            long_rows += offset > 200
            emitted += sids
        assert width == max(row_ends)  # padded to the longest row, not to packing_row_len
        if tiles:
            assert torch.equal(batch.pixel_values, torch.cat(tiles))
    # Nothing lost or repeated: what was emitted plus what the packer holds is exactly the samples
    # pulled so far, in the sampler's (unshuffled, wrapping) order.
    state = json.loads(loader.state_dict()["dp_rank_0"])
    ds = LlavaDataset(os.path.join(DATA, "finetune.json"))
    order = [ds.sample_id(ds.read_record(i % len(ds)), i % len(ds)) for i in range(3 * len(ds))]
    pulled = state["sampler"]["epoch"] * len(ds) + state["sampler"]["position"]
    held = [ds.sample_id(ds.read_record(index), index) for index, _, _ in state["buffer"]]
    assert sorted(emitted + held) == sorted(order[:pulled])
    assert held and emitted[:20] != order[:20]  # the look-ahead did reorder
    assert multi_document_rows and long_rows


def test_packing_settings_are_part_of_the_resume_fingerprint() -> None:
    loader = make_loader(packing=True, packing_lookahead=4)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="packing_lookahead: saved 4, now 1"):
        make_loader(packing=True, packing_lookahead=1).load_state_dict(state)
    with pytest.raises(ValueError, match="packing_row_len: saved 400, now 800"):
        make_loader(packing=True, packing_lookahead=4, packing_row_len=800).load_state_dict(state)
    # A state saved before the look-ahead existed (greedy, max_seq_len rows) resumes as lookahead 1.
    legacy = json.loads(state["dp_rank_0"])
    del legacy["fingerprint"]["packing_lookahead"], legacy["fingerprint"]["packing_row_len"]
    legacy_state = {**state, "dp_rank_0": json.dumps(legacy).encode()}
    make_loader(packing=True, packing_lookahead=1).load_state_dict(legacy_state)
    with pytest.raises(ValueError, match="packing_lookahead: saved 1, now 4"):
        make_loader(packing=True, packing_lookahead=4).load_state_dict(legacy_state)
    with pytest.raises(ValueError, match="packing_row_len .300. must be >= data.max_seq_len .400."):
        make_loader(packing=True, packing_row_len=300)
    with pytest.raises(ValueError, match="packing_lookahead must be >= 1"):
        make_loader(packing=True, packing_lookahead=0)


def test_packed_modality_grouping_uses_the_megabatch_in_samples() -> None:
    with pytest.raises(ValueError, match="data.modality_megabatch"):
        make_loader(packing=True, group_by_modality_length=True, global_batch_size=4)
    loader = make_loader(packing=True, group_by_modality_length=True, global_batch_size=4,
                         modality_megabatch=6)
    sampler = loader._packer.sampler
    assert (sampler.batch_size, sampler.global_batch_size) == (6, 6)  # one rank: the whole megabatch
    batch = next(iter(loader))
    assert batch.input_ids.shape[0] == 2  # still local_batch_size rows
    state = loader.state_dict()
    with pytest.raises(ValueError, match="modality_megabatch: saved 6, now 8"):
        make_loader(packing=True, group_by_modality_length=True, global_batch_size=4,
                    modality_megabatch=8).load_state_dict(state)
    # The rows a step takes are a batch size like any other (the megabatch is in samples).
    with pytest.raises(ValueError, match="rows_per_step: saved 4, now 6.*initial_load_model_only"):
        make_loader(packing=True, group_by_modality_length=True, global_batch_size=6,
                    modality_megabatch=6).load_state_dict(state)
    # Unpacked: the megabatch is the global batch in samples, as in the reference.
    unpacked = make_loader(group_by_modality_length=True, global_batch_size=4)
    assert (unpacked._packer.sampler.batch_size, unpacked._packer.sampler.global_batch_size) == (2, 4)


@pytest.mark.parametrize("mode", list(_PACKING))
def test_epoch_progress_counts_the_samples_handed_out(mode: str, tmp_path) -> None:
    """epoch_progress() = (samples in the batches handed out + samples skipped) / the rank's
    samples per epoch, across an epoch wrap and whatever the packer still holds in its buffer."""
    with open(os.path.join(DATA, "finetune.json")) as fh:
        records = json.load(fh)
    records.insert(3, {"id": "gone", "image": "images/none.jpg", "conversations": records[3]["conversations"]})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))  # 21 samples, one of them bad: 11 a rank (rank 1 wraps one)
    skips = 0
    for rank in range(2):
        loader = make_loader(**_PACKING[mode], path=str(path), dp_rank=rank, dp_world_size=2)
        assert loader.epoch_progress() == 0.0
        it, handed_out, wrapped = iter(loader), 0, False
        for _ in range(9):
            handed_out += sum(len(row) for row in next(it).sample_ids)
            skipped = sum(v for k, v in loader.counters().items() if k.startswith("skipped/"))
            assert loader.epoch_progress() == pytest.approx((handed_out + skipped) / 11, abs=1e-12)
            wrapped |= loader.epoch_progress() > 1
        assert wrapped
        skips += skipped
    assert skips >= 2  # the bad sample, once an epoch, on whichever rank it falls to


def test_packed_modality_grouping_gives_each_rank_a_balanced_share_of_every_megabatch(tmp_path) -> None:
    """With packing, each rank takes one contiguous share of every megabatch, the shares balanced
    by length (the reference's split of a megabatch into per-device batches). Dealt one sample at
    a time, rank 0 got the longest of every 4 and packed fewer samples a step than the others, so
    the ranks drifted apart in the data, megabatch after megabatch."""
    import numpy as np

    rng = np.random.default_rng(0)
    records = []
    for i in range(640):
        words = " ".join(["w"] * int(rng.integers(5, 400)))
        image = {"image": "images/img00.jpg"} if rng.random() < 0.9 else {}
        records.append({"id": f"s{i}", **image, "conversations": [
            {"from": "human", "value": ("<image>\n" if image else "") + words}, {"from": "gpt", "value": "ok"}]})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    world, megabatch = 4, 32
    orders = [make_loader(path=str(path), packing=True, group_by_modality_length=True, global_batch_size=4,
                          modality_megabatch=megabatch, dp_rank=r, dp_world_size=world)._packer.sampler.epoch_indices(0)
              for r in range(world)]
    lengths = np.array([len(r["conversations"][0]["value"].split()) for r in records])
    modality = np.array(["image" in r for r in records])
    share = megabatch // world
    for m in range(len(orders[0]) // share):
        shares = [order[m * share:(m + 1) * share] for order in orders]
        # One megabatch: the ranks' shares are disjoint and all of one modality (except the
        # reference's mixed last megabatch).
        assert len(set(np.concatenate(shares).tolist())) == megabatch
        if m < len(orders[0]) // share - 1:
            assert len(set(modality[np.concatenate(shares)].tolist())) == 1
    means = [lengths[order].mean() for order in orders]
    assert max(means) / min(means) < 1.02, means


def test_data_summary_counts_truncated_samples_and_mismatches(tmp_path) -> None:
    """The metrics' `data_events` come from the loader's counters: samples cut at max_seq_len and
    samples masked whole by the reference's length check, beside the skips."""
    from titan_llava.data.loader import DATA_EVENTS, data_summary

    short = {"id": "ok", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    long = {"id": "long", "conversations": [{"from": "human", "value": "Count."},
                                            {"from": "gpt", "value": " ".join(["one"] * 600)}]}
    # A `</s>` inside an answer breaks the reference's round arithmetic: the sample is masked.
    mismatch = {"id": "mm", "conversations": [{"from": "human", "value": "Hi?"},
                                              {"from": "gpt", "value": "Yes.</s>USER: more"}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([short, long, mismatch]))
    loader = make_loader(path=str(path), local_batch_size=3, shuffle=False)  # max_seq_len 400
    next(iter(loader))
    summary = data_summary(loader.counters())
    assert summary["data_events"] == {"tokenization_mismatch": 1, "truncated": 1, "truncated_image_dropped": 0}
    assert set(summary["data_events"]) == set(DATA_EVENTS)
    assert summary["skipped"] == {}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_unexpected_error_in_a_worker_names_the_sample(num_workers, monkeypatch) -> None:
    """An exception that is not a known kind of bad input (a bug) stops the run, as it should, but
    names the sample: a resumed run reaches the same sample again."""
    from titan_llava.data.processing import SampleProcessor

    plain = SampleProcessor.process

    def buggy(self, record, ref, sample_id):
        if ref.index == 3:
            raise TypeError("a bug")
        return plain(self, record, ref, sample_id)

    monkeypatch.setattr(SampleProcessor, "process", buggy)
    loader = make_loader(shuffle=False, num_workers=num_workers, local_batch_size=2)
    with open(os.path.join(DATA, "finetune.json")) as fh:
        sample_id = json.load(fh)[3]["id"]
    with pytest.raises(RuntimeError, match=rf"processing sample '{sample_id}' \(index 3 of .* TypeError: a bug"):
        it = iter(loader)
        for _ in range(4):
            next(it)


def test_a_loader_left_open_does_not_abort_the_interpreter_at_exit(tmp_path) -> None:
    """A script that iterates a loader and exits without close() (an error path, a tool) exits
    normally: the loader stops its threads at interpreter exit (they used to be stopped inside
    torch's C++ code, "terminate called without an active exception", status 134)."""
    import subprocess
    import sys

    with open(os.path.join(DATA, "finetune.json")) as fh:
        records = json.load(fh)
    data = tmp_path / "data.json"  # enough samples that the workers are busy at exit
    data.write_text(json.dumps([{**records[i % len(records)], "id": f"s{i}"} for i in range(200)]))
    script = tmp_path / "open.py"
    script.write_text(
        "import logging\n"
        "logging.disable(logging.WARNING)\n"
        "from tests.data.test_loader import make_loader\n"
        f"loader = make_loader(path={str(data)!r}, num_workers=2)\n"
        "it = iter(loader)\n"
        "for _ in range(3):\n"
        "    next(it)\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(script)], cwd=repo, capture_output=True, text=True,
                              timeout=120, check=False, env={**os.environ, "PYTHONPATH": repo})
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_grouped_packing_state_saved_before_megabatch_shares_resumes_with_the_old_dealing(caplog) -> None:
    """A run in flight that saved its data state when packed grouping dealt each megabatch one
    sample at a time resumes in that order (warned), bit for bit, instead of being refused."""
    opts = dict(packing=True, group_by_modality_length=True, global_batch_size=4, modality_megabatch=4,
                dp_rank=1, dp_world_size=2, shuffle=True)
    old = make_loader(**opts)
    old._packer.sampler.batch_size = 1  # the old code's dealing
    it = iter(old)
    next(it), next(it)
    state = old.state_dict()
    expected = [next(it) for _ in range(3)]
    entry = json.loads(state["dp_rank_1"])
    for key in ("megabatch_share", "rows_per_step", "sample_ids_digest", "modality_lengths_digest"):
        entry["fingerprint"].pop(key)  # keys the old code did not write
    state = {**state, "dp_rank_1": json.dumps(entry).encode()}
    resumed = make_loader(**opts)
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict(state)
    assert "one sample at a time" in caplog.text
    assert resumed._packer.sampler.batch_size == 1
    rit = iter(resumed)
    for batch in expected:
        assert_batches_equal(next(rit), batch)


def test_a_refused_legacy_state_leaves_the_loader_as_it_was() -> None:
    """A state from before megabatch shares whose settings also differ is refused, and the
    refusal changes nothing: the loader keeps its own dealing and fingerprint (a caller that
    catches the error and goes on from the start gets this run's order)."""
    opts = dict(packing=True, group_by_modality_length=True, global_batch_size=4, modality_megabatch=4,
                dp_rank=1, dp_world_size=2, shuffle=True)
    state = make_loader(**opts).state_dict()
    entry = json.loads(state["dp_rank_1"])
    for key in ("megabatch_share", "rows_per_step", "sample_ids_digest", "modality_lengths_digest"):
        entry["fingerprint"].pop(key)
    entry["fingerprint"]["seed"] = entry["fingerprint"]["seed"] + 1  # a changed setting too
    state = {**state, "dp_rank_1": json.dumps(entry).encode()}
    loader = make_loader(**opts)
    fingerprint, batch_size = dict(loader.fingerprint), loader._packer.sampler.batch_size
    with pytest.raises(ValueError, match="seed: saved"):
        loader.load_state_dict(state)
    assert loader.fingerprint == fingerprint and loader._packer.sampler.batch_size == batch_size
    assert batch_size != 1
