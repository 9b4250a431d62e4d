"""Data parallelism on CPU (gloo): FSDP2 over 2 ranks and HSDP over 2x2 ranks reproduce the
single-process losses; ranks with different modalities in a step never hang."""

from __future__ import annotations

import json
import os

import pytest

from tests.train.utils import SAMPLE_DATA, hf_init, make_hf_llava, read_metrics, run_train

pytest.importorskip("transformers")

# Identical weights in every run (random init on a CPU mesh depends on the shard layout), fp32,
# 5 steps of 4 samples = the whole 20-sample finetune set, global-token loss normalisation.
COMMON = [
    "--training.steps", "5", "--training.global_batch_size", "4",
    "--training.mixed_precision_param", "float32", "--checkpoint.enable", "false",
    "--training.loss_normalization", "global_tokens",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_llava(str(tmp_path_factory.mktemp("hf") / "llava"))


@pytest.fixture(scope="module")
def single_process(hf_dir, tmp_path_factory):
    dump = str(tmp_path_factory.mktemp("single"))
    run_train(dump, COMMON + ["--training.local_batch_size", "2", *hf_init(hf_dir)])
    return read_metrics(dump)


def _assert_same_losses(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=rel), (ra["step"], key, ra[key], rb[key])
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-12)


def test_fsdp_two_ranks_matches_single_process(hf_dir, single_process, tmp_path):
    dump = str(tmp_path / "fsdp")
    # 2 ranks x 1 micro-batch x 2 rows: the same 4 samples per step as 1 rank x 2 x 2.
    run_train(dump, COMMON + ["--training.local_batch_size", "2", *hf_init(hf_dir)], nproc=2)
    _assert_same_losses(read_metrics(dump), single_process)


def test_hsdp_2x2_matches_single_process(hf_dir, single_process, tmp_path):
    dump = str(tmp_path / "hsdp")
    run_train(
        dump,
        COMMON + [
            "--training.local_batch_size", "1",
            "--parallelism.data_parallel_replicate_degree", "2",
            "--parallelism.data_parallel_shard_degree", "2", *hf_init(hf_dir),
        ],
        nproc=4,
        timeout=400,
    )
    _assert_same_losses(read_metrics(dump), single_process)


@pytest.mark.parametrize("aspect", ["anyres", "pad"])
def test_text_only_rank_beside_multimodal_rank_does_not_hang(tmp_path, aspect):
    """Rank 0 gets only text-only samples, rank 1 only image samples; every part trains, so the
    vision tower's all-gathers and reduce-scatters must run on both ranks in every step."""
    with open(f"{SAMPLE_DATA}/finetune.json") as f:
        samples = json.load(f)
    text = [s for s in samples if "image" not in s][:2]
    image = [s for s in samples if isinstance(s.get("image"), str)][:2]
    assert len(text) == 2 and len(image) == 2
    # No shuffle, one sample per rank per step: rank r takes items r, r+2, ...
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps([text[0], image[0], text[1], image[1]]))
    dump = str(tmp_path / "run")
    run_train(
        dump,
        [
            "--data.path", str(data), "--data.shuffle", "false", "--training.steps", "2",
            "--training.local_batch_size", "1", "--training.global_batch_size", "2",
            "--checkpoint.enable", "false", "--training.trainable", "projector,llm,vision",
            # pad: image_newline gets no gradient from real images; the stand-in must not give it one
            "--model.image_aspect_ratio", aspect,
        ],
        nproc=2,
        timeout=180,  # a hang is a failure, not a stuck suite
    )
    records = read_metrics(dump)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["image_tokens_per_sec"] > 0 for r in records)


def test_skipped_samples_are_summed_over_ranks(tmp_path):
    """A bad sample on rank 1 only shows up in rank 0's metrics.jsonl (counts are all-reduced)."""
    with open(f"{SAMPLE_DATA}/finetune.json") as f:
        samples = json.load(f)
    good = [s for s in samples if isinstance(s.get("image"), str)][:4]
    broken = {**good[1], "id": "broken-1", "image": "no_such_image.jpg"}
    # No shuffle, one sample per rank per step: rank 1 takes items 1, 3, 5 (the broken one is 1).
    data = tmp_path / "data.json"
    data.write_text(json.dumps([good[0], broken, good[2], good[1], good[3], good[0]]))
    dump = str(tmp_path / "run")
    run_train(
        dump,
        [
            "--data.path", str(data), "--data.shuffle", "false", "--training.steps", "2",
            "--training.local_batch_size", "1", "--training.global_batch_size", "2",
            "--checkpoint.enable", "false",
        ],
        nproc=2,
        timeout=180,
    )
    records = read_metrics(dump)
    assert records[-1]["skipped"] == {"image_missing": 1}, records[-1]["skipped"]
    # The skip's warning, with the sample id, is in rank 1's own log file (run_train.sh shows
    # rank 0's output only).
    with open(os.path.join(dump, "logs", "rank1.log")) as f:
        assert "'broken-1'" in f.read()
    with open(os.path.join(dump, "logs", "rank0.log")) as f:
        assert "broken-1" not in f.read()

    # strict: the error is rank 1's alone: one line naming the sample (no traceback), status 2
    # (an input error; torchrun itself reports 1, run_train.sh passes the 2 on).
    proc = run_train(
        str(tmp_path / "strict"),
        [
            "--data.path", str(data), "--data.shuffle", "false", "--training.steps", "2",
            "--training.local_batch_size", "1", "--training.global_batch_size", "2",
            "--checkpoint.enable", "false", "--data.strict", "true",
        ],
        nproc=2,
        timeout=180,
        check=False,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert ("titan_llava.train: error: data.strict: sample 'broken-1': image_missing:" in out
            and "No checkpoint of this run exists" in out), out[-4000:]
    assert "exitcode: 2" in out and "BadSampleError" not in out, out[-4000:]  # no worker traceback
